"""Smoke run of bench/planner_latency.py on the shipped bundle (no timing asserts)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_planner_latency_prints_every_row():
    result = subprocess.run([sys.executable, "bench/planner_latency.py", "--bundle", "policies/cartpole_mb",
                             "--steps", "15", "--run", "/nonexistent"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(result.stdout)
    assert set(doc["results"]) == {"ours_adapter", "ours_planner_1iter", "ours_planner_1iter_stepped", "ort_floor",
                                   "ort_floor_stepped"}
    assert any("pytorch_mppi skipped" in note for note in doc["notes"])  # no training run here: said, not hidden
    for row in doc["results"].values():
        assert row["n"] == 5 and all(math.isfinite(row[k]) and row[k] > 0 for k in ("p50_ms", "p99_ms"))
