"""The MCAP episode-log format: layout version, topics, message types, metadata names, and the records read back.

One MCAP file per episode, written by :class:`~metarl_robot.logs.writer.EpisodeLogWriter` (the ROS 2 node,
``metarl import-log``, sim recordings) and read by :func:`~metarl_robot.logs.reader.read_episode`. The file is a
plain ROS 2 MCAP recording (``ros2msg`` schemas, CDR messages, standard message types only), so Foxglove,
PlotJuggler and rosbag2 open it without our code, and every value the node decided on is stored as float64 or
int64, so a replay can reproduce the node's decisions exactly. The layout (topics, fields, metadata, clocks) is
documented in ``docs/episode_log.md``; :data:`EPISODE_LOG_SCHEMA_VERSION` versions it, and the reader reads that
version and every earlier one (:data:`READABLE_SCHEMA_VERSIONS`) and refuses any other. Writer and reader share only
what is here: a change to this file is a change of the layout.

Robot-side module: numpy only (no torch, no MuJoCo, no ROS install).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metarl_robot.spec.robot import RobotSpec
from metarl_robot.spec.schema import SpecError

EPISODE_LOG_SCHEMA_VERSION = 2
"""Version of the log layout (topics, fields, metadata) this code writes; bump on any change.
1: the first layout; 2: ``/metarl/step`` gained the compute times (:data:`COMPUTE_FIELDS`)."""
READABLE_SCHEMA_VERSIONS = (1, 2)
"""Versions the reader reads: users keep logs of every earlier version, so a bump adds one, never drops one."""

# ---- topics ------------------------------------------------------------------------------------------------
TOPIC_STEP = "/metarl/step"
"""Per control step: the integer bookkeeping (step index, sequence numbers, timestamps, command source)."""
TOPIC_OBSERVATION = "/metarl/observation"
"""Per control step: the observation vector the adapter saw, exactly (float64, robot.yaml field order)."""
TOPIC_JOINT_STATES = "/joint_states"
"""Per control step: the joint part of the observation as ``sensor_msgs/JointState``, for tools (rviz, plots)."""
TOPIC_TASK = "/metarl/task"
"""Per control step, when the adapter was given task/reward parameters: those parameters."""
TOPIC_ADAPTATION = "/metarl/adaptation"
"""Per control step on which the adapter ran: its raw action and its diagnostics (context, errors, ...)."""
TOPIC_COMMAND = "/metarl/command"
"""Per control step: the command sent to the robot (after the safety layer), in action-field order."""
TOPIC_SAFETY = "/metarl/safety"
"""Safety events (stale/frozen telemetry, non-finite values, fallbacks, ...), one DiagnosticStatus each."""
TOPIC_DIAGNOSTICS = "/diagnostics"
"""The node's periodic ``diagnostic_msgs`` (loop rate, latency, frame counters, safety state)."""

FLOAT64_MULTI_ARRAY = "std_msgs/msg/Float64MultiArray"
INT64_MULTI_ARRAY = "std_msgs/msg/Int64MultiArray"
JOINT_STATE = "sensor_msgs/msg/JointState"
DIAGNOSTIC_ARRAY = "diagnostic_msgs/msg/DiagnosticArray"

TOPIC_TYPES: dict[str, str] = {
    TOPIC_STEP: INT64_MULTI_ARRAY, TOPIC_OBSERVATION: FLOAT64_MULTI_ARRAY, TOPIC_JOINT_STATES: JOINT_STATE,
    TOPIC_TASK: FLOAT64_MULTI_ARRAY, TOPIC_ADAPTATION: FLOAT64_MULTI_ARRAY, TOPIC_COMMAND: FLOAT64_MULTI_ARRAY,
    TOPIC_SAFETY: DIAGNOSTIC_ARRAY, TOPIC_DIAGNOSTICS: DIAGNOSTIC_ARRAY,
}
"""Every topic a log may hold and its ROS 2 message type."""
STEP_TOPICS = (TOPIC_STEP, TOPIC_OBSERVATION, TOPIC_JOINT_STATES, TOPIC_TASK, TOPIC_ADAPTATION, TOPIC_COMMAND)
"""Topics written by :meth:`EpisodeLogWriter.write_step`: MCAP ``sequence`` = step index, same log_time."""

COMPUTE_FIELDS = ("adapter_compute_ns", "node_compute_ns")
"""The compute times of a step (version 2), last in ``/metarl/step``: the adapter's ``observe`` + ``act``, and the
node's whole decision from its wake-up (the frame received, or the safety deadline) to the command sent (the adapter
included, so ``node - adapter`` is the node's overhead); :data:`NOT_TIMED` where unknown."""
STEP_FIELDS = ("step", "time_ns", "state_seq", "robot_stamp_ns", "receive_time_ns", "applied_command_seq",
               "command_seq", "command_answers_seq", "command_expires_ns", "command_source", "safety_state",
               *COMPUTE_FIELDS)
"""Labels (in order) of the ``/metarl/step`` Int64MultiArray."""
STEP_FIELDS_BY_VERSION = {1: STEP_FIELDS[:-len(COMPUTE_FIELDS)], 2: STEP_FIELDS}
"""The ``/metarl/step`` labels of each readable version (a later version only appends)."""
NOT_TIMED = -1
"""A compute time that was not measured: the adapter did not run on the step, the writer does not time (``metarl
import-log``, sim recordings, the node's end-of-episode safe commands), or a version-1 log (no such field)."""
COMMAND_SOURCES = ("adapter", "safe_command", "fallback_controller", "none")
"""What produced the command (``runtime.safety.CommandSource``); the index is its code in ``/metarl/step``.
``none``: nothing was sent this period (no ``/metarl/command`` message)."""
SAFETY_STATES = ("", "OK", "WARN", "FALLBACK", "SAFE_STOP", "DISARMED")
"""The safety layer's state (``runtime.safety.SafetyState``); the index is its code in ``/metarl/step``, 0 = not given.
Codes are part of the log layout: append, never reorder."""
ADAPTER_ACTION_LABEL = "action"
"""First block of ``/metarl/adaptation``: the adapter's raw action before the safety layer."""

DIAGNOSTIC_LEVELS = {"OK": 0, "WARN": 1, "ERROR": 2, "STALE": 3}
"""``diagnostic_msgs/DiagnosticStatus`` levels."""
SAFETY_NAME_PREFIX = "metarl/safety/"
"""A safety event's DiagnosticStatus ``name`` is this prefix + its kind."""
SAFETY_KEYS = ("kind", "step", "state_seq", "action")
"""KeyValues every safety event carries first, in this order (user values follow)."""

META_EPISODE = "metarl/episode_log"
META_ROBOT = "metarl/robot"
META_BUNDLE = "metarl/bundle"
META_TASK = "metarl/task"
META_EXTRA = "metarl/extra"
META_END = "metarl/episode_end"
"""Names of the MCAP metadata records (keys: docs/episode_log.md)."""
ADAPTER_STATE_ATTACHMENT = "metarl/adapter_state.npz"
"""MCAP attachment holding what the adapter carried into the episode from earlier ones (an online model's fit):
numpy's ``.npz`` (no pickle), named arrays. Absent when the adapter carried nothing (it started from its prior)."""


class EpisodeLogError(SpecError):
    """An episode log could not be written or read. ``where`` is the file, ``field`` the record/topic/argument."""


class EpisodeLogWarning(UserWarning):
    """A recoverable problem in a log (e.g. a truncated tail after a crash); also listed in ``Episode.warnings``."""


# ---- ROS 2 message definitions --------------------------------------------------------------------------
# The standard definitions (ROS 2 Humble..Kilted, identical in all), comments dropped. Embedded so the
# writer needs no ROS install; tests/logs compares them with the installed ros-*-msgs wheels.
MESSAGE_DEFINITIONS: dict[str, str] = {
    "builtin_interfaces/msg/Time": "int32 sec\nuint32 nanosec\n",
    "std_msgs/msg/Header": "builtin_interfaces/Time stamp\nstring frame_id\n",
    "std_msgs/msg/MultiArrayDimension": "string label\nuint32 size\nuint32 stride\n",
    "std_msgs/msg/MultiArrayLayout": "MultiArrayDimension[] dim\nuint32 data_offset\n",
    "std_msgs/msg/Float64MultiArray": "MultiArrayLayout layout\nfloat64[] data\n",
    "std_msgs/msg/Int64MultiArray": "MultiArrayLayout layout\nint64[] data\n",
    "sensor_msgs/msg/JointState": ("std_msgs/Header header\nstring[] name\nfloat64[] position\nfloat64[] velocity\n"
                                   "float64[] effort\n"),
    "diagnostic_msgs/msg/KeyValue": "string key\nstring value\n",
    "diagnostic_msgs/msg/DiagnosticStatus": ("byte OK=0\nbyte WARN=1\nbyte ERROR=2\nbyte STALE=3\nbyte level\n"
                                             "string name\nstring message\nstring hardware_id\nKeyValue[] values\n"),
    "diagnostic_msgs/msg/DiagnosticArray": "std_msgs/Header header\nDiagnosticStatus[] status\n",
}
"""``pkg/msg/Type`` → its ``.msg`` text."""
_PRIMITIVES = {"bool", "byte", "char", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32",
               "int64", "uint64", "string", "wstring"}


def _field_types(type_name: str) -> list[str]:
    """Full names of the non-primitive field types of a message, in field order."""
    package = type_name.split("/")[0]
    out = []
    for line in MESSAGE_DEFINITIONS[type_name].splitlines():
        base = re.sub(r"(\[.*\]|<=\d+)$", "", line.split()[0])
        if "=" in line.split()[1] or base in _PRIMITIVES:
            continue  # a constant, or a primitive field
        pkg, _, name = base.rpartition("/")
        pkg = pkg or ("std_msgs" if name == "Header" else package)
        out.append(f"{pkg}/msg/{name}")
    return out


def concatenated_definition(type_name: str) -> str:
    """The ``ros2msg`` schema text of a type as rosbag2 writes it: the type, then each dependency once.

    Dependencies follow depth-first, each after a line of 80 ``=`` and ``MSG: pkg/Type``.
    """
    seen: list[str] = []

    def visit(name: str) -> None:
        for dep in _field_types(name):
            if dep not in seen:
                seen.append(dep)
                visit(dep)

    visit(type_name)
    parts = [MESSAGE_DEFINITIONS[type_name]]
    for dep in seen:
        pkg, _, name = dep.split("/")
        parts.append(f"{'=' * 80}\nMSG: {pkg}/{name}\n{MESSAGE_DEFINITIONS[dep]}")
    return "".join(parts)


# ---- records the reader returns (and the writer accepts) -------------------------------------------------
@dataclass(frozen=True)
class DiagnosticEntry:
    """One ``diagnostic_msgs/DiagnosticStatus`` (for ``/diagnostics``)."""

    name: str
    """Component name, e.g. ``metarl/loop``."""
    level: str
    """``OK``, ``WARN``, ``ERROR`` or ``STALE``."""
    message: str = ""
    """Human-readable summary."""
    hardware_id: str = ""
    """Hardware the status is about (the robot name for our node)."""
    values: dict[str, str] = field(default_factory=dict)
    """Key/value details, as strings (write numbers with ``repr`` to keep them exact)."""


@dataclass(frozen=True)
class DiagnosticsRecord:
    """One ``/diagnostics`` message."""

    time_ns: int
    """Controller monotonic time it was logged."""
    statuses: tuple[DiagnosticEntry, ...]
    """Its statuses, in order."""


@dataclass(frozen=True)
class SafetyEventRecord:
    """Something the safety layer detected or did."""

    time_ns: int
    """Controller monotonic time of the event."""
    step: int
    """Index of the control step it belongs to (the step being decided when it happened)."""
    kind: str
    """What happened: an identifier, normally a ``runtime.safety.EventCode`` such as ``TELEMETRY_STALE``."""
    level: str
    """``OK``, ``WARN``, ``ERROR`` or ``STALE`` (``OK`` marks a recovery)."""
    message: str
    """Human-readable description."""
    action: str = ""
    """What the safety layer did about it, e.g. ``safe_command``, ``fallback``, ``clamp``; empty if nothing."""
    state_seq: int | None = None
    """Telemetry sequence number the event refers to, if any."""
    values: dict[str, str] = field(default_factory=dict)
    """Further details as strings (numbers written with ``repr``, so exact)."""


@dataclass(frozen=True)
class Episode:
    """A read episode log: per-step arrays (N steps, in step order), events, and the metadata.

    Times are integers in nanoseconds: ``time_ns`` and ``receive_time_ns`` on the controller's
    monotonic clock, ``robot_stamp_ns`` on the robot's; ``log_time_ns`` is the MCAP log time
    (UNIX epoch, see docs/episode_log.md).
    """

    path: Path
    """The file read."""
    schema_version: int
    """Log layout version of the file, one of :data:`READABLE_SCHEMA_VERSIONS` (others are refused)."""
    robot: RobotSpec
    """The robot spec the node ran with (from the log, validated, interface hash checked)."""
    robot_interface_sha256: str
    """``robot.interface_hash`` as recorded."""
    bundle: dict[str, str] | None
    """``name``, ``sha256`` (of bundle.yaml) and ``path`` of the bundle the node ran, if it recorded one."""
    task: dict[str, Any] | None
    """The true task parameters, when the writer knew them (e.g. a digital twin's hidden task)."""
    extra: dict[str, Any]
    """The writer's ``extra_metadata`` (JSON values)."""
    metadata: dict[str, dict[str, str]]
    """Every MCAP metadata record, raw: name → key → string."""
    software: dict[str, str]
    """``software_version`` and ``git_commit`` of the writer, and the ``created`` UTC time."""
    complete: bool
    """True if the writer closed the file (footer and end record present); False after a crash."""
    end_reason: str
    """Why the episode ended, as the writer was told (``""`` when it never closed)."""

    step: np.ndarray
    """(N,) int64 step index, 0..N-1."""
    time_ns: np.ndarray
    """(N,) int64 controller monotonic time the step's command was sent."""
    log_time_ns: np.ndarray
    """(N,) int64 MCAP log time of the step's messages."""
    state_seq: np.ndarray
    """(N,) int64 sequence number of the telemetry frame the step decided on."""
    robot_stamp_ns: np.ndarray
    """(N,) int64 that frame's robot timestamp (robot clock)."""
    receive_time_ns: np.ndarray
    """(N,) int64 when the controller received that frame (controller clock)."""
    applied_command_seq: np.ndarray
    """(N,) int64 that frame's ``applied_command_seq``: the command the motors applied (0: the safe command; -1: not
    logged)."""
    obs: np.ndarray
    """(N, obs_dim) float64 the observation the adapter saw."""
    command: np.ndarray
    """(N, action_dim) float64 the command sent."""
    command_seq: np.ndarray
    """(N,) int64 the command's sequence number (-1: nothing sent)."""
    command_answers_seq: np.ndarray
    """(N,) int64 the state sequence number the command answers (-1: nothing sent)."""
    command_expires_ns: np.ndarray
    """(N,) int64 the command's expiry stamp as sent, robot clock (0: nothing sent)."""
    command_source: np.ndarray
    """(N,) str: one of :data:`COMMAND_SOURCES` (``none``: nothing sent; ``command`` is NaN there)."""
    safety_state: np.ndarray
    """(N,) str: the safety layer's state that period, one of :data:`SAFETY_STATES` (``""``: not logged)."""
    adapter_compute_ns: np.ndarray
    """(N,) int64 time in the adapter's ``observe`` + ``act`` on this step (:data:`NOT_TIMED`, -1: it did not run, or
    not measured; always -1 in a version-1 log)."""
    node_compute_ns: np.ndarray
    """(N,) int64 the node's decision: its wake-up (frame received, or the safety deadline) → command sent, the
    adapter included (:data:`NOT_TIMED`, -1: not measured; always -1 in a version-1 log)."""
    task_params: dict[str, np.ndarray]
    """Task/reward parameter name → (N,) float64 values given to ``act()`` (empty if none were given)."""
    adapted: np.ndarray
    """(N,) bool: the adapter ran on this step (``adapter_action`` and ``adaptation`` are NaN where not)."""
    adapter_action: np.ndarray
    """(N, action_dim) float64 the adapter's raw action before the safety layer."""
    adaptation: dict[str, np.ndarray]
    """Adapter diagnostic name → (N, size) float64, e.g. ``context``, ``prediction_error``, ``plan_return``."""
    safety_events: list[SafetyEventRecord]
    """Safety events in log order."""
    diagnostics: list[DiagnosticsRecord]
    """``/diagnostics`` messages in log order."""
    warnings: list[str]
    """Recoverable problems found while reading (each also issued as an :class:`EpisodeLogWarning`)."""
    adapter_state: dict[str, np.ndarray] = field(default_factory=dict)
    """What the adapter carried into the episode from earlier ones (empty: it started from its prior), as the
    node recorded it; the replay restores it before the first step."""

    @property
    def num_steps(self) -> int:
        return len(self.step)

    @property
    def node_overhead_ns(self) -> np.ndarray:
        """(N,) int64 ``node_compute_ns - adapter_compute_ns``: what the node added to the adapter's time on a step
        (safety layer, command frame, bookkeeping); :data:`NOT_TIMED` where either is."""
        timed = (self.adapter_compute_ns != NOT_TIMED) & (self.node_compute_ns != NOT_TIMED)
        return np.where(timed, self.node_compute_ns - self.adapter_compute_ns, NOT_TIMED).astype(np.int64)

    def applied_commands(self, sent: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Per step ``k``: ``(N, a)`` the command the motors applied during the period that ended at frame ``k``
        and ``(N,)`` bool whether the log says which it was. Frame ``k``'s ``applied_command_seq`` names it: the
        logged command with that ``command_seq`` (whichever step sent it: a command that ran late is paired with
        the period it ran in), the robot's safe command for 0; where the log cannot tell (-1: not logged, or a
        command sent before the log started) the last command sent before frame ``k``, as the node assumes.
        ``sent``: the last command sent before frame ``k`` on every step (what an adapter that
        ``observes_sent_commands`` was fed)."""
        safe = self.robot.safe_action.astype(np.float64)
        by_seq: dict[int, int] = {}
        out = np.full((self.num_steps, self.robot.action_dim), np.nan)
        known = np.zeros(self.num_steps, dtype=bool)
        last_sent = safe
        for k in range(self.num_steps):
            seq = int(self.applied_command_seq[k])
            if sent:
                out[k] = last_sent
            elif seq == 0:
                out[k], known[k] = safe, True
            elif seq > 0 and seq in by_seq:
                out[k], known[k] = self.command[by_seq[seq]], True
            else:
                out[k] = last_sent
            if self.command_source[k] != "none":
                by_seq[int(self.command_seq[k])] = k
                last_sent = self.command[k]
        return out, known


__all__ = [
    "ADAPTER_ACTION_LABEL", "COMMAND_SOURCES", "COMPUTE_FIELDS", "DIAGNOSTIC_ARRAY", "DIAGNOSTIC_LEVELS",
    "EPISODE_LOG_SCHEMA_VERSION", "FLOAT64_MULTI_ARRAY", "INT64_MULTI_ARRAY", "JOINT_STATE", "MESSAGE_DEFINITIONS",
    "META_BUNDLE", "META_END", "META_EPISODE", "META_EXTRA", "META_ROBOT", "META_TASK", "NOT_TIMED",
    "READABLE_SCHEMA_VERSIONS", "SAFETY_KEYS", "SAFETY_NAME_PREFIX", "SAFETY_STATES", "STEP_FIELDS",
    "STEP_FIELDS_BY_VERSION", "STEP_TOPICS", "TOPIC_ADAPTATION", "TOPIC_COMMAND", "TOPIC_DIAGNOSTICS",
    "TOPIC_JOINT_STATES", "TOPIC_OBSERVATION", "TOPIC_SAFETY", "TOPIC_STEP", "TOPIC_TASK", "TOPIC_TYPES",
    "DiagnosticEntry", "DiagnosticsRecord", "Episode", "EpisodeLogError", "EpisodeLogWarning", "SafetyEventRecord",
    "concatenated_definition",
]
