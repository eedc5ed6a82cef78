"""A context-conditioned ensemble whose members' mean heads also adapt online: meta-learned features and a
Bayesian last layer (ALPaCA, Harrison et al. 2018), trained so that the closed-form posterior after a few of a
task's transitions predicts that task's next ones.

Each member predicts the normalised delta as ``phi^T W``: ``phi`` = its last hidden layer and a constant 1
(``F = hidden + 1`` features), ``W`` (F x o) its head's mean part and bias. The prior over ``W`` is centred on
the trained head with precision ``alpha`` (relative to the noise; ``log_prior_precision`` is learned). Given
context transitions ``Phi`` (K x F) with normalised deltas ``Y`` (K x o), the posterior mean is, by the Woodbury
identity (a K x K solve instead of F x F),

    W_K = W0 + Phi^T (alpha I_K + Phi Phi^T)^-1 (Y - Phi W0).

Masked context rows are zeroed, so they drop out of both factors. The robot keeps the same posterior one
transition at a time (:class:`metarl_robot.runtime.last_layer.LastLayerPosterior`); the variance head is not
adapted (it keeps the trained bounds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from metarl_robot.models.context_dynamics import ContextDynamics, ContextDynamicsConfig


@dataclass
class OnlineHeadConfig:
    """The online last layer."""

    prior_precision: float = 1.0
    """Initial alpha: precision of the prior around the trained head, relative to the noise (meta-learned)."""
    learn_prior_precision: bool = True
    """Meta-learn alpha with the rest (ALPaCA); False keeps the initial value."""

    def validate(self) -> None:
        if not (math.isfinite(self.prior_precision) and self.prior_precision > 0):
            raise ValueError(f"OnlineHeadConfig.prior_precision must be > 0, got {self.prior_precision}")


class OnlineContextDynamics(ContextDynamics):
    """:class:`ContextDynamics` with a Bayesian last layer per member (the mean part of its head)."""

    def __init__(self, obs_dim: int, act_dim: int, periodic: np.ndarray, cfg: ContextDynamicsConfig,
                 online: OnlineHeadConfig) -> None:
        super().__init__(obs_dim, act_dim, periodic, cfg)
        online.validate()
        self.online = online
        self.log_prior_precision = nn.Parameter(torch.tensor(math.log(online.prior_precision)),
                                                requires_grad=online.learn_prior_precision)
        """log alpha."""

    @property
    def feature_dim(self) -> int:
        """F: the last hidden layer and the bias feature."""
        return self.cfg.hidden + 1

    def prior_precision(self) -> float:
        return float(torch.exp(self.log_prior_precision.detach()))

    def head_features(self, obs: torch.Tensor, act: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``(E, N, ·)`` → ``phi`` ``(E, N, F)``: each member's last hidden layer and a constant 1."""
        x = self.hidden(obs, act, z)
        return torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)

    def prior_head(self) -> torch.Tensor:
        """``W0`` ``(E, F, o)``: the trained head's mean weights with its bias as the last row."""
        o = self.obs_dim
        return torch.cat([self.head.weight[:, :, :o], self.head.bias[:, :, :o]], dim=1)

    def predict_with_head(self, obs: torch.Tensor, act: torch.Tensor, z: torch.Tensor, head: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E, N, ·)`` inputs and a last layer per row ``head`` ``(E, N, F, o)`` → mean and bounded log-variance
        of the normalised delta ``(E, N, o)`` (the variance from the trained head)."""
        x = self.hidden(obs, act, z)
        phi = torch.cat([x, torch.ones_like(x[..., :1])], dim=-1)
        raw_logvar = self.head(x)[..., self.obs_dim:]
        return torch.einsum("enf,enfo->eno", phi, head), self.bounded_logvar(raw_logvar)

    def forward_with_head(self, obs: torch.Tensor, act: torch.Tensor, z: torch.Tensor, head: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`predict_with_head` in raw units: next-observation mean and log-variance ``(E, N, o)``."""
        mean, logvar = self.predict_with_head(obs, act, z, head)
        return obs + self.delta_norm.inverse(mean), logvar + 2.0 * torch.log(self.delta_norm.std)

    def posterior_head(self, phi: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The posterior mean of each member's last layer after its context: ``phi`` ``(E, N, K, F)``, normalised
        deltas ``target`` ``(E, N, K, o)``, ``mask`` ``(E, N, K)`` (1: the transition is there) → ``(E, N, F, o)``."""
        m = mask.unsqueeze(-1)
        phi, target = phi * m, target * m
        prior = self.prior_head().unsqueeze(1)  # (E, 1, F, o)
        k = phi.shape[-2]
        gram = phi @ phi.transpose(-1, -2) + torch.exp(self.log_prior_precision) * torch.eye(k, dtype=phi.dtype)
        residual = target - phi @ prior
        return prior + phi.transpose(-1, -2) @ torch.linalg.solve(gram, residual)

    def online_loss(self, obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor, z: torch.Tensor,
                    ctx_obs: torch.Tensor, ctx_act: torch.Tensor, ctx_next_obs: torch.Tensor, ctx_mask: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, float]]:
        """β-NLL of the targets under the posterior last layer after each sample's context window (ALPaCA's
        meta-objective). Targets ``(E, N, ·)`` with their context ``(E, N, K, ·)``; the context's features use the
        sample's ``z`` (the encoder reads the same window)."""
        e, n, k = ctx_mask.shape
        flat = lambda x: x.reshape(e, n * k, -1)  # noqa: E731
        z_ctx = z.unsqueeze(2).expand(e, n, k, z.shape[-1])
        phi = self.head_features(flat(ctx_obs), flat(ctx_act), flat(z_ctx)).reshape(e, n, k, -1)
        ctx_target = self.delta_norm(ctx_next_obs - ctx_obs)
        head = self.posterior_head(phi, ctx_target, ctx_mask)
        mean, logvar = self.predict_with_head(obs, act, z, head)
        loss, parts = self.nll(mean, logvar, self.delta_norm(next_obs - obs))
        parts["prior_precision"] = self.prior_precision()
        return loss, parts


__all__ = ["OnlineContextDynamics", "OnlineHeadConfig"]
