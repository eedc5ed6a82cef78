"""bench/meta_policy_latency.py on a tiny meta_policy bundle: it runs, times every row and reports the ratios (no
timing asserts)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_meta_policy_latency_times_the_step_the_floor_and_the_inner_step(meta_policy_bundle: Path):
    result = subprocess.run([sys.executable, "bench/meta_policy_latency.py", "--bundle", str(meta_policy_bundle),
                             "--episodes", "2", "--warmup", "10"], capture_output=True, text=True, timeout=600,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(result.stdout)
    assert set(doc["results"]) == {"step", "ort_floor", "inner_step"}
    assert doc["results"]["inner_step"]["n"] == 1 and doc["results"]["step"]["n"] == 2 * 250 - 10
    assert all(math.isfinite(v) and v > 0 for v in doc["ratios"].values())
    assert isinstance(doc["target"]["met"], bool) and len(doc["episode_returns"]) == 2


def test_a_bundle_of_another_kind_is_refused():
    result = subprocess.run([sys.executable, "bench/meta_policy_latency.py", "--bundle", "policies/cartpole_mb"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 2 and "model_based bundle" in result.stderr


@pytest.mark.slow
def test_a_pooling_bundle_times_its_step_apart_from_the_resets_that_only_pool():
    # The shipped bundle pools 4 episodes per step: 5 episodes give 1 step (after the 4th) and 3 pooling resets.
    result = subprocess.run([sys.executable, "bench/meta_policy_latency.py", "--bundle", "policies/cartpole_mbmpo",
                             "--episodes", "5", "--warmup", "10"], capture_output=True, text=True, timeout=600,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(result.stdout)
    assert doc["episodes_per_step"] == 4
    assert doc["results"]["inner_step"]["n"] == 1 and doc["results"]["pooling_reset"]["n"] == 3
    too_few = subprocess.run([sys.executable, "bench/meta_policy_latency.py", "--bundle", "policies/cartpole_mbmpo",
                              "--episodes", "4"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert too_few.returncode == 2 and "--episodes must be >= 5" in too_few.stderr
