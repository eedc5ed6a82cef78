"""Run configuration: one typed YAML per run, unknown keys rejected, saved resolved in the run folder.

``algo`` picks the learner and with it the sections it reads: ``context_mbrl`` reads ``model`` and
``training``; ``pearl`` reads ``pearl_net``, ``pearl`` and ``pearl_schedule``. A section of the other
algorithm is refused rather than silently ignored. ``planner``, ``loop`` and the rest are shared (for
PEARL the planner is only the oracle's, which grades the adversarial sampler and ``metarl eval``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from metarl_robot.algos.context_mbrl import ContextMBRLConfig
from metarl_robot.algos.pearl import CollectionSchedule, PEARLConfig
from metarl_robot.models.context_dynamics import ContextDynamicsConfig
from metarl_robot.models.pearl import PEARLNetConfig
from metarl_robot.runtime.planner import PlannerConfig
from metarl_robot.spec.schema import SpecError, build, check_schema_version, load_yaml, to_plain
from metarl_robot.train.task_sampler import AdversaryConfig, GaussianSamplerConfig

CONFIG_SCHEMA_VERSION = 1
"""The run-config schema this code reads."""


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


class _RunConfig:
    """What both algorithms' run configs share (a mixin: the fields are each dataclass's own)."""

    name: str | None
    algo: str
    family: str
    seed: int
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


@dataclass
class TrainConfig(_RunConfig):
    """Everything a context_mbrl training run needs; ``metarl train <this.yaml>``."""

    schema_version: int
    """Version of this schema the file was written for."""
    algo: Literal["context_mbrl"]
    """Learning algorithm (``pearl`` configs are :class:`PEARLTrainConfig`)."""
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

    def validate(self, where: str) -> None:
        self._validate_shared(where, ["training.grad_steps", "training.batch_size", "model.ensemble_size",
                                      "model.context_window"])
        if self.training.learning_rate <= 0:
            raise SpecError(where, "training.learning_rate", f"must be > 0, got {self.training.learning_rate}")


@dataclass
class PEARLTrainConfig(_RunConfig):
    """Everything a PEARL training run needs (docs/pearl.md); ``metarl train <this.yaml>``."""

    schema_version: int
    """Version of this schema the file was written for."""
    algo: Literal["pearl"]
    """Learning algorithm: a context-inference policy (PEARL)."""
    family: str
    """Task family name (sim/tasks) or path to a family YAML."""
    seed: int = 0
    """Seeds tasks, resets, exploration and network initialisation."""
    name: str | None = None
    """Run folder name under the output folder (default: <algo>_<family>_s<seed>)."""
    pearl_net: PEARLNetConfig = field(default_factory=PEARLNetConfig)
    """Sizes of the encoder, the actor and the critics."""
    pearl: PEARLConfig = field(default_factory=PEARLConfig)
    """Optimisation and replay settings."""
    pearl_schedule: CollectionSchedule = field(default_factory=CollectionSchedule)
    """Episodes of each task's exploration round: prior, posterior and RL-only."""
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    """The oracle's MPC (through the true physics), which grades the adversarial sampler and ``metarl eval``."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """The outer loop."""

    def validate(self, where: str) -> None:
        self._validate_shared(where, [])
        for section, obj in (("pearl", self.pearl), ("pearl_schedule", self.pearl_schedule)):
            try:
                obj.validate()
            except ValueError as exc:  # "PEARLConfig.meta_batch must be > 0, ..." -> field pearl.meta_batch
                named = re.match(r"\w+\.(\w+)", str(exc))
                raise SpecError(where, f"{section}.{named.group(1)}" if named else section, str(exc)) from exc
        net = self.pearl_net
        for name in ("latent_dim", "hidden", "layers", "encoder_hidden", "encoder_layers"):
            if getattr(net, name) < 1:
                raise SpecError(where, f"pearl_net.{name}", f"must be >= 1, got {getattr(net, name)}")
        if not net.min_factor_var > 0:
            raise SpecError(where, "pearl_net.min_factor_var", f"must be > 0, got {net.min_factor_var}")
        if not net.log_std_min < net.log_std_max:
            raise SpecError(where, "pearl_net.log_std_min", f"must be < log_std_max ({net.log_std_max}), got "
                            f"{net.log_std_min}")
        if self.loop.task_sampler == "adversarial":
            if self.loop.adversary.reward_gradient:
                raise SpecError(where, "loop.adversary.reward_gradient", "the implicit reward gradient "
                                "differentiates the learned dynamics model: algo context_mbrl only; set it false")
            if self.pearl_schedule.posterior_episodes + self.pearl_schedule.extra_rl_episodes < 1:
                raise SpecError(where, "pearl_schedule", "the adversarial sampler grades each candidate's first "
                                "episode under the posterior: posterior_episodes + extra_rl_episodes must be >= 1")


RunConfig = TrainConfig | PEARLTrainConfig
"""A run config of either algorithm."""
CONFIG_CLASSES: dict[str, type[TrainConfig] | type[PEARLTrainConfig]] = {"context_mbrl": TrainConfig,
                                                                          "pearl": PEARLTrainConfig}
"""``algo`` → the config class that reads it."""
ALGO_SECTIONS = {"model": "context_mbrl", "training": "context_mbrl", "pearl_net": "pearl", "pearl": "pearl",
                 "pearl_schedule": "pearl"}
"""Config sections read by one algorithm only; a config for the other is refused if it has them."""


def build_config(data: Any, where: str) -> RunConfig:
    """The run config of ``data``'s algorithm (checked for unknown keys and types, not validated)."""
    algo = data.get("algo") if isinstance(data, dict) else None
    if algo not in CONFIG_CLASSES:
        raise SpecError(where, "algo", f"got {algo!r}; allowed: " + ", ".join(repr(a) for a in CONFIG_CLASSES))
    for name, owner in ALGO_SECTIONS.items():
        if name in data and owner != algo:
            raise SpecError(where, name, f"is read by algo {owner} only, this config is for algo {algo!r} "
                            "(remove the section)")
    return build(CONFIG_CLASSES[algo], data, where)


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read a run config; ``overrides`` (nested dict) replaces values before checking."""
    data, where = load_yaml(path)
    check_schema_version(data, where, CONFIG_SCHEMA_VERSION, "run config")
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    cfg = build_config(data, where)
    cfg.validate(where)
    return cfg
