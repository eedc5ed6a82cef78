"""Context-adaptive model-based meta-RL: a dynamics ensemble conditioned on an inferred task context.

Read top to bottom: the config, then the algorithm. Each iteration the runner adds episodes of
new tasks to the buffer; :meth:`ContextMBRL.update` fits the encoder and the ensemble jointly by
Gaussian NLL on targets whose context windows come from the same episode; at control time the
context of the last K transitions conditions the model the planner plans through. The ensemble
members share the encoder but each trains on its own independently drawn minibatch.
Seeds: PETS (Chua et al. 2018) for the heads and trajectory sampling; CaDM (Lee et al. 2020) and
the adaptive-model line of GrBAL/ReBAL (Nagabandi et al. 2019) for adapting the model online.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from metarl_robot.algos.buffer import ContextBatch, EpisodeBuffer
from metarl_robot.models.context_dynamics import ContextDynamics, ContextDynamicsConfig
from metarl_robot.spec.robot import RobotSpec


@dataclass
class ContextMBRLConfig:
    """Optimisation settings of the model fit."""

    learning_rate: float = 1e-3
    """Adam step size."""
    weight_decay: float = 1e-5
    """Adam (L2) weight decay."""
    batch_size: int = 256
    """Targets per ensemble member per gradient step."""
    grad_steps: int = 500
    """Gradient steps per training iteration."""
    grad_clip: float = 10.0
    """Global gradient-norm clip."""
    eval_batch: int = 2048
    """Held-out targets per prediction-error evaluation."""


class ContextMBRL:
    """Holds the model, its optimiser and the math; the runner owns the loop and the data."""

    def __init__(self, robot: RobotSpec, model_cfg: ContextDynamicsConfig, cfg: ContextMBRLConfig,
                 seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.robot, self.cfg = robot, cfg
        self.model = ContextDynamics(robot.obs_dim, robot.action_dim, robot.obs_periodic, model_cfg)
        """The encoder + ensemble being trained."""
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.rng = np.random.default_rng(seed)
        self.window = model_cfg.context_window
        self.ensemble_size = model_cfg.ensemble_size
        self.obs_scale = robot.obs_scale

    # ---- training -------------------------------------------------------------------------------
    def update(self, buffer: EpisodeBuffer) -> dict[str, float]:
        """Refit the normalisers to all training data, then take ``grad_steps`` steps. Returns mean metrics."""
        self.model.fit_normalizers(*buffer.training_arrays())
        self.model.train()
        e, n = self.ensemble_size, self.cfg.batch_size
        totals: dict[str, float] = {}
        for _ in range(self.cfg.grad_steps):
            batch = self._tensors(buffer.sample(self.rng, e * n, self.window))
            z, kl = self.model.encode_sample(batch["ctx_obs"], batch["ctx_act"], batch["ctx_next_obs"],
                                             batch["ctx_mask"])
            per_member = {k: v.reshape(e, n, -1) for k, v in (("obs", batch["obs"]), ("act", batch["act"]),
                                                                ("next_obs", batch["next_obs"]), ("z", z))}
            loss, parts = self.model.loss(**per_member)
            loss = loss + self.model.cfg.context_kl * kl.mean()
            parts["context_kl"] = float(kl.mean().detach())
            self.optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            for k, v in {"loss": float(loss.detach()), **parts}.items():
                totals[k] = totals.get(k, 0.0) + v
        self.model.eval()
        return {k: v / self.cfg.grad_steps for k, v in totals.items()}

    @staticmethod
    def _tensors(batch: ContextBatch) -> dict[str, torch.Tensor]:
        return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in batch.__dict__.items()}

    # ---- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def prediction_error(self, buffer: EpisodeBuffer, context_sizes: tuple[int, ...]) -> dict[int, float]:
        """Held-out one-step error (RMS over components, in robot.yaml ``scale`` units) per context size.

        The prediction is the ensemble's mean. Context size 0 is the unadapted model.
        """
        out = {}
        e = self.ensemble_size

        def tile(x: torch.Tensor) -> torch.Tensor:
            return x.unsqueeze(0).expand(e, *x.shape)

        for c in context_sizes:
            rng = np.random.default_rng(12345)  # the same targets for every context size
            batch = self._tensors(buffer.sample(rng, self.cfg.eval_batch, self.window, holdout=True, context_size=c))
            z = self.model.encode(batch["ctx_obs"], batch["ctx_act"], batch["ctx_next_obs"], batch["ctx_mask"])
            mean, _ = self.model(tile(batch["obs"]), tile(batch["act"]), tile(z))
            err = (mean.mean(0).numpy() - batch["next_obs"].numpy()) / self.obs_scale
            out[c] = float(np.sqrt(np.mean(err**2)))
        return out

    # ---- numpy access for the planner -------------------------------------------------------------
    @torch.no_grad()
    def step(self, obs: np.ndarray, act: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Ensemble mean prediction, ``(E, M, ·)`` numpy in and out (the planner's step function)."""
        mean, _ = self.model(torch.as_tensor(obs), torch.as_tensor(act), torch.as_tensor(z))
        return mean.numpy()

    @torch.no_grad()
    def encode(self, ctx_obs: np.ndarray, ctx_act: np.ndarray, ctx_next_obs: np.ndarray, ctx_mask: np.ndarray
               ) -> np.ndarray:
        f = lambda x: torch.as_tensor(x, dtype=torch.float32)  # noqa: E731
        return self.model.encode(f(ctx_obs), f(ctx_act), f(ctx_next_obs), f(ctx_mask)).numpy()

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        self.model.eval()
