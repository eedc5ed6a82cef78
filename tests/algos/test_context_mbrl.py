"""The encoder learns to adapt: on a family whose tasks hide a gain, context must cut the error."""

from __future__ import annotations

import numpy as np
import pytest

from metarl_robot.algos.buffer import EpisodeBuffer
from metarl_robot.algos.context_mbrl import ContextMBRL, ContextMBRLConfig
from metarl_robot.envs.rollout import Rollout
from metarl_robot.models.context_dynamics import ContextDynamicsConfig
from metarl_robot.spec.robot import load_robot

ROBOT = load_robot("cartpole")  # only its dims (4 obs, 1 action) and scales matter here


def _hidden_gain_episodes(rng, tasks=60, steps=40):
    """obs' = obs + theta * a on cart_vel, theta ~ U(0.2, 2) per task (a stand-in for a motor gain)."""
    theta = rng.uniform(0.2, 2.0, tasks)
    obs = rng.normal(size=(tasks, steps, 4)) * 0.5
    act = rng.uniform(-1, 1, (tasks, steps, 1))
    nxt = obs.copy()
    nxt[..., 2] += theta[:, None] * act[..., 0]
    start = np.zeros(steps, dtype=bool)
    start[0] = True
    return Rollout(obs, act, nxt, np.zeros((tasks, steps)), np.ones((tasks, steps), bool), start,
                   [{} for _ in range(tasks)]), theta


@pytest.mark.slow
def test_context_makes_predictions_better_and_more_context_never_worse():
    rng = np.random.default_rng(0)
    rollout, theta = _hidden_gain_episodes(rng)
    buf = EpisodeBuffer(4, 1, holdout_every=5)
    buf.add(rollout, theta[:, None])
    algo = ContextMBRL(ROBOT, ContextDynamicsConfig(ensemble_size=2, hidden=64, layers=2, context_window=8),
                       ContextMBRLConfig(grad_steps=600, batch_size=128, learning_rate=3e-3), seed=0)
    algo.update(buf)
    err = algo.prediction_error(buf, (0, 1, 2, 4, 8))  # held-out tasks: never trained on
    assert err[8] < 0.5 * err[0], err
    assert err[4] <= err[1] * 1.05 and err[8] <= err[4] * 1.05, err


def test_checkpoint_state_round_trip():
    cfg_m, cfg_t = ContextDynamicsConfig(ensemble_size=2, hidden=16, layers=1), ContextMBRLConfig(grad_steps=3)
    a = ContextMBRL(ROBOT, cfg_m, cfg_t, seed=1)
    rollout, theta = _hidden_gain_episodes(np.random.default_rng(1), tasks=5, steps=10)
    buf = EpisodeBuffer(4, 1)
    buf.add(rollout, theta[:, None])
    a.update(buf)
    b = ContextMBRL(ROBOT, cfg_m, cfg_t, seed=2)
    b.load_state_dict(a.state_dict())
    x = np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 1), np.float32), np.zeros((2, 3, 8), np.float32)
    np.testing.assert_array_equal(a.step(*x), b.step(*x))
