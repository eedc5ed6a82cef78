"""Online adaptation of a dynamics ensemble's last layer on the robot: Bayesian linear regression, numpy only.

Why: a context encoder only interpolates between the tasks it was trained on, and a robot lies outside them.
What extrapolates is fitting the robot's own data. Each ensemble member predicts the normalised change of the
observation as ``phi(obs, action, z)^T W`` with meta-learned features ``phi`` (F of them, the last one a
constant 1 for the bias) and a last layer ``W`` (F x o). Following ALPaCA (Harrison et al. 2018), ``W`` has a
matrix-normal prior with mean ``W0`` (the meta-trained head) and row precision ``alpha I``, and the observation
noise shares its column covariance, so the posterior mean after transitions ``(phi_i, y_i)`` is

    W_n = (alpha I + sum phi_i phi_i^T)^-1 (alpha W0 + sum phi_i y_i^T),

independent of the noise covariance. It is kept by recursive least squares, one rank-one update per transition
(``P = (alpha I + sum phi phi^T)^-1``; O(F^2) per member, no matrix inverse on the robot):

    u = P phi;  k = u / (1 + phi^T u);  W <- W + k (y - W^T phi)^T;  P <- P - k u^T

The trainer (:class:`metarl_robot.models.online_dynamics.OnlineContextDynamics`) computes the same posterior in
closed form; the tests check the two agree. The posterior persists across episodes until :meth:`reset`.

A diverging update never reaches the planner: after each update the new posterior is checked (finite; ``P``
symmetric with a positive diagonal; ``W`` within ``max_deviation`` of ``W0`` in the features' normalised units)
and, if it fails, the rows of that env roll back to their last good posterior and :attr:`last_failure` says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_MAX_DEVIATION = 1e3
"""Largest allowed |W - W0| (in normalised output units per unit feature) before an update counts as diverged.
The meta-trained heads are O(1); a posterior 1000x away from them is numerical failure, not adaptation."""


@dataclass(frozen=True)
class LastLayerConfig:
    """How the robot adapts the last layer."""

    prior_precision: float
    """alpha: precision of the prior around the meta-trained head, relative to the noise (meta-learned)."""
    max_deviation: float = DEFAULT_MAX_DEVIATION
    """An update that moves any weight further than this from the prior mean is refused (rolled back)."""

    def validate(self) -> None:
        if not (np.isfinite(self.prior_precision) and self.prior_precision > 0):
            raise ValueError(f"prior_precision: must be a finite number > 0, got {self.prior_precision!r}")
        if not (np.isfinite(self.max_deviation) and self.max_deviation > 0):
            raise ValueError(f"max_deviation: must be a finite number > 0, got {self.max_deviation!r}")


class LastLayerPosterior:
    """The posterior over each env's and each member's last layer, updated one transition at a time.

    Shapes: ``B`` envs, ``E`` members, ``F`` features, ``o`` outputs. :attr:`weights` ``(B, E, F, o)`` is the
    posterior mean the planner predicts with; :attr:`covariance` ``(B, E, F, F)`` is ``P`` (in units of the noise
    variance).
    """

    def __init__(self, prior_weights: np.ndarray, config: LastLayerConfig, batch: int = 1) -> None:
        config.validate()
        prior = np.asarray(prior_weights, dtype=np.float64)
        if prior.ndim != 3 or not np.isfinite(prior).all():
            raise ValueError(f"prior_weights: expected finite (E, F, o), got shape {prior.shape}")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.config, self.batch = config, batch
        self.prior = prior
        """(E, F, o) the meta-trained last layer W0."""
        e, f, _ = prior.shape
        self.weights = np.broadcast_to(prior, (batch, *prior.shape)).copy()
        """(B, E, F, o) the posterior mean of each env's last layer."""
        self.covariance = np.broadcast_to(np.eye(f) / config.prior_precision, (batch, e, f, f)).copy()
        """(B, E, F, F) P: the posterior covariance of a weight column, in units of the noise variance."""
        self.updates = np.zeros(batch, dtype=np.int64)
        """Transitions each env's posterior rests on (since its last reset)."""
        self.rejected = np.zeros(batch, dtype=np.int64)
        """Updates refused (rolled back) per env since its last reset."""
        self.last_failure: list[str | None] = [None] * batch
        """Per env: why its latest update was refused (None: it was accepted, or none was made)."""

    @property
    def features(self) -> int:
        return self.prior.shape[1]

    def reset(self, which: np.ndarray | None = None) -> None:
        """Back to the prior (the meta-trained head) for the envs in the bool mask ``which`` (default all)."""
        which = np.ones(self.batch, dtype=bool) if which is None else np.asarray(which, dtype=bool)
        self.weights[which] = self.prior
        self.covariance[which] = np.eye(self.features) / self.config.prior_precision
        self.updates[which] = 0
        self.rejected[which] = 0
        for b in np.flatnonzero(which):
            self.last_failure[b] = None

    def update(self, phi: np.ndarray, target: np.ndarray, which: np.ndarray | None = None) -> np.ndarray:
        """Add one transition per env: ``phi`` ``(B, E, F)`` its features under each member, ``target``
        ``(B, o)`` or ``(B, E, o)`` the normalised change of the observation. Only the envs in ``which`` (default
        all) update. Returns ``(B,)`` bool: the envs whose update was accepted (refused ones keep their previous
        posterior; :attr:`last_failure` says why)."""
        which = np.ones(self.batch, dtype=bool) if which is None else np.asarray(which, dtype=bool)
        phi = np.asarray(phi, dtype=np.float64)
        target = np.asarray(target, dtype=np.float64)
        e, f, o = self.prior.shape
        if phi.shape != (self.batch, e, f):
            raise ValueError(f"phi: expected shape {(self.batch, e, f)}, got {phi.shape}")
        if target.shape == (self.batch, o):
            target = np.broadcast_to(target[:, None], (self.batch, e, o))
        if target.shape != (self.batch, e, o):
            raise ValueError(f"target: expected shape {(self.batch, o)} or {(self.batch, e, o)}, got {target.shape}")
        accepted = np.zeros(self.batch, dtype=bool)
        for b in np.flatnonzero(which):
            if not (np.isfinite(phi[b]).all() and np.isfinite(target[b]).all()):
                self._refuse(b, "a non-finite feature or target (NaN or Inf in the transition)")
                continue
            weights, cov = self._rank_one(self.weights[b], self.covariance[b], phi[b], target[b])
            problem = self._problem(weights, cov)
            if problem is not None:
                self._refuse(b, problem)
                continue
            self.weights[b], self.covariance[b] = weights, cov
            self.updates[b] += 1
            self.last_failure[b] = None
            accepted[b] = True
        return accepted

    @staticmethod
    def _rank_one(weights: np.ndarray, cov: np.ndarray, phi: np.ndarray, target: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
        """One RLS step per member: ``(E, F, o), (E, F, F), (E, F), (E, o)`` → the new weights and covariance."""
        u = np.einsum("eij,ej->ei", cov, phi)
        gain = u / (1.0 + np.einsum("ei,ei->e", phi, u))[:, None]
        residual = target - np.einsum("efo,ef->eo", weights, phi)
        new_weights = weights + gain[:, :, None] * residual[:, None, :]
        new_cov = cov - gain[:, :, None] * u[:, None, :]
        return new_weights, 0.5 * (new_cov + np.swapaxes(new_cov, 1, 2))  # keep P symmetric against round-off

    def _problem(self, weights: np.ndarray, cov: np.ndarray) -> str | None:
        if not (np.isfinite(weights).all() and np.isfinite(cov).all()):
            return "the update gave non-finite weights or covariance"
        if not (np.diagonal(cov, axis1=1, axis2=2) > 0).all():
            return "the posterior covariance lost its positive diagonal (not positive definite)"
        deviation = float(np.abs(weights - self.prior).max())
        if deviation > self.config.max_deviation:
            return (f"the update moved a weight {deviation:.3g} from the prior (allowed "
                    f"{self.config.max_deviation:g}): diverging")
        return None

    def _refuse(self, b: int, why: str) -> None:
        self.rejected[b] += 1
        self.last_failure[b] = why


__all__ = ["DEFAULT_MAX_DEVIATION", "LastLayerConfig", "LastLayerPosterior"]
