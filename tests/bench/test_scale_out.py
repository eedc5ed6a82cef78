"""bench/scale_out.py from a fresh clone at a tiny budget: Ray (started by the bench, 1 worker) against this
process on the eval grid and the adversary's grading, with the results checked equal (no timing asserts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.integration
def test_scale_out_bench_measures_ray_against_this_process(tmp_path: Path) -> None:
    # HOME: the Ray the bench starts writes its default auth token to ~/.ray; the test leaves the user's home alone
    result = subprocess.run([sys.executable, "bench/scale_out.py", "--grid", "2", "--params", "pole_length",
                             "--samples", "8", "--horizon", "4", "--population", "2", "--set", "planner.samples=8",
                             "--set", "planner.horizon=4", "--noop-jobs", "5", "--workers", "1"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    assert set(doc["configurations"]) == {"local", "ray_w1"}
    ray = doc["configurations"]["ray_w1"]
    assert ray["identical"] is True
    assert doc["eval_grid"]["tasks"] == 2 and doc["jobs"] == {"eval_grid": 4, "adversary_grading": 2}
    for key in ("eval_grid_speedup", "adversary_grading_speedup", "throughput_ms_per_job", "round_trip_ms",
                "cold_start_s"):
        assert ray[key] > 0, key
