"""Run configuration: one typed YAML per run, unknown keys rejected, saved resolved in the run folder.

``algo`` picks the learner (:data:`metarl_robot.algos.registry.ALGORITHMS`) and with it its run config
class and the sections it reads (``context_mbrl``: ``model`` and ``training``; ``online_mbrl``: those and
``online``; ``pearl``: ``pearl_net``, ``pearl`` and ``pearl_schedule``; ``macaw``: ``dataset``, ``macaw_net`` and
``macaw``), each declared by the algorithm. A
section none of whose readers is the config's algorithm is refused rather than silently ignored. ``planner``,
``loop`` and the rest are shared (for
PEARL the planner is only the oracle's, which grades the adversarial sampler and ``metarl eval``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from metarl_robot.algos.context_mbrl import TrainConfig
from metarl_robot.algos.pearl import PEARLTrainConfig
from metarl_robot.algos.registry import ALGORITHMS, get_algorithm, section_readers, with_capability
from metarl_robot.spec.schema import SpecError, build, check_schema_version, load_yaml
from metarl_robot.train.loop_config import LoopConfig, RunConfig

CONFIG_SCHEMA_VERSION = 1
"""The run-config schema this code reads."""


def build_config(data: Any, where: str) -> RunConfig:
    """The run config of ``data``'s algorithm (checked for unknown keys and types, not validated)."""
    algo = data.get("algo") if isinstance(data, dict) else None
    if algo not in ALGORITHMS:
        raise SpecError(where, "algo", f"got {algo!r}; allowed: " + ", ".join(repr(a) for a in ALGORITHMS))
    for name, readers in section_readers().items():
        if name in data and algo not in readers:
            raise SpecError(where, name, f"is read by algo {', '.join(readers)} only, this config is for algo "
                            f"{algo!r} (remove the section)")
    return build(ALGORITHMS[algo].config_class, data, where)


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
    _check_capabilities(cfg, where)
    return cfg


def _check_capabilities(cfg: RunConfig, where: str) -> None:
    """Refuse settings the config's algorithm cannot serve (it declares what it can)."""
    if get_algorithm(cfg.algo).offline and cfg.loop.task_sampler != "uniform":
        raise SpecError(where, "loop.task_sampler", f"algo {cfg.algo} learns from its dataset alone (offline): no "
                        f"tasks are drawn, so {cfg.loop.task_sampler!r} has nothing to choose; remove it")
    if cfg.loop.task_sampler == "adversarial" and cfg.loop.adversary.reward_gradient \
            and not get_algorithm(cfg.algo).differentiable_model:
        raise SpecError(where, "loop.adversary.reward_gradient", "the implicit reward gradient differentiates the "
                        f"learned dynamics model: algo {', '.join(with_capability('differentiable_model'))} only; "
                        "set it false")


# LoopConfig and RunConfig live in loop_config.py, TrainConfig and PEARLTrainConfig with their algorithms; all were
# defined here before and still import from here.
__all__ = ["CONFIG_SCHEMA_VERSION", "LoopConfig", "PEARLTrainConfig", "RunConfig", "TrainConfig", "build_config",
           "load_config"]
