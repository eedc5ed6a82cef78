"""The AdMRL implicit gap gradient against closed forms: CG vs a direct solve, the gradient vs finite differences.

The analytic problem is a one-step (bandit) task with a Gaussian policy a ~ N(φ, σ²I) over d
actions, a deterministic linear "environment" s' = A a + b and a *model* with different Â, b̂, so
the learner's adapted policy φ*(θ) = argmax V̂(·, θ) is not the real optimum and the gap is not
zero. Rewards are r_θ = θ·s' − ½aᵀQa (linear in θ) or Σ_k w exp(−(s'_k − θ_k)²/2ℓ²) − ½aᵀQa
(nonlinear in θ, the cart-pole target_x shape). Gaussian expectations of both are closed-form, so
V, V̂, φ*(θ) (Newton to machine precision), V*(θ) and gap(θ) are exact, and central differences of
gap(θ) are the reference the implicit gradient must match.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarl_robot.train.implicit_gradient import (
    Estimate,
    ImplicitGradientConfig,
    conjugate_gradient,
    hessian_vector_product,
    implicit_gap_gradient,
    model_value_derivatives,
    reinforce_gradient,
    reinforce_mixed_term,
)

F64 = torch.float64  # closed forms to machine precision; no global default-dtype change


# ---- conjugate gradient ---------------------------------------------------------------------------
def _spd(rng: np.random.Generator, n: int, cond: float) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.geomspace(1.0, cond, n)) @ q.T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cg_matches_direct_solve_on_random_spd_matrices(seed):
    rng = np.random.default_rng(seed)
    a, b = _spd(rng, 30, 1e3), rng.standard_normal(30)
    x, info = conjugate_gradient(lambda v: torch.as_tensor(a) @ v, b, iters=200, tol=1e-12)
    assert isinstance(x, np.ndarray)
    assert info.converged and not info.negative_curvature and info.relative_residual <= 1e-12
    np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=1e-8, atol=1e-10)

    damped, info = conjugate_gradient(lambda v: torch.as_tensor(a) @ v, b, iters=200, tol=1e-12, damping=0.5)
    np.testing.assert_allclose(damped, np.linalg.solve(a + 0.5 * np.eye(30), b), rtol=1e-8, atol=1e-10)
    assert not np.allclose(damped, x, rtol=1e-3)  # the damping is really applied


def test_cg_stops_at_the_iteration_cap_and_reports_it():
    rng = np.random.default_rng(3)
    a, b = _spd(rng, 40, 1e4), rng.standard_normal(40)
    _, info = conjugate_gradient(lambda v: torch.as_tensor(a) @ v, b, iters=3, tol=1e-12)
    assert info.iterations == 3 and not info.converged and info.relative_residual > 1e-6


def test_cg_reports_negative_curvature_of_an_indefinite_matrix():
    a = np.diag([1.0, 2.0, -1.0])
    _, info = conjugate_gradient(lambda v: torch.as_tensor(a) @ v, np.ones(3), iters=10)
    assert info.negative_curvature and not info.converged


def test_cg_rejects_bad_arguments():
    with pytest.raises(ValueError, match="iters must be >= 1"):
        conjugate_gradient(lambda v: v, np.ones(2), iters=0)
    with pytest.raises(ValueError, match="flat vector"):
        conjugate_gradient(lambda v: v, np.ones((2, 2)))


def test_cg_with_pearlmutter_hvp_solves_a_torch_quadratic():
    rng = np.random.default_rng(4)
    a, c = _spd(rng, 12, 50.0), rng.standard_normal(12)
    a_t, c_t = torch.as_tensor(a), torch.as_tensor(c)
    hvp = hessian_vector_product(lambda p: 0.5 * p @ a_t @ p + c_t @ p + 3.0, torch.zeros(12, dtype=F64))
    v = torch.as_tensor(rng.standard_normal(12))
    torch.testing.assert_close(hvp(v), a_t @ v)
    x, info = conjugate_gradient(hvp, -c, iters=100, tol=1e-12)
    assert info.converged
    np.testing.assert_allclose(x, np.linalg.solve(a, -c), rtol=1e-8, atol=1e-10)  # the quadratic's minimiser


def test_hvp_of_a_non_quadratic_matches_the_full_hessian():
    def f(p: torch.Tensor) -> torch.Tensor:
        return torch.sin(p).prod() + (p**3).sum() + torch.exp(p[:2] @ p[1:]).sum()

    p = torch.tensor([0.3, -0.7, 1.1], dtype=F64)
    full = torch.autograd.functional.hessian(f, p)
    hvp = hessian_vector_product(f, p)
    for v in torch.eye(3, dtype=F64):
        torch.testing.assert_close(hvp(v), full @ v)


# ---- the analytic bandit problem -------------------------------------------------------------------
SIGMA = 0.4
Q = torch.diag(torch.tensor([1.5, 1.0, 2.0], dtype=F64))
A_REAL = torch.tensor([[1.0, 0.5, -0.3], [0.2, -0.8, 0.6]], dtype=F64)
B_REAL = torch.tensor([0.1, -0.2], dtype=F64)
A_MODEL = torch.tensor([[0.7, 0.9, 0.1], [-0.3, -0.5, 1.0]], dtype=F64)
B_MODEL = torch.tensor([0.4, 0.3], dtype=F64)
WIDTH, WEIGHT = 1.0, 2.0


class Bandit:
    """One reward shape in a real environment (A, b) and its model (Â, b̂); all values in closed form."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def value(self, phi: torch.Tensor, theta: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """E_{a ~ N(φ, σ²I)}[r_θ(a, A a + b)]."""
        mean = a @ phi + b
        control = -0.5 * (phi @ Q @ phi + SIGMA**2 * torch.trace(Q))
        if self.kind == "linear":
            return theta @ mean + control
        var = SIGMA**2 * (a * a).sum(1) + WIDTH**2  # E exp(-(x-θ)²/2ℓ²), x ~ N(μ, v) = ℓ/√(ℓ²+v) exp(-(μ-θ)²/2(ℓ²+v))
        return (WEIGHT * WIDTH / torch.sqrt(var) * torch.exp(-0.5 * (mean - theta) ** 2 / var)).sum() + control

    def real(self, phi, theta):
        return self.value(phi, theta, A_REAL, B_REAL)

    def model(self, phi, theta):
        return self.value(phi, theta, A_MODEL, B_MODEL)

    def reward_param_grad(self, theta: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
        """∂_θ r_θ(a, s') per sample, (N, p)."""
        if self.kind == "linear":
            return s_next
        diff = s_next - theta
        return WEIGHT * diff / WIDTH**2 * torch.exp(-0.5 * diff**2 / WIDTH**2)

    def reward(self, theta: torch.Tensor, actions: torch.Tensor, s_next: torch.Tensor) -> torch.Tensor:
        control = -0.5 * ((actions @ Q) * actions).sum(1)
        if self.kind == "linear":
            return s_next @ theta + control
        return (WEIGHT * torch.exp(-0.5 * (s_next - theta) ** 2 / WIDTH**2)).sum(1) + control


def argmax(fn, theta: torch.Tensor) -> torch.Tensor:
    """Newton's method to machine precision (the objectives are strictly concave here)."""
    phi = torch.zeros(3, dtype=F64)
    for _ in range(60):
        grad = torch.autograd.functional.jacobian(lambda p: fn(p, theta), phi)
        hess = torch.autograd.functional.hessian(lambda p: fn(p, theta), phi)
        assert torch.linalg.eigvalsh(hess).max() < 0, "the test problem must be strictly concave"
        phi = phi - torch.linalg.solve(hess, grad)
        if grad.abs().max() < 1e-14:
            break
    assert torch.autograd.functional.jacobian(lambda p: fn(p, theta), phi).abs().max() < 1e-12
    return phi


def gap(problem: Bandit, theta: torch.Tensor) -> float:
    adapted = argmax(problem.model, theta)
    best = argmax(problem.real, theta)
    return float(problem.real(best, theta) - problem.real(adapted, theta))


def finite_difference_gap_gradient(problem: Bandit, theta: torch.Tensor, h: float = 1e-5) -> np.ndarray:
    steps = torch.eye(2, dtype=F64) * h
    return np.array([(gap(problem, theta + e) - gap(problem, theta - e)) / (2 * h) for e in steps])


THETA = torch.tensor([0.8, -0.5], dtype=F64)
KINDS = ["linear", "gaussian"]


def exact_gradient(problem: Bandit, theta: torch.Tensor):
    """The implicit gradient with every part exact (autograd of the closed forms)."""
    adapted, best = argmax(problem.model, theta), argmax(problem.real, theta)
    derivs = model_value_derivatives(problem.model, adapted, theta)
    g = torch.autograd.functional.jacobian(lambda p: problem.real(p, theta), adapted)
    eta = torch.autograd.functional.jacobian(lambda t: problem.real(adapted, t), theta)
    eta_star = torch.autograd.functional.jacobian(lambda t: problem.real(best, t), theta)
    cfg = ImplicitGradientConfig(cg_iters=20, cg_tol=1e-13, damping=0.0)
    return implicit_gap_gradient(derivs.hvp, derivs.mixed, g, eta, eta_star, cfg), derivs


@pytest.mark.parametrize("kind", KINDS)
def test_exact_implicit_gradient_matches_finite_differences_of_the_true_gap(kind):
    problem = Bandit(kind)
    reference = finite_difference_gap_gradient(problem, THETA)
    result, derivs = exact_gradient(problem, THETA)
    assert float(derivs.gradient_phi.abs().max()) < 1e-12  # evaluated at a stationary point of V̂
    assert gap(problem, THETA) > 0.01  # the model is wrong enough for the test to mean something
    assert result.cg.converged and result.cg.iterations <= 3 + 1
    np.testing.assert_allclose(result.gradient, reference, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result.gradient, result.oracle_term - result.direct_term + result.correction)
    # The test can fail: without the IFT correction the gradient is far off.
    without = result.oracle_term - result.direct_term
    assert np.abs(without - reference).max() > 0.1 * np.abs(reference).max()
    assert np.abs(without - reference).max() > 1e4 * 1e-7


@pytest.mark.parametrize("kind", KINDS)
def test_envelope_theorem_for_the_oracle_term(kind):
    problem, h = Bandit(kind), 1e-5

    def v_star(theta):
        return float(problem.real(argmax(problem.real, theta), theta))

    reference = [(v_star(THETA + h * e) - v_star(THETA - h * e)) / (2 * h) for e in torch.eye(2, dtype=F64)]
    result, _ = exact_gradient(problem, THETA)
    np.testing.assert_allclose(result.oracle_term, reference, rtol=1e-6, atol=1e-8)


def reinforce_estimate(problem: Bandit, theta: torch.Tensor, samples: int, seed: int,
                       optima: tuple[torch.Tensor, torch.Tensor] | None = None):
    """The estimator used on the stack: g, η, η* and the mixed term from sampled rollouts; H exact."""
    gen = torch.Generator().manual_seed(seed)
    adapted, best = optima or (argmax(problem.model, theta), argmax(problem.real, theta))

    def rollouts(phi, a, b):
        eps = torch.randn(samples, 3, generator=gen, dtype=F64)
        actions = phi + SIGMA * eps
        s_next = actions @ a.T + b
        return eps / SIGMA, problem.reward(theta, actions, s_next), problem.reward_param_grad(theta, s_next)

    score_real, returns_real, d_real = rollouts(adapted, A_REAL, B_REAL)
    _, _, d_oracle = rollouts(best, A_REAL, B_REAL)
    score_model, _, d_model = rollouts(adapted, A_MODEL, B_MODEL)
    g = reinforce_gradient(score_real, returns_real)
    derivs = model_value_derivatives(problem.model, adapted, theta)
    cfg = ImplicitGradientConfig(cg_iters=20, cg_tol=1e-13, damping=0.0)
    return implicit_gap_gradient(derivs.hvp, lambda x: reinforce_mixed_term(score_model, d_model, x), g.mean,
                                 d_real.mean(0), d_oracle.mean(0), cfg), g


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_reinforce_implicit_gradient_agrees_with_finite_differences_within_mc_error(kind):
    problem = Bandit(kind)
    reference = finite_difference_gap_gradient(problem, THETA)
    optima = argmax(problem.model, THETA), argmax(problem.real, THETA)
    results = [reinforce_estimate(problem, THETA, 20000, seed, optima)[0] for seed in range(24)]
    estimates = np.array([r.gradient for r in results])
    mean, stderr = estimates.mean(0), estimates.std(0, ddof=1) / np.sqrt(len(estimates))
    # Unbiased up to the product of two independent estimates (g and the mixed term: independent
    # samples, so no bias) and the leave-one-out baselines (unbiased): 4 standard errors.
    assert np.all(np.abs(mean - reference) <= 4 * stderr + 1e-9), (mean, reference, stderr)
    assert np.all(stderr < 0.05 * np.abs(reference).max())  # the check is tight enough to mean something
    without = np.mean([r.oracle_term - r.direct_term for r in results], 0)
    assert np.abs(without - reference).max() > 10 * stderr.max()


def test_reinforce_policy_gradient_matches_the_analytic_gradient():
    problem = Bandit("gaussian")
    adapted = argmax(problem.model, THETA)
    truth = torch.autograd.functional.jacobian(lambda p: problem.real(p, THETA), adapted)
    _, g = reinforce_estimate(problem, THETA, 20000, seed=7)
    assert isinstance(g, Estimate)
    assert torch.all((g.mean - truth).abs() <= 4.5 * g.stderr), (g.mean, truth, g.stderr)


def test_reinforce_mixed_term_matches_the_exact_mixed_term():
    problem = Bandit("gaussian")
    adapted = argmax(problem.model, THETA)
    derivs = model_value_derivatives(problem.model, adapted, THETA)
    gen = torch.Generator().manual_seed(11)
    eps = torch.randn(40000, 3, generator=gen, dtype=F64)
    s_next = (adapted + SIGMA * eps) @ A_MODEL.T + B_MODEL
    x = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    est = reinforce_mixed_term(eps / SIGMA, problem.reward_param_grad(THETA, s_next), x)
    exact = derivs.mixed(x)
    assert torch.all((est.mean - exact).abs() <= 4.5 * est.stderr), (est.mean, exact, est.stderr)
    assert torch.all(est.stderr < 0.1 * exact.abs().max())


def test_estimators_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="returns has 3 samples"):
        reinforce_gradient(np.zeros((4, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        reinforce_gradient(np.zeros((1, 2)), np.zeros(1))
    with pytest.raises(ValueError, match="x has 3 entries"):
        reinforce_mixed_term(np.zeros((4, 2)), np.zeros((4, 1)), np.zeros(3))
    with pytest.raises(ValueError, match="cg_iters must be >= 1"):
        ImplicitGradientConfig(cg_iters=0)
