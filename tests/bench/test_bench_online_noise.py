"""Smoke run of bench/online_noise.py (one task, a few steps, every way of feeding the adapter) and its refusal."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_online_noise_feeds_the_adapter_every_way_on_the_same_task():
    ways = ["noisy", "plan_true", "fit_true", "blend:0.5"]
    result = subprocess.run([sys.executable, "bench/online_noise.py", "--tasks", "1", "--steps", "60", "--ways",
                             *ways], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(result.stdout)
    assert list(doc["results"]) == ways and doc["obs_noise"] == 0.01 and len(doc["tasks"]) == 1
    returns = {way: row["returns"][0] for way, row in doc["results"].items()}
    assert all(0.0 < r <= 60.0 for r in returns.values()), returns  # at most 1 per step
    # The ways differ in what the adapter saw, so they command differently and the returns differ.
    assert len(set(returns.values())) == len(ways), returns


def test_a_bundle_without_an_online_last_layer_is_refused():
    result = subprocess.run([sys.executable, "bench/online_noise.py", "--bundle", "policies/cartpole_mb"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "needs an online_model bundle" in result.stderr
