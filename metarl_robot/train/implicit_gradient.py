"""The AdMRL gradient of the sub-optimality gap with respect to reward parameters (implicit function theorem).

AdMRL (Lin et al. 2020) picks the next training task as the one where the model-based learner is
most sub-optimal. For a task family whose parameters θ enter the reward, the gap

    gap(θ) = V*(θ) − V(φ*(θ), θ),        φ*(θ) = argmax_φ V̂(φ, θ)

(V the real value, V̂ the value under the learned model, φ the learner's policy parameters) has the
gradient

    ∇_θ gap = ∇_θ V*(θ) − ∂_θ V(φ*, θ) + (∂²V̂/∂θ∂φ) H⁻¹ g,     H = ∇²_φ V̂(φ*, θ),  g = ∇_φ V(φ*, θ).

docs/admrl.md derives it and states the assumptions. This module holds the pieces, each usable
alone and each tested against a closed form (tests/train/test_implicit_gradient.py):

- :func:`conjugate_gradient` solves ``(A + λI) x = b`` for a positive-definite ``A`` given only
  ``v ↦ A v``; here ``A = −H`` (H is negative definite at an interior maximum), so ``x = −H⁻¹ g``
  up to the damping λ.
- :func:`hessian_vector_product` and :func:`model_value_derivatives` give ``v ↦ H v`` by
  Pearlmutter's trick (double backward) and the mixed term ``x ↦ (∂²V̂/∂θ∂φ) x`` exactly.
- :func:`reinforce_gradient` estimates ``g`` from real rollouts (MuJoCo is not differentiable),
  :func:`reinforce_mixed_term` the mixed term from model rollouts — AdMRL's use of REINFORCE:
  ``(∂²V̂/∂θ∂φ) x = E_τ[(x · ∇_φ log π_φ(τ)) Σ_t ∂_θ r_θ(s_t, a_t)]``.
- :func:`implicit_gap_gradient` assembles the formula and returns the parts for logging.

All tensors are float64 torch tensors (inputs are converted); results are numpy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]
"""A linear map given by its action on a flat vector."""


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


# ---- conjugate gradient --------------------------------------------------------------------------
@dataclass(frozen=True)
class CGInfo:
    """How a conjugate-gradient solve ended."""

    iterations: int
    """Matrix-vector products taken."""
    residual_norm: float
    """‖b − (A + λI) x‖ of the returned x (recomputed, not the recursion's estimate)."""
    relative_residual: float
    """``residual_norm / ‖b‖`` (0 when b = 0)."""
    converged: bool
    """Whether the recursion's residual reached ``tol·‖b‖`` (without non-positive curvature on the way)."""
    negative_curvature: bool
    """A search direction p had pᵀ(A + λI)p ≤ 0: the matrix is not positive definite (the solve stopped
    there). For AdMRL this means the adapted policy is not at a strict local maximum of V̂."""


def conjugate_gradient(matvec: Matvec, b: np.ndarray | torch.Tensor, iters: int = 50, tol: float = 1e-10,
                       damping: float = 0.0) -> tuple[np.ndarray | torch.Tensor, CGInfo]:
    """Solve ``(A + damping·I) x = b`` for symmetric positive-definite ``A`` given ``matvec(v) = A v``.

    ``b`` is a flat vector (numpy or torch; the solution has the same type). Stops after ``iters``
    products, when ``‖r‖ ≤ tol·‖b‖``, or on non-positive curvature (reported in the info, with the
    iterate reached so far). Starts from x = 0, so each iterate minimises the quadratic over a
    growing Krylov space and an early stop is a regularised solve rather than garbage.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if tol < 0 or damping < 0:
        raise ValueError(f"tol and damping must be >= 0, got tol={tol}, damping={damping}")
    was_numpy = isinstance(b, np.ndarray)
    b_t = _as_tensor(b)
    if b_t.ndim != 1:
        raise ValueError(f"b must be a flat vector, got shape {tuple(b_t.shape)}")

    def a_damped(v: torch.Tensor) -> torch.Tensor:
        return _as_tensor(matvec(v)).reshape(-1) + damping * v

    x = torch.zeros_like(b_t)
    r = b_t.clone()
    p = r.clone()
    rr = float(r @ r)
    b_norm = float(torch.linalg.vector_norm(b_t))
    threshold = tol * b_norm
    k, negative = 0, False
    while k < iters and np.sqrt(rr) > threshold:
        ap = a_damped(p)
        k += 1
        curvature = float(p @ ap)
        if curvature <= 0.0:
            negative = True
            break
        alpha = rr / curvature
        x = x + alpha * p
        r = r - alpha * ap
        rr_next = float(r @ r)
        p = r + (rr_next / rr) * p
        rr = rr_next
    residual = float(torch.linalg.vector_norm(b_t - a_damped(x))) if k else b_norm
    relative = residual / b_norm if b_norm > 0 else 0.0
    info = CGInfo(iterations=k, residual_norm=residual, relative_residual=relative,
                  converged=bool(np.sqrt(rr) <= threshold) and not negative, negative_curvature=negative)
    return (x.numpy() if was_numpy else x), info


# ---- exact derivatives of a differentiable model value ---------------------------------------------
def hessian_vector_product(fn: Callable[[torch.Tensor], torch.Tensor], params: torch.Tensor) -> Matvec:
    """``v ↦ ∇²fn(params) v`` on flat vectors, by Pearlmutter's trick (one backward with a graph, then one per v).

    ``fn`` maps a tensor shaped like ``params`` to a scalar; it must be twice differentiable by autograd.
    """
    p = params.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(p), p, create_graph=True)

    def hvp(v: torch.Tensor) -> torch.Tensor:
        (hv,) = torch.autograd.grad(grad, p, grad_outputs=_as_tensor(v).reshape(p.shape).to(grad.dtype),
                                    retain_graph=True, allow_unused=True)
        return torch.zeros(p.numel(), dtype=torch.float64) if hv is None else hv.reshape(-1).to(torch.float64)

    return hvp


@dataclass
class ModelValueDerivatives:
    """First and second derivatives of a differentiable model value V̂(φ, θ) at one (φ, θ)."""

    value: float
    """V̂(φ, θ)."""
    gradient_phi: torch.Tensor
    """∇_φ V̂, flat (≈ 0 at the adapted policy: the stationarity residual)."""
    hvp: Matvec
    """v ↦ H v with H = ∇²_φ V̂ (flat vectors)."""
    mixed: Matvec
    """x ↦ (∂²V̂/∂θ∂φ) x = ∂_θ (x · ∇_φ V̂), a vector shaped like θ (flat)."""


def model_value_derivatives(model_value: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                            phi: torch.Tensor, theta: torch.Tensor) -> ModelValueDerivatives:
    """Build H v and the mixed term from one double-backward graph of ``model_value(phi, theta)`` (a scalar)."""
    p = phi.detach().clone().requires_grad_(True)
    t = theta.detach().clone().requires_grad_(True)
    value = model_value(p, t)
    (grad,) = torch.autograd.grad(value, p, create_graph=True)

    def second(v: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor:
        (out,) = torch.autograd.grad(grad, wrt, grad_outputs=_as_tensor(v).reshape(p.shape).to(grad.dtype),
                                     retain_graph=True, allow_unused=True)
        return torch.zeros(wrt.numel(), dtype=torch.float64) if out is None else out.reshape(-1).to(torch.float64)

    return ModelValueDerivatives(value=float(value.detach()), gradient_phi=grad.detach().reshape(-1).to(torch.float64),
                                 hvp=lambda v: second(v, p), mixed=lambda x: second(x, t))


# ---- REINFORCE ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """A Monte-Carlo estimate with its per-component standard error."""

    mean: torch.Tensor
    """The estimate."""
    stderr: torch.Tensor
    """Standard deviation of the per-sample terms over √N (same shape as ``mean``)."""


def _leave_one_out(values: torch.Tensor) -> torch.Tensor:
    # b_i = mean of the other samples: independent of sample i, so E[(R_i − b_i) S_i] = E[R_i S_i].
    n = values.shape[0]
    return (values.sum(0, keepdim=True) - values) / (n - 1)


def _mean_and_stderr(terms: torch.Tensor) -> Estimate:
    n = terms.shape[0]
    return Estimate(mean=terms.mean(0), stderr=terms.std(0, unbiased=True) / np.sqrt(n))


def _check_samples(score: torch.Tensor, other: torch.Tensor, other_name: str) -> None:
    if score.ndim != 2:
        raise ValueError(f"score must have shape (N, dim phi), got {tuple(score.shape)}")
    if score.shape[0] < 2:
        raise ValueError(f"need at least 2 samples for a leave-one-out baseline, got {score.shape[0]}")
    if other.shape[0] != score.shape[0]:
        raise ValueError(f"{other_name} has {other.shape[0]} samples, score has {score.shape[0]}")


def reinforce_gradient(score: np.ndarray | torch.Tensor, returns: np.ndarray | torch.Tensor) -> Estimate:
    """∇_φ E[R] ≈ mean_i (R_i − b_i) ∇_φ log π_φ(τ_i), with the leave-one-out baseline b_i.

    ``score`` is ``(N, dim φ)`` (``∇_φ log π_φ(τ_i)``), ``returns`` is ``(N,)``.
    """
    s, r = _as_tensor(score), _as_tensor(returns)
    _check_samples(s, r, "returns")
    if r.ndim != 1:
        raise ValueError(f"returns must have shape (N,), got {tuple(r.shape)}")
    return _mean_and_stderr((r - _leave_one_out(r))[:, None] * s)


def reinforce_mixed_term(score: np.ndarray | torch.Tensor, reward_param_grads: np.ndarray | torch.Tensor,
                         x: np.ndarray | torch.Tensor) -> Estimate:
    """(∂²V̂/∂θ∂φ) x ≈ mean_i (x · ∇_φ log π_φ(τ_i)) (D_i − b_i), with D_i = Σ_t ∂_θ r_θ(s_t, a_t) of rollout i.

    The model's trajectory distribution does not depend on θ (θ enters only the reward), so
    ∂_θ ∇_φ V̂ = E[∇_φ log π(τ) D(τ)ᵀ]; the leave-one-out baseline on D keeps it unbiased (E[∇ log π] = 0).
    ``score`` is ``(N, dim φ)`` from *model* rollouts, ``reward_param_grads`` is ``(N, dim θ)``.
    """
    s, d, v = _as_tensor(score), _as_tensor(reward_param_grads), _as_tensor(x).reshape(-1)
    _check_samples(s, d, "reward_param_grads")
    if d.ndim != 2:
        raise ValueError(f"reward_param_grads must have shape (N, dim theta), got {tuple(d.shape)}")
    if v.shape[0] != s.shape[1]:
        raise ValueError(f"x has {v.shape[0]} entries, the policy has {s.shape[1]} parameters")
    return _mean_and_stderr((s @ v)[:, None] * (d - _leave_one_out(d)))


# ---- assembly -----------------------------------------------------------------------------------
@dataclass
class ImplicitGradientConfig:
    """How the linear system H x = g is solved."""

    cg_iters: int = 50
    """Most conjugate-gradient iterations (Hessian-vector products)."""
    cg_tol: float = 1e-8
    """Relative residual at which CG stops."""
    damping: float = 1e-4
    """λ added to −H: solves (−H + λI) y = g, a Tikhonov-regularised H⁻¹ (biases the correction towards 0)."""

    def __post_init__(self) -> None:
        if self.cg_iters < 1:
            raise ValueError(f"cg_iters must be >= 1, got {self.cg_iters}")
        if self.cg_tol < 0:
            raise ValueError(f"cg_tol must be >= 0, got {self.cg_tol}")
        if self.damping < 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")


@dataclass
class ImplicitGradientResult:
    """∇_θ gap and its parts (numpy, flat over θ), for the adversary and for logging."""

    gradient: np.ndarray
    """∇_θ gap = oracle_term − direct_term + correction."""
    oracle_term: np.ndarray
    """∇_θ V*(θ) = E_{π*}[Σ_t ∂_θ r] (envelope theorem)."""
    direct_term: np.ndarray
    """∂_θ V(φ*, θ) = E_{π_φ*}[Σ_t ∂_θ r] in the real environment."""
    correction: np.ndarray
    """(∂²V̂/∂θ∂φ) H⁻¹ g: how the adapted policy's move with θ changes its real return."""
    correction_stderr: np.ndarray | None
    """Standard error of the correction from the mixed-term samples alone (None in exact mode)."""
    solution: np.ndarray
    """H⁻¹ g as solved (flat over φ)."""
    policy_gradient_norm: float
    """‖g‖ = ‖∇_φ V(φ*, θ)‖, the real-environment policy gradient at the adapted policy."""
    cg: CGInfo
    """How the solve of H x = g ended."""

    def as_log(self) -> dict[str, float]:
        """Flat scalars for a metrics row (one per θ coordinate where vector-valued)."""
        out: dict[str, float] = {"policy_gradient_norm": self.policy_gradient_norm,
                                 "cg_iterations": float(self.cg.iterations),
                                 "cg_relative_residual": self.cg.relative_residual,
                                 "cg_negative_curvature": float(self.cg.negative_curvature)}
        for name in ("gradient", "oracle_term", "direct_term", "correction"):
            for i, v in enumerate(np.atleast_1d(getattr(self, name))):
                out[f"{name}_{i}"] = float(v)
        return out


def implicit_gap_gradient(hvp: Matvec, mixed: Callable[[torch.Tensor], torch.Tensor | Estimate],
                          policy_gradient: np.ndarray | torch.Tensor, direct_term: np.ndarray | torch.Tensor,
                          oracle_term: np.ndarray | torch.Tensor, cfg: ImplicitGradientConfig | None = None
                          ) -> ImplicitGradientResult:
    """∇_θ gap = ∇_θ V* − ∂_θ V + (∂²V̂/∂θ∂φ) H⁻¹ g from its parts.

    - ``hvp``: v ↦ H v, H = ∇²_φ V̂ at the adapted policy (negative definite at a strict maximum);
    - ``mixed``: x ↦ (∂²V̂/∂θ∂φ) x, exact (:attr:`ModelValueDerivatives.mixed`) or a REINFORCE
      :class:`Estimate` (``lambda x: reinforce_mixed_term(score, D, x)``);
    - ``policy_gradient``: g = ∇_φ V(φ*, θ) in the real environment (flat over φ);
    - ``direct_term``: ∂_θ V(φ*, θ); ``oracle_term``: ∇_θ V*(θ) (both flat over θ).

    CG runs on the positive-definite −H: y = (−H + λI)⁻¹ g ≈ −H⁻¹ g, so the correction is −mixed(y).
    """
    cfg = cfg or ImplicitGradientConfig()
    g = _as_tensor(policy_gradient).reshape(-1)
    eta = _as_tensor(direct_term).reshape(-1)
    eta_star = _as_tensor(oracle_term).reshape(-1)
    if eta.shape != eta_star.shape:
        raise ValueError(f"direct_term has shape {tuple(eta.shape)}, oracle_term {tuple(eta_star.shape)}; "
                         "both are gradients over the same reward parameters")
    y, info = conjugate_gradient(lambda v: -_as_tensor(hvp(v)).reshape(-1), g, cfg.cg_iters, cfg.cg_tol, cfg.damping)
    mixed_y = mixed(y)
    if isinstance(mixed_y, Estimate):
        correction, stderr = -mixed_y.mean.reshape(-1), mixed_y.stderr.reshape(-1).numpy()
    else:
        correction, stderr = -_as_tensor(mixed_y).reshape(-1), None
    if correction.shape != eta.shape:
        raise ValueError(f"the mixed term has shape {tuple(correction.shape)}, the reward parameters "
                         f"{tuple(eta.shape)}")
    gradient = eta_star - eta + correction
    return ImplicitGradientResult(gradient=gradient.numpy(), oracle_term=eta_star.numpy(), direct_term=eta.numpy(),
                                  correction=correction.numpy(), correction_stderr=stderr, solution=(-y).numpy(),
                                  policy_gradient_norm=float(torch.linalg.vector_norm(g)), cg=info)
