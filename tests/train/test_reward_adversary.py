"""The AdMRL gradient adversary on the real stack: torch reward twins, the cart-pole gap gradient, a proposal.

The model is a tiny untrained ContextMBRL with normalisers fitted to real transitions (what matters
here is that the derivatives through *a* differentiable model are right, not that the model is
good). The cart-pole family is edited to start upright (a balance task) so the reward, and with it
∂r/∂target_x, is not ≈ 0 over the short window the test can afford. The "oracle episodes" are a
recorded episode of the real env under a seeded policy: the optimality of the oracle is an
assumption of the method (docs/admrl.md), not something these tests can check.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from metarl_robot.algos.context_mbrl import ContextMBRL, ContextMBRLConfig
from metarl_robot.envs.rollout import make_vector_env
from metarl_robot.models.context_dynamics import ContextDynamicsConfig
from metarl_robot.models.rewards import get_torch_reward
from metarl_robot.spec.family import load_family
from metarl_robot.spec.robot import load_robot
from metarl_robot.train.implicit_gradient import model_value_derivatives, reinforce_gradient, reinforce_mixed_term
from metarl_robot.train.reward_adversary import (
    RewardAdversaryConfig,
    RewardGradientAdversary,
    RewardGradientConfig,
    SurrogateLearner,
    Trajectories,
    real_rollouts,
    reward_gap_gradient,
    reward_param_grads,
)
from tests.conftest import edit_yaml


@pytest.fixture
def one_thread():
    """Tiny tensors on shared CPUs: intra-op threads only contend (restored after the test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_central_difference_reward_param_grads_match_autograd():
    family, robot = load_family("cartpole_swingup"), load_robot("cartpole")
    rng = np.random.default_rng(1)
    obs, next_obs = rng.normal(0, 0.5, (2, 50, robot.obs_dim))
    act = rng.uniform(-1, 1, (50, 1))
    d = reward_param_grads(family, robot, {"target_x": 0.3}, obs, act, next_obs, 1e-4)
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    r = get_torch_reward("cartpole_swingup")(robot, *(torch.as_tensor(x) for x in (obs, act, next_obs)),
                                             {"target_x": theta})
    auto = np.array([torch.autograd.grad(r[i], theta, retain_graph=True)[0].item() for i in range(50)])
    assert d.shape == (50, 1)
    np.testing.assert_allclose(d[:, 0], auto, rtol=1e-6, atol=1e-9)
    assert np.abs(auto).max() > 0.05


# ---- the cart-pole stack ----------------------------------------------------------------------------
TASK = {"target_x": 0.25, "pole_mass_scale": 1.2}
SEED = 3
WINDOW = dict(horizon=8, window_start=4, model_samples=16, adapt_steps=40, real_samples=256, mixed_samples=2048)


@pytest.fixture
def stack(sim_copy, one_thread):
    """An upright-start cart-pole family, a recorded episode of TASK and a tiny model fitted to its scales."""
    edit_yaml(sim_copy / "tasks" / "cartpole_swingup.yaml", lambda d: d["initial_state"]["qpos"].update(hinge=0.0))
    family, robot = load_family("cartpole_swingup"), load_robot("cartpole")
    # a gentle balancing-ish policy: push the cart under the pole, plus noise
    algo, episode = _recorded_episode_and_tiny_model(
        family, robot, TASK, 20, lambda obs, rng: np.clip([2.0 * obs[1] + 0.3 * obs[3] + 0.2 * rng.standard_normal()],
                                                          -1, 1))
    return algo, family, robot, episode


def _recorded_episode_and_tiny_model(family, robot, task, steps, policy):
    """``steps`` of ``task`` from SEED's start under ``policy(obs, rng)``, and a tiny untrained model whose
    normalisers are fitted to them."""
    vec = make_vector_env(family, 1, "sync", tasks=[family.validate(task)])
    env = vec.envs[0].unwrapped
    obs, _ = env.reset(seed=SEED)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(steps):
        next_obs, *_, info = env.step(policy(obs, rng))
        rows.append((obs, info["sent_action"], next_obs))
        obs = next_obs
    vec.close()
    episode = {k: np.array([r[i] for r in rows]) for i, k in enumerate(("obs", "actions", "next_obs"))}
    model_cfg = ContextDynamicsConfig(ensemble_size=2, hidden=16, layers=2, context_dim=4, encoder_hidden=16,
                                      context_window=4)
    algo = ContextMBRL(robot, model_cfg, ContextMBRLConfig(), seed=0)
    algo.model.fit_normalizers(episode["obs"], episode["actions"], episode["next_obs"])
    return algo, episode


def test_gap_gradient_on_cartpole_is_finite_at_a_stationary_point_and_both_mixed_terms_agree(stack):
    algo, family, robot, episode = stack
    out = {}
    for mode in ("exact", "reinforce"):
        cfg = RewardGradientConfig(**WINDOW, mixed_term=mode)
        out[mode] = reward_gap_gradient(algo, family, robot, TASK, episode, cfg, np.random.default_rng(5), seed=SEED)
    exact, reinforce = out["exact"], out["reinforce"]
    for r in (exact, reinforce):
        assert r.names == ["target_x"] and r.gradient.shape == (1,) and np.isfinite(r.gradient).all()
        assert r.adapted.shape == (8, 1)
        assert r.stationarity_residual <= 1e-6  # the IFT's premise, reached by the Newton polish
        assert r.implicit.cg.converged and not r.implicit.cg.negative_curvature
        assert r.start_offset < 1e-9  # replaying the oracle's commands reproduces its state at t0
        np.testing.assert_allclose(r.gradient, r.implicit.oracle_term - r.implicit.direct_term + r.implicit.correction)
        assert abs(r.oracle_return) > 1.0  # the window earns reward: the test is not all zeros
        log = r.as_log()
        assert {"gradient_target_x", "correction_target_x", "gap", "stationarity_residual"} <= set(log)
    # Same rng: the same adapted policy and real rollouts; only the mixed term's estimator differs.
    np.testing.assert_array_equal(exact.adapted, reinforce.adapted)
    np.testing.assert_array_equal(exact.implicit.direct_term, reinforce.implicit.direct_term)
    assert reinforce.implicit.correction_stderr is not None and exact.implicit.correction_stderr is None


def test_reinforce_mixed_term_agrees_with_the_pathwise_mixed_term_through_the_model(stack):
    """(∂²V̂/∂θ∂φ) x two ways at the adapted policy: REINFORCE vs autograd of large sample averages."""
    algo, family, robot, episode = stack
    cfg = RewardGradientConfig(**WINDOW)
    learner = SurrogateLearner(algo, family, robot, episode["obs"][4], np.zeros(4), cfg, np.random.default_rng(2))
    theta = torch.tensor([TASK["target_x"]], dtype=torch.float64)
    phi, residual = learner.adapt(theta)
    assert residual <= 1e-6
    x = torch.as_tensor(np.random.default_rng(3).standard_normal(learner.dim))

    # Pathwise: exact mixed terms of independent sample averages; their spread is the MC error.
    chunks = []
    for _ in range(8):
        noise = learner.draw_noise(500)
        chunks.append(model_value_derivatives(lambda p, t, e=noise: learner.objective(p, t, e), phi, theta).mixed(x))
    pathwise = torch.stack(chunks)
    path_mean, path_se = pathwise.mean(0), pathwise.std(0) / np.sqrt(len(chunks))

    with torch.no_grad():
        eps = learner.draw_noise(8000)
        a = learner.actions(phi, eps)
        s = learner.model_states(a).numpy()
    d = reward_param_grads(family, robot, {"target_x": TASK["target_x"]}, s[:, :-1], a.numpy(), s[:, 1:], 1e-4).sum(1)
    est = reinforce_mixed_term(learner.score(eps), d, x)
    combined = float(torch.sqrt(est.stderr**2 + path_se**2)[0])
    assert abs(float(est.mean[0] - path_mean[0])) <= 4 * combined, (est.mean, path_mean, est.stderr, path_se)
    assert abs(float(path_mean[0])) > 3 * combined  # a non-zero term, resolved: the agreement means something


def test_the_adapted_policy_moves_with_theta_as_the_implicit_function_theorem_says(stack):
    """dφ*/dθ by re-adapting at θ ± h (same noise, same branch) vs −H⁻¹ M from the derivatives of J."""
    algo, family, robot, episode = stack
    cfg = RewardGradientConfig(**{**WINDOW, "stationarity_tol": 1e-11, "newton_steps": 30})
    learner = SurrogateLearner(algo, family, robot, episode["obs"][4], np.zeros(4), cfg, np.random.default_rng(8))
    theta = torch.tensor([TASK["target_x"]], dtype=torch.float64)
    phi, residual = learner.adapt(theta)
    assert residual <= 1e-11
    h = 1e-4
    plus, res_plus = learner.adapt(theta + h, init=phi)
    minus, res_minus = learner.adapt(theta - h, init=phi)
    assert max(res_plus, res_minus) <= 1e-11
    fd = (plus - minus) / (2 * h)

    derivs = model_value_derivatives(learner.objective, phi, theta)
    m = torch.stack([derivs.mixed(e)[0] for e in torch.eye(learner.dim, dtype=torch.float64)])  # column of M
    hess = torch.stack([derivs.hvp(e) for e in torch.eye(learner.dim, dtype=torch.float64)])
    ift = -torch.linalg.solve(hess, m)
    assert torch.linalg.eigvalsh(0.5 * (hess + hess.T)).max() < 0  # a strict local maximum
    assert float(fd.abs().max()) > 1e-3  # φ* really moves with θ
    torch.testing.assert_close(fd, ift, rtol=1e-4, atol=1e-4 * float(fd.abs().max()))


def _replayed_env(family, episode, t0):
    vec = make_vector_env(family, 1, "sync", tasks=[family.validate(TASK)])
    env = vec.envs[0].unwrapped
    obs, _ = env.reset(seed=SEED)
    for command in episode["actions"][:t0]:
        obs, *_ = env.step(command)
    return vec, env, obs


def test_batched_real_rollouts_are_what_the_env_steps_to(stack):
    _, family, robot, episode = stack
    rng = np.random.default_rng(4)
    actions = np.clip(np.cumsum(rng.uniform(-0.3, 0.3, (3, 6, 1)), axis=1), -1, 1)  # within the rate limit
    vec, env, start = _replayed_env(family, episode, 4)
    obs, next_obs, rewards = real_rollouts(env, start, actions, family, robot, TASK)
    vec.close()
    for i in range(3):
        vec, env, first = _replayed_env(family, episode, 4)
        stepped = [env.step(a) for a in actions[i]]
        vec.close()
        np.testing.assert_allclose(obs[i, 0], first, atol=1e-12)
        np.testing.assert_allclose(next_obs[i], [s[0] for s in stepped], atol=1e-9)
        np.testing.assert_allclose(rewards[i], [s[1] for s in stepped], atol=1e-9)


@pytest.mark.slow
def test_reinforce_policy_gradient_in_mujoco_matches_a_directional_finite_difference(stack):
    """g · x by REINFORCE from real rollouts vs the pathwise derivative of the real value along x (common noise)."""
    algo, family, robot, episode = stack
    cfg = RewardGradientConfig(**WINDOW)
    vec, env, start = _replayed_env(family, episode, cfg.window_start)
    learner = SurrogateLearner(algo, family, robot, start, np.zeros(4), cfg, np.random.default_rng(6))
    phi, _ = learner.adapt(torch.tensor([TASK["target_x"]], dtype=torch.float64))
    x = torch.as_tensor(np.random.default_rng(7).standard_normal(learner.dim))

    def returns(p, eps):
        return real_rollouts(env, start, learner.actions(p, eps).numpy(), family, robot, TASK)[2].sum(1)

    eps = learner.draw_noise(8192)
    g = reinforce_gradient(learner.score(eps), returns(phi, eps))
    along, along_se = float(g.mean @ x), float(torch.sqrt((g.stderr**2) @ (x**2)))  # SE ignoring correlations
    eps_fd, h = learner.draw_noise(4096), 1e-4
    per_sample = (returns(phi + h * x, eps_fd) - returns(phi - h * x, eps_fd)) / (2 * h)
    vec.close()
    fd, fd_se = per_sample.mean(), per_sample.std() / np.sqrt(len(per_sample))
    combined = np.hypot(along_se, fd_se)
    assert abs(along - fd) <= 4 * combined, (along, fd, along_se, fd_se)
    assert abs(fd) > 3 * combined  # resolved: a sign error would fail


def test_adversary_moves_only_the_reward_coordinate_inside_the_train_box(stack):
    algo, family, robot, episode = stack
    cfg = RewardAdversaryConfig(steps=2, step_size=0.25, gradient=RewardGradientConfig(**WINDOW))
    adversary = RewardGradientAdversary(algo, family, robot, cfg, seed=0)
    seen = []

    def oracle(task):
        seen.append(task)
        return episode  # stands in for the oracle's episode of each visited task

    new = adversary.propose(TASK, oracle, seed=SEED)
    lo, hi = family.param("target_x").train
    assert lo <= new["target_x"] <= hi and new["target_x"] != TASK["target_x"]
    assert {k: v for k, v in new.items() if k != "target_x"} == {k: v for k, v in family.validate(TASK).items()
                                                                 if k != "target_x"}
    assert len(adversary.history) == 2 and len(seen) == 2 and seen[1]["target_x"] != seen[0]["target_x"]
    for row in adversary.history:
        assert row["step_norm"] <= 0.25 + 1e-12 and row["gradient_finite"] == 1.0
    # Each step goes along its gradient's sign (or is stopped by the box).
    first = adversary.history[0]
    assert np.sign(seen[1]["target_x"] - seen[0]["target_x"]) == np.sign(first["gradient_target_x"])


def test_bad_inputs_are_refused_with_the_field_named(stack):
    algo, family, robot, episode = stack
    with pytest.raises(ValueError, match="fewer than window_start \\+ horizon"):
        reward_gap_gradient(algo, family, robot, TASK, episode, RewardGradientConfig(horizon=30))
    with pytest.raises(ValueError, match="need obs, actions and next_obs"):
        Trajectories.of({"obs": episode["obs"]})
    with pytest.raises(ValueError, match="matching n and T"):
        Trajectories.of({**episode, "actions": episode["actions"][:5]})
    with pytest.raises(ValueError, match="mixed_term must be 'reinforce' or 'exact'"):
        RewardGradientConfig(mixed_term="pathwise")
    with pytest.raises(ValueError, match="step_size must be in"):
        RewardAdversaryConfig(step_size=0.0)


@pytest.mark.slow
def test_half_cheetah_velocity_runs_and_refuses_the_exact_mixed_term(one_thread):
    family, robot = load_family("half_cheetah_vel"), load_robot("half_cheetah")
    task = {"target_velocity": 0.5}
    algo, episode = _recorded_episode_and_tiny_model(family, robot, task, 12,
                                                     lambda obs, rng: rng.uniform(-1, 1, robot.action_dim))
    cfg = RewardGradientConfig(horizon=6, window_start=4, model_samples=16, adapt_steps=40, real_samples=128,
                               mixed_samples=512)
    r = reward_gap_gradient(algo, family, robot, task, episode, cfg, np.random.default_rng(1), seed=SEED)
    assert r.names == ["target_velocity"] and r.gradient.shape == (1,) and np.isfinite(r.gradient).all()
    assert r.adapted.shape == (6, robot.action_dim) and r.stationarity_residual <= 1e-6 and r.start_offset < 1e-9
    # ∂r/∂v* = sign(v − v*): each window step contributes ±1 (up to the finite-difference kink average).
    assert abs(r.implicit.oracle_term[0]) <= 6 + 1e-6 and abs(r.implicit.direct_term[0]) <= 6 + 1e-6
    with pytest.raises(ValueError, match="use 'reinforce'"):
        reward_gap_gradient(algo, family, robot, task, episode, dataclasses.replace(cfg, mixed_term="exact"))
