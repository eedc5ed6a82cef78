"""Smoke test of bench/env_steps.py: it runs, prints one JSON document, and every figure is a real rate.

No timing asserts: speeds depend on the machine; only the structure of the output is checked.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "env_steps.py"


@pytest.mark.slow
def test_env_steps_quick_prints_valid_json() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--families", "cartpole_swingup"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # stdout holds the JSON document and nothing else

    assert doc["benchmark"] == "env_steps"
    assert doc["machine"]["cpu_count"] >= 1
    assert doc["config"]["families"] == ["cartpole_swingup"]
    assert doc["config"]["repeats"] == 1
    assert doc["notes"]

    rows = doc["results"]
    seen = {(r["kind"], r["mode"]) for r in rows}
    assert seen == {("ours", "single"), ("ours", "sync"), ("ours", "async"), ("floor", "single"),
                    ("peer", "single"), ("peer", "sync"), ("peer", "async")}
    for row in rows:
        assert row["name"] and row["num_envs"] == (1 if row["mode"] == "single" else doc["config"]["num_envs"])
        stats = row["steps_per_s"]
        assert set(stats) == {"median", "min", "max"}
        for value in (*stats.values(), *row["per_repeat"]):
            assert isinstance(value, float) and math.isfinite(value) and value > 0, row
        assert len(row["per_repeat"]) == doc["config"]["repeats"]

    ratio = doc["ratios"]["cartpole_swingup"]["ours_vs_raw_mujoco"]
    assert math.isfinite(ratio) and ratio > 0
