"""PEARL's networks: a probabilistic context encoder and a latent-conditioned SAC actor-critic.

- :class:`InputNormalizers` turns raw robot units into network inputs (angle features, data
  standardisation, the action box mapped to [-1, 1]); it lives in buffers, so exported graphs take
  and return raw units, like :mod:`metarl_robot.models.context_dynamics`.
- :class:`ContextEncoder` maps each context transition ``(obs, action, reward, next_obs)`` on its own
  to a Gaussian factor over the latent task ``z``; :func:`product_of_gaussians` combines any number
  of them (0 included) with the prior ``N(0, I)`` into the posterior ``q(z | c)``. A product is
  permutation invariant, and it can be updated one transition at a time on the robot.
- :class:`TanhGaussianActor` and :class:`TwinQ` are the SAC policy and critics, conditioned on ``z``.
- :class:`PEARLAgent` holds them all, with the target critics; its ``transition_factors``,
  ``posterior`` and ``deterministic_action`` are the graphs meant for export.

Seed: Rakelly et al. 2019 (PEARL). Differences from the reference code are documented where they are.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metarl_robot.models.layers import Normalizer, angle_features, mlp


@dataclass
class PEARLNetConfig:
    """Sizes of the encoder, the actor and the critics."""

    latent_dim: int = 5
    """Size of the latent task variable z (PEARL uses 5 on its MuJoCo tasks)."""
    hidden: int = 256
    """Width of the actor's and each critic's hidden layers."""
    layers: int = 3
    """Hidden layers of the actor and of each critic."""
    encoder_hidden: int = 128
    """Width of the encoder's hidden layers."""
    encoder_layers: int = 3
    """Hidden layers of the encoder."""
    min_factor_var: float = 1e-4
    """Floor on the variance of each transition's factor, so one transition cannot pin z exactly."""
    log_std_min: float = -10.0
    """Lower clamp of the actor's pre-tanh log standard deviation."""
    log_std_max: float = 2.0
    """Upper clamp of the actor's pre-tanh log standard deviation."""


def product_of_gaussians(means: torch.Tensor, variances: torch.Tensor, mask: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine ``(B, K, d)`` Gaussian factors, ``(B, K)`` 1/0 mask, with the prior ``N(0, I)``.

    Returns the mean and variance ``(B, d)`` of ``N(0, I) * prod_k N(means_k, variances_k)``
    (normalised): precision ``1 + sum_k 1 / var_k`` and mean ``var * sum_k mean_k / var_k`` over
    the unmasked slots. The reference code multiplies the factors alone; including the prior makes
    an empty context (K = 0, or an all-zero mask) give exactly the prior with no special case, which
    is what meta-evaluation before any training and every reset on the robot need. Masked slots must
    hold finite numbers (they are multiplied by 0).
    """
    weights = mask.unsqueeze(-1) / variances
    precision = 1.0 + weights.sum(dim=1)
    variance = 1.0 / precision
    return variance * (weights * means).sum(dim=1), variance


def kl_to_standard_normal(mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """``KL(N(mean, diag(variance)) || N(0, I))`` per row, ``(..., d)`` → ``(...)``."""
    return 0.5 * (variance + mean**2 - 1.0 - torch.log(variance)).sum(dim=-1)


class InputNormalizers(nn.Module):
    """Raw robot units → network inputs. Observation and context statistics are fitted from data;
    actions are mapped from the robot's action box to [-1, 1] (fixed, so the policy's squashed output
    and the critics' action input share one scale)."""

    def __init__(self, obs_dim: int, act_dim: int, periodic: np.ndarray, action_low: np.ndarray,
                 action_high: np.ndarray) -> None:
        super().__init__()
        periodic = np.asarray(periodic, dtype=bool)
        if periodic.shape != (obs_dim,):
            raise ValueError(f"periodic must have shape ({obs_dim},), got {periodic.shape}")
        low, high = np.asarray(action_low, dtype=np.float32), np.asarray(action_high, dtype=np.float32)
        if low.shape != (act_dim,) or high.shape != (act_dim,) or not np.all(high > low):
            raise ValueError(f"action_low/action_high must be ({act_dim},) arrays with high > low, got {low}, {high}")
        self.register_buffer("keep_idx", torch.as_tensor(np.flatnonzero(~periodic), dtype=torch.long))
        self.register_buffer("angle_idx", torch.as_tensor(np.flatnonzero(periodic), dtype=torch.long))
        self.register_buffer("action_centre", torch.as_tensor((high + low) / 2.0))
        self.register_buffer("action_half_range", torch.as_tensor((high - low) / 2.0))
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.feat_dim = obs_dim + int(periodic.sum())
        """Size of the observation features (periodic components become sine and cosine)."""
        self.obs_norm = Normalizer(self.feat_dim)
        """Standardises angle-featurised observations (policy, critics and encoder)."""
        self.reward_norm = Normalizer(1)
        """Standardises rewards in the context (the critic's target uses raw rewards)."""
        self.delta_norm = Normalizer(obs_dim)
        """Standardises ``next_obs - obs`` in the context: how the dynamics moved is what reveals them."""

    @property
    def context_dim(self) -> int:
        """Size of one context transition's features."""
        return self.feat_dim + self.act_dim + 1 + self.obs_dim

    def fit(self, obs: np.ndarray, reward: np.ndarray, next_obs: np.ndarray) -> None:
        """Set the data-fitted statistics from flat ``(N, ·)`` transitions."""
        obs_t = torch.as_tensor(obs, dtype=torch.float32)
        self.obs_norm.fit(angle_features(obs_t, self.keep_idx, self.angle_idx))
        self.reward_norm.fit(np.asarray(reward, dtype=np.float32).reshape(-1, 1))
        self.delta_norm.fit(np.asarray(next_obs) - np.asarray(obs))

    def observation(self, obs: torch.Tensor) -> torch.Tensor:
        return self.obs_norm(angle_features(obs, self.keep_idx, self.angle_idx))

    def unit_action(self, action: torch.Tensor) -> torch.Tensor:
        """Box → [-1, 1]."""
        return (action - self.action_centre) / self.action_half_range

    def box_action(self, unit: torch.Tensor) -> torch.Tensor:
        """[-1, 1] → box."""
        return self.action_centre + self.action_half_range * unit

    def context(self, obs: torch.Tensor, action: torch.Tensor, reward: torch.Tensor, next_obs: torch.Tensor
                ) -> torch.Tensor:
        """``(..., ·)`` transitions with ``(...)`` rewards → ``(..., context_dim)`` encoder inputs."""
        return torch.cat([self.observation(obs), self.unit_action(action), self.reward_norm(reward.unsqueeze(-1)),
                          self.delta_norm(next_obs - obs)], dim=-1)


class ContextEncoder(nn.Module):
    """One transition → one Gaussian factor ``(mean, variance)`` over z; no interaction between
    transitions (that is what makes the product permutation invariant and incrementally updatable)."""

    def __init__(self, context_dim: int, cfg: PEARLNetConfig) -> None:
        super().__init__()
        self.net = mlp(context_dim, cfg.encoder_hidden, cfg.encoder_layers, 2 * cfg.latent_dim)
        self.min_var = cfg.min_factor_var

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, raw = self.net(features).chunk(2, dim=-1)
        return mean, F.softplus(raw) + self.min_var


class TanhGaussianActor(nn.Module):
    """``(obs features, z)`` → mean and log-std of a Gaussian whose tanh is the action in [-1, 1]."""

    def __init__(self, feat_dim: int, act_dim: int, cfg: PEARLNetConfig) -> None:
        super().__init__()
        self.net = mlp(feat_dim + cfg.latent_dim, cfg.hidden, cfg.layers, 2 * act_dim)
        self.log_std_min, self.log_std_max = cfg.log_std_min, cfg.log_std_max

    def forward(self, features: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(torch.cat([features, z], dim=-1)).chunk(2, dim=-1)
        return mean, log_std.clamp(self.log_std_min, self.log_std_max)


class TwinQ(nn.Module):
    """Two independent critics ``Q(obs features, unit action, z)`` (clipped double-Q)."""

    def __init__(self, feat_dim: int, act_dim: int, cfg: PEARLNetConfig) -> None:
        super().__init__()
        fan_in = feat_dim + act_dim + cfg.latent_dim
        self.q1 = mlp(fan_in, cfg.hidden, cfg.layers, 1)
        self.q2 = mlp(fan_in, cfg.hidden, cfg.layers, 1)

    def forward(self, features: torch.Tensor, unit_action: torch.Tensor, z: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([features, unit_action, z], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


class PEARLAgent(nn.Module):
    """Normalisers, encoder, actor, critics and target critics; raw robot units in and out."""

    def __init__(self, obs_dim: int, act_dim: int, periodic: np.ndarray, action_low: np.ndarray,
                 action_high: np.ndarray, cfg: PEARLNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.inputs = InputNormalizers(obs_dim, act_dim, periodic, action_low, action_high)
        self.encoder = ContextEncoder(self.inputs.context_dim, cfg)
        self.actor = TanhGaussianActor(self.inputs.feat_dim, act_dim, cfg)
        self.critic = TwinQ(self.inputs.feat_dim, act_dim, cfg)
        self.target_critic = copy.deepcopy(self.critic)
        """Polyak-averaged copy of the critics for the Bellman target; never trained directly."""
        self.target_critic.requires_grad_(False)

    # ---- task inference (exported) --------------------------------------------------------------
    def transition_factors(self, obs: torch.Tensor, action: torch.Tensor, reward: torch.Tensor,
                           next_obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each transition's Gaussian factor over z: ``(..., ·)`` and ``(...)`` rewards → two ``(..., d)``."""
        return self.encoder(self.inputs.context(obs, action, reward, next_obs))

    def posterior(self, ctx_obs: torch.Tensor, ctx_act: torch.Tensor, ctx_reward: torch.Tensor,
                  ctx_next_obs: torch.Tensor, ctx_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, K, ·)`` context, ``(B, K)`` rewards and mask → posterior mean and variance ``(B, d)``."""
        means, variances = self.transition_factors(ctx_obs, ctx_act, ctx_reward, ctx_next_obs)
        return product_of_gaussians(means, variances, ctx_mask)

    # ---- policy ---------------------------------------------------------------------------------
    def policy(self, obs: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-tanh mean and log-std, ``(..., a)`` each."""
        return self.actor(self.inputs.observation(obs), z)

    def deterministic_action(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The exported action head: ``box(tanh(mean))``, strictly inside the action box."""
        mean, _ = self.policy(obs, z)
        return self.inputs.box_action(torch.tanh(mean))

    def sample_action(self, obs: torch.Tensor, z: torch.Tensor, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised action in the box and its log-density ``(...)`` (change of variables
        through tanh and the box's affine map)."""
        mean, log_std = self.policy(obs, z)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        pre_tanh = mean + torch.exp(log_std) * noise
        gaussian_log_prob = (-0.5 * noise**2 - log_std - 0.5 * math.log(2.0 * math.pi)).sum(dim=-1)
        # log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u)), exact and stable for large |u|.
        log_det_tanh = (2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))).sum(dim=-1)
        log_det_box = torch.log(self.inputs.action_half_range).sum()
        action = self.inputs.box_action(torch.tanh(pre_tanh))
        return action, gaussian_log_prob - log_det_tanh - log_det_box

    # ---- critics --------------------------------------------------------------------------------
    def q_values(self, obs: torch.Tensor, action: torch.Tensor, z: torch.Tensor, target: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both critics' values ``(...)`` of raw-unit ``(obs, action)`` under task ``z``."""
        critic = self.target_critic if target else self.critic
        return critic(self.inputs.observation(obs), self.inputs.unit_action(action), z)

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        """Polyak step ``target <- (1 - tau) target + tau critic``."""
        for target, source in zip(self.target_critic.parameters(), self.critic.parameters(), strict=True):
            target.lerp_(source, tau)
