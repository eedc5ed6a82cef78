"""Smoke run of bench/adversarial_tasks.py with a tiny budget (no learning claims, no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

TINY = ["loop.random_episodes=2", "loop.tasks_per_iteration=2", "training.grad_steps=5", "planner.samples=8",
        "planner.horizon=4", "planner.iterations=1", "model.hidden=16", "model.ensemble_size=2",
        "loop.adversary.population=3"]


@pytest.mark.slow
@pytest.mark.integration
def test_adversarial_benchmark_compares_every_sampler(tmp_path):
    cmd = [sys.executable, "bench/adversarial_tasks.py", "--out", str(tmp_path), "--seeds", "0", "--iterations", "2",
           "--eval-at", "0", "1", "--grid", "2", "--params", "pole_length", "pole_mass_scale", "--jobs", "1"]
    for s in TINY:
        cmd += ["--set", s]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    assert set(doc["samplers"]) == {"uniform", "gaussian", "adversarial"}
    for sampler, entry in doc["samplers"].items():
        assert [c["iteration"] for c in entry["curve"]] == [0, 1]
        last = entry["curve"][-1]
        assert last["worst_gap"]["mean"] >= last["mean_gap"]["mean"]
        # Equal training budgets: every sampler added the same number of transitions.
        assert last["transitions"] == doc["samplers"]["uniform"]["curve"][-1]["transitions"]
        assert (last["adversary_env_steps"] > 0) == (sampler == "adversarial")
    assert set(doc["comparison"]) >= {"worst_gap_reduction_vs_uniform", "mean_gap_increase_vs_uniform", "met"}
    assert (tmp_path / "learning_curves.png").stat().st_size > 0
    # The grid's oracle ran once and every evaluation reused it.
    cache = json.loads((tmp_path / "oracle_cache.json").read_text())
    assert len(cache["records"]) == 4
