"""bench/mbmpo_inner_step.py: it runs on the shipped meta_policy bundle at a tiny budget, every setting has a gain
per task, the robot's own step (the bundle's pooled size and step size) is flagged; another kind and bad sizes are
refused."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/mbmpo_inner_step.py", *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_every_setting_reports_a_gain_per_task():
    result = bench("--tasks", "2", "--episodes", "4", "--pooled", "1", "4", "--step-sizes", "0.01", "0.05")
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(result.stdout)
    assert [(s["pooled_episodes"], s["step_size"]) for s in doc["settings"]] == [(1, 0.01), (1, 0.05), (4, 0.01),
                                                                                  (4, 0.05)]
    # The step the bundle's adapter takes (the shipped bundle pools 4 episodes at 0.01) is flagged, and only it.
    assert (doc["bundle_episodes_per_step"], doc["bundle_step_size"]) == (4, 0.01)
    assert [s["robot_step"] for s in doc["settings"]] == [False, False, True, False]
    for setting in doc["settings"]:
        assert len(setting["per_task"]) == 2 and setting["tasks_raised"] in (0, 1, 2)
        gains = [t["gain"] for t in setting["per_task"]]
        assert all(math.isfinite(g) for g in gains)
        assert setting["mean_gain"] == pytest.approx(sum(gains) / 2)
        # Every setting's policies differ from the meta-policy, so their returns do too.
        assert [t["return"] for t in setting["per_task"]] != doc["meta_policy"]["per_task"]


def test_another_kind_and_sizes_that_do_not_divide_are_refused():
    other = bench("--bundle", "policies/cartpole_mb")
    assert other.returncode == 2 and "'model_based' bundle" in other.stderr
    sizes = bench("--episodes", "4", "--pooled", "3")
    assert sizes.returncode == 2 and "--pooled [3]" in sizes.stderr
