"""Task families: named, bounded boxes of dynamics and reward parameters (``sim/tasks/<family>.yaml``).

A *task* is a point in the box: a ``{param name: value}`` mapping, or equivalently a flat vector
in the family's parameter order. This module is pure (numpy + yaml): the runtime and the
adversary use it as much as the simulator does. How a dynamics parameter changes the MuJoCo
model is the simulator's business (:mod:`metarl_robot.envs.dynamics`). User guide:
``docs/task_families.md``.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from metarl_robot.paths import family_yaml_path
from metarl_robot.spec.schema import SpecError, build, check_schema_version, load_yaml

FAMILY_SCHEMA_VERSION = 1
"""The task-family schema this code reads; bump on any incompatible change."""

ENV_ID_PATTERN = r"[A-Za-z0-9_]+/[A-Za-z0-9_]+-v\d+"
"""Gymnasium ids are namespaced and versioned: ``metarl/CartpoleSwingup-v0``."""

Task = dict[str, float]
"""A task: every parameter of a family by name (integer parameters hold integral floats)."""

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")


@dataclass(frozen=True)
class PowerRange:
    """A log-uniform range written as powers, e.g. ``{base: 1.5, exponent: [-3, 3]}`` = 1.5^U(-3, 3)."""

    base: float
    """Base of the power (> 0, != 1)."""
    exponent: list[float]
    """``[low, high]`` exponents: the range is [base**low, base**high]."""


@dataclass(frozen=True)
class ParamSpec:
    """One parameter as written in the YAML."""

    kind: Literal["dynamics", "reward"]
    """``dynamics`` changes the MuJoCo model; ``reward`` changes only the reward."""
    nominal: float
    """Value of the unshifted robot/task; used for parameters a task leaves out."""
    train: list[float] | PowerRange
    """``[low, high]`` range (or a PowerRange) that training tasks are drawn from."""
    test: list[float] | PowerRange
    """Range for evaluation; may reach beyond ``train`` (out-of-distribution tasks)."""
    sampling: Literal["uniform", "log_uniform", "integer"] = "uniform"
    """``uniform``: U(lo, hi); ``log_uniform``: exp(U(ln lo, ln hi)); ``integer``: uniform over lo..hi."""
    units: str = "1"
    """Physical units of the value (``1`` for scale factors)."""
    effect: dict[str, Any] | None = None
    """Dynamics only: ``{effect name: targets}``, see docs/task_families.md for the effect list."""
    doc: str = ""
    """What the parameter means physically."""


@dataclass(frozen=True)
class InitialState:
    """Initial-state distribution of every episode."""

    qpos: dict[str, float | list[float]] = field(default_factory=dict)
    """Joint name → position(s) replacing the MJCF's ``qpos0`` entries for that joint."""
    qpos_noise: float = 0.0
    """Half-width ``a`` of U(-a, a) noise added to every qpos entry (quaternions are renormalised)."""
    qvel_noise: float = 0.0
    """Standard deviation of Gaussian noise on every qvel entry (initial velocities are zero)."""


@dataclass(frozen=True)
class FamilySpec:
    """A task-family YAML as written."""

    schema_version: int
    """Version of this schema the file was written for."""
    name: str
    """Family name, equal to the file stem."""
    description: str
    """One line on what varies and why."""
    robot: str
    """Robot folder under sim/robots."""
    env_id: str
    """Gymnasium id this family is registered under (``metarl/<Name>-v<N>``)."""
    reward: str
    """Reward function name in :mod:`metarl_robot.spec.rewards`."""
    episode_steps: int
    """Control steps per episode (episodes end by truncation only)."""
    params: dict[str, ParamSpec]
    """Parameters in vector order."""
    initial_state: InitialState = field(default_factory=InitialState)
    """Initial-state distribution."""


@dataclass(frozen=True)
class Param:
    """A resolved parameter: ranges as ``(low, high)`` floats."""

    name: str
    kind: str
    nominal: float
    train: tuple[float, float]
    test: tuple[float, float]
    sampling: str
    units: str
    effect: dict[str, Any] | None
    doc: str

    @property
    def bounds(self) -> tuple[float, float]:
        """The allowed range: the hull of the train and test ranges."""
        return (min(self.train[0], self.test[0]), max(self.train[1], self.test[1]))

    def range(self, split: str) -> tuple[float, float]:
        return self.train if split == "train" else self.test

    def describe_range(self) -> str:
        return f"[{_fmt(self.bounds[0])}, {_fmt(self.bounds[1])}] {self.units} (train {_fmt_range(self.train)}, " \
            f"test {_fmt_range(self.test)}, {self.sampling})"

    def sample(self, rng: np.random.Generator, split: str, n: int) -> np.ndarray:
        lo, hi = self.range(split)
        if self.sampling == "log_uniform":
            return np.exp(rng.uniform(math.log(lo), math.log(hi), size=n))
        if self.sampling == "integer":
            return rng.integers(int(lo), int(hi) + 1, size=n).astype(float)
        return rng.uniform(lo, hi, size=n)

    def grid(self, k: int, split: str) -> np.ndarray:
        lo, hi = self.range(split)
        if self.sampling == "log_uniform":
            return np.geomspace(lo, hi, k) if k > 1 else np.array([math.sqrt(lo * hi)])
        values = np.linspace(lo, hi, k) if k > 1 else np.array([(lo + hi) / 2])
        if self.sampling == "integer":
            values = np.unique(np.round(values))
        return values


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _fmt_range(r: tuple[float, float]) -> str:
    return f"[{_fmt(r[0])}, {_fmt(r[1])}]"


class TaskFamily:
    """A loaded task family: parameter box, sampling, grids, vector/dict conversion, validation."""

    def __init__(self, spec: FamilySpec, where: str = "<family>") -> None:
        self.spec = spec
        """The YAML as written."""
        self.where = where
        """Where it was loaded from (for error messages)."""
        self.params: list[Param] = [_resolve(name, p, where) for name, p in spec.params.items()]
        """Resolved parameters in vector order."""
        self._by_name = {p.name: p for p in self.params}
        if not self.params:
            raise SpecError(where, "params", "a family needs at least one parameter")
        if spec.episode_steps < 1:
            raise SpecError(where, "episode_steps", f"must be >= 1, got {spec.episode_steps}")
        if not re.fullmatch(ENV_ID_PATTERN, spec.env_id):
            raise SpecError(where, "env_id", f"{spec.env_id!r} must look like 'metarl/<Name>-v<N>' "
                            "(namespace/name-version)")
        for key in ("qpos_noise", "qvel_noise"):
            if getattr(spec.initial_state, key) < 0:
                raise SpecError(where, f"initial_state.{key}", f"must be >= 0, got {getattr(spec.initial_state, key)}")

    # ---- identity ------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def dim(self) -> int:
        return len(self.params)

    @property
    def dynamics_names(self) -> list[str]:
        return [p.name for p in self.params if p.kind == "dynamics"]

    @property
    def reward_names(self) -> list[str]:
        return [p.name for p in self.params if p.kind == "reward"]

    def param(self, name: str) -> Param:
        try:
            return self._by_name[name]
        except KeyError:
            raise SpecError(self.name, name, f"unknown parameter; parameters of {self.name}: {self.names}") from None

    # ---- validation and conversion -------------------------------------------------------------
    def nominal(self) -> Task:
        return {p.name: p.nominal for p in self.params}

    def validate(self, task: Mapping[str, Any]) -> Task:
        """Check a (possibly partial) task; parameters left out take their nominal value.

        Raises :class:`SpecError` naming the parameter and its allowed range for an unknown name,
        a non-number, NaN/Inf, a value out of bounds or a non-integer for an integer parameter.
        """
        if not isinstance(task, Mapping):
            raise SpecError(self.name, "task", f"expected a mapping of parameter name to value, got {task!r}")
        unknown = [k for k in task if k not in self._by_name]
        if unknown:
            raise SpecError(self.name, str(unknown[0]), f"unknown parameter; parameters of {self.name}: {self.names}")
        out = {}
        for p in self.params:
            value = task.get(p.name, p.nominal)
            out[p.name] = self._check_value(p, value)
        return out

    def _check_value(self, p: Param, value: Any) -> float:
        allowed = f"allowed range {p.describe_range()}"
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise SpecError(self.name, p.name, f"expected a number, got {value!r}; {allowed}")
        value = float(value)
        if not math.isfinite(value):
            raise SpecError(self.name, p.name, f"must be finite, got {value}; {allowed}")
        lo, hi = p.bounds
        if not lo <= value <= hi:
            raise SpecError(self.name, p.name, f"{value:.6g} is out of bounds; {allowed}")
        if p.sampling == "integer" and value != round(value):
            raise SpecError(self.name, p.name, f"must be an integer, got {value}; {allowed}")
        return value

    def to_vector(self, task: Mapping[str, Any]) -> np.ndarray:
        """Task → flat float64 vector in parameter order (validated)."""
        task = self.validate(task)
        return np.array([task[n] for n in self.names], dtype=np.float64)

    def from_vector(self, vector: Any) -> Task:
        """Flat vector in parameter order → validated task."""
        vec = np.asarray(vector, dtype=np.float64)
        if vec.shape != (self.dim,):
            raise SpecError(self.name, "task vector", f"expected shape ({self.dim},) for {self.names}, got {vec.shape}")
        return self.validate(dict(zip(self.names, vec.tolist(), strict=True)))

    # ---- distributions -------------------------------------------------------------------------
    def _check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise SpecError(self.name, "split", f"got {split!r}; allowed: {', '.join(SPLITS)}")

    def sample(self, rng: np.random.Generator, split: str = "train", n: int = 1) -> list[Task]:
        """``n`` independent tasks drawn from the split's ranges with each parameter's sampling rule."""
        self._check_split(split)
        columns = {p.name: p.sample(rng, split, n) for p in self.params}
        return [{name: float(columns[name][i]) for name in self.names} for i in range(n)]

    def grid(self, k: int, split: str = "test", names: list[str] | None = None) -> list[Task]:
        """Cartesian grid with ``k`` points per axis over ``names`` (default: all); others at nominal.

        Log-uniform axes are spaced geometrically, integer axes hold distinct integers.
        """
        self._check_split(split)
        if k < 1:
            raise SpecError(self.name, "grid", f"k must be >= 1, got {k}")
        names = self.names if names is None else list(names)
        for n in names:
            self.param(n)
        axes = [self._by_name[n].grid(k, split) for n in names]
        base = self.nominal()
        return [{**base, **dict(zip(names, map(float, point), strict=True))} for point in itertools.product(*axes)]

    def is_ood(self, task: Mapping[str, Any]) -> bool:
        """True if any parameter lies outside its training range."""
        task = self.validate(task)
        return any(not p.train[0] <= task[p.name] <= p.train[1] for p in self.params)

    def describe(self) -> str:
        """A human-readable table of the parameter box."""
        lines = [f"{self.name}: {self.spec.description}", f"  robot={self.spec.robot}  env_id={self.spec.env_id}  "
                 f"episode_steps={self.spec.episode_steps}  reward={self.spec.reward}"]
        for p in self.params:
            lines.append(f"  {p.name:<22} {p.kind:<8} nominal={_fmt(p.nominal):<8} {p.describe_range()}")
        return "\n".join(lines)


class ParamBox:
    """Unit-cube coordinates over some of a family's parameters (log space for log-uniform ones).

    Searches (identification, the adversary) work in the unit cube so that every axis has the same
    scale and a log-uniform factor moves as much from x0.5 to x1 as from x1 to x2.
    """

    def __init__(self, family: TaskFamily, names: list[str], box: Literal["train", "test", "bounds"] = "bounds"
                 ) -> None:
        if box not in ("train", "test", "bounds"):
            raise SpecError(family.name, "box", f"got {box!r}; allowed: train, test, bounds")
        self.names = list(names)
        """Parameters the coordinates cover, in this order."""
        params = [family.param(n) for n in self.names]
        ranges = [p.bounds if box == "bounds" else p.range(box) for p in params]
        self.log = np.array([p.sampling == "log_uniform" for p in params], dtype=bool)
        lo = np.array([r[0] for r in ranges], dtype=np.float64)
        hi = np.array([r[1] for r in ranges], dtype=np.float64)
        self.value_range = (lo, hi)
        """The box in parameter values: ``exp(log(hi))`` can exceed ``hi`` by an ulp, so values are clipped to it."""
        self.lo = np.where(self.log, np.log(np.maximum(lo, 1e-300)), lo)
        self.hi = np.where(self.log, np.log(np.maximum(hi, 1e-300)), hi)
        self.integer = np.array([p.sampling == "integer" for p in params], dtype=bool)

    def to_values(self, u: np.ndarray) -> np.ndarray:
        """Unit-cube points ``(..., d)`` → parameter values (clipped to the box, integers rounded)."""
        x = self.lo + np.clip(u, 0.0, 1.0) * (self.hi - self.lo)
        values = np.clip(np.where(self.log, np.exp(x), x), *self.value_range)
        return np.where(self.integer, np.round(values), values)

    def to_unit(self, values: np.ndarray) -> np.ndarray:
        """Parameter values ``(..., d)`` → unit-cube coordinates (a zero-width axis maps to 0.5)."""
        x = np.where(self.log, np.log(np.maximum(values, 1e-300)), values)
        width = self.hi - self.lo
        return np.where(width > 0, (x - self.lo) / np.where(width > 0, width, 1.0), 0.5)


def _resolve_range(value: list[float] | PowerRange, sampling: str, where: str, at: str) -> tuple[float, float]:
    if isinstance(value, PowerRange):
        if sampling != "log_uniform":
            raise SpecError(where, at, "a {base, exponent} range needs sampling: log_uniform")
        if value.base <= 0 or value.base == 1:
            raise SpecError(where, f"{at}.base", f"must be > 0 and != 1, got {value.base}")
        if len(value.exponent) != 2:
            raise SpecError(where, f"{at}.exponent", f"expected [low, high], got {value.exponent}")
        lo, hi = sorted(value.base**e for e in value.exponent)
    else:
        if len(value) != 2:
            raise SpecError(where, at, f"expected [low, high], got {value}")
        lo, hi = value
    if not lo <= hi:
        raise SpecError(where, at, f"low ({lo}) must be <= high ({hi})")
    if sampling == "log_uniform" and lo <= 0:
        raise SpecError(where, at, f"log_uniform needs low > 0, got {lo}")
    if sampling == "integer" and (lo != round(lo) or hi != round(hi)):
        raise SpecError(where, at, f"integer sampling needs integer bounds, got [{lo}, {hi}]")
    return float(lo), float(hi)


def _resolve(name: str, p: ParamSpec, where: str) -> Param:
    at = f"params.{name}"
    train = _resolve_range(p.train, p.sampling, where, f"{at}.train")
    test = _resolve_range(p.test, p.sampling, where, f"{at}.test")
    if p.kind == "dynamics" and not p.effect:
        raise SpecError(where, f"{at}.effect", "a dynamics parameter needs an effect (see docs/task_families.md)")
    if p.kind == "reward" and p.effect:
        raise SpecError(where, f"{at}.effect", "a reward parameter has no effect on the model; remove it")
    if p.effect is not None and len(p.effect) != 1:
        raise SpecError(where, f"{at}.effect", f"give exactly one effect, got {list(p.effect)}")
    param = Param(name, p.kind, p.nominal, train, test, p.sampling, p.units, p.effect, p.doc)
    lo, hi = param.bounds
    if not lo <= p.nominal <= hi:
        raise SpecError(where, f"{at}.nominal", f"{p.nominal} is outside the parameter's range [{lo}, {hi}]")
    return param


def load_family(name_or_path: str | Path) -> TaskFamily:
    """Load ``sim/tasks/<name>.yaml`` (or a path to a family YAML)."""
    path = family_yaml_path(name_or_path)
    data, where = load_yaml(path)
    check_schema_version(data, where, FAMILY_SCHEMA_VERSION, "task family")
    spec = build(FamilySpec, data, where)
    if path.stem != spec.name:
        raise SpecError(where, "name", f"{spec.name!r} must equal the file name stem {path.stem!r}")
    return TaskFamily(spec, where)
