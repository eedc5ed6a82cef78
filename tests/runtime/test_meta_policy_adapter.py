"""The robot's MB-MPO adapter: the inner step it takes at an episode start is the trainer's (numpy vs torch), per env,
from the meta-parameters or the weights acting; what persists is its carried state; bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarl_robot.models.meta_policy import GaussianMLPPolicy, adapt
from metarl_robot.runtime.meta_policy import InnerStepConfig, MetaPolicyAdapter
from metarl_robot.runtime.policy_gradient import advantages, feature_dim, policy_features, policy_mean, to_env_action
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import load_robot

ROBOT = load_robot("cartpole")
REWARD = get_reward("cartpole_swingup")
INNER = InnerStepConfig(step_size=0.05)


def meta_params(seed: int = 0) -> list[np.ndarray]:
    torch.manual_seed(seed)
    return GaussianMLPPolicy(feature_dim(ROBOT), ROBOT.action_dim, (16, 16), init_std=0.5).numpy_params()


def run_episode(adapter: MetaPolicyAdapter, steps: int, seed: int = 0, target_x=0.2):
    """Feed ``steps`` transitions of a made-up system; returns what was recorded (obs, samples, rewards)."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(0, 0.3, (adapter.batch, ROBOT.obs_dim))
    record = {"obs": [], "samples": [], "rewards": []}
    for _ in range(steps):
        action, diag = adapter.act(obs, {"target_x": target_x})
        nxt = obs + 0.04 * np.concatenate([obs[:, 2:], action, action], axis=1) + rng.normal(0, 0.01, obs.shape)
        adapter.observe(obs, action, nxt)
        record["obs"].append(obs)
        record["samples"].append(diag["policy_sample"])
        record["rewards"].append(REWARD(ROBOT, obs, action, nxt, {"target_x": np.full(adapter.batch, target_x)})[0])
        obs = nxt
    return {k: np.stack(v, axis=1) for k, v in record.items()}  # (B, T, ·)


def test_the_step_at_an_episode_start_is_the_trainers_torch_step():
    adapter = MetaPolicyAdapter(ROBOT, REWARD, meta_params(), INNER, batch=1, seed=1)
    record = run_episode(adapter, 60)
    adapter.reset()
    assert adapter.inner_steps.tolist() == [1]
    feats = policy_features(ROBOT, record["obs"][0])
    adv = advantages(record["rewards"][:1], feats[None], INNER.discount, INNER.baseline_reg)[0]
    for dtype, tolerance in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        params = [torch.tensor(p, dtype=dtype, requires_grad=True) for p in meta_params()]
        expected = adapt(params, *(torch.tensor(x, dtype=dtype) for x in (feats, record["samples"][0], adv)),
                         INNER.step_size, create_graph=False)
        for got, want, meta in zip(adapter.params[0], expected, meta_params(), strict=True):
            step, want_step = got - meta, want.detach().double().numpy() - meta
            slack = 1e-7 if dtype == torch.float32 else 0.0  # float32 rounds the weights themselves
            assert np.abs(step - want_step).max() <= tolerance * np.abs(want_step).max() + slack, dtype
    assert any(not np.array_equal(a, b) for a, b in zip(adapter.params[0], meta_params(), strict=True))


def test_each_later_episode_steps_from_the_weights_acting_and_forget_goes_back():
    adapter = MetaPolicyAdapter(ROBOT, REWARD, meta_params(), INNER, batch=2, seed=2)
    run_episode(adapter, 40, seed=0)
    adapter.reset(np.array([True, False]))  # only env 0 adapts now
    assert adapter.inner_steps.tolist() == [1, 0]
    assert all(np.array_equal(a, b) for a, b in zip(adapter.params[1], meta_params(), strict=True))
    once = [p.copy() for p in adapter.params[0]]
    record = run_episode(adapter, 40, seed=1)
    adapter.reset()
    assert adapter.inner_steps.tolist() == [2, 1]
    # Env 0's second step is taken from its adapted weights on its latest episode alone.
    expected = adapter.step_on(once, record["obs"][0], record["samples"][0], record["rewards"][0])
    assert all(np.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(adapter.params[0], expected, strict=True))
    adapter.forget(np.array([True, False]))
    assert adapter.inner_steps.tolist() == [0, 1]
    assert all(np.array_equal(a, b) for a, b in zip(adapter.params[0], meta_params(), strict=True))


def test_short_episodes_and_adapt_false_take_no_step():
    short = MetaPolicyAdapter(ROBOT, REWARD, meta_params(), InnerStepConfig(min_transitions=10), seed=0)
    run_episode(short, 9)
    short.reset()
    assert short.inner_steps.tolist() == [0]
    frozen = MetaPolicyAdapter(ROBOT, REWARD, meta_params(), INNER, seed=0, adapt=False)
    run_episode(frozen, 30)
    frozen.reset()
    assert frozen.inner_steps.tolist() == [0]
    assert all(np.array_equal(a, b) for a, b in zip(frozen.params[0], meta_params(), strict=True))


def test_actions_are_the_sample_mapped_into_the_box_and_deterministic_is_the_mean():
    adapter = MetaPolicyAdapter(ROBOT, REWARD, meta_params(), INNER, seed=0, deterministic=True)
    obs = np.array([[0.1, 3.0, 0.0, 0.5]])
    action, diag = adapter.act(obs, {"target_x": 0.0})
    np.testing.assert_array_equal(diag["policy_sample"], policy_mean(meta_params(), policy_features(ROBOT, obs)))
    np.testing.assert_array_equal(action, to_env_action(ROBOT, diag["policy_sample"]))
    noisy = MetaPolicyAdapter(ROBOT, REWARD, meta_params(), INNER, seed=0)
    samples = np.array([noisy.act(obs, {"target_x": 0.0})[1]["policy_sample"][0, 0] for _ in range(400)])
    assert abs(samples.std() - 0.5) < 0.06  # init_std 0.5
    assert (np.abs([noisy.act(obs, {"target_x": 0.0})[0] for _ in range(50)]) <= ROBOT.action_high).all()


def test_carried_state_round_trips_and_bad_state_is_refused():
    adapter = MetaPolicyAdapter(ROBOT, REWARD, meta_params(), INNER, batch=2, seed=3)
    run_episode(adapter, 30)
    adapter.reset()
    state = adapter.carried_state()
    fresh = MetaPolicyAdapter(ROBOT, REWARD, meta_params(), INNER, batch=2, seed=3)
    fresh.restore(state)
    assert fresh.inner_steps.tolist() == [1, 1]
    for b in range(2):
        assert all(np.array_equal(x, y) for x, y in zip(fresh.params[b], adapter.params[b], strict=True))
    # The action noise of an episode is seeded from the carried count: the restored adapter draws what the original
    # draws next, so a replay of any episode reproduces its sampled actions.
    obs = np.zeros((2, ROBOT.obs_dim))
    np.testing.assert_array_equal(fresh.act(obs, {"target_x": 0.0})[0], adapter.act(obs, {"target_x": 0.0})[0])
    assert state["episodes_started"].tolist() == [1, 1]
    with pytest.raises(ValueError, match="one count"):
        fresh.restore(dict(state, episodes_started=np.array([1, 2])))
    with pytest.raises(ValueError, match="expected arrays"):
        fresh.restore({k: v for k, v in state.items() if k != "inner_steps"})
    bad = dict(state, param_0=state["param_0"][:1])
    with pytest.raises(ValueError, match="'param_0'"):
        fresh.restore(bad)
    nan = dict(state, param_1=np.full_like(state["param_1"], np.nan))
    with pytest.raises(ValueError, match="'param_1'"):
        fresh.restore(nan)


def test_an_empty_carried_state_restores_the_meta_parameters():
    # What the replay and the simulated recorder pass when nothing was carried (a candidate bundle, a log without
    # adapter state): the adapter starts from its meta-parameters, as the Adapter protocol has it.
    adapter = MetaPolicyAdapter(ROBOT, REWARD, meta_params(), INNER, batch=2, seed=3)
    run_episode(adapter, 30)
    adapter.reset()
    assert adapter.inner_steps.tolist() == [1, 1]
    adapter.restore({})
    assert adapter.inner_steps.tolist() == [0, 0]
    for b in range(2):
        assert all(np.array_equal(x, y) for x, y in zip(adapter.params[b], adapter.meta_params, strict=True))


def test_bad_input_is_refused_with_the_field_named():
    adapter = MetaPolicyAdapter(ROBOT, REWARD, meta_params(), INNER, seed=0)
    with pytest.raises(ValueError, match="obs contains NaN"):
        adapter.act(np.array([[np.nan, 0, 0, 0]]), {"target_x": 0.0})
    with pytest.raises(ValueError, match="obs: expected shape"):
        adapter.act(np.zeros((1, 3)), {"target_x": 0.0})
    with pytest.raises(ValueError, match="lacks reward parameter"):
        adapter.act(np.zeros((1, 4)), {})
    with pytest.raises(ValueError, match="follows act"):
        adapter.observe(np.zeros((1, 4)), np.zeros((1, 1)), np.zeros((1, 4)))
    with pytest.raises(ValueError, match="step_size must be > 0"):
        MetaPolicyAdapter(ROBOT, REWARD, meta_params(), InnerStepConfig(step_size=0.0))
    with pytest.raises(ValueError, match="which must be a bool mask"):
        adapter.reset(np.array([True, False]))
