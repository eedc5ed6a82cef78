"""The interface between the training loop and a meta-RL algorithm (rsl_rl's split).

The algorithm holds the math and its state: networks, optimisers, its data store and how it
collects an iteration's data on given tasks. The :class:`~metarl_robot.train.runner.Runner` holds
the loop: which tasks (iteration 0's initial draw, the samplers, adversarial grading, the
reward-gradient proposal, the oracle's accounting), the run folder, logging and checkpoints.

An iteration, as the runner drives it::

    collection = algo.collect(tasks, iteration, seed, starts)   # one collection per task, nothing stored yet
    collection = collection.take(chosen)                        # only when the adversary chose among them
    info = algo.store(tasks, collection)                        # into the data store (buffer.npz, replay.npz)
    fit = algo.update()                                         # gradient steps on the store
    report = algo.report(iteration, collection, fit, graded_return, counters)

An :attr:`Algorithm.offline` algorithm (e.g. MACAW) learns from a fixed dataset: the runner skips the first three
lines (no tasks, no env) and reports with ``collection`` None.

Adding an algorithm: a module with its config dataclasses, its run config (a
:class:`~metarl_robot.train.loop_config.RunConfig` subclass) and a subclass of :class:`Algorithm`,
plus one line in :data:`metarl_robot.algos.registry.ALGORITHMS` (docs/algorithms.md).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    from metarl_robot.spec.family import Task, TaskFamily
    from metarl_robot.spec.robot import RobotSpec
    from metarl_robot.train.loop_config import RunConfig


@dataclass
class Collection(ABC):
    """An iteration's data on its tasks (row ``i`` belongs to task ``i``), not yet in the data store; each
    algorithm subclasses it with its own data."""

    graded_returns: np.ndarray
    """``(tasks,)`` each task's return of the episode the adversary grades against the oracle's."""
    episodes_per_task: int
    """Episodes collected per task (the graded one included): the env steps of a candidate not trained on."""
    graded_start_offset: int = 0
    """The graded episode resets with the task's start seed + this (its oracle episode starts there too)."""
    grading_info: dict[str, Any] = field(default_factory=dict)
    """Extra tasks.jsonl fields of a graded iteration (e.g. which episode was graded)."""

    def take(self, chosen: list[int]) -> Collection:
        """The part of the tasks at indices ``chosen`` (in that order): what the adversary keeps."""
        index = np.asarray(chosen, dtype=np.int64)
        return replace(self, graded_returns=self.graded_returns[index], **self.take_rows(index))

    @abstractmethod
    def take_rows(self, index: np.ndarray) -> dict[str, Any]:
        """The subclass's own per-task fields, rows ``index`` (for :meth:`take`)."""


@dataclass
class IterationReport:
    """What the runner logs of an iteration (it adds ``seconds`` as the last metric)."""

    metrics: dict[str, float]
    """The metrics.csv row without ``iteration`` and ``seconds``; the same columns every iteration."""
    line: str
    """The progress line's summary (one line per iteration when stderr is not a terminal)."""
    postfix: dict[str, str]
    """Extra fields of the progress bar."""


class Algorithm(ABC):
    """A meta-RL algorithm as the runner, the exporter and the registry see it."""

    name: ClassVar[str]
    """The config's ``algo`` value and the checkpoint's ``algo_kind`` (the registry's key)."""
    config_class: ClassVar[type[RunConfig]]
    """Its run config (``metarl train <config.yaml>``)."""
    sections: ClassVar[tuple[str, ...]]
    """The run-config sections this algorithm reads beyond the shared ones (``planner``, ``loop``); a config of an
    algorithm that reads none of them is refused if it has one. Algorithms may share a section (e.g. ``model``)."""
    bundle_kind: ClassVar[str | None]
    """The ``kind`` of the policy bundle its export writes by default (``metarl export``); None if it has no
    exporter."""
    initial_sampler: ClassVar[str]
    """tasks.jsonl's ``sampler`` at iteration 0 (its initial tasks are uniform draws for every sampler)."""
    store_file: ClassVar[str]
    """Its data store in the run folder (needed to resume, and by the exporter's parity check)."""
    exporters: ClassVar[dict[str, str]] = {}
    """Bundle kind → ``"module:function"`` of the export step writing it (``metarl export``, see
    :func:`metarl_robot.export.bundle_writer.export_run`); named, not imported, since the export code imports
    the trainer. Empty if its runs cannot be exported; ``bundle_kind`` is the one written by default."""
    differentiable_model: ClassVar[bool] = False
    """Whether it learns a dynamics model the reward-gradient adversary can differentiate
    (``loop.adversary.reward_gradient``; docs/admrl.md)."""
    offline: ClassVar[bool] = False
    """Whether it learns from a fixed dataset alone (offline RL): the runner then draws no tasks, collects nothing
    and makes no env; each iteration is :meth:`update` and :meth:`report` (with ``collection`` None), and it never
    calls :meth:`collect` or :meth:`store`."""

    run_cfg: RunConfig | None = None
    """The run config it was built from (:meth:`build`); None for one constructed directly, which can
    update and act but not collect."""
    family: TaskFamily | None = None
    """The task family it collects on (set by :meth:`build`)."""

    # ---- building -------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def create(cls, cfg: RunConfig, robot: RobotSpec) -> Algorithm:
        """An untrained instance sized as ``cfg`` says."""

    @classmethod
    def build(cls, cfg: RunConfig, robot: RobotSpec, family: TaskFamily | None = None) -> Algorithm:
        """An untrained instance for the run ``cfg`` on ``family`` (None: to load weights into, not to train)."""
        algo = cls.create(cfg, robot)
        algo.run_cfg, algo.family = cfg, family
        return algo

    # ---- one iteration ----------------------------------------------------------------------------
    @abstractmethod
    def collect(self, tasks: list[Task], iteration: int, seed: int, starts: list[int] | None = None) -> Collection:
        """One collection per task, with the untrained learner at iteration 0. ``seed``: the iteration's reset
        seed (by default sub-env ``i`` of a chunk resets with it + the chunk's offset + ``i``); ``starts``: each
        task's own reset seed instead, as a gap measurement against the oracle needs."""

    @abstractmethod
    def store(self, tasks: list[Task], collection: Collection) -> dict[str, Any]:
        """Add ``collection`` (of ``tasks``) to the data store; returns extra tasks.jsonl fields (written first)."""

    @abstractmethod
    def update(self) -> dict[str, float]:
        """Gradient steps on the data store; returns the mean of each fit metric (logged as ``fit_<name>``)."""

    @abstractmethod
    def report(self, iteration: int, collection: Collection | None, fit: dict[str, float],
               graded_return: float | None, counters: dict[str, float]) -> IterationReport:
        """The iteration's metrics row: ``graded_return`` is the adversary's mean over every candidate it graded
        (None when it did not grade); ``counters`` the runner's env-step counts, logged as they are; ``collection``
        is None for an :attr:`offline` algorithm."""

    # ---- persistence ------------------------------------------------------------------------------
    @abstractmethod
    def state_dict(self) -> dict:
        """Weights, optimisers and random states (the checkpoint's ``algo``)."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""

    def loop_state(self) -> dict[str, Any]:
        """Counters of the loop the algorithm keeps, saved at the checkpoint's top level."""
        return {}

    def load_loop_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`loop_state` from a checkpoint (nothing to restore by default)."""
        del state

    @abstractmethod
    def save_store(self, run_dir: Path) -> None:
        """Write the data store to ``run_dir / store_file``."""

    @abstractmethod
    def load_store(self, run_dir: Path) -> None:
        """Read the data store back from ``run_dir / store_file`` (resume)."""

    def adopt_store(self, run_dir: Path, source_names: list[str]) -> bool:
        """Fine-tuning (``metarl retrain``): take another run's data store, whose tasks have the parameters
        ``source_names``. By default only when they are this family's (True); otherwise the data is not kept
        (False) and the run starts with an empty store."""
        if list(source_names) != list(self.family.names):
            return False
        self.load_store(run_dir)
        return True

    # ---- export -----------------------------------------------------------------------------------
    @classmethod
    def export_step(cls, kind: str) -> Callable[..., Any]:
        """The export step :attr:`exporters` names for ``kind`` (imported on use); KeyError if it has none."""
        module, _, function = cls.exporters[kind].partition(":")
        return getattr(importlib.import_module(module), function)
