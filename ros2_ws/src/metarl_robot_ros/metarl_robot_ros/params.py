"""The node's parameters: one table of names, types, defaults and meanings, and strict validation.

The node reads its parameters once, at ``configure``, from ROS parameters (``config/adapt.yaml``,
launch-file overrides, ``-p name:=value``) and turns them into a :class:`NodeConfig` here. Nothing
here imports rclpy, so the tests and the docs check this table without a ROS graph.

Every problem is a :class:`ParameterError` that names the parameter and its allowed values;
unknown parameters (a typo such as ``safety.stale_after_period``) are refused with the list of
known ones, never silently ignored. Task/reward parameters (``task.<name>``) are the reward
parameters of the bundle's task family, so they are checked once the bundle is loaded
(:meth:`NodeConfig.with_bundle`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metarl_robot.runtime.safety import SafetyConfig
from metarl_robot.spec.schema import SpecError
from metarl_robot.telemetry.transport import DEFAULT_HOST, DEFAULT_PORT_BASE, Endpoints
from metarl_robot_ros.control_loop import LoopThresholds
from metarl_robot_ros.robot_link import LINK_ZMQ, LINKS

SAFETY_PREFIX = "safety."
"""``safety.<key>``: a :class:`~metarl_robot.runtime.safety.SafetyConfig` field."""
THRESHOLD_PREFIX = "diagnostics.threshold."
"""``diagnostics.threshold.<check>.<statistic>.{warn,error}``: a :class:`~metarl_robot_ros.control_loop.LoopThresholds`
field, named as ros2_control's controller_manager names its diagnostics thresholds."""
TASK_PREFIX = "task."
"""``task.<name>``: a reward parameter of the bundle's task family (e.g. ``task.target_x``)."""
IGNORED_PREFIXES = ("qos_overrides.",)
"""Parameters rclpy itself reads (QoS overrides); never ours to judge."""
IGNORED_NAMES = ("use_sim_time", "start_type_description_service")
"""Parameters every rclpy node declares."""
RATE_TOLERANCE = 0.005
"""``control_rate_hz`` may differ from the bundle's rate by this fraction (float round-off of ``1 / period``)."""
DEFAULT_LOG_DIR = "~/.ros/metarl/episodes"


class ParameterError(SpecError):
    """A node parameter is missing, of the wrong type, out of range or unknown (``field`` = its name)."""

    def __init__(self, name: str, problem: str, where: str = "parameters") -> None:
        super().__init__(where, name, problem)


@dataclass(frozen=True)
class ParamSpec:
    """One node parameter, as documented in docs/ros2_node.md."""

    name: str
    """ROS parameter name (dotted for nested YAML keys)."""
    type: str
    """ROS type: ``string``, ``integer``, ``double`` or ``bool``."""
    default: Any
    """Value when not given."""
    allowed: str
    """Allowed values, as shown in errors and docs."""
    doc: str
    """What it does."""


_SAFETY_DOCS = {
    "stale_after_periods": ("double", "[1.5, 50] control periods",
                            "no fresh, finite frame for longer than this -> safe command (stale or frozen)"),
    "max_lost_frames": ("integer", "[0, 100] frames", "largest tolerated gap in state sequence numbers"),
    "recovery_fresh_frames": ("integer", "[1, 1000] frames", "good frames in a row that clear a link fault"),
    "prediction_error_threshold": ("double", "0 (not checked) or > 0, RMS in robot.yaml scale units",
                                   "adapter prediction error that counts as bad (calibrate: docs/safety.md)"),
    "prediction_error_steps": ("integer", "[1, 100] graded steps", "bad steps in a row that switch to FALLBACK"),
    "shutdown_periods": ("integer", "[1, 1000] control periods",
                         "safe commands sent on deactivate, SIGINT/SIGTERM or an exception"),
}
"""Type, allowed values and meaning of every SafetyConfig key as a node parameter (docs/safety.md)."""


_THRESHOLDS = {
    "periodicity.mean_error": ("rate_error", "[0.001, 10], a fraction of the expected rate",
                               "relative error of the loop rate, abs(rate - expected) / expected, above which the "
                               "control loop status is"),
    "periodicity.standard_deviation": ("jitter", "[0.001, 10], a fraction of the control period",
                                       "standard deviation of the loop period over the control period, above which "
                                       "the control loop status is"),
    "execution_time.mean": ("compute", "[0.001, 10], a fraction of the control period",
                            "mean compute time (adapter observe + act) over the control period, above which the "
                            "control loop status is"),
}
"""``diagnostics.threshold.<key>.{warn,error}`` → (LoopThresholds field prefix, allowed values, meaning)."""
THRESHOLD_LEVELS = ("warn", "error")


def _threshold_specs() -> tuple[ParamSpec, ...]:
    defaults = LoopThresholds()
    specs = []
    for key, (prefix, allowed, doc) in _THRESHOLDS.items():
        name = THRESHOLD_PREFIX + key
        specs.append(ParamSpec(f"{name}.warn", "double", getattr(defaults, f"{prefix}_warn"), allowed, f"{doc} WARN"))
        specs.append(ParamSpec(f"{name}.error", "double", getattr(defaults, f"{prefix}_error"), f"{allowed}, >= warn",
                               f"{doc} ERROR"))
    return tuple(specs)


def _safety_specs() -> tuple[ParamSpec, ...]:
    defaults = SafetyConfig()
    specs = []
    for f in dataclasses.fields(SafetyConfig):
        kind, allowed, doc = _SAFETY_DOCS[f.name]
        default = getattr(defaults, f.name)
        if f.name == "prediction_error_threshold" and default is None:
            default = 0.0  # ROS parameters have no null: 0 means "not checked"
        specs.append(ParamSpec(SAFETY_PREFIX + f.name, kind, default, allowed, doc))
    return tuple(specs)


PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec("bundle", "string", "", "path to a bundle folder (or its bundle.yaml)",
              "the policy bundle to run (required); loaded and fully validated at configure"),
    ParamSpec("link", "string", LINK_ZMQ, " or ".join(LINKS),
              "how the node talks to the robot: zmq (the telemetry protocol: endpoints, host, port_base, curve_keys) "
              "or ros2_control (joint_states in, forward_command_controller commands out; remappable topics)"),
    ParamSpec("endpoints", "string", "", "'' or 'state=URL,command=URL,handshake=URL' (tcp:// or ipc://)",
              "the robot's telemetry addresses; empty: tcp://<host>:<port_base>, +1, +2"),
    ParamSpec("host", "string", DEFAULT_HOST, "a host name or IP address",
              "the robot's address when endpoints is empty"),
    ParamSpec("port_base", "integer", DEFAULT_PORT_BASE, "[1, 65533]",
              "state port when endpoints is empty (command = +1, handshake = +2)"),
    ParamSpec("curve_keys", "string", "", "'' or a folder with controller.key_secret and robot.key",
              "CURVE keys for an encrypted, authenticated link (docs/telemetry.md); empty: plain link"),
    ParamSpec("insecure", "bool", False, "true or false",
              "allow a plain (unencrypted, unauthenticated) tcp link to a robot off this machine; without it such a "
              "link is refused at configure (loopback and ipc:// are always allowed); /diagnostics warns while on"),
    ParamSpec("handshake_timeout_s", "double", 3.0, "(0, 60] seconds",
              "how long configure waits for the robot's WELCOME"),
    ParamSpec("control_rate_hz", "double", 0.0, "0 (the bundle's rate) or the bundle's rate",
              "expected control rate; the bundle's model predicts one control period ahead, so another rate "
              "is refused"),
    ParamSpec("adapt", "bool", True, "true or false",
              "true: adapt as the bundle's kind does (infer the task context online; an online_model bundle also "
              "fits its last layer); false: no adaptation at all: plan with the unadapted model (empty context, "
              "prior last layer), or act with z at the prior mean (context_policy)"),
    ParamSpec("seed", "integer", 0, "[0, 2^31 - 1]",
              "seed of the planner's sampling noise (a context_policy bundle acts deterministically)"),
    *_safety_specs(),
    ParamSpec("log_dir", "string", DEFAULT_LOG_DIR, "a folder ('~' expanded), or '' for no logs",
              "one MCAP episode log per activation is written here"),
    ParamSpec("episode_steps", "integer", 0, "0 (until deactivated) or [1, 10^9] control steps",
              "end the episode after this many control steps: safe command, log closed, node deactivates"),
    ParamSpec("diagnostics_rate_hz", "double", 1.0, "[0.1, 50] Hz", "how often /diagnostics is published"),
    *_threshold_specs(),
    ParamSpec("autostart", "bool", True, "true or false",
              "configure and activate at startup (no lifecycle manager needed); a failed configure then ends "
              "the process with exit code 2"),
)
"""Every fixed parameter (``task.<name>`` parameters come from the bundle's family)."""

PARAMETERS_BY_NAME: dict[str, ParamSpec] = {p.name: p for p in PARAMETERS}


@dataclass(frozen=True)
class NodeConfig:
    """The node's validated configuration."""

    bundle: Path
    """Bundle folder."""
    endpoints: Endpoints
    """The robot's telemetry addresses."""
    curve_keys: Path | None
    """CURVE key folder, or None for a plain link."""
    insecure: bool
    """A plain tcp link off loopback is allowed (the operator said so)."""
    handshake_timeout_s: float
    """Seconds to wait for WELCOME."""
    control_rate_hz: float
    """Requested control rate; 0 until :meth:`with_bundle` resolves it to the bundle's."""
    adapt: bool
    """Online adaptation on (True) or the unadapted model (False)."""
    seed: int
    """Planner seed."""
    safety: SafetyConfig
    """Safety layer settings."""
    log_dir: Path | None
    """Where episode logs go; None: no logs."""
    episode_steps: int
    """Control steps per episode; 0: until deactivated."""
    diagnostics_rate_hz: float
    """/diagnostics rate."""
    autostart: bool
    """Configure and activate at startup."""
    task_overrides: dict[str, float] = field(default_factory=dict)
    """``task.<name>`` values as given (checked against the family by :meth:`with_bundle`)."""
    task: dict[str, float] = field(default_factory=dict)
    """Every reward parameter of the bundle's family, given or nominal (after :meth:`with_bundle`)."""
    link: str = LINK_ZMQ
    """How the node talks to the robot: one of :data:`~metarl_robot_ros.robot_link.LINKS`."""
    loop_thresholds: LoopThresholds = field(default_factory=LoopThresholds)
    """WARN/ERROR limits of the control loop's ``/diagnostics`` status."""

    @property
    def control_period_s(self) -> float:
        return 1.0 / self.control_rate_hz

    def with_bundle(self, bundle: Any) -> NodeConfig:
        """Check the bundle-dependent parameters against a loaded bundle (any kind): the control rate, ``task.*``
        and that a prediction-error threshold is given only to a bundle that reports prediction errors."""
        bundle_rate = 1.0 / bundle.robot.ctrl_dt
        rate = self.control_rate_hz
        if rate == 0.0:
            rate = bundle_rate
        elif abs(rate - bundle_rate) > RATE_TOLERANCE * bundle_rate:
            raise ParameterError("control_rate_hz", f"must be 0 (use the bundle's) or the bundle's rate "
                                 f"{bundle_rate:g} Hz (control period {bundle.robot.ctrl_dt:g} s of "
                                 f"{bundle.robot.name!r}); got {self.control_rate_hz:g}. The model predicts one "
                                 "control period ahead: retrain or re-export for another rate")
        family = bundle.family
        reward_names = list(family.reward_names)
        unknown = [name for name in self.task_overrides if name not in reward_names]
        if unknown:
            allowed = ", ".join(TASK_PREFIX + n for n in reward_names) or "none (this family has no reward parameters)"
            raise ParameterError(TASK_PREFIX + unknown[0], f"is not a reward parameter of the bundle's family "
                                 f"{family.name!r}; allowed: {allowed}")
        try:
            task = family.validate(dict(self.task_overrides))
        except SpecError as exc:
            raise ParameterError(TASK_PREFIX + exc.field, exc.problem) from None
        if self.safety.prediction_error_threshold is not None and not bundle.has_dynamics_model:
            # The check could never trip: a threshold that silently does nothing is a guard the operator trusts.
            raise ParameterError(SAFETY_PREFIX + "prediction_error_threshold", f"must be 0 for a {bundle.kind} "
                                 f"bundle ({bundle.name!r}): it has no dynamics model and reports no prediction "
                                 f"error to check; got {self.safety.prediction_error_threshold:g}")
        return dataclasses.replace(self, control_rate_hz=rate, task={n: float(task[n]) for n in reward_names})


def known_parameter(name: str) -> bool:
    """True for a fixed parameter, ``task.<name>``, or one rclpy declares itself."""
    return (name in PARAMETERS_BY_NAME or (name.startswith(TASK_PREFIX) and len(name) > len(TASK_PREFIX))
            or name in IGNORED_NAMES or name.startswith(IGNORED_PREFIXES))


def _allowed_names() -> str:
    return ", ".join([p.name for p in PARAMETERS] + [TASK_PREFIX + "<reward parameter>"])


def _check_type(spec: ParamSpec, value: Any) -> Any:
    """The value in its Python type, or a ParameterError naming the parameter and the expected type."""
    kind = spec.type
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if (kind == "bool" and isinstance(value, bool)) or (kind == "string" and isinstance(value, str)):
        return value
    if kind == "integer" and is_number and isinstance(value, int):
        return value
    if kind == "double" and is_number:
        # A YAML integer (3) for a double parameter (3.0) is what people write; accept it.
        if not math.isfinite(value):
            raise ParameterError(spec.name, f"must be a finite number ({spec.allowed}), got {value!r}")
        return float(value)
    raise ParameterError(spec.name, f"must be {_TYPE_WORDS[kind]} ({spec.allowed}), got {value!r} "
                         f"({type(value).__name__})")


_TYPE_WORDS = {"bool": "a bool", "integer": "an integer", "double": "a number", "string": "a string"}


def parse_parameters(values: Mapping[str, Any]) -> NodeConfig:
    """Build a :class:`NodeConfig` from parameter values (name → Python value); missing ones take their default.

    Raises :class:`ParameterError` for an unknown name, a wrong type or a value out of its allowed range.
    """
    for name in values:
        if not known_parameter(name):
            raise ParameterError(name, f"unknown parameter; known: {_allowed_names()}")
    v = {p.name: p.default for p in PARAMETERS}
    for name, value in values.items():
        if name in PARAMETERS_BY_NAME:
            v[name] = _check_type(PARAMETERS_BY_NAME[name], value)
    task_overrides: dict[str, float] = {}
    for name, value in values.items():
        if name.startswith(TASK_PREFIX) and name not in PARAMETERS_BY_NAME:
            spec = ParamSpec(name, "double", None, "a number in the family's range", "")
            task_overrides[name[len(TASK_PREFIX):]] = _check_type(spec, value)

    link = v["link"].strip()
    if link not in LINKS:
        raise ParameterError("link", f"must be {' or '.join(LINKS)}, got {v['link']!r}")
    bundle = v["bundle"].strip()
    if not bundle:
        raise ParameterError("bundle", "is required: the path to a bundle folder (e.g. policies/cartpole_mb), "
                             "given as -p bundle:=PATH or the launch argument bundle:=PATH")
    endpoints_text = v["endpoints"].strip()
    if endpoints_text:
        try:
            endpoints = Endpoints.parse(endpoints_text)
        except ValueError as exc:
            raise ParameterError("endpoints", f"{exc}; allowed: {PARAMETERS_BY_NAME['endpoints'].allowed}") from None
        if any(address.endswith(":*") for address in endpoints.as_dict().values()):
            raise ParameterError("endpoints", "a controller connects to fixed addresses: give ports, not '*'")
    else:
        host = v["host"].strip()
        if not host:
            raise ParameterError("host", "must be a host name or IP address, got ''")
        if not 1 <= v["port_base"] <= 65533:
            raise ParameterError("port_base", f"must be in [1, 65533], got {v['port_base']}")
        endpoints = Endpoints.from_port_base(host, v["port_base"])
    curve = v["curve_keys"].strip()
    if curve and not Path(curve).expanduser().is_dir():
        raise ParameterError("curve_keys", f"folder {curve!r} not found; give the folder made by "
                             "`python -m metarl_robot.telemetry.keys DIR`, or '' for a plain link")
    if not 0 < v["handshake_timeout_s"] <= 60:
        raise ParameterError("handshake_timeout_s", f"must be in (0, 60] seconds, got {v['handshake_timeout_s']:g}")
    if v["control_rate_hz"] < 0:
        raise ParameterError("control_rate_hz", f"must be 0 (the bundle's rate) or the bundle's rate in Hz, got "
                             f"{v['control_rate_hz']:g}")
    if not 0 <= v["seed"] <= 2**31 - 1:
        raise ParameterError("seed", f"must be in [0, 2^31 - 1], got {v['seed']}")
    if not 0 <= v["episode_steps"] <= 10**9:
        raise ParameterError("episode_steps", "must be 0 (until deactivated) or in [1, 10^9], got "
                             f"{v['episode_steps']}")
    if not 0.1 <= v["diagnostics_rate_hz"] <= 50:
        raise ParameterError("diagnostics_rate_hz", f"must be in [0.1, 50] Hz, got {v['diagnostics_rate_hz']:g}")

    loop_thresholds = _parse_thresholds(v)
    safety_values = {p.name[len(SAFETY_PREFIX):]: v[p.name] for p in PARAMETERS if p.name.startswith(SAFETY_PREFIX)}
    if safety_values["prediction_error_threshold"] == 0.0:
        safety_values["prediction_error_threshold"] = None
    elif safety_values["prediction_error_threshold"] < 0:
        raise ParameterError("safety.prediction_error_threshold", "must be 0 (not checked) or > 0, got "
                             f"{safety_values['prediction_error_threshold']:g}")
    try:
        safety = SafetyConfig.from_mapping(safety_values, where="parameters")
    except SpecError as exc:
        raise ParameterError(SAFETY_PREFIX + exc.field, exc.problem) from None
    log_dir = v["log_dir"].strip()
    return NodeConfig(
        bundle=Path(bundle).expanduser(), endpoints=endpoints, curve_keys=Path(curve).expanduser() if curve else None,
        insecure=v["insecure"],
        handshake_timeout_s=v["handshake_timeout_s"], control_rate_hz=v["control_rate_hz"], adapt=v["adapt"],
        seed=v["seed"], safety=safety, log_dir=Path(log_dir).expanduser() if log_dir else None,
        episode_steps=v["episode_steps"], diagnostics_rate_hz=v["diagnostics_rate_hz"], autostart=v["autostart"],
        task_overrides=task_overrides, link=link, loop_thresholds=loop_thresholds)


def _parse_thresholds(v: Mapping[str, Any]) -> LoopThresholds:
    values = {}
    for key, (prefix, _, _) in _THRESHOLDS.items():
        for level in THRESHOLD_LEVELS:
            name = f"{THRESHOLD_PREFIX}{key}.{level}"
            if not 0.001 <= v[name] <= 10:
                raise ParameterError(name, f"must be in [0.001, 10] (a fraction), got {v[name]:g}")
            values[f"{prefix}_{level}"] = v[name]
        warn, error = (f"{THRESHOLD_PREFIX}{key}.{level}" for level in THRESHOLD_LEVELS)
        if v[error] < v[warn]:
            raise ParameterError(error, f"must be >= {warn} ({v[warn]:g}), got {v[error]:g}")
    return LoopThresholds(**values)
