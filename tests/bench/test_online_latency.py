"""Smoke run of bench/online_latency.py on the tiny online bundle (no timing asserts), and its refusal of a bundle
without an online last layer."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_online_latency_prints_both_adapters_and_the_ratio(online_bundle: Path):
    result = subprocess.run([sys.executable, "bench/online_latency.py", "--bundle", str(online_bundle), "--steps", "6"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(result.stdout)
    assert set(doc["results"]) == {"step_online", "step_no_updates", "observe_online", "observe_no_updates"}
    for row in doc["results"].values():
        assert row["n"] == 6 and all(math.isfinite(row[k]) and row[k] > 0 for k in ("p50_ms", "p99_ms"))
    assert doc["ratio_p99"] == doc["results"]["step_online"]["p99_ms"] / doc["results"]["step_no_updates"]["p99_ms"]
    assert doc["target_ratio_p99"] == 1.2 and doc["bundle_kind"] == "online_model"


def test_a_bundle_without_an_online_last_layer_is_refused():
    result = subprocess.run([sys.executable, "bench/online_latency.py", "--bundle", "policies/cartpole_mb"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "has no online last layer" in result.stderr
