"""MACAW's robot-side adaptation (runtime/awr_policy.py): the numpy step equals the trainer's torch step, and the
adapter keeps, adapts to, carries and restores its window of episodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarl_robot.models.macaw import AdvantageWeighting, Batch, MACAWNetConfig, MACAWNetworks
from metarl_robot.runtime.awr_policy import AWRBatch, AWREpisode, AWRPolicyAdapter, AWRStepConfig, awr_adapt
from metarl_robot.runtime.policy_gradient import feature_dim, policy_features, policy_mean
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import load_robot
from metarl_robot.spec.schema import SpecError

ROBOT = load_robot("cartpole")


def nets_float64(head: bool = True, seed: int = 0) -> MACAWNetworks:
    torch.manual_seed(seed)
    nets = MACAWNetworks(feature_dim(ROBOT), ROBOT.action_dim, MACAWNetConfig(hidden=[16, 12], advantage_head_hidden=8),
                         inner_value_lr=0.05, inner_policy_lr=0.02, advantage_weight=0.5 if head else 0.0).double()
    with torch.no_grad():  # rates of different sizes per tensor: a swapped rate would show
        nets.value_lr_raw.add_(torch.linspace(-0.5, 0.5, len(nets.value_lr_raw), dtype=torch.float64))
        nets.policy_lr_raw.add_(torch.linspace(-0.5, 0.5, len(nets.policy_lr_raw), dtype=torch.float64))
    return nets


def episode(rng: np.random.Generator, t: int = 40) -> AWREpisode:
    obs = rng.standard_normal((t + 1, ROBOT.obs_dim)) * ROBOT.obs_scale
    return AWREpisode(obs[:-1], rng.uniform(-1.3, 1.3, (t, ROBOT.action_dim)), rng.standard_normal(t), obs[1:])


def torch_batch(batch: AWRBatch) -> Batch:
    t = lambda x: torch.as_tensor(x, dtype=torch.float64)  # noqa: E731
    return Batch(t(batch.feats), t(batch.actions), t(batch.returns), t(batch.tail_discount),
                 t(batch.tail_feats[batch.tail_of]))


@pytest.mark.parametrize("head", [True, False])
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("bootstrap", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_numpy_step_equals_the_trainers_torch_step(head, steps, bootstrap, normalize):
    rng = np.random.default_rng(steps)
    nets = nets_float64(head)
    step = AWRStepConfig(steps=steps, bootstrap=bootstrap, return_scale=2.5, temperature=0.7, weight_clip=5.0,
                         normalize_advantages=normalize, discount=0.95)
    batch = AWRBatch.of(ROBOT, [episode(rng, 30), episode(rng, 45)], step)
    weighting = AdvantageWeighting(step.temperature, step.weight_clip, normalize)
    adapted, _ = nets.adapt(nets.meta_params(), torch_batch(batch), weighting, bootstrap, steps, create_graph=False)
    want = nets.numpy_policy(adapted.policy)
    got = awr_adapt(nets.numpy_networks(), batch, step)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)
    meta = nets.numpy_policy(list(nets.policy))
    assert max(float(np.abs(g - m).max()) for g, m in zip(got, meta, strict=True)) > 1e-4  # it moved


def test_batch_rows_returns_and_tails():
    rng = np.random.default_rng(0)
    step = AWRStepConfig(discount=0.9, return_scale=2.0)
    e = episode(rng, 12)
    b = AWRBatch.of(ROBOT, [e], step)
    assert b.feats.shape == (12, feature_dim(ROBOT))
    np.testing.assert_allclose(b.returns[-1], e.reward[-1] / 2.0)
    np.testing.assert_allclose(b.returns[-2], (e.reward[-2] + 0.9 * e.reward[-1]) / 2.0)
    np.testing.assert_allclose(b.tail_discount[[0, -1]], [0.9 ** 12, 0.9])
    np.testing.assert_allclose(b.tail_feats, policy_features(ROBOT, e.next_obs[-1:]))
    assert (b.tail_of == 0).all()
    assert b.actions.min() >= -1 and b.actions.max() <= 1  # what the robot ran: the box's edge
    with pytest.raises(ValueError, match="no episodes"):
        AWRBatch.of(ROBOT, [], step)


def make_adapter(k: int = 2, batch: int = 2) -> AWRPolicyAdapter:
    nets = nets_float64().numpy_networks()
    return AWRPolicyAdapter(ROBOT, get_reward("cartpole_swingup"), nets, AWRStepConfig(adapt_episodes=k),
                            batch=batch)


def run(adapter: AWRPolicyAdapter, rng: np.random.Generator, t: int = 20) -> None:
    """One episode of random observations through act/observe, then the next episode's reset."""
    params = {"target_x": np.zeros(adapter.batch)}
    obs = rng.standard_normal((adapter.batch, ROBOT.obs_dim)) * ROBOT.obs_scale
    for _ in range(t):
        action, _ = adapter.act(obs, params)
        nxt = obs + 0.1 * rng.standard_normal(obs.shape)
        adapter.observe(obs, action, nxt)
        obs = nxt
    adapter.reset()


def test_adapter_acts_with_the_mean_and_adapts_to_its_last_k_episodes():
    rng = np.random.default_rng(1)
    adapter = make_adapter(k=2)
    obs = rng.standard_normal((2, ROBOT.obs_dim))
    _, diag = adapter.act(obs, {"target_x": np.zeros(2)})
    meta = adapter.nets.policy
    np.testing.assert_allclose(diag["policy_sample"], policy_mean(meta, policy_features(ROBOT, obs)))
    adapter.reset()  # no transition recorded: nothing to adapt on
    assert adapter.window == [[], []] and (adapter.inner_steps == 0).all()
    for n in range(1, 4):
        run(adapter, rng)
        assert [len(w) for w in adapter.window] == [min(n, 2)] * 2 and (adapter.inner_steps == n).all()
    want = awr_adapt(adapter.nets, AWRBatch.of(ROBOT, adapter.window[1], adapter.step), adapter.step)
    for g, w in zip(adapter.params[1], want, strict=True):
        np.testing.assert_array_equal(g, w)
    adapter.forget(np.array([True, False]))
    assert adapter.window[0] == [] and len(adapter.window[1]) == 2
    assert all(np.array_equal(p, m) for p, m in zip(adapter.params[0], meta, strict=True))


def test_carried_state_restores_weights_and_windows_exactly():
    rng = np.random.default_rng(2)
    adapter = make_adapter(k=3)
    run(adapter, rng, 20)
    run(adapter, rng, 15)
    state = adapter.carried_state()
    assert state["window_lengths"].tolist() == [[20, 15, 0]] * 2
    other = make_adapter(k=3)
    other.restore(state)
    run(adapter, rng := np.random.default_rng(5), 12)
    run(other, np.random.default_rng(5), 12)
    for a, b in zip(adapter.params, other.params, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    other.restore({})
    assert other.window == [[], []] and (other.inner_steps == 0).all()


@pytest.mark.parametrize("change, words", [
    (lambda s: {k: v for k, v in s.items() if k != "window_next_obs"}, ["window_next_obs"]),
    (lambda s: s | {"window_lengths": s["window_lengths"][:, :2]}, ["window_lengths", "adapt_episodes 3"]),
    (lambda s: s | {"window_reward": np.where(True, np.nan, s["window_reward"])}, ["window_reward", "NaN"]),
    (lambda s: s | {"window_lengths": s["window_lengths"] * 0 + 3}, ["window_lengths", "min_transitions"]),
])
def test_bad_window_arrays_are_refused_naming_the_array_and_change_nothing(change, words):
    rng = np.random.default_rng(3)
    adapter = make_adapter(k=3)
    run(adapter, rng)
    before = adapter.carried_state()
    with pytest.raises(ValueError) as err:
        adapter.restore(change(adapter.carried_state()))
    for word in words:
        assert word in str(err.value)
    after = adapter.carried_state()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_step_settings_validate_and_only_adapt_episodes_may_change():
    step = AWRStepConfig()
    assert step.with_settings({"adapt_episodes": 3}, "x").adapt_episodes == 3
    with pytest.raises(SpecError, match=r"adapt_episodes.*\[1, 5\]"):
        step.with_settings({"adapt_episodes": 6}, "x")
    with pytest.raises(SpecError, match=r"takes only adapt_episodes.*horizon"):
        step.with_settings({"horizon": 10}, "an awr_policy bundle does not plan")
    with pytest.raises(SpecError, match="return_scale"):
        AWRStepConfig(return_scale=0.0).validate()


def test_logged_episodes_of_another_controller_adapt_the_weights():
    rng = np.random.default_rng(4)
    adapter = make_adapter(k=5, batch=1)
    logged = [episode(rng, 30) for _ in range(6)]
    adapter.adapt_on(0, logged)
    assert len(adapter.window[0]) == 5 and adapter.window[0][0] is logged[1]  # the last five
    with pytest.raises(ValueError, match="min_transitions"):
        adapter.adapt_on(0, [episode(rng, 3)])
