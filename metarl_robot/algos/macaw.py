"""MACAW (Mitchell et al. 2021, "Offline Meta-Reinforcement Learning with Advantage Weighting"): a value function and a
Gaussian policy meta-trained with MAML on a fixed multi-task dataset so that a few regression steps on K <= 5
trajectories of a new task adapt them. Meta-training never touches an environment.

Read top to bottom: the configs, the dataset as MACAW reads it (:class:`OfflineTasks`), then the algorithm. The data
is an offline dataset of ``metarl dataset collect`` or ``build`` (docs/datasets.md), named by the run config's
``dataset`` and refused unless its robot and family are the config's. The runner drives MACAW as an offline algorithm
(:attr:`MACAW.offline`): it draws no tasks and collects nothing; each iteration is :meth:`MACAW.update`
(``macaw.meta_steps`` meta-steps) and a report.

A meta-step (:meth:`MACAW.meta_step`): ``meta_batch`` tasks of the dataset; per task a random split of its episodes
into adaptation data D_tr (``adapt_episodes`` whole episodes) and query data D_ts (``query_batch`` transitions of its
other episodes); the inner loop on D_tr (:meth:`~metarl_robot.models.macaw.MACAWNetworks.adapt`: value steps, then
policy steps with the advantage head's enriched loss); the meta-losses of the adapted networks on D_ts (value MSE and
the AWR loss); one Adam step on the meta-parameters, the learned inner learning rates and the advantage head's weight,
differentiated through the inner steps (second-order MAML by default, ``first_order`` drops those terms).

What differs from the official code (eric-mitchell/macaw: ``src/macaw.py``, ``src/nn.py``,
``config/alg/standard.json``), and why (docs/macaw.md):

* networks: tanh MLPs with a linear mean over :func:`~metarl_robot.runtime.policy_gradient.policy_features` (the robot's
  numpy layout, so the robot's ``policy_mean`` and ``log_prob_gradient`` serve the policy later) rather than ReLU MLPs
  with a tanh-squashed mean; no BiasLinear layers; weight-transform layers are optional and off by default;
* returns: value targets are divided by one return scale of the dataset (the std of its returns-to-go), so the same
  learning rates fit every family; the official code regresses raw returns with a 1e-5 outer value rate;
* the tail of a truncated episode is bootstrapped with the value function being trained (detached) in every value
  loss and advantage; the official code bootstraps its outer value loss (with a soft-updated target copy) and its
  advantages, not its inner value loss;
* adaptation data are whole episodes (the paper's K trajectories) rather than 256 contiguous transitions, and query
  data come from the task's other episodes (the official offline setting draws both from one buffer);
* with several inner steps each reuses the whole adaptation batch (the official code splits it across the steps).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from metarl_robot.algos.base import Algorithm, Collection, IterationReport
from metarl_robot.models.macaw import AdvantageWeighting, Batch, MACAWNetConfig, MACAWNetworks
from metarl_robot.replay.dataset import DATA_FILE, DatasetError, OfflineDataset, load_dataset
from metarl_robot.runtime.awr_policy import MAX_ADAPT_EPISODES, AWRPolicyAdapter, AWRStepConfig
from metarl_robot.runtime.manifest import sha256_file
from metarl_robot.runtime.planner import PlannerConfig
from metarl_robot.runtime.policy_gradient import (
    PolicyParams,
    discounted_returns,
    feature_dim,
    from_env_action,
    policy_features,
    policy_mean,
    to_env_action,
)
from metarl_robot.spec.family import Task, TaskFamily
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import RobotSpec
from metarl_robot.spec.schema import SpecError
from metarl_robot.train.loop_config import LoopConfig, RunConfig


@dataclass
class MACAWConfig:
    """MACAW's meta-training (the official code's values, config/alg/standard.json, in brackets)."""

    adapt_episodes: int = 2
    """K: whole episodes of a task one inner loop adapts on (D_tr); the paper's setting adapts from at most 5
    trajectories [256 contiguous transitions]. A task with K or fewer episodes adapts on all but one."""
    query_batch: int = 256
    """Transitions of the task's other episodes its meta-losses are measured on (D_ts) [256]."""
    meta_batch: int = 5
    """Tasks per meta-step [5]."""
    meta_steps: int = 200
    """Meta-steps per iteration of the runner."""
    inner_steps: int = 1
    """Inner steps in meta-training: this many value steps, then this many policy steps [1]."""
    test_inner_steps: int = 1
    """Inner steps at meta-test, adapting to a new task's trajectories; more than ``inner_steps`` may help [1]."""
    inner_value_lr: float = 0.01
    """Initial inner learning rate of the value function [0.001, on unscaled returns]."""
    inner_policy_lr: float = 0.001
    """Initial inner learning rate of the policy and its advantage head [0.001]."""
    advantage_weight: float = 0.01
    """Initial lambda: weight of the advantage head's loss in the inner policy loss; 0: no advantage head (the
    paper's ablation) [0.01]."""
    learn_inner_rates: bool = True
    """Meta-learn the inner learning rates (one per parameter tensor) and lambda, as the paper does [true]."""
    rate_lr: float = 0.001
    """Adam step size of the inner learning rates and lambda (in softplus space) [0.001]."""
    value_lr: float = 1e-4
    """Adam step size of the value function's meta-parameters [1e-5, on unscaled returns]."""
    policy_lr: float = 1e-4
    """Adam step size of the policy's and the advantage head's meta-parameters [1e-4]."""
    temperature: float = 1.0
    """AWR temperature T of ``exp(A / T)`` [1]."""
    weight_clip: float = 20.0
    """Largest AWR weight [20]."""
    normalize_advantages: bool = True
    """Standardise advantages over each batch before ``exp(A / T)`` [true]."""
    discount: float = 0.99
    """Discount of the returns-to-go [0.99]."""
    bootstrap: bool = True
    """Bootstrap the tail of every (truncated) episode: the return of a transition adds the discounted value of its
    episode's last next observation (detached); false: the return stops where the episode was cut."""
    first_order: bool = False
    """First-order MAML: the inner gradients are constants of the meta-loss (the advantage head and lambda then get
    no meta-gradient). Second order is exact and, for networks this size, cheap."""
    grad_clip: float = 0.0
    """Global norm clip of the meta-gradient; 0: none [1e9: none]."""

    def validate(self, where: str, section: str = "macaw") -> None:
        for name in ("adapt_episodes", "query_batch", "meta_batch", "meta_steps", "inner_steps", "test_inner_steps"):
            if getattr(self, name) < 1:
                raise SpecError(where, f"{section}.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("inner_value_lr", "inner_policy_lr", "rate_lr", "value_lr", "policy_lr", "temperature",
                     "weight_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise SpecError(where, f"{section}.{name}", f"must be a finite number > 0, got {value}")
        if not (math.isfinite(self.advantage_weight) and self.advantage_weight >= 0):
            raise SpecError(where, f"{section}.advantage_weight",
                            f"must be a finite number >= 0 (0: no advantage head), got {self.advantage_weight}")
        if not 0.0 <= self.discount < 1.0:
            raise SpecError(where, f"{section}.discount", f"must be in [0, 1), got {self.discount}")
        if not self.grad_clip >= 0:
            raise SpecError(where, f"{section}.grad_clip", f"must be >= 0 (0: no clip), got {self.grad_clip}")


@dataclass
class MACAWTrainConfig(RunConfig):
    """Everything a MACAW run needs (docs/macaw.md); ``metarl train <this.yaml>``."""

    algo: Literal["macaw"]
    """Learning algorithm: offline meta-RL with advantage weighting."""
    dataset: str = ""
    """The offline dataset folder (``metarl dataset collect`` or ``build``; a relative path is from the working
    directory); its robot and family must be this config's."""
    macaw_net: MACAWNetConfig = field(default_factory=MACAWNetConfig)
    """Sizes of the value function, the policy and the advantage head."""
    macaw: MACAWConfig = field(default_factory=MACAWConfig)
    """Meta-training settings."""
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    """Not used in training (nothing plans); every run config has one (the oracle's, for evaluation)."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """The outer loop: ``iterations`` (``macaw.meta_steps`` meta-steps each) and ``torch_threads``; nothing is
    collected, so its task and collection settings are not used."""

    def validate(self, where: str) -> None:
        self._validate_shared(where, [])
        if not self.dataset.strip():
            raise SpecError(where, "dataset", "must name an offline dataset folder (metarl dataset collect or build "
                            "writes one; docs/datasets.md)")
        self.macaw_net.validate(where)
        self.macaw.validate(where)


# ---- the dataset as MACAW reads it -------------------------------------------------------------------------------
@dataclass
class OfflineTasks:
    """An offline dataset's transitions as tensors (features, normalised actions, returns-to-go, bootstrap states)
    and the episodes of each task MACAW can use."""

    feats: torch.Tensor
    """``(T, F)`` policy features of each observation."""
    actions: torch.Tensor
    """``(T, a)`` each command in normalised units, clipped to ``[-1, 1]`` (a command logged outside the box ran
    limited to it)."""
    returns: torch.Tensor
    """``(T,)`` discounted return-to-go inside the transition's episode, in reward units (NaN: unknown rewards)."""
    tail_discount: torch.Tensor
    """``(T,)`` discount ** (steps to the episode's last next observation); 0 in an episode that terminated."""
    tail_feats: torch.Tensor
    """``(E, F)`` features of each episode's last next observation."""
    episode_of: np.ndarray
    """``(T,)`` the episode of each transition."""
    offsets: np.ndarray
    """``(E + 1,)`` episode boundaries."""
    task_episodes: list[np.ndarray]
    """The episodes of each usable task (at least ``min_episodes`` with known rewards), in task-id order."""
    task_ids: list[int]
    """The dataset's id of each usable task."""
    unknown_reward_episodes: int
    """Episodes left out: their rewards are unknown (NaN)."""
    small_tasks: int
    """Tasks left out: fewer than ``min_episodes`` episodes with known rewards."""
    return_scale: float = 1.0
    """Returns are divided by this in every :class:`Batch` (the value function's units)."""

    @classmethod
    def from_dataset(cls, data: OfflineDataset, discount: float, min_episodes: int = 2) -> OfflineTasks:
        """Its transitions; tasks with fewer than ``min_episodes`` episodes of known rewards are left out (counted).
        ``return_scale`` is the std of the usable returns-to-go (1 if they are constant)."""
        robot, offsets = data.robot, np.asarray(data.episode_offsets, dtype=np.int64)
        rewards = np.asarray(data.rewards, dtype=np.float64)
        lengths = np.diff(offsets)
        episode_of = np.repeat(np.arange(len(lengths)), lengths)
        returns = np.empty_like(rewards)
        steps_left = np.empty(len(rewards))
        for start, stop in pairwise(offsets):
            returns[start:stop] = discounted_returns(rewards[None, start:stop], discount)[0]
            steps_left[start:stop] = np.arange(stop - start, 0, -1)
        # Nothing follows a terminal state; a truncated episode's last next observation is where its return was cut.
        terminated = np.asarray(data.terminations, dtype=bool)[offsets[1:] - 1]
        tail_discount = discount ** steps_left * ~terminated[episode_of]
        known = np.array([np.isfinite(rewards[a:b]).all() for a, b in pairwise(offsets)], dtype=bool)
        task_episodes, task_ids, small = [], [], 0
        for task in np.unique(data.task_ids):
            episodes = np.flatnonzero((data.task_ids == task) & known)
            if len(episodes) >= min_episodes:
                task_episodes.append(episodes)
                task_ids.append(int(task))
            else:
                small += 1
        usable = returns[known[episode_of]]
        scale = float(np.std(usable)) if len(usable) else 1.0
        f32 = lambda x: torch.as_tensor(np.asarray(x), dtype=torch.float32)  # noqa: E731
        return cls(feats=f32(policy_features(robot, data.observations)),
                   actions=f32(np.clip(from_env_action(robot, data.actions), -1.0, 1.0)), returns=f32(returns),
                   tail_discount=f32(tail_discount),
                   tail_feats=f32(policy_features(robot, data.next_observations[offsets[1:] - 1])),
                   episode_of=episode_of, offsets=offsets, task_episodes=task_episodes, task_ids=task_ids,
                   unknown_reward_episodes=int((~known).sum()), small_tasks=small,
                   return_scale=scale if scale > 1e-8 else 1.0)

    @property
    def episodes(self) -> int:
        """Episodes of the usable tasks."""
        return int(sum(len(e) for e in self.task_episodes))

    @property
    def transitions(self) -> int:
        """Transitions of the usable tasks."""
        return int(sum(len(self.rows(e)) for e in self.task_episodes))

    def rows(self, episodes: np.ndarray) -> np.ndarray:
        """The transitions of ``episodes``, in order."""
        return np.concatenate([np.arange(self.offsets[e], self.offsets[e + 1]) for e in episodes])

    def batch(self, rows: np.ndarray) -> Batch:
        """The transitions ``rows`` as a :class:`Batch` (returns divided by :attr:`return_scale`)."""
        index = torch.as_tensor(rows, dtype=torch.long)
        return Batch(feats=self.feats[index], actions=self.actions[index],
                     returns=self.returns[index] / self.return_scale, tail_discount=self.tail_discount[index],
                     tail_feats=self.tail_feats[torch.as_tensor(self.episode_of[rows], dtype=torch.long)])

    def sample(self, rng: np.random.Generator, tasks: int, adapt_episodes: int, query: int
               ) -> list[tuple[Batch, Batch]]:
        """A meta-batch: ``tasks`` usable tasks (with replacement only when there are fewer), each split at random into
        adaptation data (``adapt_episodes`` whole episodes, all but one where it has no more) and query data
        (``query`` transitions drawn from its other episodes, with replacement only when they hold fewer)."""
        picked = rng.choice(len(self.task_episodes), size=tasks, replace=len(self.task_episodes) < tasks)
        out = []
        for t in picked:
            episodes = rng.permutation(self.task_episodes[t])
            k = min(adapt_episodes, len(episodes) - 1)
            others = self.rows(episodes[k:])
            query_rows = rng.choice(others, size=query, replace=len(others) < query)
            out.append((self.batch(self.rows(episodes[:k])), self.batch(query_rows)))
        return out


# ---- the algorithm ---------------------------------------------------------------------------------------------
class MACAW(Algorithm):
    """Holds the networks, their optimiser and the dataset as it reads it; the runner owns the loop (offline: update
    and report only)."""

    name = "macaw"
    config_class = MACAWTrainConfig
    sections = ("dataset", "macaw_net", "macaw")
    bundle_kind = "awr_policy"
    exporters: ClassVar[dict[str, str]] = {"awr_policy": "metarl_robot.export.awr_policy_graphs:export_awr_policy"}
    initial_sampler = "dataset"
    store_file = "dataset_ref.json"
    offline = True

    def __init__(self, robot: RobotSpec, net_cfg: MACAWNetConfig, cfg: MACAWConfig, seed: int = 0) -> None:
        net_cfg.validate("MACAWNetConfig", "macaw_net")
        cfg.validate("MACAWConfig")
        torch.manual_seed(seed)
        self.robot, self.net_cfg, self.cfg = robot, net_cfg, cfg
        self.nets = MACAWNetworks(feature_dim(robot), robot.action_dim, net_cfg, cfg.inner_value_lr,
                                  cfg.inner_policy_lr, cfg.advantage_weight)
        """The meta-parameters and the learned inner rates."""
        self.weighting = AdvantageWeighting(cfg.temperature, cfg.weight_clip, cfg.normalize_advantages)
        rates = self.nets.rate_params()
        for p in rates:  # fixed rates need no gradient (and stay out of the optimiser)
            p.requires_grad_(cfg.learn_inner_rates)
        groups = [{"params": list(self.nets.value), "lr": cfg.value_lr},
                  {"params": [*self.nets.policy, *self.nets.head], "lr": cfg.policy_lr}]
        if cfg.learn_inner_rates:
            groups.append({"params": rates, "lr": cfg.rate_lr})
        self.optimizer = torch.optim.Adam(groups)
        self.rng = np.random.default_rng(seed)
        """Meta-batches: tasks, the split of their episodes, query transitions."""
        self.data: OfflineTasks | None = None
        """The dataset being meta-trained on (attached by :meth:`build` with a family)."""
        self.dataset_ref: dict[str, Any] | None = None
        """What the dataset was: path, sha256 of its arrays, robot, family, counts (the run folder's store file)."""
        self.return_scale = 1.0
        """Returns are divided by this (the dataset's return std, fixed when training starts)."""
        self.meta_steps_taken = 0
        """Meta-steps so far."""

    @classmethod
    def create(cls, cfg: MACAWTrainConfig, robot: RobotSpec) -> MACAW:
        return cls(robot, cfg.macaw_net, cfg.macaw, cfg.seed)

    @classmethod
    def build(cls, cfg: MACAWTrainConfig, robot: RobotSpec, family: TaskFamily | None = None) -> MACAW:
        """An untrained instance; with ``family`` (training) the config's dataset attached, checked against it."""
        algo = super().build(cfg, robot, family)
        if family is not None:
            algo.attach_dataset(cfg.dataset, family, f"run config {cfg.run_name}")
        return algo

    def attach_dataset(self, path: str | Path, family: TaskFamily, where: str) -> None:
        """Load the dataset at ``path`` to meta-train on; a :class:`SpecError` on the config's ``dataset`` field when
        it is unreadable, of another robot or family, or has no task with two episodes of known rewards."""
        try:
            data = load_dataset(path)
        except DatasetError as exc:
            raise SpecError(where, "dataset", str(exc)) from None  # the message names the folder and its file
        ours, theirs = self.robot, data.robot
        if theirs.interface_hash != ours.interface_hash:
            raise SpecError(where, "dataset", f"robot: {path} holds data of robot {theirs.name!r} (robot.yaml "
                            f"interface {theirs.interface_hash[:12]}), but family {family.name!r} of this config runs "
                            f"robot {ours.name!r} (interface {ours.interface_hash[:12]}); use a dataset of this robot")
        if data.family.name != family.name or list(data.task_names) != list(family.names):
            raise SpecError(where, "dataset", f"family: {path} is a dataset of family {data.family.name!r} (parameters "
                            f"{list(data.task_names)}), this config trains family {family.name!r} (parameters "
                            f"{list(family.names)}); use a dataset of this family")
        tasks = OfflineTasks.from_dataset(data, self.cfg.discount)
        if not tasks.task_episodes:
            raise SpecError(where, "dataset", f"{path}: no task has 2 or more episodes with known rewards (MACAW "
                            f"adapts on some of a task's episodes and meta-trains on the others); {data.num_episodes} "
                            f"episode(s) of {len(np.unique(data.task_ids))} task(s), "
                            f"{tasks.unknown_reward_episodes} with unknown rewards")
        self.data, self.return_scale = tasks, tasks.return_scale
        self.dataset_ref = {
            "path": str(path), "sha256": sha256_file(Path(path) / DATA_FILE), "robot": theirs.name,
            "robot_interface_sha256": theirs.interface_hash, "family": data.family.name,
            "episodes": data.num_episodes, "transitions": data.num_transitions,
            "tasks": len(np.unique(data.task_ids)), "tasks_used": len(tasks.task_ids),
            "episodes_used": tasks.episodes, "unknown_reward_episodes": tasks.unknown_reward_episodes,
            "tasks_with_too_few_episodes": tasks.small_tasks}

    # ---- one iteration: no collection ---------------------------------------------------------------------------
    def collect(self, tasks: list[Task], iteration: int, seed: int, starts: list[int] | None = None) -> Collection:
        raise NotImplementedError("macaw is offline: it learns from its dataset and collects nothing (the runner never "
                                  "asks an offline algorithm to)")

    def store(self, tasks: list[Task], collection: Collection) -> dict[str, Any]:
        raise NotImplementedError("macaw is offline: its data store is its dataset")

    def update(self) -> dict[str, float]:
        """``meta_steps`` meta-steps on fresh meta-batches of the dataset; the mean of each metric."""
        if self.data is None:
            raise RuntimeError("no dataset attached: MACAW.build(cfg, robot, family) attaches the config's")
        cfg, totals = self.cfg, {}
        for _ in range(cfg.meta_steps):
            tasks = self.data.sample(self.rng, cfg.meta_batch, cfg.adapt_episodes, cfg.query_batch)
            for k, v in self.meta_step(tasks).items():
                totals[k] = totals.get(k, 0.0) + v
        return {k: v / cfg.meta_steps for k, v in totals.items()}

    def meta_step(self, tasks: list[tuple[Batch, Batch]]) -> dict[str, float]:
        """One meta-step on ``(adaptation, query)`` batches of tasks (module docstring); the mean over tasks of the
        inner losses (first step), the query losses after and before adaptation, and the rates."""
        cfg, nets = self.cfg, self.nets
        self.optimizer.zero_grad()
        meta = nets.meta_params()
        sums: dict[str, float] = {}
        for adapt_batch, query_batch in tasks:
            adapted, inner = nets.adapt(meta, adapt_batch, self.weighting, cfg.bootstrap, cfg.inner_steps,
                                        create_graph=not cfg.first_order)
            value_loss, policy_loss, outer = nets.query_losses(adapted, query_batch, self.weighting, cfg.bootstrap)
            # One backward per task frees its graph; the gradients add up in the parameters.
            ((value_loss + policy_loss) / len(tasks)).backward()
            with torch.no_grad():  # the meta-parameters' losses (with the adapted advantages): what adapting gains
                value_before = nets.value_loss(meta.value, query_batch, cfg.bootstrap)
                policy_before, _ = nets.policy_loss(meta.policy, None, query_batch,
                                                    nets.advantages(adapted.value, query_batch, cfg.bootstrap),
                                                    self.weighting)
            row = {"inner_value_loss": inner["value"], "inner_awr_loss": inner["awr"],
                   "advantage_head_loss": inner.get("advantage_head", float("nan")),
                   "value_loss": float(value_loss.detach()), "policy_loss": float(policy_loss.detach()),
                   "value_loss_unadapted": float(value_before), "policy_loss_unadapted": float(policy_before),
                   "weight_mean": outer["weight_mean"]}
            for k, v in row.items():
                sums[k] = sums.get(k, 0.0) + v / len(tasks)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for group in self.optimizer.param_groups for p in group["params"]],
                                           cfg.grad_clip)
        self.optimizer.step()
        self.meta_steps_taken += 1
        with torch.no_grad():
            sums.update(inner_value_lr=float(nets.inner_value_lr().mean()),
                        inner_policy_lr=float(nets.inner_policy_lr().mean()),
                        advantage_weight=float(nets.advantage_weight()))
        return sums

    def report(self, iteration: int, collection: Collection | None, fit: dict[str, float], graded_return: float | None,
               counters: dict[str, float]) -> IterationReport:
        data = self.data
        metrics = {"tasks": float(len(data.task_episodes)), "episodes": float(data.episodes),
                   "transitions": float(data.transitions), "meta_steps": float(self.meta_steps_taken),
                   **{f"fit_{k}": v for k, v in fit.items()}}
        line = (f"query value loss {fit['value_loss']:.3g} adapted ({fit['value_loss_unadapted']:.3g} unadapted), "
                f"policy loss {fit['policy_loss']:.3g} ({fit['policy_loss_unadapted']:.3g}), inner lr value "
                f"{fit['inner_value_lr']:.3g} policy {fit['inner_policy_lr']:.3g}")
        return IterationReport(metrics, line, {"v": f"{fit['value_loss']:.3g}", "pi": f"{fit['policy_loss']:.3g}"})

    # ---- meta-test: adapt to a new task, act ---------------------------------------------------------------------
    def adapt_to(self, data: OfflineDataset, episodes: Sequence[int], steps: int | None = None) -> PolicyParams:
        """The adapted policy for a new task from its trajectories, ``episodes`` of ``data`` (the paper: K <= 5):
        ``steps`` inner steps (default ``test_inner_steps``) from the meta-parameters, as in meta-training. Returns
        it in the robot's layout (``[W0, b0, ..., W_out, b_out, log_std]``, float64; :meth:`act` acts with it)."""
        if data.robot.interface_hash != self.robot.interface_hash:
            raise ValueError(f"data: of robot {data.robot.name!r}, this MACAW is for robot {self.robot.name!r}")
        episodes = np.asarray(episodes, dtype=np.int64)
        if not len(episodes) or episodes.min() < 0 or episodes.max() >= data.num_episodes:
            raise ValueError(f"episodes: expected indices of the data's {data.num_episodes} episodes, got "
                             f"{episodes.tolist()}")
        tasks = OfflineTasks.from_dataset(data, self.cfg.discount, min_episodes=1)
        tasks.return_scale = self.return_scale
        batch = tasks.batch(tasks.rows(episodes))
        if not torch.isfinite(batch.returns).all():
            raise ValueError("episodes: their rewards are unknown (NaN); adaptation regresses returns")
        with torch.enable_grad():  # the inner step differentiates even when called under no_grad
            adapted, _ = self.nets.adapt(self.nets.meta_params(), batch, self.weighting, self.cfg.bootstrap,
                                         steps or self.cfg.test_inner_steps, create_graph=False)
        return self.nets.numpy_policy(adapted.policy)

    def robot_step(self) -> AWRStepConfig:
        """The adaptation step the robot takes (:mod:`metarl_robot.runtime.awr_policy`): meta-test's inner steps,
        this run's weighting, discount and return scale, adapting on the last ``adapt_episodes`` episodes (the
        training K, at most 5)."""
        cfg = self.cfg
        return AWRStepConfig(steps=cfg.test_inner_steps, discount=cfg.discount, bootstrap=cfg.bootstrap,
                             return_scale=self.return_scale, temperature=cfg.temperature, weight_clip=cfg.weight_clip,
                             normalize_advantages=cfg.normalize_advantages,
                             adapt_episodes=min(cfg.adapt_episodes, MAX_ADAPT_EPISODES))

    def make_policy_adapter(self, batch: int, seed: int, settings: dict[str, Any] | None = None) -> AWRPolicyAdapter:
        """The robot's adapter over this run's networks (numpy; ``metarl eval`` of a run): as the exported bundle's
        with the torch weights in float64. ``settings``: ``adapt_episodes``."""
        if self.family is None:
            raise RuntimeError("make_policy_adapter needs the family (its reward): set algo.family first")
        step = self.robot_step().with_settings(settings, "a macaw controller does not plan")
        return AWRPolicyAdapter(self.robot, get_reward(self.family.spec.reward), self.nets.numpy_networks(), step,
                                batch=batch, seed=seed)

    def act(self, obs: np.ndarray, policy: PolicyParams | None = None) -> np.ndarray:
        """Robot-unit actions ``(..., a)`` of the mean of ``policy`` (:meth:`adapt_to`'s; the meta-policy's when None)
        at observations ``(..., obs_dim)``."""
        params = self.nets.numpy_policy(list(self.nets.policy)) if policy is None else policy
        return to_env_action(self.robot, policy_mean(params, policy_features(self.robot, obs)))

    # ---- checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"nets": self.nets.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": self.rng.bit_generator.state, "return_scale": self.return_scale,
                "meta_steps": self.meta_steps_taken, "dataset": self.dataset_ref}

    def load_state_dict(self, state: dict) -> None:
        self.nets.load_state_dict(state["nets"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.rng.bit_generator.state = state["rng"]
        self.return_scale, self.meta_steps_taken = float(state["return_scale"]), int(state["meta_steps"])
        if self.data is not None:
            self.data.return_scale = self.return_scale
        if self.dataset_ref is None:
            self.dataset_ref = state["dataset"]

    def save_store(self, run_dir: Path) -> None:
        """What the dataset was (``dataset_ref.json``): the data stays in its own folder."""
        (Path(run_dir) / self.store_file).write_text(json.dumps(self.dataset_ref, indent=1) + "\n")

    def load_store(self, run_dir: Path) -> None:
        """Resume: refuse a dataset that changed since the run started (its arrays' sha256)."""
        path = Path(run_dir) / self.store_file
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SpecError(str(path), "", f"not readable: {exc}") from None
        if self.dataset_ref is not None and saved.get("sha256") != self.dataset_ref["sha256"]:
            raise SpecError(str(path), "dataset", f"the run trained on {saved.get('path')} (sha256 "
                            f"{str(saved.get('sha256'))[:12]} of {DATA_FILE}), but {self.dataset_ref['path']} now "
                            f"holds other data ({self.dataset_ref['sha256'][:12]}); resume with the dataset it was "
                            "trained on")
        self.dataset_ref = self.dataset_ref or saved

    def adopt_store(self, run_dir: Path, source_names: list[str]) -> bool:
        """Fine-tuning keeps nothing of the other run's data: MACAW's data is its own config's dataset."""
        del run_dir, source_names
        return False


__all__ = ["MACAW", "MACAWConfig", "MACAWTrainConfig", "OfflineTasks"]
