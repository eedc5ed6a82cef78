"""The torch twins of the rewards: the same function as the numpy originals (values and θ-gradients)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarl_robot.models.rewards import TORCH_REWARDS, get_torch_reward
from metarl_robot.spec.rewards import REWARDS, get_reward
from metarl_robot.spec.robot import load_robot

ROBOT_OF = {"cartpole_swingup": "cartpole", "half_cheetah_velocity": "half_cheetah", "ant_direction": "ant",
            "ant_goal": "ant"}
PARAMS_OF = {"cartpole_swingup": {"target_x": 0.3}, "half_cheetah_velocity": {"target_velocity": 1.7},
             "ant_direction": {"direction": 0.8}, "ant_goal": {"goal_x": 1.0, "goal_y": -2.0}}


def test_every_reward_has_a_torch_twin_that_matches_it():
    assert set(TORCH_REWARDS) == set(REWARDS)
    rng = np.random.default_rng(0)
    for name, robot_name in ROBOT_OF.items():
        robot = load_robot(robot_name)
        obs, next_obs = (rng.normal(0, 1.5, (64, robot.obs_dim)) for _ in range(2))
        if "torso_height" in robot.obs_slices:  # straddle the healthy band's edges
            next_obs[:, robot.obs_slices["torso_height"]] = rng.uniform(0.0, 1.2, (64, 1))
        act = rng.uniform(robot.action_low, robot.action_high, (64, robot.action_dim))
        params = PARAMS_OF[name]
        expected = get_reward(name)(robot, obs, act, next_obs, params)[0]
        got = get_torch_reward(name)(robot, *(torch.as_tensor(x) for x in (obs, act, next_obs)),
                                     {k: torch.tensor(v, dtype=torch.float64) for k, v in params.items()})
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12, err_msg=name)
    with pytest.raises(KeyError, match="no torch twin"):
        get_torch_reward("nope")
