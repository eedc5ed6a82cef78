"""MB-MPO's meta-policy on the training side: a Gaussian MLP policy and its differentiable inner step (torch).

Why: MB-MPO (Clavera et al. 2018) meta-learns a policy so that ONE vanilla policy-gradient step on a task's paths
adapts it (MAML). The trainer needs that step as a function of the parameters, so the outer loss can differentiate
through it (second-order MAML); hence the policy is written functionally over a parameter list rather than as
``nn.Linear`` modules. The parameter list has exactly the layout of the robot's numpy copy,
:data:`metarl_robot.runtime.policy_gradient.PolicyParams`, which takes the same step without torch; the tests
check the two agree to round-off.

Its MLP pieces (:func:`mlp_params`, :func:`mlp_forward`: tanh hidden layers, linear output, the robot's numpy layout)
are MACAW's too (:mod:`metarl_robot.models.macaw`). Everything works in the dtype of its inputs: the trainer uses
float32, the parity tests float64.
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import torch
from torch import nn

from metarl_robot.runtime.policy_gradient import PolicyParams

_LOG_2PI = math.log(2.0 * math.pi)


class GaussianMLPPolicy(nn.Module):
    """tanh MLP mean over normalised actions with a state-independent log standard deviation."""

    def __init__(self, feature_dim: int, action_dim: int, hidden: tuple[int, ...] = (32, 32),
                 init_std: float = 1.0) -> None:
        super().__init__()
        if feature_dim < 1 or action_dim < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"sizes must be >= 1: feature_dim={feature_dim}, action_dim={action_dim}, "
                             f"hidden={hidden}")
        if not (math.isfinite(init_std) and init_std > 0):
            raise ValueError(f"init_std must be a finite number > 0, got {init_std!r}")
        self.feature_dim, self.action_dim, self.hidden = feature_dim, action_dim, tuple(hidden)
        params = mlp_params([feature_dim, *hidden, action_dim])
        params.append(nn.Parameter(torch.full((action_dim,), math.log(init_std))))
        self.params = nn.ParameterList(params)
        """[W0, b0, ..., W_out, b_out, log_std]: the layout of the robot's ``PolicyParams``."""

    def param_list(self) -> list[torch.Tensor]:
        """The parameters as a plain list, in :data:`PolicyParams` order (what :func:`adapt` takes)."""
        return list(self.params)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(..., F) -> (..., a): the mean action in normalised units."""
        return functional_mean(self.param_list(), feats)

    def numpy_params(self) -> PolicyParams:
        """float64 numpy copies of the parameters, for :mod:`metarl_robot.runtime.policy_gradient`."""
        return [p.detach().cpu().to(torch.float64).numpy().copy() for p in self.params]

    def load_numpy_params(self, params: PolicyParams) -> None:
        """Overwrite the parameters with ``params`` (same layout and shapes), cast to this module's dtype."""
        if len(params) != len(self.params):
            raise ValueError(f"expected {len(self.params)} arrays, got {len(params)}")
        for i, (p, value) in enumerate(zip(self.params, params, strict=True)):
            value = np.asarray(value)
            if value.shape != tuple(p.shape):
                raise ValueError(f"params[{i}]: expected shape {tuple(p.shape)}, got {value.shape}")
        with torch.no_grad():
            for p, value in zip(self.params, params, strict=True):
                p.copy_(torch.as_tensor(np.asarray(value), dtype=p.dtype, device=p.device))


def mlp_params(widths: list[int]) -> list[nn.Parameter]:
    """``[W0, b0, ..., W_out, b_out]`` of an MLP over ``widths`` (input, hidden..., output): Xavier-uniform weights
    ``(fan_in, fan_out)``, zero biases (the layout :func:`mlp_forward` and the robot's numpy MLP read)."""
    params: list[nn.Parameter] = []
    for fan_in, fan_out in pairwise(widths):
        params.append(nn.Parameter(nn.init.xavier_uniform_(torch.empty(fan_in, fan_out))))
        params.append(nn.Parameter(torch.zeros(fan_out)))
    return params


def mlp_forward(layers: list[torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., in) -> (last hidden activation (..., H) (``x`` itself without hidden layers), output (..., out)) of the
    MLP ``layers`` = [W0, b0, ..., W_out, b_out]: tanh hidden layers, a linear output layer."""
    h = x
    for i in range(0, len(layers) - 2, 2):
        h = torch.tanh(h @ layers[i] + layers[i + 1])
    return h, h @ layers[-2] + layers[-1]


def functional_mean(params: list[torch.Tensor], feats: torch.Tensor) -> torch.Tensor:
    """(..., F) -> (..., a): the mean of the policy given by ``params`` (PolicyParams layout)."""
    return mlp_forward(params[:-1], feats)[1]


def gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """(...,): the log density of ``actions`` (..., a) under the diagonal Gaussian ``mean`` (..., a), state-independent
    ``log_std`` (a,), incl. the -0.5*a*log(2*pi) constant."""
    z = (actions - mean) * torch.exp(-log_std)
    return -0.5 * (z**2).sum(-1) - log_std.sum() - 0.5 * log_std.numel() * _LOG_2PI


def functional_log_prob(params: list[torch.Tensor], feats: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """(...,): the diagonal Gaussian log density of ``actions`` (..., a), incl. the -0.5*a*log(2*pi) constant."""
    return gaussian_log_prob(functional_mean(params, feats), params[-1], actions)


def adapt(params: list[torch.Tensor], feats: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor,
          step_size: float, create_graph: bool = True) -> list[torch.Tensor]:
    """params + step_size * grad of mean(advantages * log_prob) (torch.autograd.grad, create_graph so an outer loss can
    differentiate through the step: second-order MAML).

    Every parameter must require grad. With ``create_graph=False`` the gradient is a constant of the outer loss but
    the result still depends on ``params`` (first-order MAML). The mean is over every row of ``advantages``."""
    objective = (advantages * functional_log_prob(params, feats, actions)).mean()
    grads = torch.autograd.grad(objective, params, create_graph=create_graph)
    return [p + step_size * g for p, g in zip(params, grads, strict=True)]


def kl_divergence(mean_old: torch.Tensor, log_std_old: torch.Tensor, mean_new: torch.Tensor,
                  log_std_new: torch.Tensor) -> torch.Tensor:
    """(...,): KL(old || new) per row between diagonal Gaussians (means (..., a), log-stds (a,) or (..., a))."""
    var_ratio = torch.exp(2.0 * (log_std_old - log_std_new))
    shift = (mean_old - mean_new) * torch.exp(-log_std_new)
    # shift already broadcasts to every row, so a state-independent log-std counts once per row.
    return (log_std_new - log_std_old + 0.5 * (var_ratio + shift**2) - 0.5).sum(-1)


__all__ = ["GaussianMLPPolicy", "adapt", "functional_log_prob", "functional_mean", "gaussian_log_prob", "kl_divergence",
           "mlp_forward", "mlp_params"]
