"""Smoke run of bench/replay_verdict.py: a tiny calibration, one log per group, each with a verdict."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_replay_verdict_calls_every_log_within_or_outside():
    result = subprocess.run([sys.executable, "bench/replay_verdict.py", "--per-group", "1", "--steps", "40",
                             "--calibration-episodes", "8", "--effect", "delay=1"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(result.stdout)
    assert list(doc["groups"]) == ["train", "test", "delay=1"]
    for group in doc["groups"].values():
        (row,) = group["episodes"]
        assert row["within"] in (True, False) and row["error_ratio"] > 0
        assert group["outside"] == int(row["within"] is False)
        assert row["line"].startswith("within" if row["within"] else "OUTSIDE")
    assert doc["levels"]["episodes"] == 8
