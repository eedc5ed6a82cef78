"""Run configuration: one typed YAML per run, unknown keys rejected, saved resolved in the run folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from metarl_robot.algos.context_mbrl import ContextMBRLConfig
from metarl_robot.models.context_dynamics import ContextDynamicsConfig
from metarl_robot.runtime.planner import PlannerConfig
from metarl_robot.spec.schema import SpecError, build, check_schema_version, load_yaml, to_plain
from metarl_robot.train.task_sampler import AdversaryConfig, GaussianSamplerConfig

CONFIG_SCHEMA_VERSION = 1
"""The run-config schema this code reads."""


@dataclass
class LoopConfig:
    """The outer meta-training loop (owned by the runner)."""

    iterations: int = 10
    """Training iterations; iteration 0 collects random-action data, later ones collect with MPC."""
    tasks_per_iteration: int = 4
    """Tasks drawn per iteration, one per sub-env, one episode each."""
    random_episodes: int = 8
    """Random-action episodes (each on its own task) collected before the first model fit."""
    task_sampler: Literal["uniform", "gaussian", "adversarial"] = "uniform"
    """How training tasks are chosen from the family's train box: ``uniform`` draws, a ``gaussian`` around
    the box centre, or ``adversarial`` (AdMRL: the tasks with the largest gap to the oracle; docs/admrl.md)."""
    gaussian: GaussianSamplerConfig = field(default_factory=GaussianSamplerConfig)
    """Settings of the ``gaussian`` sampler."""
    adversary: AdversaryConfig = field(default_factory=AdversaryConfig)
    """Settings of the ``adversarial`` sampler."""
    vector: Literal["sync", "async"] = "sync"
    """Vector env mode for collection (planning is batched across sub-envs either way)."""
    eval_context_sizes: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8, 16])
    """Context sizes at which the held-out prediction error is logged (0 = unadapted)."""
    torch_threads: int = 1
    """torch intra-op threads. Planning makes thousands of tiny model calls per step, for which one
    thread is fastest: with torch's default pool a loaded 2-core machine ran 15x slower."""


@dataclass
class TrainConfig:
    """Everything a training run needs; ``metarl train <this.yaml>``."""

    schema_version: int
    """Version of this schema the file was written for."""
    algo: Literal["context_mbrl"]
    """Learning algorithm."""
    family: str
    """Task family name (sim/tasks) or path to a family YAML."""
    seed: int = 0
    """Seeds tasks, resets, planner noise and network initialisation."""
    name: str | None = None
    """Run folder name under the output folder (default: <algo>_<family>_s<seed>)."""
    model: ContextDynamicsConfig = field(default_factory=ContextDynamicsConfig)
    """Encoder and ensemble sizes."""
    training: ContextMBRLConfig = field(default_factory=ContextMBRLConfig)
    """Optimisation of the model."""
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    """MPC used for data collection, and exported as the bundle's planner defaults."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """The outer loop."""

    @property
    def run_name(self) -> str:
        return self.name or f"{self.algo}_{Path(self.family).stem}_s{self.seed}"

    def validate(self, where: str) -> None:
        try:
            self.planner.validate()
        except ValueError as exc:
            raise SpecError(where, "planner", str(exc)) from exc
        positive = ["loop.iterations", "loop.tasks_per_iteration", "loop.random_episodes", "training.grad_steps",
                    "training.batch_size", "model.ensemble_size", "model.context_window"]
        for name in positive:
            section, key = name.split(".")
            value = getattr(getattr(self, section), key)
            if value < 1:
                raise SpecError(where, name, f"must be >= 1, got {value}")
        if self.loop.gaussian.std <= 0:
            raise SpecError(where, "loop.gaussian.std", f"must be > 0, got {self.loop.gaussian.std}")
        try:
            self.loop.adversary.validate(None, self.loop.tasks_per_iteration)
        except ValueError as exc:
            raise SpecError(where, "loop.adversary", str(exc)) from exc
        if self.training.learning_rate <= 0:
            raise SpecError(where, "training.learning_rate", f"must be > 0, got {self.training.learning_rate}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(to_plain(self), sort_keys=False)


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read a run config; ``overrides`` (nested dict) replaces values before checking."""
    data, where = load_yaml(path)
    check_schema_version(data, where, CONFIG_SCHEMA_VERSION, "run config")
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    cfg = build(TrainConfig, data, where)
    cfg.validate(where)
    return cfg
