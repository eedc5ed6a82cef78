"""Out-of-family effects: ways a twin (or an evaluation env) differs from every task of its family.

A task family randomises some physics (its dynamics parameters); a real robot also differs in ways
no family parameter models. :class:`OutOfFamily` names those differences so a controller can be
graded on them: evaluation only, never training (the env applies them only when given
``effects=``). docs/out_of_family.md is the user's page.

==============  ====================  ===========================================================
effect (CLI)    field                 what it changes
==============  ====================  ===========================================================
delay=K         delay_periods         commands reach the motors K more control periods late
damping=J:V     joint_damping         + V viscous damping on joint J (N·s/m or N·m·s/rad)
friction=J:V    joint_friction        + V dry friction loss on joint J (N or N·m)
obs_noise=S     obs_noise             N(0, (S·scale)²) on every observed value (scale: robot.yaml)
integrator=I    integrator            MuJoCo integrator I (Euler, RK4, implicit, implicitfast)
bias=F:V        sensor_bias           + V on observation field F (``F[i]``: its element i), F's units
==============  ====================  ===========================================================

Physics effects (damping, friction, integrator) change the model after every task application;
the delay adds to the family's own ``action_delay``; noise and bias change only what the
controller observes (the env's ``info["true_obs"]`` keeps the true observation, and rewards grade
the true motion).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import mujoco
import numpy as np

from metarl_robot.envs.robot_model import joint_dof_slice
from metarl_robot.spec.robot import RobotSpec
from metarl_robot.spec.schema import SpecError, build, load_yaml

Integrator = Literal["Euler", "RK4", "implicit", "implicitfast"]

INTEGRATORS: dict[str, mujoco.mjtIntegrator] = {
    "Euler": mujoco.mjtIntegrator.mjINT_EULER,
    "RK4": mujoco.mjtIntegrator.mjINT_RK4,
    "implicit": mujoco.mjtIntegrator.mjINT_IMPLICIT,
    "implicitfast": mujoco.mjtIntegrator.mjINT_IMPLICITFAST,
}
"""MuJoCo's integrators by their MJCF name (``<option integrator="..."/>``)."""

CLI_KINDS: dict[str, str] = {
    "delay": "delay_periods",
    "damping": "joint_damping",
    "friction": "joint_friction",
    "obs_noise": "obs_noise",
    "integrator": "integrator",
    "bias": "sensor_bias",
}
"""``--effect KIND=VALUE`` kind → :class:`OutOfFamily` field."""

_PER_NAME = ("joint_damping", "joint_friction", "sensor_bias")
"""Fields that map a name (joint, observation field) to a value."""
_BIAS_KEY = re.compile(r"^(?P<field>[A-Za-z_][A-Za-z0-9_]*)(\[(?P<index>\d+)\])?$")
_DOF_FIELDS = {"joint_damping": "dof_damping", "joint_friction": "dof_frictionloss"}
"""Effect field → the MjModel dof field it adds to."""
NOISE_STREAM = 0x6F6F66
"""Mixed into the env's seed for the noise generator, so noise never draws from the physics' RNG stream."""


@dataclass(frozen=True)
class OutOfFamily:
    """Effects outside every task family, each off by default (an empty instance changes nothing)."""

    delay_periods: int = 0
    """Commands reach the motors this many more control periods late, on top of any family ``action_delay``;
    the queue starts full of the robot's safe command at every reset. Out of family: no shipped family has a
    delay parameter, and a family that has one still adds this."""
    joint_damping: dict[str, float] = field(default_factory=dict)
    """Joint → viscous damping added to each of its dofs (N·s/m for a slide joint, N·m·s/rad for a hinge).
    Only joints whose damping no family parameter changes (a bearing the family treats as ideal)."""
    joint_friction: dict[str, float] = field(default_factory=dict)
    """Joint → dry (Coulomb) friction loss added to each of its dofs (N or N·m); same rule as damping."""
    obs_noise: float = 0.0
    """Std of zero-mean Gaussian noise on every observed value, in robot.yaml ``scale`` units (value std =
    ``obs_noise * scale`` of its field), from the env's noise generator: a noisy encoder. Families are
    noise-free."""
    integrator: Integrator | None = None
    """MuJoCo integrator replacing the MJCF's (``None``: keep it): the physics rounded differently, which no
    family parameter changes."""
    sensor_bias: dict[str, float] = field(default_factory=dict)
    """Observation field (``name``, or ``name[i]`` for element i) → constant offset in that field's units (a
    miscalibrated sensor). Only what the controller observes changes; families model no sensor error."""

    def __post_init__(self) -> None:
        self.check("effects")
        for name in _PER_NAME:  # own, key-sorted copies: equal effects compare and print alike
            object.__setattr__(self, name, dict(sorted(getattr(self, name).items())))

    def __hash__(self) -> int:  # the dict fields are not hashable; equal effects have equal labels
        return hash(self.label)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, data: Any, where: str) -> OutOfFamily:
        """From a YAML-style mapping of field → value (the field names of this class); errors name ``where``."""
        try:
            return build(cls, {} if data is None else data, where)
        except SpecError as exc:  # __post_init__'s value checks do not know where the data came from
            raise SpecError(where, exc.field, exc.problem) from None

    @classmethod
    def load(cls, path: str | Path) -> OutOfFamily:
        """From a YAML file holding one mapping (see :meth:`from_mapping`)."""
        data, where = load_yaml(path)
        return cls.from_mapping(data, where)

    @classmethod
    def parse(cls, items: list[str], base: OutOfFamily | None = None) -> OutOfFamily:
        """From ``--effect KIND=VALUE`` strings (see :data:`CLI_KINDS`), on top of ``base`` (e.g. a YAML file's):
        a scalar replaces the base's, a named entry is added to (or replaces) the base's entry of that name."""
        values = (base or cls()).as_dict()
        for item in items:
            kind, sep, text = (s.strip() for s in item.partition("="))
            where = f"--effect {item!r}"
            if not sep or kind not in CLI_KINDS:
                raise SpecError(where, "", f"expected KIND=VALUE with KIND one of {', '.join(CLI_KINDS)} (e.g. "
                                "delay=2, damping=hinge:0.05, friction=hinge:0.01, obs_noise=0.02, integrator=RK4, "
                                "bias=pole_angle:0.05)")
            name = CLI_KINDS[kind]
            if name in _PER_NAME:
                key, colon, number = (s.strip() for s in text.rpartition(":"))
                if not colon or not key:
                    raise SpecError(where, name, f"{kind} needs NAME:VALUE (e.g. {kind}="
                                    f"{'pole_angle' if kind == 'bias' else 'hinge'}:0.05)")
                values[name][key] = _number(number, where, f"{name}.{key}")
            elif name == "delay_periods":
                if not re.fullmatch(r"\d+", text):
                    raise SpecError(where, name, f"delay is a whole number of control periods >= 0, got {text!r}")
                values[name] = int(text)
            elif name == "obs_noise":
                values[name] = _number(text, where, name)
            else:
                values[name] = text
            try:
                cls.from_mapping(values, where)  # each item's error names that item
            except SpecError as exc:
                raise SpecError(where, exc.field, exc.problem) from None
        return cls.from_mapping(values, "--effect")

    @classmethod
    def from_cli(cls, items: list[str] | None, file: str | Path | None) -> OutOfFamily | None:
        """``--effects FILE`` then ``--effect`` items on top; ``None`` when neither is given."""
        if not items and not file:
            return None
        return cls.parse(list(items or []), cls.load(file) if file else None)

    # ---- validation --------------------------------------------------------------------------
    def check(self, where: str) -> None:
        """Values on their own (robot-free): types, signs, finiteness, known integrator."""
        if isinstance(self.delay_periods, bool) or not isinstance(self.delay_periods, int) or self.delay_periods < 0:
            raise SpecError(where, "delay_periods", f"a whole number of control periods >= 0, got "
                            f"{self.delay_periods!r}")
        for name in _PER_NAME:
            mapping = getattr(self, name)
            if not isinstance(mapping, Mapping):
                raise SpecError(where, name, f"expected a mapping of name -> number, got {mapping!r}")
            for key, value in mapping.items():
                if not isinstance(value, int | float) or not math.isfinite(value):
                    raise SpecError(where, f"{name}.{key}", f"must be a finite number, got {value!r}")
                if name in _DOF_FIELDS and value < 0:
                    raise SpecError(where, f"{name}.{key}", f"is added to the joint's {_DOF_FIELDS[name]} and must "
                                    f"be >= 0 (a negative one is not physical), got {value!r}")
        if not isinstance(self.obs_noise, int | float) or not math.isfinite(self.obs_noise) or self.obs_noise < 0:
            raise SpecError(where, "obs_noise", f"a standard deviation >= 0 in scale units, got {self.obs_noise!r}")
        if self.integrator is not None and self.integrator not in INTEGRATORS:
            raise SpecError(where, "integrator", f"got {self.integrator!r}; allowed: {', '.join(INTEGRATORS)}")

    def check_robot(self, robot: RobotSpec, where: str = "effects") -> None:
        """Joint and field names against robot.yaml: the robot's joints, its measured observation fields."""
        for name in _DOF_FIELDS:
            for joint in getattr(self, name):
                if joint not in robot.joints:
                    raise SpecError(where, f"{name}.{joint}", f"joint {joint!r} is not one of robot "
                                    f"{robot.name!r}'s joints: {', '.join(robot.joints)}")
        for key in self.sensor_bias:
            _bias_slice(robot, key, where)

    # ---- views -------------------------------------------------------------------------------
    def __bool__(self) -> bool:
        """True when any effect is on."""
        return self != OutOfFamily()

    @property
    def physics(self) -> bool:
        """Whether the motion itself changes (delay, damping, friction, integrator), not only what is observed."""
        return bool(self.delay_periods or self.joint_damping or self.joint_friction or self.integrator)

    def as_dict(self) -> dict[str, Any]:
        """Plain field → value (YAML/JSON; :meth:`from_mapping` reads it back)."""
        return {f.name: (dict(v) if isinstance(v := getattr(self, f.name), dict) else v)
                for f in dataclasses.fields(self)}

    def to_args(self) -> list[str]:
        """The ``--effect`` strings that give these effects (:meth:`parse` reads them back)."""
        kinds = {name: kind for kind, name in CLI_KINDS.items()}
        args = []
        for name, value in self.as_dict().items():
            if name in _PER_NAME:
                args.extend(f"{kinds[name]}={key}:{v:g}" for key, v in value.items())
            elif value:
                args.append(f"{kinds[name]}={value:g}" if isinstance(value, float) else f"{kinds[name]}={value}")
        return args

    @property
    def label(self) -> str:
        """A short name for tables and grids, e.g. ``delay=2 damping=hinge:0.05``; ``none`` when off."""
        return " ".join(self.to_args()) or "none"

    def grid(self) -> dict[str, OutOfFamily]:
        """Each effect kind that is on, alone, and all of them together (``"all"``): an evaluation grid."""
        out = {}
        for kind, name in CLI_KINDS.items():
            alone = OutOfFamily(**{name: getattr(self, name)})
            if alone:
                out[kind] = alone
        if out:
            out["all"] = self
        return out

    def record(self) -> dict[str, Any]:
        """What a run summary or report records: the effects and their label."""
        return {"effects": self.as_dict(), "label": self.label}

    def oracle_record(self) -> dict[str, Any]:
        """What an oracle planning through the env's MuJoCo model and state sees of these effects (eval.json)."""
        seen = [n for n in ("delay_periods", "joint_damping", "joint_friction", "integrator") if getattr(self, n)]
        unseen = {n: "the oracle rolls out from the env's true MuJoCo state, so it does not see this observation "
                  "error (only the first planned step's reward reads the observed value)"
                  for n in ("obs_noise", "sensor_bias") if getattr(self, n)}
        return {"plans_through": seen, "not_given": unseen}


def _number(text: str, where: str, at: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SpecError(where, at, f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise SpecError(where, at, f"must be finite, got {text!r}")
    return value


def _bias_slice(robot: RobotSpec, key: str, where: str) -> slice:
    """The observation entries ``key`` (``field`` or ``field[i]``) names."""
    at = f"sensor_bias.{key}"
    fields = {f.name: f for f in robot.measured_fields}
    match = _BIAS_KEY.match(key)
    if match is None or match["field"] not in fields:
        raise SpecError(where, at, f"not a measured observation field of robot {robot.name!r}; fields: "
                        f"{', '.join(fields)} (name[i] for element i of a larger field)")
    sl = robot.obs_slices[match["field"]]
    if match["index"] is None:
        return sl
    index = int(match["index"])
    if index >= fields[match["field"]].size:
        raise SpecError(where, at, f"field {match['field']!r} has {fields[match['field']].size} element(s); "
                        f"index {index} is out of range")
    return slice(sl.start + index, sl.start + index + 1)


class BoundEffects:
    """Effects bound to one env's robot and model: what the env calls after every task application and on
    every observation. Built by :class:`~metarl_robot.envs.meta_env.MetaMujocoEnv` from ``effects=``."""

    def __init__(self, effects: OutOfFamily, robot: RobotSpec, model: mujoco.MjModel,
                 owners: Mapping[tuple[str, int], tuple[str, bool]], family_where: str) -> None:
        effects.check_robot(robot)
        self.effects = effects
        """What was asked for."""
        self.delay_periods = effects.delay_periods
        """Extra control periods of command delay."""
        # dof field -> (dofs, added values); a dof a family parameter changes is refused (see _dofs).
        self._added: list[tuple[str, np.ndarray, np.ndarray]] = []
        for name, model_field in _DOF_FIELDS.items():
            dofs, values = [], []
            for joint, value in getattr(effects, name).items():
                for dof in _dofs(model, joint):
                    if (model_field, dof) in owners:
                        raise SpecError("effects", f"{name}.{joint}", f"the task family ({family_where}) already "
                                        f"changes {model_field} of joint {joint!r} with its parameter "
                                        f"{owners[(model_field, dof)][0]!r}; an out-of-family effect must be on a "
                                        "joint the family does not touch")
                    dofs.append(dof)
                    values.append(value)
            if dofs:
                self._added.append((model_field, np.array(dofs), np.array(values)))
        self.offset = np.zeros(robot.obs_dim)
        """Constant added to every observation (sensor bias)."""
        for key, value in effects.sensor_bias.items():
            self.offset[_bias_slice(robot, key, "effects")] += value
        self.noise_std = effects.obs_noise * robot.obs_scale
        """Per observed value, the noise std in its own units."""
        self.observes = bool(effects.obs_noise or effects.sensor_bias)
        """Whether observations differ from the true state."""
        if effects.integrator is not None:
            model.opt.integrator = INTEGRATORS[effects.integrator]  # no task application touches opt

    def apply_physics(self, model: mujoco.MjModel) -> None:
        """Add damping and friction loss; called after every task application (which restores the nominal)."""
        for model_field, dofs, values in self._added:
            getattr(model, model_field)[dofs] += values

    def observe(self, obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """What the controller sees of the true ``obs``."""
        seen = obs + self.offset
        if self.effects.obs_noise:
            seen = seen + self.noise_std * rng.standard_normal(obs.shape)
        return seen


def _dofs(model: mujoco.MjModel, joint: str) -> range:
    sl = joint_dof_slice(model, model.joint(joint).id)
    return range(sl.start, sl.stop)


__all__ = ["CLI_KINDS", "INTEGRATORS", "BoundEffects", "OutOfFamily"]
