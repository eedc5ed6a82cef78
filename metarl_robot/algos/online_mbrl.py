"""``online_mbrl``: the context-conditioned ensemble of ``context_mbrl`` meta-trained so that a closed-form update
of its last layer on a task's own transitions adapts it (ALPaCA's objective), and run that way: the collection
controller, the held-out error and the exported bundle (kind ``online_model``) all adapt the last layer online.

Everything else — data, buffer, collection loop, planner, checkpoints — is ``context_mbrl``'s; this module only
swaps the model (:class:`~metarl_robot.models.online_dynamics.OnlineContextDynamics`), the loss (the β-NLL of
each target under the posterior last layer after its context window) and the adapter
(:class:`~metarl_robot.runtime.online_adapter.OnlineModelAdapter` over the torch model). docs/online.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch

from metarl_robot.algos.buffer import EpisodeBuffer
from metarl_robot.algos.context_mbrl import ContextMBRL, ContextMBRLConfig, TrainConfig
from metarl_robot.models.context_dynamics import ContextDynamicsConfig
from metarl_robot.models.online_dynamics import OnlineContextDynamics, OnlineHeadConfig
from metarl_robot.runtime.last_layer import LastLayerConfig
from metarl_robot.runtime.online_adapter import OnlineModelAdapter
from metarl_robot.runtime.planner import PlannerConfig
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import RobotSpec
from metarl_robot.spec.schema import SpecError


@dataclass
class OnlineMBRLTrainConfig(TrainConfig):
    """Everything an online_mbrl training run needs (context_mbrl's config and the ``online`` section);
    ``metarl train <this.yaml>``."""

    algo: Literal["online_mbrl"]
    """Learning algorithm: the context ensemble with an online Bayesian last layer."""
    online: OnlineHeadConfig = field(default_factory=OnlineHeadConfig)
    """The online last layer's prior."""

    def validate(self, where: str) -> None:
        super().validate(where)
        try:
            self.online.validate()
        except ValueError as exc:
            raise SpecError(where, "online.prior_precision", str(exc)) from exc


class OnlineMBRL(ContextMBRL):
    """``context_mbrl`` with a meta-learned, online-adapted last layer (see the module docstring)."""

    name = "online_mbrl"
    config_class = OnlineMBRLTrainConfig
    sections = ("model", "training", "online")
    bundle_kind = "online_model"
    exporters: ClassVar[dict[str, str]] = {"online_model": "metarl_robot.export.online_graphs:export_online_model"}
    differentiable_model = False  # the reward-gradient adversary differentiates context_mbrl's prior model only
    model: OnlineContextDynamics

    def __init__(self, robot: RobotSpec, model_cfg: ContextDynamicsConfig, cfg: ContextMBRLConfig,
                 online: OnlineHeadConfig, seed: int = 0) -> None:
        self.online_cfg = online
        super().__init__(robot, model_cfg, cfg, seed)

    @classmethod
    def create(cls, cfg: OnlineMBRLTrainConfig, robot: RobotSpec) -> OnlineMBRL:
        return cls(robot, cfg.model, cfg.training, cfg.online, cfg.seed)

    def make_model(self, robot: RobotSpec, model_cfg: ContextDynamicsConfig) -> OnlineContextDynamics:
        return OnlineContextDynamics(robot.obs_dim, robot.action_dim, robot.obs_periodic, model_cfg, self.online_cfg)

    def make_adapter(self, planner: PlannerConfig, batch: int, adapt: bool = True, online: bool = True
                     ) -> OnlineModelAdapter:
        """The robot's online adapter over the torch model (collection, evaluation of a run)."""
        return OnlineModelAdapter(self.robot, get_reward(self.family.spec.reward), self.encode, self.step_with_head,
                                  self.head_features, self.model.prior_head().detach().numpy(),
                                  LastLayerConfig(self.model.prior_precision()), self.ensemble_size, self.window,
                                  planner, batch=batch, adapt=adapt, online=online)

    # ---- training -------------------------------------------------------------------------------
    def model_loss(self, batch: dict[str, torch.Tensor], z: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """ALPaCA's meta-objective: each target under the posterior last layer after its own context window."""
        e, n = self.ensemble_size, self.cfg.batch_size
        member = lambda x: x.reshape(e, n, *x.shape[1:])  # noqa: E731
        return self.model.online_loss(member(batch["obs"]), member(batch["act"]), member(batch["next_obs"]),
                                      member(z), member(batch["ctx_obs"]), member(batch["ctx_act"]),
                                      member(batch["ctx_next_obs"]), member(batch["ctx_mask"]))

    # ---- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def prediction_error(self, buffer: EpisodeBuffer, context_sizes: tuple[int, ...]) -> dict[int, float]:
        """Held-out one-step error per context size, adapting both the context and the last layer on the window
        (size 0: the meta-trained model)."""
        out = {}
        e = self.ensemble_size
        tile = lambda x: x.unsqueeze(0).expand(e, *x.shape)  # noqa: E731
        for c in context_sizes:
            rng = np.random.default_rng(12345)  # the same targets for every context size
            batch = self._tensors(buffer.sample(rng, self.cfg.eval_batch, self.window, holdout=True, context_size=c))
            z = self.model.encode(batch["ctx_obs"], batch["ctx_act"], batch["ctx_next_obs"], batch["ctx_mask"])
            n, k = batch["ctx_mask"].shape
            flat = lambda x: tile(x).reshape(e, n * k, -1)  # noqa: E731,B023
            phi = self.model.head_features(flat(batch["ctx_obs"]), flat(batch["ctx_act"]),
                                           tile(z).unsqueeze(2).expand(e, n, k, z.shape[-1]).reshape(e, n * k, -1))
            target = self.model.delta_norm(tile(batch["ctx_next_obs"] - batch["ctx_obs"]))
            head = self.model.posterior_head(phi.reshape(e, n, k, -1), target, tile(batch["ctx_mask"]))
            mean, _ = self.model.forward_with_head(tile(batch["obs"]), tile(batch["act"]), tile(z), head)
            err = (mean.mean(0).numpy() - batch["next_obs"].numpy()) / self.obs_scale
            out[c] = float(np.sqrt(np.mean(err**2)))
        return out

    # ---- numpy access for the adapter -------------------------------------------------------------
    @torch.no_grad()
    def step_with_head(self, obs: np.ndarray, act: np.ndarray, z: np.ndarray, head: np.ndarray) -> np.ndarray:
        """Ensemble mean prediction with the last layer ``head`` ``(E, F, o)``; ``(E, M, ·)`` numpy in and out."""
        t = lambda x: torch.as_tensor(x, dtype=torch.float32)  # noqa: E731
        rows = head_per_row(t(head), obs.shape[1])
        return self.model.forward_with_head(t(obs), t(act), t(z), rows)[0].numpy()

    @torch.no_grad()
    def head_features(self, obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray, z: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
        """``(E, M, ·)`` transitions → their features ``(E, M, F)`` and normalised deltas ``(E, M, o)``."""
        t = lambda x: torch.as_tensor(x, dtype=torch.float32)  # noqa: E731
        phi = self.model.head_features(t(obs), t(act), t(z))
        return phi.numpy(), self.model.delta_norm(t(next_obs) - t(obs)).numpy()


def head_per_row(head: torch.Tensor, rows: int) -> torch.Tensor:
    """A member's last layer ``(E, F, o)`` for each of its ``rows``: ``(E, rows, F, o)`` (a view, no copy)."""
    return head.unsqueeze(1).expand(head.shape[0], rows, *head.shape[1:])


__all__ = ["OnlineMBRL", "OnlineMBRLTrainConfig", "head_per_row"]
