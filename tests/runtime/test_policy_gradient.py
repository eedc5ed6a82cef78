"""The robot's numpy inner step of MB-MPO against torch's autograd (the trainer's step) and against finite
differences; its features, action map, returns, baseline and advantages against hand computations."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from itertools import pairwise

import numpy as np
import pytest
import torch

from metarl_robot.models.meta_policy import adapt
from metarl_robot.paths import REPO_ROOT
from metarl_robot.runtime.policy_gradient import (
    advantages,
    discounted_returns,
    feature_dim,
    inner_step,
    linear_baseline,
    log_prob,
    log_prob_gradient,
    policy_features,
    policy_mean,
    to_env_action,
)
from metarl_robot.spec.robot import load_robot

torch.set_num_threads(1)
F, A, N = 6, 2, 48
HIDDEN = [(16, 8), (12,), ()]
"""Two hidden layers, one, and none (a linear-Gaussian policy)."""


def random_problem(hidden: tuple[int, ...], seed: int = 0):
    """Params with non-trivial scale (tanh units in their curved range), features, actions off the mean, and
    advantages of both signs."""
    rng = np.random.default_rng(seed)
    widths = [F, *hidden, A]
    params = []
    for fan_in, fan_out in pairwise(widths):
        params += [rng.normal(0.0, 1.2 / np.sqrt(fan_in), (fan_in, fan_out)), rng.normal(0.0, 0.5, fan_out)]
    params.append(rng.uniform(-0.7, 0.4, A))
    feats = rng.normal(0.0, 1.5, (N, F))
    actions = policy_mean(params, feats) + np.exp(params[-1]) * rng.normal(0.0, 1.3, (N, A))
    adv = rng.normal(0.0, 1.0, N)
    assert (adv < 0).any() and (adv > 0).any()
    return params, feats, actions, adv


def objective(params, feats, actions, adv) -> float:
    return float(np.mean(adv * log_prob(params, feats, actions)))


def torch_gradient(params, feats, actions, adv) -> list[np.ndarray]:
    """Autograd of the same objective, with torch's own Normal density (independent of both implementations)."""
    ps = [torch.tensor(p, requires_grad=True) for p in params]
    h = torch.tensor(feats)
    for w, b in zip(ps[:-3:2], ps[1:-3:2], strict=True):
        h = torch.tanh(h @ w + b)
    mean = h @ ps[-3] + ps[-2]
    dist = torch.distributions.Normal(mean, torch.exp(ps[-1]))
    loss = (torch.tensor(adv) * dist.log_prob(torch.tensor(actions)).sum(-1)).mean()
    return [g.numpy() for g in torch.autograd.grad(loss, ps)]


def max_relative_error(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """Largest |got - want| over all parameters, relative to the largest |want| of the same array."""
    assert [g.shape for g in got] == [w.shape for w in want]
    return max(float(np.abs(g - w).max() / np.abs(w).max()) for g, w in zip(got, want, strict=True))


# ---- the policy against torch -------------------------------------------------------------------------------------
@pytest.mark.parametrize("hidden", HIDDEN)
def test_log_prob_is_torchs_normal_log_prob(hidden):
    params, feats, actions, _ = random_problem(hidden)
    mean = torch.tensor(policy_mean(params, feats))
    want = torch.distributions.Normal(mean, torch.exp(torch.tensor(params[-1]))).log_prob(torch.tensor(actions))
    np.testing.assert_allclose(log_prob(params, feats, actions), want.sum(-1).numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hidden", HIDDEN)
def test_log_prob_gradient_is_torch_autograd(hidden):
    params, feats, actions, adv = random_problem(hidden)
    got = log_prob_gradient(params, feats, actions, adv)
    want = torch_gradient(params, feats, actions, adv)
    assert max_relative_error(got, want) < 1e-10
    assert all(np.abs(w).max() > 1e-3 for w in want)  # every array is exercised, not trivially zero


@pytest.mark.parametrize("hidden", HIDDEN)
def test_inner_step_is_torch_adapt(hidden):
    params, feats, actions, adv = random_problem(hidden, seed=3)
    step = 0.37
    got = inner_step(params, feats, actions, adv, step)
    tensors = [torch.tensor(p, requires_grad=True) for p in params]
    want = [p.detach().numpy() for p in adapt(tensors, torch.tensor(feats), torch.tensor(actions), torch.tensor(adv),
                                               step, create_graph=False)]
    # Compare the step itself: the parameters would hide a wrong gradient behind their own size.
    moved_got = [g - p for g, p in zip(got, params, strict=True)]
    moved_want = [w - p for w, p in zip(want, params, strict=True)]
    assert max_relative_error(moved_got, moved_want) < 1e-10
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_the_gradient_accepts_paths_with_a_time_axis():
    """(N, T, F) paths give the mean over all N*T rows, like the flattened batch."""
    params, feats, actions, adv = random_problem((12,))
    flat = log_prob_gradient(params, feats, actions, adv)
    paths = log_prob_gradient(params, feats.reshape(4, 12, F), actions.reshape(4, 12, A), adv.reshape(4, 12))
    for p, f in zip(paths, flat, strict=True):
        np.testing.assert_allclose(p, f, rtol=1e-12, atol=1e-15)


# ---- the gradient against finite differences (no torch) ----------------------------------------------------------
@pytest.mark.parametrize("hidden", HIDDEN[:2])
def test_log_prob_gradient_matches_central_differences(hidden):
    params, feats, actions, adv = random_problem(hidden, seed=7)
    grads = log_prob_gradient(params, feats, actions, adv)
    rng = np.random.default_rng(1)
    eps = 1e-6
    for k, p in enumerate(params):  # a few entries of every array, the log-std included
        for flat in rng.choice(p.size, size=min(3, p.size), replace=False):
            idx = np.unravel_index(flat, p.shape)
            plus = [q.copy() for q in params]
            minus = [q.copy() for q in params]
            plus[k][idx] += eps
            minus[k][idx] -= eps
            numeric = (objective(plus, feats, actions, adv) - objective(minus, feats, actions, adv)) / (2 * eps)
            assert grads[k][idx] == pytest.approx(numeric, rel=1e-6, abs=1e-8), (k, idx)


# ---- the inner step ----------------------------------------------------------------------------------------------
def test_one_small_inner_step_increases_the_objective_at_the_first_order_rate():
    params, feats, actions, adv = random_problem((16, 8), seed=5)
    step = 1e-4
    grads = log_prob_gradient(params, feats, actions, adv)
    before = objective(params, feats, actions, adv)
    after = objective(inner_step(params, feats, actions, adv, step), feats, actions, adv)
    expected = step * sum(float(np.sum(g**2)) for g in grads)  # first-order gain of an ascent step
    assert after > before
    assert after - before == pytest.approx(expected, rel=0.02)


def test_inner_step_leaves_its_inputs_untouched():
    params, feats, actions, adv = random_problem((12,))
    copies = [a.copy() for a in (*params, feats, actions, adv)]
    new = inner_step(params, feats, actions, adv, 0.5)
    for original, copy in zip((*params, feats, actions, adv), copies, strict=True):
        np.testing.assert_array_equal(original, copy)
    assert not any(np.shares_memory(n, p) for n, p in zip(new, params, strict=True))
    assert all(n.dtype == np.float64 for n in new)


def test_zero_advantages_leave_the_policy_where_it_was():
    params, feats, actions, _ = random_problem((12,))
    new = inner_step(params, feats, actions, np.zeros(N), 1.0)
    for n, p in zip(new, params, strict=True):
        np.testing.assert_array_equal(n, p)


def test_malformed_params_and_shapes_are_refused():
    params, feats, actions, adv = random_problem((12,))
    with pytest.raises(ValueError, match="odd count"):
        log_prob_gradient(params[:-1], feats, actions, adv)
    with pytest.raises(ValueError, match="layer 1"):
        log_prob_gradient([params[0], params[1], params[2].T, *params[3:]], feats, actions, adv)
    with pytest.raises(ValueError, match="log_std"):
        log_prob([*params[:-1], np.zeros(A + 1)], feats, actions)
    with pytest.raises(ValueError, match="feats"):
        policy_mean(params, feats[:, :-1])
    with pytest.raises(ValueError, match="weights"):
        log_prob_gradient(params, feats, actions, adv[:-1])


# ---- features and actions ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cartpole():
    return load_robot("cartpole")


def test_cartpole_features_scale_and_turn_the_angle_into_sine_and_cosine(cartpole):
    # obs: cart_pos (scale 1), pole_angle (periodic), cart_vel (scale 2), pole_angvel (scale 10)
    assert feature_dim(cartpole) == 5
    obs = np.array([0.5, np.pi / 3 + 4 * np.pi, 1.0, -7.0])  # an angle unwrapped over two turns
    np.testing.assert_allclose(policy_features(cartpole, obs),
                               [0.5, 0.5, -0.7, np.sin(np.pi / 3), np.cos(np.pi / 3)], atol=1e-12)


def test_features_are_clipped_and_keep_leading_axes(cartpole):
    obs = np.zeros((2, 3, 4))
    obs[0, 1] = [50.0, 0.0, -30.0, 500.0]
    feats = policy_features(cartpole, obs)
    assert feats.shape == (2, 3, 5)
    np.testing.assert_array_equal(feats[0, 1], [10.0, -10.0, 10.0, 0.0, 1.0])
    np.testing.assert_array_equal(feats[1, 2], [0.0, 0.0, 0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="obs"):
        policy_features(cartpole, np.zeros(3))


def test_to_env_action_maps_the_unit_box_onto_the_robots_box_and_clips(cartpole):
    np.testing.assert_array_equal(to_env_action(cartpole, np.array([[-1.0], [1.0], [3.0], [-2.5]])),
                                  [[-1.0], [1.0], [1.0], [-1.0]])
    # An asymmetric box: the affine map must be right, not just the clip.
    robot = replace(cartpole, action=[replace(cartpole.action[0], low=-2.0, high=4.0)])
    np.testing.assert_allclose(to_env_action(robot, np.array([[-1.0], [1.0], [0.0], [0.5], [1.5], [-9.0]])),
                               [[-2.0], [4.0], [1.0], [2.5], [4.0], [-2.0]])


# ---- returns, baseline, advantages -------------------------------------------------------------------------------
def test_discounted_returns_are_the_reward_to_go():
    rewards = np.random.default_rng(0).normal(size=(3, 7))
    want = np.zeros_like(rewards)
    for i in range(3):
        for t in range(7):
            want[i, t] = sum(0.9 ** (k - t) * rewards[i, k] for k in range(t, 7))
    np.testing.assert_allclose(discounted_returns(rewards, 0.9), want, rtol=1e-12)
    np.testing.assert_array_equal(discounted_returns(rewards, 0.0), rewards)


def linear_returns(feats: np.ndarray, seed: int = 2) -> np.ndarray:
    """Returns exactly linear in the baseline's own features ``[f, f**2, t/100, ..., 1]`` (f clipped)."""
    rng = np.random.default_rng(seed)
    f = np.clip(feats, -10, 10)
    s = np.arange(feats.shape[1])[None, :] / 100.0
    return (f @ rng.normal(size=feats.shape[2]) + f**2 @ rng.normal(size=feats.shape[2])
            + 3.0 * s - 2.0 * s**2 + 5.0 * s**3 + 0.7)


def test_linear_baseline_recovers_returns_linear_in_its_features():
    feats = np.random.default_rng(1).uniform(-2, 2, (8, 40, 3))
    returns = linear_returns(feats)
    residual = linear_baseline(feats, returns) - returns
    assert np.abs(residual).max() < 1e-4 * np.abs(returns).max()  # only the ridge's bias
    np.testing.assert_allclose(linear_baseline(feats, returns, reg=1e-12), returns, atol=1e-8)


def test_linear_baseline_is_rllabs_ridge_fit():
    """Written out path by path as rllab's LinearFeatureBaseline does; a strong ridge makes the features' exact
    scaling (t/100, not any other unit of time) matter."""
    rng = np.random.default_rng(5)
    feats, returns = rng.normal(size=(3, 25, 2)), rng.normal(size=(3, 25))
    rows = []
    for path in feats:
        o = np.clip(path, -10, 10)
        al = np.arange(len(path)).reshape(-1, 1) / 100.0
        rows.append(np.concatenate([o, o**2, al, al**2, al**3, np.ones((len(path), 1))], axis=1))
    x = np.concatenate(rows)
    for reg in (1e-5, 3.0):
        coeffs = np.linalg.lstsq(x.T @ x + reg * np.eye(x.shape[1]), x.T @ returns.reshape(-1), rcond=None)[0]
        np.testing.assert_allclose(linear_baseline(feats, returns, reg=reg), (x @ coeffs).reshape(3, 25), rtol=1e-9,
                                   atol=1e-12)


def test_linear_baseline_clips_its_features():
    feats = np.random.default_rng(3).uniform(-2, 2, (4, 20, 2))
    feats[0, 3, 1], feats[2, 7, 0] = 40.0, -1e6
    returns = linear_returns(feats)  # linear in the clipped features: the baseline fits them
    np.testing.assert_allclose(linear_baseline(feats, returns, reg=1e-12), returns, atol=1e-7)
    np.testing.assert_array_equal(linear_baseline(feats, returns), linear_baseline(np.clip(feats, -10, 10), returns))


def test_linear_baseline_refuses_non_finite_paths():
    feats = np.random.default_rng(3).uniform(-2, 2, (4, 20, 2))
    returns = linear_returns(feats)
    returns[1, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        linear_baseline(feats, returns)


def test_advantages_are_returns_minus_baseline_normalised():
    rng = np.random.default_rng(4)
    rewards, feats = rng.normal(1.0, 2.0, (5, 30)), rng.normal(size=(5, 30, 4))
    raw = advantages(rewards, feats, 0.99, normalize=False)
    returns = discounted_returns(rewards, 0.99)
    np.testing.assert_allclose(raw, returns - linear_baseline(feats, returns), rtol=1e-12)
    assert np.abs(raw).max() > 1e-3  # the baseline does not explain random rewards
    adv = advantages(rewards, feats, 0.99)
    assert adv.shape == (5, 30)
    assert abs(adv.mean()) < 1e-12 and adv.std() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(adv, (raw - raw.mean()) / (raw.std() + 1e-8), rtol=1e-12)


# ---- episodes of different lengths (the robot pools its episodes) -------------------------------------------------
def test_a_list_of_equal_length_episodes_gives_the_arrays_results_bitwise():
    # One implementation: the (N, T) form and the list form are the same computation, to the last bit.
    rng = np.random.default_rng(6)
    for n, t, f in ((1, 250, 5), (4, 250, 5), (16, 100, 5), (3, 17, 2)):
        rewards, feats = rng.normal(0.5, 3.0, (n, t)), rng.normal(0.0, 2.0, (n, t, f))
        returns = discounted_returns(rewards, 0.99)
        assert isinstance(returns, np.ndarray) and returns.shape == (n, t)
        pairs = [(returns, discounted_returns(list(rewards), 0.99)),
                 (linear_baseline(feats, returns), linear_baseline(list(feats), list(returns))),
                 (advantages(rewards, feats, 0.99), advantages(list(rewards), list(feats), 0.99)),
                 (advantages(rewards, feats, 0.9, normalize=False),
                  advantages(list(rewards), list(feats), 0.9, normalize=False))]
        for array_form, list_form in pairs:
            assert isinstance(list_form, list) and len(list_form) == n
            np.testing.assert_array_equal(np.stack(list_form), array_form)


def test_episodes_of_different_lengths_share_one_baseline_and_one_normalisation():
    rng = np.random.default_rng(7)
    lengths = (40, 13, 27)
    rewards = [rng.normal(1.0, 2.0, n) for n in lengths]
    feats = [rng.normal(size=(n, 3)) for n in lengths]
    returns = discounted_returns(rewards, 0.95)
    for r, ret in zip(rewards, returns, strict=True):  # each episode's own reward-to-go, unaffected by the others
        np.testing.assert_array_equal(ret, discounted_returns(r[None], 0.95)[0])
    # ONE ridge fit on all rows, each episode's step index starting at 0 (rllab's features, written out)
    x = np.concatenate([np.concatenate([np.clip(f, -10, 10), np.clip(f, -10, 10) ** 2, s, s**2, s**3, np.ones_like(s)],
                                       axis=1) for f, s in ((f, np.arange(len(f))[:, None] / 100.0) for f in feats)])
    coeffs = np.linalg.lstsq(x.T @ x + 1e-5 * np.eye(x.shape[1]), x.T @ np.concatenate(returns), rcond=None)[0]
    baseline = linear_baseline(feats, returns)
    assert [b.shape for b in baseline] == [(n,) for n in lengths]
    np.testing.assert_allclose(np.concatenate(baseline), x @ coeffs, rtol=1e-9, atol=1e-12)
    raw = np.concatenate(returns) - x @ coeffs
    adv = advantages(rewards, feats, 0.95)
    assert [a.shape for a in adv] == [(n,) for n in lengths]
    flat = np.concatenate(adv)
    assert abs(flat.mean()) < 1e-12 and flat.std() == pytest.approx(1.0, abs=1e-6)  # over all rows, not per episode
    np.testing.assert_allclose(flat, (raw - raw.mean()) / (raw.std() + 1e-8), rtol=1e-8, atol=1e-10)


def test_episodes_that_do_not_match_are_refused():
    rng = np.random.default_rng(8)
    feats, returns = [rng.normal(size=(10, 3)), rng.normal(size=(12, 3))], [rng.normal(size=10), rng.normal(size=11)]
    with pytest.raises(ValueError, match=r"one \(T_i, F\) and \(T_i,\) per episode"):
        linear_baseline(feats, returns)
    with pytest.raises(ValueError, match=r"feats\[1\]: expected an episode of 2 axes"):
        linear_baseline([feats[0], feats[1][0]], returns)
    with pytest.raises(ValueError, match="rewards: no episodes"):
        discounted_returns([], 0.99)
    with pytest.raises(ValueError, match=r"rewards: expected an array of 2 axes"):
        discounted_returns(np.zeros(5), 0.99)


# ---- the robot boundary ------------------------------------------------------------------------------------------
def test_policy_gradient_imports_no_torch():
    code = ("import sys, metarl_robot.runtime.policy_gradient; "
            "assert not {'torch', 'mujoco', 'gymnasium'} & set(sys.modules), sorted(sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
