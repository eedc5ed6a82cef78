"""Context-conditioned probabilistic dynamics ensemble (PETS heads, CaDM-style context encoder).

- :class:`ContextEncoder` maps the last ``K`` transitions of the current task, in any order and
  any number from 0 to K, to a latent context ``z`` (mean pooling: permutation invariant).
- :class:`ContextDynamics` holds the encoder and an ensemble of ``E`` Gaussian heads that predict
  the change of the observation given ``(obs, action, z)``. Log-variances are soft-bounded between
  learned limits (Chua et al. 2018). Normalisation lives in buffers, so an exported graph takes
  and returns raw robot units.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metarl_robot.models.layers import EnsembleLinear, Normalizer, angle_features, mlp


@dataclass
class ContextDynamicsConfig:
    """Sizes of the encoder and the ensemble."""

    ensemble_size: int = 5
    """Number of ensemble members E (trajectory sampling keeps a particle on one member, TS-inf)."""
    hidden: int = 128
    """Width of each member's hidden layers."""
    layers: int = 3
    """Hidden layers per member."""
    context_dim: int = 8
    """Size of the latent context z."""
    encoder_hidden: int = 64
    """Width of the encoder's per-transition and output MLPs."""
    encoder_layers: int = 2
    """Hidden layers of each encoder MLP."""
    context_window: int = 16
    """K: the encoder sees at most the last K transitions since reset."""
    init_max_logvar: float = 0.5
    """Initial upper soft bound of the normalised log-variance."""
    init_min_logvar: float = -10.0
    """Initial lower soft bound of the normalised log-variance."""
    nll_beta: float = 1.0
    """β-NLL (Seitzer et al. 2022): each term weighted by the detached variance^β. With β = 0 (plain
    NLL) the model lowers its loss by inflating the variance instead of fitting the mean, and the
    context encoder gets almost no gradient: on a hidden-gain test family z collapsed and context
    never helped; with β = 1 (the mean's gradient is the MSE's; the variance is still learned) the
    encoder switched on and cut held-out error 4x (tests/algos/test_context_mbrl.py)."""
    context_kl: float = 0.0
    """Weight of KL(q(z | context) || N(0, I)) (PEARL's information bottleneck); 0 = deterministic z.
    With few training tasks a deterministic encoder can memorise task identities and mislead on new
    tasks; the bottleneck keeps z near the prior unless the context really explains the dynamics."""


class ContextEncoder(nn.Module):
    """Permutation-invariant encoder: masked mean of per-transition embeddings, then an MLP."""

    def __init__(self, feat_dim: int, act_dim: int, obs_dim: int, cfg: ContextDynamicsConfig) -> None:
        super().__init__()
        self.phi = mlp(feat_dim + act_dim + obs_dim, cfg.encoder_hidden, cfg.encoder_layers, cfg.encoder_hidden)
        # +1: the fraction of the window that is filled, so the head knows how much evidence it has.
        # The head gives a mean and a log-variance per dimension; only the mean is used at run time.
        self.rho = mlp(cfg.encoder_hidden + 1, cfg.encoder_hidden, cfg.encoder_layers, 2 * cfg.context_dim)
        self.window = cfg.context_window

    def distribution(self, transition_features: torch.Tensor, mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, K, f)`` features, ``(B, K)`` 1/0 mask → mean and log-variance of z, each ``(B, d)``."""
        h = self.phi(transition_features)
        mask = mask.unsqueeze(-1)
        count = mask.sum(dim=1)
        pooled = (h * mask).sum(dim=1) / count.clamp_min(1.0)
        mean, logvar = self.rho(torch.cat([pooled, count / self.window], dim=-1)).chunk(2, dim=-1)
        return mean, logvar.clamp(-10.0, 4.0)

    def forward(self, transition_features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The context used for prediction: the posterior mean, ``(B, d)``."""
        return self.distribution(transition_features, mask)[0]


class ContextDynamics(nn.Module):
    """Encoder + ensemble. Predicts ``next_obs`` mean and log-variance in raw units."""

    def __init__(self, obs_dim: int, act_dim: int, periodic: np.ndarray, cfg: ContextDynamicsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.obs_dim, self.act_dim = obs_dim, act_dim
        periodic = np.asarray(periodic, dtype=bool)
        self.register_buffer("keep_idx", torch.as_tensor(np.flatnonzero(~periodic), dtype=torch.long))
        self.register_buffer("angle_idx", torch.as_tensor(np.flatnonzero(periodic), dtype=torch.long))
        feat_dim = obs_dim + int(np.sum(periodic))
        self.feat_norm = Normalizer(feat_dim)
        """Standardises angle-featurised observations."""
        self.act_norm = Normalizer(act_dim)
        self.delta_norm = Normalizer(obs_dim)
        """Standardises ``next_obs - obs``: the ensemble predicts in this space."""
        self.encoder = ContextEncoder(feat_dim, act_dim, obs_dim, cfg)
        e = cfg.ensemble_size
        dims = [feat_dim + act_dim + cfg.context_dim] + [cfg.hidden] * cfg.layers
        self.hidden_layers = nn.ModuleList(EnsembleLinear(e, a, b) for a, b in itertools.pairwise(dims))
        self.head = EnsembleLinear(e, cfg.hidden, 2 * obs_dim)
        self.max_logvar = nn.Parameter(torch.full((obs_dim,), cfg.init_max_logvar))
        self.min_logvar = nn.Parameter(torch.full((obs_dim,), cfg.init_min_logvar))

    # ---- normalisation --------------------------------------------------------------------------
    def features(self, obs: torch.Tensor) -> torch.Tensor:
        return angle_features(obs, self.keep_idx, self.angle_idx)

    def fit_normalizers(self, obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray) -> None:
        """Set every normaliser from data (called before training, and when the data grows)."""
        obs_t = torch.as_tensor(obs, dtype=torch.float32)
        self.feat_norm.fit(self.features(obs_t))
        self.act_norm.fit(act)
        self.delta_norm.fit(np.asarray(next_obs) - np.asarray(obs))

    def _transition_features(self, obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.feat_norm(self.features(obs)), self.act_norm(act), self.delta_norm(next_obs - obs)], -1)

    # ---- the two graphs that are exported ---------------------------------------------------------
    def encode(self, ctx_obs: torch.Tensor, ctx_act: torch.Tensor, ctx_next_obs: torch.Tensor,
               ctx_mask: torch.Tensor) -> torch.Tensor:
        """``(B, K, ·)`` context transitions and ``(B, K)`` mask → ``(B, context_dim)`` (posterior mean)."""
        return self.encoder(self._transition_features(ctx_obs, ctx_act, ctx_next_obs), ctx_mask)

    def encode_sample(self, ctx_obs: torch.Tensor, ctx_act: torch.Tensor, ctx_next_obs: torch.Tensor,
                      ctx_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: a reparameterised sample of z and its KL to N(0, I) per row (mean z if context_kl = 0)."""
        mean, logvar = self.encoder.distribution(self._transition_features(ctx_obs, ctx_act, ctx_next_obs), ctx_mask)
        if self.cfg.context_kl == 0.0:
            return mean, torch.zeros(mean.shape[0])
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        kl = 0.5 * (torch.exp(logvar) + mean**2 - 1.0 - logvar).sum(dim=-1)
        return z, kl

    def predict_normalized(self, obs: torch.Tensor, act: torch.Tensor, z: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E, N, ·)`` inputs → mean and bounded log-variance of the *normalised* delta, ``(E, N, o)``."""
        mean, raw_logvar = self.head(self.hidden(obs, act, z)).chunk(2, dim=-1)
        return mean, self.bounded_logvar(raw_logvar)

    def hidden(self, obs: torch.Tensor, act: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``(E, N, ·)`` inputs → each member's last hidden layer ``(E, N, hidden)``: what its head reads."""
        x = torch.cat([self.feat_norm(self.features(obs)), self.act_norm(act), z], dim=-1)
        for layer in self.hidden_layers:
            x = F.silu(layer(x))
        return x

    def bounded_logvar(self, raw_logvar: torch.Tensor) -> torch.Tensor:
        """The head's raw log-variance soft-bounded between the learned limits (PETS)."""
        logvar = self.max_logvar - F.softplus(self.max_logvar - raw_logvar)
        return self.min_logvar + F.softplus(logvar - self.min_logvar)

    def forward(self, obs: torch.Tensor, act: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E, N, ·)`` → next-observation mean and log-variance in raw units, ``(E, N, o)``."""
        mean, logvar = self.predict_normalized(obs, act, z)
        next_obs = obs + self.delta_norm.inverse(mean)
        return next_obs, logvar + 2.0 * torch.log(self.delta_norm.std)

    # ---- training objective ---------------------------------------------------------------------
    def loss(self, obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor, z: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """β-NLL of the normalised delta, averaged over members, plus the PETS bound penalty."""
        mean, logvar = self.predict_normalized(obs, act, z)
        return self.nll(mean, logvar, self.delta_norm(next_obs - obs))

    def nll(self, mean: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor
            ) -> tuple[torch.Tensor, dict[str, float]]:
        """β-NLL of a prediction of the normalised delta ``target``, plus the PETS bound penalty."""
        inv_var = torch.exp(-logvar)
        per_term = ((mean - target) ** 2) * inv_var + logvar
        if self.cfg.nll_beta:
            per_term = per_term * torch.exp(self.cfg.nll_beta * logvar).detach()
        nll = per_term.mean()
        bound = 0.01 * (self.max_logvar.sum() - self.min_logvar.sum())
        mse = ((mean - target) ** 2).mean()
        return nll + bound, {"nll": float(nll.detach()), "mse_normalized": float(mse.detach())}
