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


@pytest.mark.parametrize("family", ["cartpole_swingup", "half_cheetah_vel"])
def test_peer_costs_are_the_negative_of_our_rewards(family):
    # pytorch-mppi plans with a torch copy of the reward: it must be the same function, or the comparison is not.
    import importlib.util

    import numpy as np
    import torch

    from metarl_robot.spec.family import load_family
    from metarl_robot.spec.rewards import get_reward
    from metarl_robot.spec.robot import load_robot

    spec = importlib.util.spec_from_file_location("planner_latency", "bench/planner_latency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    fam = load_family(family)
    robot = load_robot(fam.spec.robot)
    param = fam.reward_names[0]
    rng = np.random.default_rng(0)
    obs, next_obs = (rng.normal(size=(64, robot.obs_dim)) * robot.obs_scale for _ in range(2))
    action = rng.uniform(robot.action_low, robot.action_high, (64, robot.action_dim))
    value = 0.7
    ours, _ = get_reward(fam.spec.reward)(robot, obs, action, next_obs, {param: np.full(64, value)})
    theirs = bench.torch_cost(robot, fam.spec.reward, {param: value})(torch.as_tensor(next_obs),
                                                                        torch.as_tensor(action)).numpy()
    np.testing.assert_allclose(theirs, -ours, rtol=1e-9, atol=1e-12)
