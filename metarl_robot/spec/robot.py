"""``robot.yaml``: the one description of the sim/real interface of a robot.

The env, the exporter, the telemetry codec, the ROS 2 node and the replay all read this file.
This module only parses and checks it for internal consistency (numpy + yaml, safe on a robot
computer); checking it against the MJCF lives in :mod:`metarl_robot.envs.robot_model`.
See ``docs/robot_spec.md`` for the user guide.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from metarl_robot.paths import robot_yaml_path
from metarl_robot.spec.schema import SpecError, build, check_schema_version, load_yaml, to_plain

ROBOT_SCHEMA_VERSION = 1
"""The robot.yaml schema this code reads; bump on any incompatible change."""


@dataclass(frozen=True)
class ObsSource:
    """Where the simulator reads an observation field from: exactly one of the three kinds."""

    joint_pos: str | list[str] | None = None
    """Joint name(s): their ``qpos`` entries (a free joint gives 7: xyz + quaternion wxyz)."""
    joint_vel: str | list[str] | None = None
    """Joint name(s): their ``qvel`` entries (a free joint gives 6: world linear + local angular)."""
    sensor: str | list[str] | None = None
    """MJCF sensor name(s): their ``sensordata`` entries."""
    index: list[int] | None = None
    """Optional selection of components of the concatenated source, e.g. ``[0, 1]`` for x and y."""

    @property
    def kind(self) -> str:
        return next(k for k in ("joint_pos", "joint_vel", "sensor") if getattr(self, k) is not None)

    @property
    def names(self) -> list[str]:
        value = getattr(self, self.kind)
        return [value] if isinstance(value, str) else list(value)


@dataclass(frozen=True)
class ObsField:
    """One named block of the observation vector, in the units the robot reports it."""

    name: str
    """Identifier used in telemetry, logs and rewards (snake_case)."""
    size: int
    """Number of scalars in the block."""
    units: str
    """Physical units as sent by the robot, e.g. ``m``, ``rad/s``, ``1`` for unitless."""
    scale: float
    """Typical magnitude: ``value / scale`` is O(1). Used to normalise and to report errors in scale units."""
    source: ObsSource
    """How the simulator computes it."""
    privileged: bool = False
    """True for sim-only quantities a real robot cannot measure: usable in training, never by the runtime."""
    periodic: bool = False
    """True for an unwrapped angle (rad): learned models see its sine and cosine, not the raw value."""
    doc: str = ""
    """Free text: sensor, frame, sign convention."""
    noise_std: float | None = None
    """Standard deviation of the sensor's noise, in ``units`` (None: not calibrated). A calibration of this robot,
    not part of the interface (not in :attr:`RobotSpec.interface_hash`): ``metarl identify`` tests its fit
    against it (docs/identify.md)."""


@dataclass(frozen=True)
class ActionField:
    """One actuator command, in robot units."""

    name: str
    """Identifier used in telemetry and logs."""
    actuator: str
    """MJCF actuator name that receives this command."""
    units: str
    """Units of the command as the robot receives it."""
    low: float
    """Lowest allowed command."""
    high: float
    """Highest allowed command."""
    max_rate: float
    """Largest allowed change per second (units/s); the runtime safety layer enforces it."""
    doc: str = ""
    """Free text: what a unit of command means physically."""


@dataclass(frozen=True)
class ControlSpec:
    """Timing of the control loop."""

    period: float
    """Control period ``ctrl_dt`` in seconds (one action per period)."""
    substeps: int
    """MuJoCo steps per control period: the MJCF timestep (``sim_dt``) must equal period / substeps."""


@dataclass(frozen=True)
class RobotSpec:
    """A parsed and self-consistent ``robot.yaml``."""

    schema_version: int
    """Version of this schema the file was written for."""
    name: str
    """Robot name, the folder name under ``sim/robots/``."""
    description: str
    """One line on what the robot is."""
    mjcf: str
    """MJCF file, relative to the robot.yaml."""
    control: ControlSpec
    """Control period and simulation substeps."""
    joints: list[str]
    """MJCF joint names in the order used for joint-state messages."""
    actuators: list[str]
    """Every MJCF actuator, in command order (all must be commanded)."""
    observation: list[ObsField]
    """Observation fields in vector order; privileged fields are kept out of the robot's vector."""
    action: list[ActionField]
    """Action fields in vector order, one per actuator."""
    safe_command: dict[str, float]
    """What the robot should receive when anything goes wrong, by action field name."""
    source_path: Path | None = field(default=None, init=False, compare=False, repr=False)
    """Where the file was loaded from (not part of the contract)."""

    # ---- derived layout ----------------------------------------------------------------------
    @property
    def ctrl_dt(self) -> float:
        return self.control.period

    @property
    def sim_dt(self) -> float:
        return self.control.period / self.control.substeps

    @cached_property
    def measured_fields(self) -> list[ObsField]:
        """Fields a real robot reports: the runtime's observation vector, in order."""
        return [f for f in self.observation if not f.privileged]

    @cached_property
    def privileged_fields(self) -> list[ObsField]:
        return [f for f in self.observation if f.privileged]

    @property
    def obs_dim(self) -> int:
        return sum(f.size for f in self.measured_fields)

    @property
    def privileged_dim(self) -> int:
        return sum(f.size for f in self.privileged_fields)

    @property
    def action_dim(self) -> int:
        return len(self.action)

    @cached_property
    def obs_slices(self) -> dict[str, slice]:
        """Field name → slice of the (measured) observation vector."""
        return _slices(self.measured_fields)

    def field_rms(self, values: np.ndarray) -> dict[str, np.ndarray]:
        """Per measured field, the RMS over its entries of ``values`` ``(..., obs_dim)`` (e.g. errors in scale
        units): ``(...)`` each."""
        values = np.asarray(values, dtype=np.float64)
        return {name: np.sqrt(np.mean(values[..., sl] ** 2, axis=-1)) for name, sl in self.obs_slices.items()}

    @cached_property
    def privileged_slices(self) -> dict[str, slice]:
        return _slices(self.privileged_fields)

    @cached_property
    def obs_scale(self) -> np.ndarray:
        """Per-component scale of the measured observation vector."""
        return np.concatenate([np.full(f.size, f.scale) for f in self.measured_fields])

    @cached_property
    def obs_periodic(self) -> np.ndarray:
        """Per-component bool mask of the measured observation: True where the component is a periodic angle."""
        return np.concatenate([np.full(f.size, f.periodic) for f in self.measured_fields])

    @cached_property
    def action_low(self) -> np.ndarray:
        return np.array([a.low for a in self.action])

    @cached_property
    def action_high(self) -> np.ndarray:
        return np.array([a.high for a in self.action])

    @cached_property
    def action_max_rate(self) -> np.ndarray:
        return np.array([a.max_rate for a in self.action])

    @cached_property
    def safe_action(self) -> np.ndarray:
        return np.array([self.safe_command[a.name] for a in self.action])

    @cached_property
    def mjcf_path(self) -> Path:
        base = self.source_path.parent if self.source_path else Path.cwd()
        return base / self.mjcf

    def to_dict(self) -> dict:
        """The contract as plain data (what a bundle copies)."""
        data = to_plain(self)
        data.pop("source_path")
        return data

    @cached_property
    def interface_hash(self) -> str:
        """sha256 of the canonical contract: equal on both ends of a link iff the interface is the same.

        Computed over the parsed content, so comments and formatting in the YAML do not change it.
        """
        data = self.to_dict()
        for entry in data["observation"]:  # calibrations of this robot, not the contract
            entry.pop("noise_std", None)
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _slices(fields: list[ObsField]) -> dict[str, slice]:
    out, start = {}, 0
    for f in fields:
        out[f.name] = slice(start, start + f.size)
        start += f.size
    return out


def _duplicates(names: list[str]) -> list[str]:
    seen, dup = set(), []
    for n in names:
        if n in seen:
            dup.append(n)
        seen.add(n)
    return dup


def validate_robot_spec(spec: RobotSpec, where: str) -> None:
    """Internal consistency checks that need no MJCF. Raises :class:`SpecError` naming the field."""
    if spec.control.period <= 0:
        raise SpecError(where, "control.period", f"must be > 0 seconds, got {spec.control.period}")
    if spec.control.substeps < 1:
        raise SpecError(where, "control.substeps", f"must be >= 1, got {spec.control.substeps}")
    for key, names in (("joints", spec.joints), ("actuators", spec.actuators)):
        if dup := _duplicates(names):
            raise SpecError(where, key, f"duplicate name {dup[0]!r}")
    if dup := _duplicates([f.name for f in spec.observation]):
        raise SpecError(where, "observation", f"duplicate field name {dup[0]!r}")
    if dup := _duplicates([a.name for a in spec.action]):
        raise SpecError(where, "action", f"duplicate field name {dup[0]!r}")
    if not spec.measured_fields:
        raise SpecError(where, "observation", "needs at least one non-privileged field")
    for i, f in enumerate(spec.observation):
        at = f"observation[{i}] ({f.name})"
        if f.size < 1:
            raise SpecError(where, f"{at}.size", f"must be >= 1, got {f.size}")
        if f.scale <= 0:
            raise SpecError(where, f"{at}.scale", f"must be > 0, got {f.scale}")
        if f.noise_std is not None and not (math.isfinite(f.noise_std) and f.noise_std >= 0):
            raise SpecError(where, f"{at}.noise_std", f"a sensor noise standard deviation in {f.units}: a finite "
                            f"number >= 0, got {f.noise_std}")
        kinds = [k for k in ("joint_pos", "joint_vel", "sensor") if getattr(f.source, k) is not None]
        if len(kinds) != 1:
            raise SpecError(
                where, f"{at}.source", f"give exactly one of joint_pos, joint_vel, sensor (got {kinds or 'none'})"
            )
        if f.source.kind in ("joint_pos", "joint_vel"):
            for name in f.source.names:
                if name not in spec.joints:
                    raise SpecError(
                        where, f"{at}.source.{f.source.kind}", f"joint {name!r} is not in 'joints' ({spec.joints})"
                    )
    if len(spec.action) != len(spec.actuators):
        raise SpecError(
            where, "action", f"needs one field per actuator: {len(spec.actuators)} actuators, {len(spec.action)} fields"
        )
    for i, a in enumerate(spec.action):
        at = f"action[{i}] ({a.name})"
        if a.actuator != spec.actuators[i]:
            problem = f"{a.actuator!r} must match actuators[{i}] = {spec.actuators[i]!r} (same order)"
            raise SpecError(where, f"{at}.actuator", problem)
        if not a.low < a.high:
            raise SpecError(where, f"{at}.low", f"low ({a.low}) must be < high ({a.high})")
        if a.max_rate <= 0:
            raise SpecError(where, f"{at}.max_rate", f"must be > 0 units/s, got {a.max_rate}")
    action_names = [a.name for a in spec.action]
    missing = [n for n in action_names if n not in spec.safe_command]
    extra = [n for n in spec.safe_command if n not in action_names]
    if missing or extra:
        raise SpecError(
            where, "safe_command", f"needs exactly the action fields {action_names}; missing {missing}, unknown {extra}"
        )
    for a in spec.action:
        value = spec.safe_command[a.name]
        if not a.low <= value <= a.high:
            raise SpecError(where, f"safe_command.{a.name}", f"{value} is outside the action range [{a.low}, {a.high}]")


def load_robot(name_or_path: str | Path) -> RobotSpec:
    """Load ``sim/robots/<name>/robot.yaml`` (or a robot.yaml path) and check it for consistency."""
    path = robot_yaml_path(name_or_path)
    data, where = load_yaml(path)
    check_schema_version(data, where, ROBOT_SCHEMA_VERSION, "robot.yaml")
    spec = build(RobotSpec, data, where)
    spec = _with_path(spec, path)
    validate_robot_spec(spec, where)
    if path.name == "robot.yaml" and spec.name != path.parent.name:
        raise SpecError(where, "name", f"{spec.name!r} must equal the robot's folder name {path.parent.name!r}")
    return spec


def robot_from_dict(data: dict, where: str = "<robot spec>") -> RobotSpec:
    """Rebuild a spec from :meth:`RobotSpec.to_dict` output (e.g. the copy inside a bundle)."""
    check_schema_version(data, where, ROBOT_SCHEMA_VERSION, "robot spec")
    spec = build(RobotSpec, data, where)
    validate_robot_spec(spec, where)
    return spec


def _with_path(spec: RobotSpec, path: Path) -> RobotSpec:
    object.__setattr__(spec, "source_path", path.resolve())
    return spec
