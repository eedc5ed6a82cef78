"""The sampling planner: limits, determinism, warm start, and that it actually optimises."""

from __future__ import annotations

import numpy as np
import pytest

from metarl_robot.runtime.ensemble_rollout import EnsembleRollout
from metarl_robot.runtime.planner import Planner, PlannerConfig, limit_sequences
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import load_robot

ROBOT = load_robot("cartpole")
REWARD = get_reward("cartpole_swingup")


class PointCart:
    """Cart-only kinematics: x' = x + u * dt * 3, pole fixed upright: reward then wants x at target_x."""

    def rollout(self, start, actions, particles):
        obs = np.asarray(start)
        b, n, h, _ = actions.shape
        x = obs[:, None, None, 0] + np.cumsum(actions[..., 0], axis=-1) * 0.12
        out = np.zeros((b, n, h, 4))
        out[..., 0] = x
        return np.repeat(out[:, :, None], particles, axis=2)


def test_limit_sequences_respects_box_and_rate():
    rng = np.random.default_rng(0)
    seq = rng.uniform(-5, 5, (3, 7, 20, 1))
    last = np.array([[0.5]] * 3)[:, None]
    out = limit_sequences(seq, last, np.array([-1.0]), np.array([1.0]), np.array([0.3]))
    assert out.min() >= -1 and out.max() <= 1
    steps = np.diff(np.concatenate([np.broadcast_to(last[:, :, None], (3, 7, 1, 1)), out], axis=2), axis=2)
    assert np.abs(steps).max() <= 0.3 + 1e-12


def test_limit_sequences_is_the_clip_recursion_even_from_outside_the_box():
    rng = np.random.default_rng(1)
    low, high, step = np.array([-1.0, 0.0]), np.array([1.0, 2.0]), np.array([0.3, 0.5])
    seq = rng.uniform(-4, 4, (2, 5, 12, 2))
    last = rng.uniform(-3, 3, (2, 1, 2))  # a last command beyond the box (e.g. limits changed) must come back in
    expected, prev = np.empty_like(seq), np.broadcast_to(last, (2, 5, 2))
    for t in range(seq.shape[2]):
        expected[:, :, t] = prev = np.clip(np.clip(seq[:, :, t], prev - step, prev + step), low, high)
    np.testing.assert_array_equal(limit_sequences(seq, last, low, high, step), expected)


@pytest.mark.parametrize("method", ["mppi", "cem"])
def test_planner_drives_toward_the_reward(method):
    cfg = PlannerConfig(method=method, horizon=15, samples=64, iterations=3, noise_correlation=0.5)
    planner = Planner(cfg, ROBOT, REWARD, PointCart(), batch=2)
    obs = np.zeros((2, 4))
    targets = {"target_x": np.array([1.0, -1.0])}
    result = planner.plan(obs, obs, targets, np.zeros((2, 1)))
    assert result.action.shape == (2, 1) and result.plan.shape == (2, 15, 1)
    assert result.action[0, 0] > 0.3 and result.action[1, 0] < -0.3  # each env heads for its own target
    assert np.all(np.abs(np.diff(result.plan[..., 0], axis=1)) <= ROBOT.action_max_rate[0] * ROBOT.ctrl_dt + 1e-9)


def test_planner_is_deterministic_given_its_seed_and_warm_starts():
    def run():
        planner = Planner(PlannerConfig(horizon=10, samples=32, seed=3), ROBOT, REWARD, PointCart(), batch=1)
        obs = np.zeros((1, 4))
        first = planner.plan(obs, obs, {"target_x": np.array([0.8])}, np.zeros((1, 1)))
        warm = planner.mean.copy()
        second = planner.plan(obs, obs, {"target_x": np.array([0.8])}, first.action)
        return first, warm, second

    a, warm, b = run()
    c, _, d = run()
    np.testing.assert_array_equal(a.plan, c.plan)
    np.testing.assert_array_equal(b.plan, d.plan)
    np.testing.assert_array_equal(warm[0, :-1], a.plan[0, 1:])  # shifted by one step


def test_non_finite_predictions_never_win():
    class Exploding(PointCart):
        def rollout(self, start, actions, particles):
            out = super().rollout(start, actions, particles)
            out[:, 1::2] = np.nan  # every other sample diverges
            return out

    planner = Planner(PlannerConfig(horizon=5, samples=16), ROBOT, REWARD, Exploding(), batch=1)
    result = planner.plan(np.zeros((1, 4)), np.zeros((1, 4)), {"target_x": np.array([1.0])}, np.zeros((1, 1)))
    assert np.all(np.isfinite(result.plan)) and np.isfinite(result.expected_return).all()


@pytest.mark.parametrize(("field", "value"), [("horizon", 0), ("samples", 1), ("method", "ilqr"),
                                              ("noise_correlation", 1.0), ("temperature", 0.0)])
def test_bad_planner_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"planner.{field}"):
        PlannerConfig(**{field: value}).validate()


def test_ensemble_rollout_keeps_each_particle_on_one_member():
    # Member e adds (e + 1) * action to the state each step: the rollout must show which member it used.
    def step(obs, act, z):
        members = np.arange(obs.shape[0], dtype=np.float32)[:, None, None] + 1
        return obs + members * act[..., :1] + 0 * z[..., :1]

    roll = EnsembleRollout(step, ensemble_size=3)
    actions = np.ones((2, 3, 4, 1))
    out = roll.rollout((np.zeros((2, 4)), np.zeros((2, 5))), actions, particles=1)
    assert out.shape == (2, 3, 1, 4, 4)
    rows = out[..., 0, -1, 0].reshape(-1)  # final x of each (b, n): 4 steps x (member + 1)
    np.testing.assert_array_equal(rows, [4 * (r % 3 + 1) for r in range(6)])
    # 1 x 2 rows do not fill 3 members: padded internally, the two real rows come back in order.
    short = roll.rollout((np.zeros((1, 4)), np.zeros((1, 5))), np.ones((1, 2, 4, 1)), particles=1)
    np.testing.assert_array_equal(short[0, :, 0, -1, 0], [4, 8])


def test_fused_rollout_returns_what_the_stepped_rollout_returns_and_only_at_its_horizon():
    rng = np.random.default_rng(1)
    weights = rng.normal(size=(3, 4 + 1 + 5, 4)) * 0.3  # a different linear map per member

    def step(obs, act, z):
        return np.tanh(np.einsum("emi,eio->emo", np.concatenate([obs, act, z], -1), weights)).astype(np.float32)

    calls = []

    def fused(obs, actions, z):  # the chain of steps, as the rollout graph computes it
        calls.append(actions.shape)
        out = []
        for t in range(actions.shape[2]):
            obs = step(obs, actions[:, :, t], z)
            out.append(obs)
        return np.stack(out, axis=2)

    start = (rng.normal(size=(2, 4)), rng.normal(size=(2, 5)))
    actions = rng.uniform(-1, 1, (2, 5, 6, 1))
    stepped = EnsembleRollout(step, 3).rollout(start, actions, particles=2)
    with_fused = EnsembleRollout(step, 3, fused=(fused, 6))
    np.testing.assert_allclose(with_fused.rollout(start, actions, particles=2), stepped, rtol=1e-6)
    assert calls == [(3, 7, 6, 1)]  # 2 x 5 x 2 = 20 rows on 3 members: 7 each (one padded)
    with_fused.rollout(start, actions[:, :, :4], particles=2)  # another horizon: stepped, not fused
    assert len(calls) == 1
