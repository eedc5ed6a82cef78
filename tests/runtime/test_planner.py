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


LOW, HIGH, STEP = np.array([-1.0, 0.0]), np.array([1.0, 2.0]), np.array([0.3, 0.5])


def assert_feasible(out: np.ndarray, last: np.ndarray, tol: float = 1e-12) -> None:
    """Box exactly (clipping is exact), rate from ``last`` within round-off."""
    assert np.all(out >= LOW) and np.all(out <= HIGH)
    first = np.broadcast_to(np.asarray(last)[..., None, :], (*out.shape[:-2], 1, out.shape[-1]))
    steps = np.diff(np.concatenate([first, out], axis=-2), axis=-2)
    assert np.all(np.abs(steps) <= STEP + tol)


def feasible_sequences(rng: np.random.Generator, shape: tuple[int, ...], last: np.ndarray) -> np.ndarray:
    """Random sequences within both limits by construction: box-clipped sums of increments within the rate."""
    return np.clip(last[..., None, :] + np.cumsum(rng.uniform(-STEP, STEP, shape), axis=-2), LOW, HIGH)


@pytest.mark.parametrize(("shape", "last_shape"), [((12, 2), (2,)), ((5, 12, 2), (5, 2)), ((2, 5, 12, 2), (2, 1, 2)),
                                                   ((2, 5, 12, 2), (2,)), ((1, 12, 2), (3, 2))])
def test_limit_sequences_is_feasible_for_any_batch_shape(shape, last_shape):
    rng = np.random.default_rng(1)
    seq = rng.uniform(-4, 4, shape) * rng.uniform(0, 1, (*shape[:-2], 1, 1))  # some far outside, some barely
    last = rng.uniform(LOW, HIGH, last_shape)  # the last command sent is in the box
    out = limit_sequences(seq, last, LOW, HIGH, STEP)
    assert out.shape == np.broadcast_shapes(shape[:-2], last_shape[:-1]) + shape[-2:] and out.dtype == np.float64
    assert_feasible(out, last)
    assert_feasible(limit_sequences(seq.astype(np.float32), last, LOW, HIGH, STEP), last)  # float32 in, float64 out


def test_limit_sequences_from_outside_the_box_comes_back_into_it():
    rng = np.random.default_rng(2)
    seq = rng.uniform(-4, 4, (2, 5, 12, 2))
    last = rng.uniform(-3, 3, (2, 1, 2))  # e.g. the limits changed under a running planner
    out = limit_sequences(seq, last, LOW, HIGH, STEP)
    assert np.all(out >= LOW) and np.all(out <= HIGH)
    assert_feasible(out, np.clip(last, LOW, HIGH))  # the first step is rate limited from last clipped to the box


def sequential_limit(seq: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Each step clipped within ``max_step`` of the previous sent one, then to the box: the sim env's limiter."""
    out, prev = np.empty_like(seq), np.broadcast_to(last, seq.shape[:-2] + seq.shape[-1:])
    for t in range(seq.shape[-2]):
        out[..., t, :] = prev = np.clip(np.clip(seq[..., t, :], prev - STEP, prev + STEP), LOW, HIGH)
    return out


def test_limit_sequences_leaves_feasible_sequences_bit_for_bit():
    rng = np.random.default_rng(3)
    last = rng.uniform(LOW, HIGH, (4, 1, 2))
    seq = feasible_sequences(rng, (4, 6, 12, 2), last)
    seq[0, 0] = last[0, 0]  # constant: the warm start after a reset
    np.testing.assert_array_equal(limit_sequences(seq, last, LOW, HIGH, STEP), seq)
    # What the sim's own limiter lets through (steps right at the rounded rate bound and on the box included)
    # is feasible too, so sequences that have been through it come back bit for bit.
    passed = sequential_limit(rng.uniform(-4, 4, (4, 6, 12, 2)), last)
    np.testing.assert_array_equal(limit_sequences(passed, last, LOW, HIGH, STEP), passed)


def test_averages_of_limited_sequences_stay_feasible():
    rng = np.random.default_rng(4)
    last = rng.uniform(LOW, HIGH, (3, 1, 2))
    limited = limit_sequences(rng.uniform(-4, 4, (3, 64, 12, 2)), last, LOW, HIGH, STEP)
    weights = rng.dirichlet(np.full(64, 0.3), size=3)  # what MPPI's weighted mean and CEM's elite mean are
    assert_feasible(np.einsum("bn,bnha->bha", weights, limited), last[:, 0])
    assert_feasible(0.1 * limited[:, 0] + 0.9 * limited[:, 1:9].mean(axis=1), last[:, 0])  # CEM's momentum update


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


def test_sampling_noise_is_the_ar1_recursion_on_the_seeded_white_noise():
    beta = 0.7
    planner = Planner(PlannerConfig(horizon=9, samples=5, noise_correlation=beta, seed=2), ROBOT, REWARD, PointCart(),
                      batch=2)
    white = np.random.default_rng(2).standard_normal((2, 5, 9, 3))
    expected = white.copy()
    for t in range(1, 9):
        expected[:, :, t] = beta * expected[:, :, t - 1] + np.sqrt(1 - beta**2) * white[:, :, t]
    np.testing.assert_allclose(planner._noise(2, 9, 3), expected, rtol=0, atol=1e-12)


def test_non_finite_predictions_never_win():
    class Exploding(PointCart):
        def rollout(self, start, actions, particles):
            out = super().rollout(start, actions, particles)
            out[:, 1::2] = np.nan  # every other sample diverges
            return out

    planner = Planner(PlannerConfig(horizon=5, samples=16), ROBOT, REWARD, Exploding(), batch=1)
    result = planner.plan(np.zeros((1, 4)), np.zeros((1, 4)), {"target_x": np.array([1.0])}, np.zeros((1, 1)))
    assert np.all(np.isfinite(result.plan)) and np.isfinite(result.expected_return).all()


class Recording(PointCart):
    """PointCart that keeps the action sequences it was asked to roll out."""

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def rollout(self, start, actions, particles):
        self.seen.append(actions.copy())
        return super().rollout(start, actions, particles)


@pytest.mark.parametrize("method", ["mppi", "cem"])
def test_plans_obey_the_limits_and_the_sent_action_passes_the_sim_limiter_unchanged(method):
    # The planner limits each sample once; its means are averages of them, so only round-off could break a limit,
    # and the command it returns must survive the sim env's (and the safety layer's) exact comparisons.
    rng = np.random.default_rng(5)
    planner = Planner(PlannerConfig(method=method, horizon=12, samples=32, noise_correlation=0.8), ROBOT, REWARD,
                      PointCart(), batch=4)
    low, high, step = ROBOT.action_low, ROBOT.action_high, ROBOT.action_max_rate * ROBOT.ctrl_dt
    last = rng.uniform(low, high, (4, 1))
    for i in range(20):
        if i % 5 == 0:  # warm starts the rate limit rules out: a jump across the whole box from the last command
            planner.mean = np.repeat(-np.sign(last)[:, None] * high, 12, axis=1)
        obs = rng.normal(size=(4, 4))
        result = planner.plan(obs, obs, {"target_x": rng.uniform(-1, 1, 4)}, last)
        window = np.diff(np.concatenate([last[:, None], result.plan], axis=1), axis=1)
        assert np.all(result.plan >= low) and np.all(result.plan <= high) and np.all(np.abs(window) <= step + 1e-12)
        a = result.action
        sent = np.minimum(np.maximum(np.minimum(np.maximum(a, low), high), last - step), last + step)
        np.testing.assert_array_equal(sent, a)
        np.testing.assert_array_equal(result.plan[:, 0], a)
        last = a


def test_sample_0_is_the_warm_start_unchanged():
    model = Recording()
    planner = Planner(PlannerConfig(horizon=8, samples=16, iterations=2), ROBOT, REWARD, model, batch=1)
    warm = np.array([0.25, 0.5, 0.75, 1.0, 1.0, 0.5, 0.0, -0.5])[None, :, None]  # within 1.0 per step of 0
    planner.mean = warm.copy()
    planner.plan(np.zeros((1, 4)), np.zeros((1, 4)), {"target_x": np.array([0.5])}, np.zeros((1, 1)))
    np.testing.assert_array_equal(model.seen[0][:, 0], warm)


@pytest.mark.parametrize("method", ["mppi", "cem"])
def test_when_no_prediction_is_finite_the_plan_is_the_limited_warm_start(method):
    class Diverging(PointCart):
        def rollout(self, start, actions, particles):
            return np.full(super().rollout(start, actions, particles).shape, np.nan)

    planner = Planner(PlannerConfig(method=method, horizon=6, samples=16), ROBOT, REWARD, Diverging(), batch=1)
    warm = np.array([0.5, 0.75, 1.0, 1.0, 0.5, 0.0])[None, :, None]
    planner.mean = warm.copy()
    result = planner.plan(np.zeros((1, 4)), np.zeros((1, 4)), {"target_x": np.array([0.5])}, np.zeros((1, 1)))
    if method == "mppi":  # the current mean wins (MPPI used to return the all-zero average here)
        np.testing.assert_array_equal(result.plan, warm)
    assert np.all(np.abs(np.diff(result.plan[0, :, 0], prepend=0.0)) <= ROBOT.action_max_rate[0] * ROBOT.ctrl_dt)


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
    # More padding rows than real ones (2 rows on 5 members).
    wide = EnsembleRollout(step, ensemble_size=5).rollout((np.zeros((1, 4)), np.zeros((1, 5))), np.ones((1, 2, 4, 1)),
                                                          particles=1)
    assert wide.dtype == np.float64
    np.testing.assert_array_equal(wide[0, :, 0, -1, 0], [4, 8])


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
