"""MACAW's networks on the training side (torch): a value function and a Gaussian policy written functionally over
parameter lists, their advantage-weighted regression losses, and the inner adaptation meta-training differentiates
through.

Why: MACAW (Mitchell et al. 2021, "Offline Meta-Reinforcement Learning with Advantage Weighting") meta-learns, with MAML
on fixed offline data only, a value function ``V_phi(s)`` and a policy ``pi_theta(a | s)`` such that a few gradient
steps of two regression losses on a handful of a new task's trajectories adapt them:

* value:  ``phi' = phi - alpha_v * grad mean (V_phi(s) - R)^2``, ``R`` the discounted return-to-go of the transition's
  episode (:meth:`MACAWNetworks.targets`: with the tail of a truncated episode bootstrapped);
* policy: ``theta' = theta - alpha_pi * grad [-mean w log pi_theta(a | s) + lambda mean (A_theta(s, a) - A)^2]``
  with the advantage ``A = R - V_phi'(s)``, the weight ``w = min(exp(A' / T), clip)`` (``A'``: ``A`` standardised
  over the batch, as the official code does by default; AWR, Peng et al. 2019) and ``A_theta`` an *advantage head* on
  the policy's last hidden layer and the action. The head is the paper's enriched policy update: the AWR term alone is
  a weighted behaviour-cloning gradient, which cannot tell the policy how good an action was; regressing the
  advantage through the policy's own hidden layer can. It is used in the inner loop only; the meta-loss is the AWR
  term of the adapted policy on other data of the task (:meth:`MACAWNetworks.query_losses`).

``alpha_v``, ``alpha_pi`` (one learned rate per parameter tensor, kept positive by a softplus, as in the official code
eric-mitchell/macaw ``src/macaw.py``) and ``lambda`` (softplus too) are meta-learned with the networks.

Layouts: the value function is an MLP with one output, the policy's mean an MLP over :func:`~metarl_robot.runtime.
policy_gradient.policy_features`, both with tanh hidden layers and a linear output in the robot's numpy layout
(:func:`~metarl_robot.models.meta_policy.mlp_params`, :func:`~metarl_robot.models.meta_policy.mlp_forward`), so that a
materialised policy plus its fixed ``log_std`` is a :data:`~metarl_robot.runtime.policy_gradient.PolicyParams` the
robot's ``policy_mean`` and ``log_prob_gradient`` read. Optionally every layer is a *weight-transform* layer
(:class:`MLPLayout`, the paper's WLinear): its weight and bias are ``c + z M`` with a latent ``z``; adapting ``z``,
``M`` and ``c`` makes one gradient step more expressive than one on the weights themselves.

Everything works in the dtype of its inputs: the trainer uses float32, the tests float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metarl_robot.models.meta_policy import gaussian_log_prob, mlp_forward, mlp_params
from metarl_robot.runtime.awr_policy import AWRNetworks
from metarl_robot.runtime.policy_gradient import PolicyParams
from metarl_robot.spec.schema import SpecError


@dataclass
class MACAWNetConfig:
    """Sizes of MACAW's networks (the official code's values in brackets)."""

    hidden: list[int] = field(default_factory=lambda: [64, 64])
    """Hidden layer widths of the value function and of the policy, tanh after each (the robot's numpy MLP)
    [3 x 100, ReLU]."""
    advantage_head_hidden: int = 32
    """Width of the advantage head's hidden layer [32]."""
    action_std: float = 0.2
    """Standard deviation of the Gaussian policy in normalised action units, fixed [0.2]."""
    weight_transform_dim: int = 0
    """Size of the latent ``z`` of weight-transform layers (each layer's weight and bias are ``c + z M``, all three
    adapted); 0: plain layers [100]."""

    def validate(self, where: str, section: str = "macaw_net") -> None:
        if not self.hidden or min(self.hidden) < 1:
            raise SpecError(where, f"{section}.hidden", f"must be a non-empty list of widths >= 1, got {self.hidden}")
        if self.advantage_head_hidden < 1:
            raise SpecError(where, f"{section}.advantage_head_hidden",
                            f"must be >= 1, got {self.advantage_head_hidden}")
        if not (math.isfinite(self.action_std) and self.action_std > 0):
            raise SpecError(where, f"{section}.action_std", f"must be a finite number > 0, got {self.action_std}")
        if self.weight_transform_dim < 0:
            raise SpecError(where, f"{section}.weight_transform_dim",
                            f"must be >= 0 (0: plain layers), got {self.weight_transform_dim}")


@dataclass(frozen=True)
class AdvantageWeighting:
    """How advantages become AWR weights: ``min(exp(A' / temperature), clip)``."""

    temperature: float = 1.0
    """``T``: larger weighs actions more evenly (the official code's adaptation_temp, 1)."""
    clip: float = 20.0
    """Largest weight (AWR's and the official code's 20)."""
    normalize: bool = True
    """Standardise the advantages over the batch first (``A' = (A - mean) / std``, the official default); False:
    ``A' = A`` in the value function's units (returns divided by the dataset's return scale)."""


@dataclass
class Batch:
    """Transitions of one task as tensors: what an inner step or a meta-loss reads."""

    feats: torch.Tensor
    """``(N, F)`` policy features of each observation."""
    actions: torch.Tensor
    """``(N, a)`` the action taken, in normalised units."""
    returns: torch.Tensor
    """``(N,)`` the discounted return-to-go inside the transition's episode (the value function's units)."""
    tail_discount: torch.Tensor
    """``(N,)`` discount ** (steps from the transition to its episode's last next observation); 0 where the episode
    terminated (nothing follows a terminal state)."""
    tail_feats: torch.Tensor
    """``(N, F)`` features of the transition's episode's last next observation: the state the return is cut at."""

    def __len__(self) -> int:
        return len(self.returns)


@dataclass
class MACAWParams:
    """One set of MACAW's parameters, the meta-parameters or a task's adapted ones (lists in their layouts' order)."""

    value: list[torch.Tensor]
    """The value function's."""
    policy: list[torch.Tensor]
    """The policy mean's."""
    head: list[torch.Tensor]
    """The advantage head's (empty without one)."""

    def detached(self) -> MACAWParams:
        return MACAWParams(*([p.detach() for p in part] for part in (self.value, self.policy, self.head)))


@dataclass(frozen=True)
class MLPLayout:
    """An MLP's widths (input, hidden..., output) and how its layers are parameterised: ``[W, b]`` per layer, or with
    ``transform_dim`` > 0 weight-transform layers ``[z (d,), M (d, in*out + out), c (in*out + out,)]`` whose weight
    and bias are ``c + z M``, flattened (the official code's WLinear is ``nn.Linear(d, in*out + out)`` applied to ``z``:
    ``M`` its weight, ``c`` its bias)."""

    widths: tuple[int, ...]
    """Input, hidden and output widths."""
    transform_dim: int = 0
    """Size of ``z``; 0: plain layers."""

    def init(self) -> list[nn.Parameter]:
        """Fresh parameters: plain layers as :func:`mlp_params` (Xavier-uniform, zero bias); a weight-transform layer
        starts at that weight and bias (``c``) plus ``z M`` with ``z ~ N(0, 1/out**2)`` (the official initialisation)
        and ``M`` uniform in ``±1/sqrt(d)`` (``nn.Linear``'s)."""
        plain = mlp_params(list(self.widths))
        if not self.transform_dim:
            return plain
        d, params = self.transform_dim, []
        for w, b in zip(plain[::2], plain[1::2], strict=True):
            c = torch.cat([w.detach().reshape(-1), b.detach()])
            z = torch.randn(d) / w.shape[1]
            m = torch.empty(d, c.numel()).uniform_(-1.0 / math.sqrt(d), 1.0 / math.sqrt(d))
            params += [nn.Parameter(z), nn.Parameter(m), nn.Parameter(c)]
        return params

    def layers(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The plain ``[W0, b0, ..., W_out, b_out]`` these parameters make (themselves for plain layers)."""
        if not self.transform_dim:
            return list(params)
        out: list[torch.Tensor] = []
        for i, (fan_in, fan_out) in enumerate(pairwise(self.widths)):
            z, m, c = params[3 * i:3 * i + 3]
            theta = c + z @ m
            out += [theta[:fan_in * fan_out].reshape(fan_in, fan_out), theta[fan_in * fan_out:]]
        return out


# ---- the losses -------------------------------------------------------------------------------------------------
def awr_weights(advantages: torch.Tensor, weighting: AdvantageWeighting) -> torch.Tensor:
    """(N,) -> (N,): ``min(exp(A' / T), clip)`` of detached advantages (``A'`` standardised over the batch when
    ``weighting.normalize``: population std + 1e-8, so one row gets weight 1)."""
    adv = advantages.detach()
    if weighting.normalize:
        adv = (adv - adv.mean()) / (adv.std(correction=0) + 1e-8)
    # Clamping the exponent rather than the weight: exp of a large advantage must not overflow to inf first.
    return torch.exp(torch.clamp(adv / weighting.temperature, max=math.log(weighting.clip)))


def awr_loss(log_probs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``-mean(weights * log_probs)``: weighted regression of the policy onto the data's actions."""
    return -(weights * log_probs).mean()


def inverse_softplus(y: float) -> float:
    """``x`` with ``softplus(x) = y`` (y > 0): the raw value a learned positive rate starts from."""
    return float(y + math.log(-math.expm1(-y)))


# ---- the networks -----------------------------------------------------------------------------------------------
class MACAWNetworks(nn.Module):
    """The meta-parameters (value function, policy, advantage head), the learned inner rates, and the math on any
    parameter set (meta or adapted): values, densities, losses, the inner steps and the meta-losses."""

    def __init__(self, feature_dim: int, action_dim: int, cfg: MACAWNetConfig, inner_value_lr: float,
                 inner_policy_lr: float, advantage_weight: float) -> None:
        super().__init__()
        if feature_dim < 1 or action_dim < 1:
            raise ValueError(f"sizes must be >= 1: feature_dim={feature_dim}, action_dim={action_dim}")
        if not (inner_value_lr > 0 and inner_policy_lr > 0 and advantage_weight >= 0):
            raise ValueError(f"inner rates must be > 0 and the advantage weight >= 0, got {inner_value_lr}, "
                             f"{inner_policy_lr}, {advantage_weight}")
        hidden, d = list(cfg.hidden), cfg.weight_transform_dim
        self.feature_dim, self.action_dim = feature_dim, action_dim
        self.value_layout = MLPLayout((feature_dim, *hidden, 1), d)
        self.policy_layout = MLPLayout((feature_dim, *hidden, action_dim), d)
        self.head_layout = MLPLayout((hidden[-1] + action_dim, cfg.advantage_head_hidden, 1), d) \
            if advantage_weight > 0 else None
        """None: no advantage head (the paper's ablation: MAML over AWR alone)."""
        self.value = nn.ParameterList(self.value_layout.init())
        self.policy = nn.ParameterList(self.policy_layout.init())
        self.head = nn.ParameterList(self.head_layout.init() if self.head_layout else [])
        self.log_std_value = math.log(cfg.action_std)
        """The policy's fixed log standard deviation (a number: exact in any dtype)."""
        self.value_lr_raw = nn.Parameter(torch.full((len(self.value),), inverse_softplus(inner_value_lr)))
        """softplus of it: the value function's inner learning rate, one per parameter tensor."""
        self.policy_lr_raw = nn.Parameter(torch.full((len(self.policy) + len(self.head),),
                                                     inverse_softplus(inner_policy_lr)))
        """softplus of it: the inner learning rate of each policy and head parameter tensor, in that order."""
        self.advantage_weight_raw = nn.Parameter(
            torch.tensor(inverse_softplus(advantage_weight) if advantage_weight > 0 else 0.0))
        """softplus of it: lambda, the advantage head's weight in the inner policy loss (unused without a head)."""

    # ---- parameters ------------------------------------------------------------------------------------------
    def meta_params(self) -> MACAWParams:
        """The meta-parameters themselves (gradients of a meta-loss reach them)."""
        return MACAWParams(list(self.value), list(self.policy), list(self.head))

    def rate_params(self) -> list[nn.Parameter]:
        """The raw learned rates (inner learning rates, and lambda with a head)."""
        return [self.value_lr_raw, self.policy_lr_raw, *([self.advantage_weight_raw] if self.head_layout else [])]

    def inner_value_lr(self) -> torch.Tensor:
        return F.softplus(self.value_lr_raw)

    def inner_policy_lr(self) -> torch.Tensor:
        return F.softplus(self.policy_lr_raw)

    def advantage_weight(self) -> torch.Tensor:
        return F.softplus(self.advantage_weight_raw) if self.head_layout else torch.zeros(())

    # ---- forward ------------------------------------------------------------------------------------------------
    def log_std(self, like: torch.Tensor) -> torch.Tensor:
        """(a,) the policy's fixed log standard deviation, in the dtype and on the device of ``like``."""
        return torch.full((self.action_dim,), self.log_std_value, dtype=like.dtype, device=like.device)

    def values(self, value: list[torch.Tensor], feats: torch.Tensor) -> torch.Tensor:
        """(..., F) -> (...,): ``V(s)``."""
        return mlp_forward(self.value_layout.layers(value), feats)[1][..., 0]

    def policy_forward(self, policy: list[torch.Tensor], feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., F) -> (the last hidden activation (..., H), the mean action (..., a))."""
        return mlp_forward(self.policy_layout.layers(policy), feats)

    def predicted_advantage(self, head: list[torch.Tensor], hidden: torch.Tensor, actions: torch.Tensor
                            ) -> torch.Tensor:
        """(...,): the advantage head on ``[hidden, action]``. ``hidden`` is not detached: the head's loss shapes
        the policy's own layers in the inner step (that is its point)."""
        return mlp_forward(self.head_layout.layers(head), torch.cat([hidden, actions], dim=-1))[1][..., 0]

    def targets(self, value: list[torch.Tensor], batch: Batch, bootstrap: bool) -> torch.Tensor:
        """(N,) the regression target ``R``: the return-to-go in the episode, plus with ``bootstrap`` the discounted
        value of the episode's last next observation under ``value`` (detached: a target, not a prediction). Our
        episodes end by truncation (time limits, logs cut at faults), so without it the return of a late state
        misses everything after the cut."""
        if not bootstrap:
            return batch.returns
        return batch.returns + batch.tail_discount * self.values(value, batch.tail_feats).detach()

    def advantages(self, value: list[torch.Tensor], batch: Batch, bootstrap: bool) -> torch.Tensor:
        """(N,) ``A = R - V(s)`` under ``value``, detached (the policy's losses weigh with it; they do not train the
        value function)."""
        return (self.targets(value, batch, bootstrap) - self.values(value, batch.feats)).detach()

    # ---- losses ------------------------------------------------------------------------------------------------
    def value_loss(self, value: list[torch.Tensor], batch: Batch, bootstrap: bool) -> torch.Tensor:
        """``mean (V(s) - R)^2``, ``R`` bootstrapped with the value function being trained (:meth:`targets`)."""
        return F.mse_loss(self.values(value, batch.feats), self.targets(value, batch, bootstrap))

    def policy_loss(self, policy: list[torch.Tensor], head: list[torch.Tensor] | None, batch: Batch,
                    advantages: torch.Tensor, weighting: AdvantageWeighting) -> tuple[torch.Tensor, dict[str, float]]:
        """The AWR loss of ``policy`` on ``batch`` weighted by ``advantages``; with ``head`` (the inner loop) plus
        ``lambda * mean (A_head(s, a) - A)^2``. Returns the loss and its parts (``awr``, ``advantage_head``,
        ``weight_mean``)."""
        hidden, mean = self.policy_forward(policy, batch.feats)
        weights = awr_weights(advantages, weighting)
        awr = awr_loss(gaussian_log_prob(mean, self.log_std(mean), batch.actions), weights)
        parts = {"awr": float(awr.detach()), "weight_mean": float(weights.mean())}
        if not head:
            return awr, parts
        head_loss = F.mse_loss(self.predicted_advantage(head, hidden, batch.actions), advantages)
        parts["advantage_head"] = float(head_loss.detach())
        return awr + self.advantage_weight() * head_loss, parts

    # ---- adaptation ----------------------------------------------------------------------------------------------
    def adapt(self, params: MACAWParams, batch: Batch, weighting: AdvantageWeighting, bootstrap: bool,
              steps: int = 1, create_graph: bool = True) -> tuple[MACAWParams, dict[str, float]]:
        """The inner loop on a task's adaptation data: ``steps`` SGD steps of the value function, then ``steps`` of
        the policy and its advantage head with the advantages of the adapted value function (the official code's
        order), each parameter tensor with its learned rate. ``create_graph``: the steps stay differentiable for
        second-order MAML; without it the gradients are constants of the outer loss (first order: the results still
        depend on the parameters and the rates). Returns the adapted parameters and the first step's losses
        (``value``, ``awr``, ``advantage_head``, ``weight_mean``)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        value, n_policy = params.value, len(params.policy)
        policy_and_head = [*params.policy, *params.head]
        info: dict[str, float] = {}
        for step in range(steps):
            loss = self.value_loss(value, batch, bootstrap)
            if step == 0:
                info["value"] = float(loss.detach())
            value = _sgd_step(value, loss, self.inner_value_lr(), create_graph)
        advantages = self.advantages(value, batch, bootstrap)
        for step in range(steps):
            loss, parts = self.policy_loss(policy_and_head[:n_policy], policy_and_head[n_policy:], batch,
                                           advantages, weighting)
            if step == 0:
                info.update(parts)
            policy_and_head = _sgd_step(policy_and_head, loss, self.inner_policy_lr(), create_graph)
        return MACAWParams(value, policy_and_head[:n_policy], policy_and_head[n_policy:]), info

    def query_losses(self, params: MACAWParams, batch: Batch, weighting: AdvantageWeighting, bootstrap: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """The meta-losses of (adapted) ``params`` on a task's query data: the value loss and the AWR loss of the
        policy (no advantage head: it serves the inner loop only), and the policy loss's parts."""
        value_loss = self.value_loss(params.value, batch, bootstrap)
        advantages = self.advantages(params.value, batch, bootstrap)
        policy_loss, parts = self.policy_loss(params.policy, None, batch, advantages, weighting)
        return value_loss, policy_loss, parts

    # ---- to the robot's layout -------------------------------------------------------------------------------------
    def numpy_policy(self, policy: list[torch.Tensor]) -> PolicyParams:
        """The policy ``[W0, b0, ..., W_out, b_out, log_std]`` as float64 numpy arrays: the robot's
        :data:`~metarl_robot.runtime.policy_gradient.PolicyParams` (``policy_mean`` acts with it)."""
        layers = [p.detach().cpu().to(torch.float64).numpy().copy() for p in self.policy_layout.layers(policy)]
        return [*layers, np.full(self.action_dim, self.log_std_value)]

    def numpy_networks(self) -> AWRNetworks:
        """The meta-parameters, learned rates and lambda as the robot's numpy step reads them (float64); plain layers
        only (a weight-transform layer adapts ``z``, ``M`` and ``c``, which the robot's step does not)."""
        if self.value_layout.transform_dim:
            raise ValueError("weight-transform layers (macaw_net.weight_transform_dim > 0) have no robot-side "
                             "adaptation; train with plain layers (weight_transform_dim: 0) to export")
        as_np = lambda ps: [p.detach().cpu().to(torch.float64).numpy().copy() for p in ps]  # noqa: E731
        return AWRNetworks(value=as_np(self.value), policy=self.numpy_policy(list(self.policy)), head=as_np(self.head),
                           value_rates=as_np([self.inner_value_lr()])[0],
                           policy_rates=as_np([self.inner_policy_lr()])[0],
                           advantage_weight=float(self.advantage_weight().detach()))


def _sgd_step(params: list[torch.Tensor], loss: torch.Tensor, rates: torch.Tensor, create_graph: bool
              ) -> list[torch.Tensor]:
    """``p_i - rates[i] * grad_i loss`` for each tensor (torch.autograd.grad: every parameter must require grad)."""
    grads = torch.autograd.grad(loss, params, create_graph=create_graph)
    return [p - rates[i] * g for i, (p, g) in enumerate(zip(params, grads, strict=True))]


__all__ = ["AdvantageWeighting", "Batch", "MACAWNetConfig", "MACAWNetworks", "MACAWParams", "MLPLayout", "awr_loss",
           "awr_weights", "inverse_softplus"]
