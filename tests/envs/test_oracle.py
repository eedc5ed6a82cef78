"""The MuJoCo oracle predicts exactly what the env will do."""

from __future__ import annotations

import numpy as np
import pytest

from metarl_robot.envs.meta_env import MetaMujocoEnv
from metarl_robot.envs.oracle import MujocoOracle
from metarl_robot.runtime.planner import limit_sequences


@pytest.mark.parametrize("family", ["cartpole_swingup", "half_cheetah_vel"])
def test_oracle_rollout_matches_stepping_the_env(family):
    env = MetaMujocoEnv(family)
    task = env.family.sample(np.random.default_rng(0), "test", 1)[0]
    env.reset(seed=0, options={"task": task})
    rng = np.random.default_rng(1)
    raw = rng.uniform(env.robot.action_low, env.robot.action_high, (1, 3, 6, env.robot.action_dim))
    # The oracle rolls out what it is given; the planner only ever gives it rate-limited sequences.
    actions = limit_sequences(raw, env.robot.safe_action, env.robot.action_low, env.robot.action_high,
                              env.robot.action_max_rate * env.robot.ctrl_dt)
    pred = MujocoOracle(threads=2).rollout([env], actions, particles=1)
    for n in range(3):
        twin = MetaMujocoEnv(family, task=task)
        twin.reset(seed=0)
        for t in range(6):
            obs, *_ = twin.step(actions[0, n, t])
            np.testing.assert_allclose(pred[0, n, 0, t], obs, rtol=0, atol=1e-9)
