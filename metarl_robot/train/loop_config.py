"""The run config's shared part: the outer loop's settings and the fields every algorithm's run config starts with.

Each algorithm's module subclasses :class:`RunConfig` (its ``config_class``); :mod:`metarl_robot.train.config`
reads a YAML file into the one its ``algo`` names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml

from metarl_robot.runtime.planner import PlannerConfig
from metarl_robot.spec.schema import SpecError, to_plain
from metarl_robot.train.task_sampler import AdversaryConfig, GaussianSamplerConfig


@dataclass
class LoopConfig:
    """The outer meta-training loop (owned by the runner)."""

    iterations: int = 10
    """Training iterations; iteration 0 collects initial data (random actions for context_mbrl, the untrained
    policy for pearl), later ones collect with the current learner."""
    tasks_per_iteration: int = 4
    """Tasks drawn per iteration, one per sub-env (one episode each for context_mbrl, one exploration round
    as ``pearl_schedule`` says for pearl)."""
    random_episodes: int = 8
    """Tasks of iteration 0, each on its own uniform draw: one random-action episode each for context_mbrl,
    one exploration round of the untrained policy each for pearl."""
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
    """Context sizes at which the held-out prediction error is logged (0 = unadapted; context_mbrl only)."""
    torch_threads: int = 1
    """torch intra-op threads. Planning makes thousands of tiny model calls per step, for which one
    thread is fastest: with torch's default pool a loaded 2-core machine ran 15x slower."""


@dataclass
class RunConfig:
    """The fields every algorithm's run config starts with; the algorithm's module subclasses it (its
    ``config_class``), narrowing ``algo`` to its name and adding its own sections, then ``planner`` and
    ``loop`` (declared there, so that a resolved config.yaml lists them after the algorithm's sections)."""

    schema_version: int
    """Version of this schema the file was written for."""
    algo: str
    """Learning algorithm (:data:`metarl_robot.algos.registry.ALGORITHMS`)."""
    family: str
    """Task family name (sim/tasks) or path to a family YAML."""
    seed: int = 0
    """Seeds tasks, resets, the learner's own randomness (planner noise, exploration) and network initialisation."""
    name: str | None = None
    """Run folder name under the output folder (default: <algo>_<family>_s<seed>)."""
    if TYPE_CHECKING:  # every subclass declares them, after its own sections
        planner: PlannerConfig
        loop: LoopConfig

    @property
    def run_name(self) -> str:
        return self.name or f"{self.algo}_{Path(self.family).stem}_s{self.seed}"

    def _validate_shared(self, where: str, positive: list[str]) -> None:
        try:
            self.planner.validate()
        except ValueError as exc:
            raise SpecError(where, "planner", str(exc)) from exc
        for name in ["loop.iterations", "loop.tasks_per_iteration", "loop.random_episodes", *positive]:
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

    def to_yaml(self) -> str:
        return yaml.safe_dump(to_plain(self), sort_keys=False)
