"""Context-adaptive model-based meta-RL: a dynamics ensemble conditioned on an inferred task context.

Read top to bottom: the configs, the iteration's collection, then the algorithm. Each iteration
collects one episode per new task (random actions at iteration 0, MPC through the current model
after: :meth:`ContextMBRL.collect`) into the :class:`EpisodeBuffer`; :meth:`ContextMBRL.update` fits
the encoder and the ensemble jointly by Gaussian NLL on targets whose context windows come from the
same episode; at control time the context of the last K transitions conditions the model the
planner plans through. The ensemble
members share the encoder but each trains on its own independently drawn minibatch.
Seeds: PETS (Chua et al. 2018) for the heads and trajectory sampling; CaDM (Lee et al. 2020) and
the adaptive-model line of GrBAL/ReBAL (Nagabandi et al. 2019) for adapting the model online.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from metarl_robot.algos.base import Algorithm, Collection, IterationReport
from metarl_robot.algos.buffer import ContextBatch, EpisodeBuffer
from metarl_robot.algos.mpc_controller import MPCController
from metarl_robot.envs.rollout import Rollout, collect, make_vector_env, random_policy
from metarl_robot.models.context_dynamics import ContextDynamics, ContextDynamicsConfig
from metarl_robot.runtime.adapter import ModelBasedAdapter
from metarl_robot.runtime.planner import PlannerConfig
from metarl_robot.spec.family import Task
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import RobotSpec
from metarl_robot.spec.schema import SpecError
from metarl_robot.train.loop_config import LoopConfig, RunConfig


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


@dataclass
class TrainConfig(RunConfig):
    """Everything a context_mbrl training run needs; ``metarl train <this.yaml>``."""

    algo: Literal["context_mbrl"]
    """Learning algorithm (``pearl`` configs are :class:`~metarl_robot.algos.pearl.PEARLTrainConfig`)."""
    model: ContextDynamicsConfig = field(default_factory=ContextDynamicsConfig)
    """Encoder and ensemble sizes."""
    training: ContextMBRLConfig = field(default_factory=ContextMBRLConfig)
    """Optimisation of the model."""
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    """MPC used for data collection, and exported as the bundle's planner defaults."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """The outer loop."""

    def validate(self, where: str) -> None:
        self._validate_shared(where, ["training.grad_steps", "training.batch_size", "model.ensemble_size",
                                      "model.context_window"])
        if self.training.learning_rate <= 0:
            raise SpecError(where, "training.learning_rate", f"must be > 0, got {self.training.learning_rate}")


# ---- an iteration's episodes -------------------------------------------------------------------
@dataclass
class Collected(Collection):
    """An iteration's episodes (one per task) and the controller's online prediction errors."""

    rollout: Rollout | None = None
    """Transitions, one sub-env row per task."""
    errors: np.ndarray | None = None
    """``(T, tasks)`` online one-step prediction error by step since reset (MPC iterations only)."""
    seed: int = 0
    """Reset seed of the iteration (by default chunk sub-env ``i`` resets with it + its index; graded candidates
    reset with the sampler's ``starts``)."""

    def take_rows(self, index: np.ndarray) -> dict[str, Any]:
        return {"rollout": self.rollout.take(index), "errors": None if self.errors is None else self.errors[:, index]}

    def summary(self, window: int) -> tuple[float, dict[str, float]]:
        """Mean return and the online errors before / after the first ``window`` steps (NaN for random data)."""
        mean_return = float(np.mean(self.rollout.episode_returns()[:, 0]))
        if self.errors is None:  # every iteration logs the same columns
            return mean_return, {"online_pred_err_first_k": float("nan"), "online_pred_err_after_k": float("nan")}
        return mean_return, {"online_pred_err_first_k": float(np.nanmean(self.errors[1:window + 1])),
                             "online_pred_err_after_k": float(np.nanmean(self.errors[window + 1:]))}


# ---- the algorithm -------------------------------------------------------------------------------
class ContextMBRL(Algorithm):
    """Holds the model, its optimiser, its episode buffer and the math; the runner owns the loop."""

    name = "context_mbrl"
    config_class = TrainConfig
    sections = ("model", "training")
    bundle_kind = "model_based"
    initial_sampler = "random"
    exporters: ClassVar[dict[str, str]] = {"model_based": "metarl_robot.export.bundle_writer:export_model_based",
                                           "unadapted": "metarl_robot.export.bundle_writer:export_unadapted"}
    store_file = "buffer.npz"
    differentiable_model = True

    def __init__(self, robot: RobotSpec, model_cfg: ContextDynamicsConfig, cfg: ContextMBRLConfig,
                 seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.robot, self.cfg = robot, cfg
        self.model = self.make_model(robot, model_cfg)
        """The encoder + ensemble being trained."""
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        self.rng = np.random.default_rng(seed)
        self.window = model_cfg.context_window
        self.ensemble_size = model_cfg.ensemble_size
        self.obs_scale = robot.obs_scale
        self.buffer = EpisodeBuffer(robot.obs_dim, robot.action_dim, holdout_every=5)
        """Every episode collected (``buffer.npz``); every fifth is held out for the prediction error."""

    @classmethod
    def create(cls, cfg: TrainConfig, robot: RobotSpec) -> ContextMBRL:
        return cls(robot, cfg.model, cfg.training, cfg.seed)

    def make_model(self, robot: RobotSpec, model_cfg: ContextDynamicsConfig) -> ContextDynamics:
        """The untrained encoder + ensemble."""
        return ContextDynamics(robot.obs_dim, robot.action_dim, robot.obs_periodic, model_cfg)

    def make_adapter(self, planner: PlannerConfig, batch: int, adapt: bool = True) -> ModelBasedAdapter:
        """The collection controller's adapter over the torch model, as the robot's runs over the ONNX graphs
        (``adapt=False``: the empty context, for evaluations)."""
        return ModelBasedAdapter(self.robot, get_reward(self.family.spec.reward), self.encode, self.step,
                                 self.ensemble_size, self.window, planner, batch=batch, adapt=adapt)

    # ---- collection -------------------------------------------------------------------------------
    def collect(self, tasks: list[Task], iteration: int, seed: int, starts: list[int] | None = None) -> Collected:
        """One episode per task, ``tasks_per_iteration`` sub-envs at a time: random actions at iteration 0,
        MPC through the current model after."""
        run, family = self.run_cfg, self.family
        num = min(run.loop.tasks_per_iteration, len(tasks))
        envs = make_vector_env(family, num, run.loop.vector)
        parts: list[Rollout] = []
        errors: list[np.ndarray] = []
        try:
            for start in range(0, len(tasks), num):
                chunk = tasks[start:start + num]
                chunk = chunk + [chunk[-1]] * (num - len(chunk))  # pad the last chunk; duplicates dropped below
                reset: int | list[int] = seed + start
                if starts is not None:
                    reset = starts[start:start + num]
                    reset = reset + [reset[-1]] * (num - len(reset))
                if iteration == 0:
                    controller = random_policy(self.robot.action_low, self.robot.action_high, seed + start)
                else:
                    adapter = self.make_adapter(replace(run.planner, seed=seed + start), num)
                    params = {n: np.array([t[n] for t in chunk]) for n in family.reward_names}
                    controller = MPCController(adapter, params)
                rollout = collect(envs, family, controller, chunk, 1, seed=reset)
                parts.append(rollout.take(np.arange(len(tasks[start:start + num]))))
                if isinstance(controller, MPCController):
                    errors.append(np.stack(controller.errors)[:, :len(tasks[start:start + num])])
        finally:
            envs.close()
        rollout = Rollout.concatenate(parts)
        return Collected(rollout.episode_returns()[:, 0], episodes_per_task=1, rollout=rollout,
                         errors=np.concatenate(errors, axis=1) if errors else None, seed=seed)

    def store(self, tasks: list[Task], collection: Collected) -> dict[str, Any]:
        self.buffer.add(collection.rollout, np.stack([self.family.to_vector(t) for t in tasks]))
        return {}

    def report(self, iteration: int, collection: Collected, fit: dict[str, float], graded_return: float | None,
               counters: dict[str, float]) -> IterationReport:
        mean_return, online = collection.summary(self.window)
        sizes = tuple(self.run_cfg.loop.eval_context_sizes)
        pred = self.prediction_error(self.buffer, sizes) if len(self.buffer.split(True)) \
            else dict.fromkeys(sizes, float("nan"))  # no held-out episode yet
        # The adversary trains on its worst graded episodes: the mean over all it graded compares with the
        # other samplers' training return.
        graded = mean_return if graded_return is None else graded_return
        metrics = {
            "episode_return": mean_return, "graded_episode_return": graded,
            "policy": 0.0 if iteration == 0 else 1.0,
            "episodes": float(len(self.buffer)), "transitions": float(self.buffer.transitions),
            **counters,
            **{f"fit_{k}": v for k, v in fit.items()}, **online,
            **{f"pred_err_ctx{c}": v for c, v in pred.items()},
        }
        err0, err_k = pred.get(0, np.nan), pred.get(max(pred, default=0), np.nan)
        line = f"return {mean_return:.1f}, held-out error {err0:.4f} without context, {err_k:.4f} with"
        return IterationReport(metrics, line, {"err0": f"{err0:.3f}", "errK": f"{err_k:.3f}"})

    # ---- training -------------------------------------------------------------------------------
    def update(self, buffer: EpisodeBuffer | None = None) -> dict[str, float]:
        """Refit the normalisers to all training data (``buffer``, by default its own), then take
        ``grad_steps`` steps. Returns mean metrics."""
        buffer = self.buffer if buffer is None else buffer
        self.model.fit_normalizers(*buffer.training_arrays())
        self.model.train()
        e, n = self.ensemble_size, self.cfg.batch_size
        totals: dict[str, float] = {}
        for _ in range(self.cfg.grad_steps):
            batch = self._tensors(buffer.sample(self.rng, e * n, self.window))
            z, kl = self.model.encode_sample(batch["ctx_obs"], batch["ctx_act"], batch["ctx_next_obs"],
                                             batch["ctx_mask"])
            loss, parts = self.model_loss(batch, z)
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

    def model_loss(self, batch: dict[str, torch.Tensor], z: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The model's loss on a sampled batch (``E * n`` targets, member ``i`` fitting rows ``i * n ...``) with
        each target's context ``z``."""
        e, n = self.ensemble_size, self.cfg.batch_size
        per_member = {k: v.reshape(e, n, -1) for k, v in (("obs", batch["obs"]), ("act", batch["act"]),
                                                            ("next_obs", batch["next_obs"]), ("z", z))}
        return self.model.loss(**per_member)

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

    def save_store(self, run_dir: Path) -> None:
        self.buffer.save(run_dir / self.store_file)

    def load_store(self, run_dir: Path) -> None:
        self.buffer = EpisodeBuffer.load(run_dir / self.store_file)

    def adopt_store(self, run_dir: Path, source_names: list[str]) -> bool:
        """Every episode is kept (dynamics data is data whatever the family): its task vector is rewritten in this
        family's parameters, those it lacks at their nominal value."""
        self.load_store(run_dir)
        nominal = self.family.nominal()
        old = [dict(zip(source_names, row, strict=True)) for row in self.buffer.tasks]
        self.buffer.tasks = np.array([[task.get(n, nominal[n]) for n in self.family.names] for task in old],
                                     dtype=np.float64).reshape(len(old), len(self.family.names))
        return True
