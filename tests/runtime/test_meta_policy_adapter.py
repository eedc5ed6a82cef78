"""The robot's MB-MPO adapter: the inner step it takes at an episode start is the trainer's (numpy vs torch), per env,
from the meta-parameters or the weights acting, on one episode or ``episodes_per_step`` pooled; what persists is its
carried state (the weights, the episodes pooled so far); bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarl_robot.models.meta_policy import GaussianMLPPolicy, adapt
from metarl_robot.runtime.meta_policy import PENDING_KEYS, InnerStepConfig, MetaPolicyAdapter, PolicyEpisode
from metarl_robot.runtime.policy_gradient import (
    advantages,
    feature_dim,
    inner_step,
    policy_features,
    policy_mean,
    to_env_action,
)
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import load_robot
from metarl_robot.spec.schema import SpecError

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
    expected = adapter.step_on(once, [PolicyEpisode(record["obs"][0], record["samples"][0], record["rewards"][0])])
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


# ---- episodes pooled per step (episodes_per_step) ------------------------------------------------------------------
def pooled(k: int, batch: int = 1, seed: int = 0, **inner) -> MetaPolicyAdapter:
    return MetaPolicyAdapter(ROBOT, REWARD, meta_params(), InnerStepConfig(step_size=0.05, episodes_per_step=k,
                                                                           **inner), batch=batch, seed=seed)


def episode_of(record: dict, b: int = 0) -> PolicyEpisode:
    return PolicyEpisode(record["obs"][b], record["samples"][b], record["rewards"][b])


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_one_step_per_k_episodes_pooled_in_the_order_they_ended():
    adapter = pooled(3, seed=4)
    records = []
    for i, steps in enumerate((30, 45, 20)):  # episodes of different lengths, as on a robot
        records.append(run_episode(adapter, steps, seed=i))
        adapter.reset()
        if i < 2:  # pooled, no step yet: the meta-policy acts on
            assert adapter.inner_steps.tolist() == [0] and same(adapter.params[0], meta_params())
            assert [len(e.reward) for e in adapter.pending[0]] == [30, 45][:i + 1]
            np.testing.assert_array_equal(adapter.pending[0][i].obs, records[i]["obs"][0])
    assert adapter.inner_steps.tolist() == [1] and adapter.pending == [[]]
    first = [episode_of(r) for r in records]
    assert same(adapter.params[0], adapter.step_on(meta_params(), first))
    # One baseline and one normalisation over all three: not three one-episode steps added up.
    alone = [adapter.step_on(meta_params(), [e]) for e in first]
    summed = [m + sum(a[i] - m for a in alone) / 3 for i, m in enumerate(meta_params())]
    assert not all(np.allclose(p, q, rtol=0, atol=1e-9) for p, q in zip(adapter.params[0], summed, strict=True))
    # The next three episodes step from the adapted weights.
    acting = [p.copy() for p in adapter.params[0]]
    later = []
    for i in range(3):
        later.append(episode_of(run_episode(adapter, 25, seed=10 + i)))
        adapter.reset()
    assert adapter.inner_steps.tolist() == [2]
    assert same(adapter.params[0], adapter.step_on(acting, later))


def test_the_pooled_step_is_the_bench_step_on_equal_length_episodes():
    # What bench/mbmpo_inner_step.py measured: advantages of the (K, T) paths, the gradient the mean over all rows.
    adapter = pooled(4, batch=1, seed=1)
    records = [run_episode(adapter, 50, seed=i) for i in range(4)]
    rewards = np.concatenate([r["rewards"] for r in records])  # (4, T)
    feats = policy_features(ROBOT, np.concatenate([r["obs"] for r in records]))  # (4, T, F)
    samples = np.concatenate([r["samples"] for r in records])
    adv = advantages(rewards, feats, 0.99, 1e-5)
    want = inner_step(meta_params(), feats.reshape(-1, feats.shape[-1]), samples.reshape(-1, ROBOT.action_dim),
                      adv.reshape(-1), 0.05)
    assert same(adapter.step_on(meta_params(), [episode_of(r) for r in records]), want)


def test_the_pooled_step_is_the_trainers_torch_step_on_the_pooled_rows():
    adapter = pooled(2, seed=2)
    records = [run_episode(adapter, steps, seed=i) for i, steps in enumerate((35, 50))]
    feats = [policy_features(ROBOT, r["obs"][0]) for r in records]
    adv = np.concatenate(advantages([r["rewards"][0] for r in records], feats, INNER.discount, INNER.baseline_reg))
    params = [torch.tensor(p, requires_grad=True) for p in meta_params()]
    expected = adapt(params, torch.tensor(np.concatenate(feats)), torch.tensor(np.concatenate(
        [r["samples"][0] for r in records])), torch.tensor(adv), 0.05, create_graph=False)
    got = adapter.step_on(meta_params(), [episode_of(r) for r in records])
    for g, w, m in zip(got, expected, meta_params(), strict=True):
        assert np.abs((g - m) - (w.detach().numpy() - m)).max() <= 1e-10 * np.abs(w.detach().numpy() - m).max()


def test_a_short_episode_is_not_pooled_and_forget_empties_the_pool():
    adapter = pooled(2, seed=3, min_transitions=10)
    kept = episode_of(run_episode(adapter, 30, seed=0))
    adapter.reset()
    run_episode(adapter, 9, seed=1)  # too short to step on: not pooled, as with one episode per step
    adapter.reset()
    assert adapter.inner_steps.tolist() == [0] and len(adapter.pending[0]) == 1
    second = episode_of(run_episode(adapter, 20, seed=2))
    adapter.reset()
    assert adapter.inner_steps.tolist() == [1] and same(adapter.params[0], adapter.step_on(meta_params(),
                                                                                           [kept, second]))
    run_episode(adapter, 20, seed=3)
    adapter.reset()
    assert len(adapter.pending[0]) == 1
    adapter.forget()
    assert adapter.pending == [[]] and adapter.inner_steps.tolist() == [0]


def test_episodes_per_step_one_carries_what_it_always_carried():
    adapter = MetaPolicyAdapter(ROBOT, REWARD, meta_params(), INNER, batch=2, seed=3)
    run_episode(adapter, 30)
    adapter.reset()
    assert not set(PENDING_KEYS) & set(adapter.carried_state())


def half_full(k: int = 3) -> tuple[MetaPolicyAdapter, dict[str, np.ndarray]]:
    """Two envs after the same two episodes: env 0 pooled both (30 and 45 steps), env 1 only the second (it was
    reset after its first, with the pool then forgotten)."""
    adapter = pooled(k, batch=2, seed=5)
    run_episode(adapter, 30, seed=0)
    adapter.reset()
    adapter.forget(np.array([False, True]))
    run_episode(adapter, 45, seed=1)
    adapter.reset()
    assert [len(p) for p in adapter.pending] == [2, 1] and adapter.inner_steps.tolist() == [0, 0]
    return adapter, adapter.carried_state()


def test_a_half_full_pool_round_trips_and_the_restored_adapter_takes_the_same_next_step():
    adapter, state = half_full()
    assert state["pending_lengths"].tolist() == [[30, 45], [45, 0]]
    assert state["pending_obs"].shape == (2, 75, ROBOT.obs_dim) and state["pending_reward"].shape == (2, 75)
    assert state["pending_sample"].shape == (2, 75, ROBOT.action_dim)
    np.testing.assert_array_equal(state["pending_reward"][1, 45:], 0.0)  # padding after env 1's own rows
    fresh = pooled(3, batch=2, seed=5)
    fresh.restore({k: v.copy() for k, v in state.items()})
    for b in range(2):
        for got, want in zip(fresh.pending[b], adapter.pending[b], strict=True):
            assert all(np.array_equal(x, y) for x, y in zip(got, want, strict=True))
    # The same next episode (the noise is reseeded from the carried count, so the same samples) on both: env 0's pool
    # fills and it steps, bit for bit as the original; env 1 pools a second episode.
    for a in (adapter, fresh):
        run_episode(a, 20, seed=2)
        a.reset()
    assert fresh.inner_steps.tolist() == adapter.inner_steps.tolist() == [1, 0]
    assert same(fresh.params[0], adapter.params[0]) and not same(fresh.params[0], meta_params())
    assert [len(p) for p in fresh.pending] == [0, 2]
    np.testing.assert_array_equal(fresh.carried_state()["pending_obs"], adapter.carried_state()["pending_obs"])


def test_a_state_without_pending_arrays_restores_with_nothing_pooled():
    # Every state logged before pooling existed (and every episodes_per_step 1 state) has no pending arrays.
    old = MetaPolicyAdapter(ROBOT, REWARD, meta_params(), INNER, batch=2, seed=3)
    run_episode(old, 30)
    old.reset()
    adapter, _ = half_full()
    adapter.restore(old.carried_state())
    assert adapter.pending == [[], []] and adapter.inner_steps.tolist() == [1, 1]
    assert same(adapter.params[0], old.params[0])
    run_episode(adapter, 20)
    adapter.reset()
    assert adapter.inner_steps.tolist() == [1, 1]  # one episode of three: no step


def _with(state: dict, **changes) -> dict:
    return {**state, **changes}


BAD_PENDING = {
    "pending_obs shape": (lambda s: _with(s, pending_obs=s["pending_obs"][:, :, :3]), "'pending_obs'", "(2, 75, 4)"),
    "pending_sample NaN": (lambda s: _with(s, pending_sample=np.full_like(s["pending_sample"], np.nan)),
                           "'pending_sample'", "NaN"),
    "pending_reward 1-D": (lambda s: _with(s, pending_reward=s["pending_reward"][0]), "'pending_reward'", "(B, P)"),
    "pending_reward ints": (lambda s: _with(s, pending_reward=s["pending_reward"].astype(np.int64)),
                            "'pending_reward'", "finite floats"),
    "lengths of another k": (lambda s: _with(s, pending_lengths=np.array([[30, 45, 0], [45, 0, 0]])),
                             "'pending_lengths'", "episodes_per_step 3"),
    "lengths as floats": (lambda s: _with(s, pending_lengths=s["pending_lengths"].astype(float)), "'pending_lengths'",
                          "integers"),
    "a gap in the lengths": (lambda s: _with(s, pending_lengths=np.array([[30, 45], [0, 45]])), "'pending_lengths'",
                             "then zeros"),
    "a length under min_transitions": (lambda s: _with(s, pending_lengths=np.array([[30, 5], [45, 0]])),
                                       "'pending_lengths'", "min_transitions 10"),
    "a negative length": (lambda s: _with(s, pending_lengths=np.array([[30, -45], [45, 0]])), "'pending_lengths'",
                          "then zeros"),
    "more rows than held": (lambda s: _with(s, pending_lengths=np.array([[30, 50], [45, 0]])), "'pending_lengths'",
                            "[80, 45] rows"),
    "a pending array missing": (lambda s: {k: v for k, v in s.items() if k != "pending_sample"}, "expected arrays",
                                "pending_sample"),
}


@pytest.mark.parametrize("case", list(BAD_PENDING))
def test_bad_pending_arrays_are_refused_naming_the_array_and_change_nothing(case):
    change, *words = BAD_PENDING[case]
    adapter, state = half_full()
    before = adapter.carried_state()
    with pytest.raises(ValueError) as err:
        adapter.restore(change(state))
    for word in words:
        assert word in str(err.value), str(err.value)
    after = adapter.carried_state()
    assert set(after) == set(before) and all(np.array_equal(after[k], before[k]) for k in before)


def test_a_pooled_state_restores_only_into_an_adapter_pooling_as_many():
    _, state = half_full(k=3)
    with pytest.raises(ValueError, match=r"'pending_lengths': expected integers of shape \(2, 0\) "
                                         r"\(episodes_per_step 1\)"):
        MetaPolicyAdapter(ROBOT, REWARD, meta_params(), INNER, batch=2, seed=5).restore(state)


@pytest.mark.parametrize("value", [0, -1, True, 2.0, "2"])
def test_episodes_per_step_must_be_an_integer_of_at_least_one(value):
    with pytest.raises(ValueError, match=r"InnerStepConfig\.episodes_per_step must be an integer >= 1"):
        InnerStepConfig(episodes_per_step=value).validate()


def test_runtime_settings_change_episodes_per_step_only():
    inner = InnerStepConfig(step_size=0.05)
    assert inner.with_settings({"episodes_per_step": 4}, "x") == InnerStepConfig(step_size=0.05, episodes_per_step=4)
    assert inner.with_settings(None, "x") is inner and inner.with_settings({}, "x") is inner
    with pytest.raises(SpecError, match=r"planner_overrides: it acts; of planner_overrides it takes only "
                                        r"episodes_per_step .*\['step_size'\]"):
        inner.with_settings({"episodes_per_step": 2, "step_size": 0.1}, "it acts")
    with pytest.raises(SpecError, match=r"planner_overrides: episodes_per_step: must be an integer >= 1, got 0"):
        inner.with_settings({"episodes_per_step": 0}, "it acts")
