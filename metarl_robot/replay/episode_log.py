"""Episode logs: one MCAP file per episode, ROS 2 message schemas, read back for shadow replay.

The ROS 2 node writes one :class:`EpisodeLogWriter` per episode; ``metarl replay`` reads it with
:func:`read_episode`. The file is a plain ROS 2 MCAP recording (``ros2msg`` schemas, CDR messages,
standard message types only), so Foxglove, PlotJuggler and rosbag2 open it without our code, and
every value the node decided on is stored as float64 or int64, so a replay can reproduce the node's
decisions exactly. The layout (topics, fields, metadata, clocks) is documented in
``docs/episode_log.md``; :data:`EPISODE_LOG_SCHEMA_VERSION` versions it and the reader refuses any
other version.

Crash tolerance: messages collect in an in-memory chunk that is compressed and handed to the OS
when it exceeds ``chunk_size`` bytes, when its oldest step is ``max_chunk_age_s`` old, and right
after every safety event; metadata goes to the OS as soon as it is written. A crash (even SIGKILL)
therefore loses at most the open chunk, and :func:`read_episode` reads every complete chunk of a
file that was never closed, with a warning saying what was dropped.

Robot-side module: numpy, mcap and mcap-ros2-support only (no torch, no MuJoCo, no ROS install).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import struct
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mcap.exceptions import EndOfFile
from mcap.opcode import Opcode
from mcap.records import Channel, Footer, Message, Metadata, Schema
from mcap.stream_reader import StreamReader
from mcap.writer import CompressionType
from mcap_ros2.decoder import DecoderFactory
from mcap_ros2.writer import Writer as Ros2McapWriter

from metarl_robot.provenance import git_commit, software_version
from metarl_robot.spec.robot import RobotSpec, robot_from_dict
from metarl_robot.spec.schema import SpecError

EPISODE_LOG_SCHEMA_VERSION = 1
"""Version of the log layout (topics, fields, metadata) this code writes and reads; bump on any change."""

DEFAULT_CHUNK_SIZE = 32 * 1024
"""Bytes of uncompressed messages per chunk (~28 cart-pole steps, ~1.1 s at 25 Hz): bounds what a crash loses."""
DEFAULT_MAX_CHUNK_AGE_S = 1.0
"""A chunk is written once its oldest step is this old (controller clock), however small it is."""

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

STEP_FIELDS = ("step", "time_ns", "state_seq", "robot_stamp_ns", "receive_time_ns", "applied_command_seq",
               "command_seq", "command_answers_seq", "command_expires_ns", "command_source", "safety_state")
"""Labels (in order) of the ``/metarl/step`` Int64MultiArray."""
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

_INT64_MAX = 2**63 - 1
_MAX_SEQUENCE = 2**32 - 1
"""MCAP's per-message ``sequence`` is uint32; it carries the step index."""
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class EpisodeLogError(SpecError):
    """An episode log could not be written or read. ``where`` is the file, ``field`` the record/topic/argument."""


class EpisodeLogWarning(UserWarning):
    """A recoverable problem in a log (e.g. a truncated tail after a crash); also listed in ``Episode.warnings``."""


# ---- ROS 2 message definitions --------------------------------------------------------------------------
# The standard definitions (ROS 2 Humble..Kilted, identical in all), comments dropped. Embedded so the
# writer needs no ROS install; tests/replay compares them with the installed ros-*-msgs wheels.
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
    """Log layout version (always :data:`EPISODE_LOG_SCHEMA_VERSION`: other versions are refused)."""
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

    @property
    def num_steps(self) -> int:
        return len(self.step)


# ---- writing ---------------------------------------------------------------------------------------------
class _MultiArray:
    """Field layout of a Float64/Int64MultiArray: one ``dim`` per named block (size, stride = its offset)."""

    def __init__(self, blocks: Sequence[tuple[str, int]]) -> None:
        self.blocks = list(blocks)
        self.size = sum(size for _, size in self.blocks)
        offsets = np.cumsum([0] + [size for _, size in self.blocks])[:-1]
        self.layout = {"dim": [{"label": label, "size": size, "stride": int(offset)}
                               for (label, size), offset in zip(self.blocks, offsets, strict=True)],
                       "data_offset": 0}

    def message(self, data: list) -> dict:
        return {"layout": self.layout, "data": data}


def _time_msg(log_time_ns: int) -> dict[str, int]:
    sec, nanosec = divmod(log_time_ns, 1_000_000_000)
    return {"sec": sec, "nanosec": nanosec}


class EpisodeLogWriter:
    """Write one episode to one MCAP file (see the module docstring and docs/episode_log.md).

    Call :meth:`write_step` once per control period after the command was sent, :meth:`write_safety_event`
    when the safety layer acts (before the ``write_step`` of that period), :meth:`write_diagnostics`
    when the node publishes ``/diagnostics``, and :meth:`close` at the end (or use ``with``). Not
    thread-safe: call it from one thread. The file must not exist (one file per episode).
    """

    def __init__(self, path: str | Path, robot: RobotSpec, *, bundle: Any = None,
                 task: Mapping[str, Any] | None = None, extra_metadata: Mapping[str, Any] | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, max_chunk_age_s: float = DEFAULT_MAX_CHUNK_AGE_S,
                 compression: str = "zstd", fsync: bool = False,
                 clock_anchor: tuple[int, int] | None = None) -> None:
        """Create ``path`` (parents too) and write the metadata records.

        ``bundle``: a loaded :class:`~metarl_robot.runtime.bundle.Bundle` or a mapping with ``name``,
        ``sha256`` (and optionally ``path``). ``task``: the true task parameters if known (JSON values).
        ``extra_metadata``: anything else worth keeping (JSON values), e.g. the node's parameters.
        ``compression``: ``zstd``, ``lz4`` or ``none``. ``fsync``: also fsync each written chunk
        (survives power loss, not only crashes; slow on SD cards). ``clock_anchor``: ``(wall_ns,
        monotonic_ns)`` pairing the UNIX clock with the controller clock; default: both read now.
        """
        self.path = Path(path)
        self.robot = robot
        where = str(self.path)
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise EpisodeLogError(where, "chunk_size", f"must be a positive number of bytes, got {chunk_size!r}")
        if not max_chunk_age_s > 0:
            raise EpisodeLogError(where, "max_chunk_age_s", f"must be > 0 seconds, got {max_chunk_age_s!r}")
        codecs = {"zstd": CompressionType.ZSTD, "lz4": CompressionType.LZ4, "none": CompressionType.NONE}
        if compression not in codecs:
            raise EpisodeLogError(where, "compression", f"must be one of {sorted(codecs)}, got {compression!r}")
        wall_anchor, mono_anchor = clock_anchor if clock_anchor is not None else (time.time_ns(), time.monotonic_ns())
        self.wall_anchor_ns, self.monotonic_anchor_ns = int(wall_anchor), int(mono_anchor)
        """The MCAP log time of controller time ``t`` is ``wall_anchor_ns + t - monotonic_anchor_ns``."""
        self.max_chunk_age_ns = int(max_chunk_age_s * 1e9)
        self.fsync = fsync
        metadata = self._metadata_records(bundle, task, extra_metadata, chunk_size, compression)

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._file = open(self.path, "xb")  # noqa: SIM115 -- owned by this object, closed in close()
        except FileExistsError:
            raise EpisodeLogError(where, "path", "already exists; every episode needs a new file") from None
        self._mcap = Ros2McapWriter(self._file, chunk_size=chunk_size, compression=codecs[compression])
        # mcap-ros2-support exposes no way to close the open chunk early; its mcap.Writer does (mcap >= 1.6).
        self._inner = getattr(self._mcap, "_writer", None)
        if not callable(getattr(self._inner, "flush", None)):
            self._file.close()
            self.path.unlink()
            raise EpisodeLogError(where, "", "needs mcap >= 1.6 (Writer.flush) under mcap-ros2-support")
        self._schemas = {t: self._mcap.register_msgdef(t, concatenated_definition(t))
                         for t in dict.fromkeys(TOPIC_TYPES.values())}
        for name, record in metadata.items():
            self._mcap.add_metadata(name, record)

        self._obs_layout = _MultiArray([(f.name, f.size) for f in robot.measured_fields])
        self._command_layout = _MultiArray([(a.name, 1) for a in robot.action])
        self._step_layout = _MultiArray([(label, 1) for label in STEP_FIELDS])
        self._joint_names, self._joint_pos_index, self._joint_vel_index = joint_state_map(robot)
        self._task_layout: _MultiArray | None = None
        self._adaptation_layout: _MultiArray | None = None
        self._steps = 0
        self._safety_events = 0
        self._diagnostics = 0
        self._last_time_ns: int | None = None
        self._chunk_opened_ns: int | None = None
        """Controller time of the oldest step not yet handed to the OS."""
        self._closed = False
        self._sync()

    # ---- public API ------------------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        """Steps written so far (the index the next step gets)."""
        return self._steps

    @property
    def closed(self) -> bool:
        return self._closed

    def log_time(self, time_ns: int) -> int:
        """MCAP log time (UNIX ns) of a controller monotonic time."""
        return self.wall_anchor_ns + int(time_ns) - self.monotonic_anchor_ns

    def write_step(self, *, obs: Any, state_seq: int, robot_stamp_ns: int, receive_time_ns: int, command: Any,
                   command_seq: int | None, command_source: str = "adapter", command_answers_seq: int | None = None,
                   command_expires_ns: int = 0, applied_command_seq: int = -1, safety_state: str = "",
                   task_params: Mapping[str, Any] | None = None, adapter_action: Any = None,
                   adaptation: Mapping[str, Any] | None = None, time_ns: int | None = None) -> int:
        """Log one control step; returns its index. Everything is checked before anything is written.

        ``obs``: the observation vector given to the adapter, shape (obs_dim,) or (1, obs_dim), NaN/Inf
        kept as is. ``state_seq``/``robot_stamp_ns``/``applied_command_seq``: ``seq``, ``stamp_ns`` and
        ``applied_command_seq`` of the STATE frame it came from (docs/telemetry.md); ``receive_time_ns``:
        when that frame arrived (controller monotonic clock). ``command``: what was sent, (action_dim,)
        or (1, action_dim); ``command_seq``, ``command_answers_seq`` (default ``state_seq``) and
        ``command_expires_ns`` (robot clock) as put in the COMMAND frame; ``command_source``: one of
        :data:`COMMAND_SOURCES` (the safety decision's ``source``; for ``none``, nothing was sent:
        ``command`` and ``command_seq`` are None); ``safety_state``: the safety layer's state, one of
        :data:`SAFETY_STATES`. ``task_params``: the
        parameters passed to ``act()`` (same names every step). ``adapter_action``/``adaptation``: the
        adapter's raw action and diagnostics (arrays of shape (1, ·), (·) or scalars; same names and
        sizes every step) — both or neither (a step on which the adapter did not run).
        ``time_ns``: controller monotonic time the command was sent (default: now); strictly increasing.
        """
        self._check_open()
        where = str(self.path)
        time_ns = time.monotonic_ns() if time_ns is None else _as_int(time_ns, where, "time_ns")
        if self._last_time_ns is not None and time_ns <= self._last_time_ns:
            raise EpisodeLogError(where, "time_ns", f"{time_ns} is not after the previous step's {self._last_time_ns}: "
                                  "step times must strictly increase (controller monotonic clock, ns)")
        log_time = self._checked_log_time(time_ns)
        step = self._steps
        if step > _MAX_SEQUENCE:
            raise EpisodeLogError(where, "step", f"more than {_MAX_SEQUENCE + 1} steps in one episode")
        obs_vec = _vector(obs, self.robot.obs_dim, where, "obs")
        command_source, safety_state = str(command_source), str(safety_state)
        if command_source not in COMMAND_SOURCES:
            raise EpisodeLogError(where, "command_source", f"must be one of {list(COMMAND_SOURCES)}, "
                                  f"got {command_source!r}")
        if safety_state not in SAFETY_STATES:
            raise EpisodeLogError(where, "safety_state", f"must be one of {list(SAFETY_STATES)}, got {safety_state!r}")
        sent = command_source != "none"
        if sent and (command is None or command_seq is None):
            raise EpisodeLogError(where, "command", f"command and command_seq are required when a command was sent "
                                  f"(command_source={command_source!r})")
        if not sent and (command is not None or command_seq is not None):
            raise EpisodeLogError(where, "command", "must be None with command_source='none' (nothing was sent)")
        command_vec = _vector(command, self.robot.action_dim, where, "command") if sent else None
        state_seq = _as_int(state_seq, where, "state_seq")
        answers = state_seq if command_answers_seq is None else _as_int(command_answers_seq, where,
                                                                         "command_answers_seq")
        ints = [step, time_ns, state_seq, _as_int(robot_stamp_ns, where, "robot_stamp_ns"),
                _as_int(receive_time_ns, where, "receive_time_ns"),
                _as_int(applied_command_seq, where, "applied_command_seq"),
                _as_int(command_seq, where, "command_seq") if sent else -1, answers if sent else -1,
                _as_int(command_expires_ns, where, "command_expires_ns") if sent else 0,
                COMMAND_SOURCES.index(command_source), SAFETY_STATES.index(safety_state)]
        task_msg, task_layout = self._task_message(task_params)
        adaptation_msg, adaptation_layout = self._adaptation_message(adapter_action, adaptation)

        messages = [(TOPIC_STEP, self._step_layout.message(ints)),
                    (TOPIC_OBSERVATION, self._obs_layout.message(obs_vec.tolist()))]
        if self._joint_names:
            stamp = {"stamp": _time_msg(log_time), "frame_id": ""}
            pos = [obs_vec[i] if i >= 0 else math.nan for i in self._joint_pos_index] if self._joint_pos_index else []
            vel = [obs_vec[i] if i >= 0 else math.nan for i in self._joint_vel_index] if self._joint_vel_index else []
            messages.append((TOPIC_JOINT_STATES, {"header": stamp, "name": self._joint_names, "position": pos,
                                                  "velocity": vel, "effort": []}))
        if task_msg is not None:
            messages.append((TOPIC_TASK, task_msg))
        if adaptation_msg is not None:
            messages.append((TOPIC_ADAPTATION, adaptation_msg))
        if command_vec is not None:
            messages.append((TOPIC_COMMAND, self._command_layout.message(command_vec.tolist())))

        written_before = self._file.tell()
        for topic, msg in messages:
            self._mcap.write_message(topic, self._schemas[TOPIC_TYPES[topic]], msg, log_time=log_time,
                                     sequence=step)
        self._task_layout, self._adaptation_layout = task_layout, adaptation_layout
        self._steps += 1
        self._last_time_ns = time_ns
        self._after_write(time_ns, written_before)
        return step

    def write_safety_event(self, kind: str, message: str, *, level: str | int = "ERROR", action: str = "",
                           state_seq: int | None = None, step: int | None = None,
                           values: Mapping[str, Any] | None = None, time_ns: int | None = None) -> None:
        """Log a safety event on ``/metarl/safety``; an ERROR or STALE one goes to the OS at once (with the open chunk).

        ``kind``: identifier of what happened (letters, digits, ``_``), e.g. a ``runtime.safety.EventCode``;
        ``level``: ``OK`` (recovered), ``WARN``, ``ERROR`` or ``STALE``, or its code 0-3 (a
        ``DiagnosticLevel``); ``action``: what the safety layer did (e.g. ``safe_command``);
        ``step``: the control step it belongs to (default: the next one to be written);
        ``values``: details, stored as strings (floats with ``repr``, exact).
        """
        self._check_open()
        where = str(self.path)
        if not isinstance(kind, str) or not _NAME.match(kind):
            raise EpisodeLogError(where, "kind", f"must be an identifier (letters, digits, _), got {kind!r}")
        kind = str(kind)  # a StrEnum member → its value
        level_code = _level_code(level, where, "level")
        time_ns = time.monotonic_ns() if time_ns is None else _as_int(time_ns, where, "time_ns")
        step = self._steps if step is None else _as_int(step, where, "step")
        details = _string_values(values, where, "values")
        if clash := [k for k in details if k in SAFETY_KEYS]:
            raise EpisodeLogError(where, "values", f"keys {clash} are reserved ({list(SAFETY_KEYS)})")
        pairs = [("kind", kind), ("step", str(step)),
                 ("state_seq", "" if state_seq is None else str(_as_int(state_seq, where, "state_seq"))),
                 ("action", str(action)), *details.items()]
        status = {"level": level_code, "name": SAFETY_NAME_PREFIX + kind, "message": str(message),
                  "hardware_id": self.robot.name, "values": [{"key": k, "value": v} for k, v in pairs]}
        written_before = self._file.tell()
        self._write_diagnostic_array(TOPIC_SAFETY, [status], time_ns, sequence=self._safety_events)
        self._safety_events += 1
        # Errors often precede a crash, so they reach the disk now; warnings (clamps, rate limits) can
        # come every period and would otherwise make one tiny chunk per step.
        self._after_write(time_ns, written_before, flush=level_code >= DIAGNOSTIC_LEVELS["ERROR"])

    def write_diagnostics(self, statuses: Sequence[Any], *, time_ns: int | None = None) -> None:
        """Log one ``/diagnostics`` message.

        ``statuses``: :class:`DiagnosticEntry` objects, or anything with the ``diagnostic_msgs/DiagnosticStatus``
        attributes (``level`` as int, name or rclpy's 1-byte ``bytes``; ``values`` as a mapping or
        a list of objects with ``key``/``value``), e.g. the statuses the node publishes.
        """
        self._check_open()
        where = str(self.path)
        time_ns = time.monotonic_ns() if time_ns is None else _as_int(time_ns, where, "time_ns")
        encoded = []
        for i, status in enumerate(statuses):
            at = f"statuses[{i}]"
            raw_values = getattr(status, "values", {})
            if not isinstance(raw_values, Mapping):
                raw_values = {getattr(kv, "key", None): getattr(kv, "value", None) for kv in raw_values}
            encoded.append({"level": _level_code(getattr(status, "level", None), where, f"{at}.level"),
                            "name": str(getattr(status, "name", "")), "message": str(getattr(status, "message", "")),
                            "hardware_id": str(getattr(status, "hardware_id", "")),
                            "values": [{"key": k, "value": v}
                                       for k, v in _string_values(raw_values, where, f"{at}.values").items()]})
        written_before = self._file.tell()
        self._write_diagnostic_array(TOPIC_DIAGNOSTICS, encoded, time_ns, sequence=self._diagnostics)
        self._diagnostics += 1
        self._after_write(time_ns, written_before)

    def flush(self) -> None:
        """Compress the open chunk and hand everything to the OS (and fsync if asked): a crash now loses nothing."""
        self._check_open()
        self._inner.flush()
        self._chunk_opened_ns = None
        self._sync()

    def close(self, end_reason: str = "closed") -> None:
        """Write the end record, the summary and the footer, and close the file. Idempotent."""
        if self._closed:
            return
        self._mcap.add_metadata(META_END, {"steps": str(self._steps), "safety_events": str(self._safety_events),
                                           "end_reason": str(end_reason)})
        self._mcap.finish()
        self._sync(force_fsync=True)
        self._file.close()
        self._closed = True

    def __enter__(self) -> EpisodeLogWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close("closed" if exc_type is None else f"exception: {exc_type.__name__}: {exc}")

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"EpisodeLogWriter({str(self.path)!r}, robot={self.robot.name!r}, steps={self._steps}, {state})"

    # ---- internals -------------------------------------------------------------------------------------
    def _metadata_records(self, bundle: Any, task: Mapping[str, Any] | None, extra: Mapping[str, Any] | None,
                          chunk_size: int, compression: str) -> dict[str, dict[str, str]]:
        where = str(self.path)
        records = {
            META_EPISODE: {
                "schema_version": str(EPISODE_LOG_SCHEMA_VERSION), "writer": __name__,
                "software_version": software_version(), "git_commit": git_commit(include_untracked=False) or "unknown",
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.wall_anchor_ns / 1e9)),
                "wall_anchor_ns": str(self.wall_anchor_ns), "monotonic_anchor_ns": str(self.monotonic_anchor_ns),
                "chunk_size": str(chunk_size), "max_chunk_age_ns": str(self.max_chunk_age_ns),
                "compression": compression,
            },
            META_ROBOT: {
                "name": self.robot.name, "interface_sha256": self.robot.interface_hash,
                "spec_json": json.dumps(self.robot.to_dict(), sort_keys=True),
                "control_period_s": repr(float(self.robot.ctrl_dt)),
                "obs_fields": ",".join(f.name for f in self.robot.measured_fields),
                "action_fields": ",".join(a.name for a in self.robot.action),
            },
        }
        if bundle is not None:
            get = bundle.get if isinstance(bundle, Mapping) else lambda key, default=None: getattr(bundle, key, default)
            name, sha = get("name"), get("sha256")
            if not isinstance(name, str) or not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
                raise EpisodeLogError(where, "bundle", "needs a name and the hex sha256 of its bundle.yaml "
                                      f"(a loaded Bundle or a mapping), got name={name!r} sha256={sha!r}")
            records[META_BUNDLE] = {"name": name, "sha256": sha, "path": str(get("path", "") or "")}
        if task is not None:
            records[META_TASK] = {"params_json": _json(task, where, "task")}
        if extra:
            records[META_EXTRA] = {str(k): _json(v, where, f"extra_metadata.{k}") for k, v in extra.items()}
        return records

    def _task_message(self, task_params: Mapping[str, Any] | None) -> tuple[dict | None, _MultiArray | None]:
        """The ``/metarl/task`` message (None: no parameters) and the layout to keep (fixed by step 0)."""
        where = str(self.path)
        values = {}
        for name, value in (task_params or {}).items():
            try:
                arr = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise EpisodeLogError(where, f"task_params.{name}", f"must be a number: {exc}") from None
            if arr.size != 1:
                raise EpisodeLogError(where, f"task_params.{name}", f"must be one number, got shape {arr.shape}")
            values[str(name)] = float(arr.reshape(()))
        layout = self._task_layout
        if self._steps == 0:
            layout = _MultiArray([(name, 1) for name in values]) if values else None
        expected = [label for label, _ in layout.blocks] if layout else []
        if list(values) != expected:
            raise EpisodeLogError(where, "task_params", f"names {list(values)} differ from the first step's "
                                  f"{expected}; give the same names, in the same order, every step")
        return (layout.message(list(values.values())) if layout else None), layout

    def _adaptation_message(self, adapter_action: Any, adaptation: Mapping[str, Any] | None
                            ) -> tuple[dict | None, _MultiArray | None]:
        """The ``/metarl/adaptation`` message (None: the adapter did not run) and the layout to keep."""
        where = str(self.path)
        if adapter_action is None and adaptation is None:
            return None, self._adaptation_layout
        if adapter_action is None or adaptation is None:
            raise EpisodeLogError(where, "adaptation", "give adapter_action and adaptation together (or neither, "
                                  "for a step on which the adapter did not run)")
        blocks = [(ADAPTER_ACTION_LABEL, _vector(adapter_action, self.robot.action_dim, where, "adapter_action"))]
        for name, value in adaptation.items():
            if name == ADAPTER_ACTION_LABEL:
                raise EpisodeLogError(where, "adaptation.action", "is reserved for adapter_action")
            try:
                arr = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError) as exc:
                raise EpisodeLogError(where, f"adaptation.{name}", f"must be numeric: {exc}") from None
            if arr.ndim >= 2 and arr.shape[0] != 1:
                raise EpisodeLogError(where, f"adaptation.{name}", f"one robot only: shape {arr.shape} has batch "
                                      f"{arr.shape[0]}; pass (1, ·), (·) or a scalar")
            blocks.append((str(name), arr.ravel()))
        found = [(label, arr.size) for label, arr in blocks]
        layout = self._adaptation_layout or _MultiArray(found)
        if found != layout.blocks:
            raise EpisodeLogError(where, "adaptation", f"names/sizes {found} differ from the first adapted step's "
                                  f"{layout.blocks}; they must be the same every step")
        return layout.message(np.concatenate([arr for _, arr in blocks]).tolist()), layout

    def _write_diagnostic_array(self, topic: str, statuses: list[dict], time_ns: int, sequence: int) -> None:
        log_time = self._checked_log_time(time_ns)
        msg = {"header": {"stamp": _time_msg(log_time), "frame_id": ""}, "status": statuses}
        self._mcap.write_message(topic, self._schemas[TOPIC_TYPES[topic]], msg, log_time=log_time,
                                 sequence=sequence % (_MAX_SEQUENCE + 1))

    def _checked_log_time(self, time_ns: int) -> int:
        log_time = self.log_time(time_ns)
        if not 0 <= log_time <= _INT64_MAX or log_time // 1_000_000_000 > 2**31 - 1:
            raise EpisodeLogError(str(self.path), "time_ns", f"{time_ns} maps to log time {log_time} ns, outside the "
                                  "UNIX epoch range; times are controller monotonic ns (time.monotonic_ns()), the "
                                  f"clock anchored at {self.monotonic_anchor_ns}")
        return log_time

    def _after_write(self, time_ns: int, written_before: int, flush: bool = False) -> None:
        """Close the open chunk if asked or if it spans ``max_chunk_age_s``; hand finished chunks to the OS."""
        if self._file.tell() != written_before or self._chunk_opened_ns is None:
            # The mcap writer closed a full chunk during this write (or none was open): the open one starts now.
            self._chunk_opened_ns = time_ns
        if flush or time_ns - self._chunk_opened_ns >= self.max_chunk_age_ns:
            self.flush()
        else:
            self._sync()

    def _sync(self, force_fsync: bool = False) -> None:
        # Chunks the mcap writer finished sit in Python's file buffer until flushed: push them to the OS.
        self._file.flush()
        if self.fsync or force_fsync:
            os.fsync(self._file.fileno())

    def _check_open(self) -> None:
        if self._closed:
            raise EpisodeLogError(str(self.path), "", "the log is closed")


def joint_state_map(robot: RobotSpec) -> tuple[list[str], list[int], list[int]]:
    """Joints whose position or velocity is an observation component: names, and obs indices (-1: not observed).

    Only single-value joints (hinge, slide) named whole by a field map; free/ball joints and indexed
    sources do not (their components are not one value per joint).
    """
    pos: dict[str, int] = {}
    vel: dict[str, int] = {}
    for f in robot.measured_fields:
        src = f.source
        if src.kind not in ("joint_pos", "joint_vel") or src.index is not None or f.size != len(src.names):
            continue
        start = robot.obs_slices[f.name].start
        target = pos if src.kind == "joint_pos" else vel
        for i, joint in enumerate(src.names):
            target.setdefault(joint, start + i)
    names = [j for j in robot.joints if j in pos or j in vel]
    pos_index = [pos.get(j, -1) for j in names] if pos else []
    vel_index = [vel.get(j, -1) for j in names] if vel else []
    return names, pos_index, vel_index


def _vector(value: Any, size: int, where: str, name: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise EpisodeLogError(where, name, f"must be numeric: {exc}") from None
    if arr.shape not in ((size,), (1, size)):
        raise EpisodeLogError(where, name, f"must have shape ({size},) or (1, {size}), got {arr.shape}")
    return arr.reshape(size)


def _as_int(value: Any, where: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise EpisodeLogError(where, name, f"must be an integer, got {value!r}")
    value = int(value)
    if not -_INT64_MAX - 1 <= value <= _INT64_MAX:
        raise EpisodeLogError(where, name, f"{value} does not fit in int64")
    return value


def _level_code(level: Any, where: str, name: str) -> int:
    if isinstance(level, bytes) and len(level) == 1:
        level = level[0]  # rclpy represents a ``byte`` field as 1-byte bytes
    if isinstance(level, str) and level in DIAGNOSTIC_LEVELS:
        return DIAGNOSTIC_LEVELS[level]
    if isinstance(level, int | np.integer) and int(level) in DIAGNOSTIC_LEVELS.values():
        return int(level)
    raise EpisodeLogError(where, name, f"must be one of {list(DIAGNOSTIC_LEVELS)} (or 0-3), got {level!r}")


def _string_values(values: Mapping[str, Any] | None, where: str, name: str) -> dict[str, str]:
    out = {}
    for key, value in (values or {}).items():
        if not isinstance(key, str) or not key:
            raise EpisodeLogError(where, name, f"keys must be non-empty strings, got {key!r}")
        out[key] = repr(float(value)) if isinstance(value, float | np.floating) else str(value)
    return out


def _json(value: Any, where: str, name: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=True, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise EpisodeLogError(where, name, f"must be JSON-serialisable: {exc}") from None


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


# ---- reading ---------------------------------------------------------------------------------------------
_MAGIC = b"\x89MCAP0\r\n"
_RECORD_HEAD = struct.Struct("<BQ")


def _scan(path: Path, notes: list[str]) -> tuple[list, bool]:
    """Every record of the file in order (chunks opened, CRCs checked), and whether the footer was reached.

    Reads record by record, so a record cut short by the end of the file (a crash while writing)
    ends the scan with a note and everything before it is kept; a complete record that does not
    parse or fails its CRC is corruption, an error naming its byte offset.
    """
    where = str(path)
    size = path.stat().st_size
    records: list = []
    with path.open("rb") as f:
        if f.read(len(_MAGIC)) != _MAGIC:
            raise EpisodeLogError(where, "", "not an MCAP file (the file does not start with the MCAP magic bytes)")
        while True:
            offset = f.tell()
            head = f.read(_RECORD_HEAD.size)
            if not head:
                notes.append(f"the file ends after {offset} bytes without a footer: the writer did not close it "
                             "(crash, kill or still writing); every complete chunk was read")
                return records, False
            length = _RECORD_HEAD.unpack(head)[1] if len(head) == _RECORD_HEAD.size else None
            body = f.read(length) if length is not None else b""
            if length is None or len(body) < length:
                notes.append(f"the file ends inside a {_opcode_name(head[0])} record at byte {offset} "
                             f"({size - offset} trailing bytes dropped): the writer did not close it (crash, kill or "
                             "still writing); every complete chunk before it was read")
                return records, False
            parsed = _parse_record(head + body, where, offset)
            records.extend(parsed)
            if any(isinstance(r, Footer) for r in parsed):
                if f.read() != _MAGIC:
                    raise EpisodeLogError(where, f"byte {f.tell()}", "the footer is not followed by the MCAP magic")
                return records, True


def _parse_record(data: bytes, where: str, offset: int) -> list:
    """The record in ``data`` (a chunk: the records inside it, CRC checked); unknown opcodes give ``[]``."""
    opcode = data[0]
    try:
        Opcode(opcode)
    except ValueError:
        return []  # the MCAP spec lets readers skip record types they do not know
    parsed: list = []
    reader = StreamReader(io.BytesIO(data), skip_magic=True, validate_crcs=True)
    try:
        # The stream reader only stops at a footer: running out after our one record is the normal end.
        for record in reader.records:
            parsed.append(record)
    except EndOfFile:
        pass
    except Exception as exc:  # CRC mismatch, bad lengths, decompressor errors (zstd/lz4 raise their own types)
        raise EpisodeLogError(where, f"byte {offset}", f"corrupt {_opcode_name(opcode)} record: "
                              f"{type(exc).__name__}: {exc}") from None
    if not parsed:
        raise EpisodeLogError(where, f"byte {offset}", f"corrupt {_opcode_name(opcode)} record: it does not parse")
    return parsed


def _opcode_name(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"unknown (opcode {opcode:#x})"


def _decoded(records: list, where: str) -> Iterator[tuple[str, Message, Any]]:
    """``(topic, message record, decoded ROS message)`` for every message, checking each topic's type."""
    schemas: dict[int, Schema] = {}
    channels: dict[int, Channel] = {}
    factory = DecoderFactory()
    decoders: dict[int, Any] = {}
    for record in records:
        if isinstance(record, Schema):
            schemas[record.id] = record
        elif isinstance(record, Channel):
            channels[record.id] = record
        elif isinstance(record, Message):
            channel = channels.get(record.channel_id)
            if channel is None:
                raise EpisodeLogError(where, "", f"message on unknown channel {record.channel_id}")
            schema = schemas.get(channel.schema_id)
            expected = TOPIC_TYPES.get(channel.topic)
            if expected is not None and (schema is None or schema.name != expected):
                raise EpisodeLogError(where, channel.topic, f"has type {schema.name if schema else None!r}, "
                                      f"expected {expected!r}")
            if record.channel_id not in decoders:
                decoders[record.channel_id] = factory.decoder_for(channel.message_encoding, schema)
            decoder = decoders[record.channel_id]
            if decoder is None:
                if expected is not None:
                    raise EpisodeLogError(where, channel.topic, f"encoding {channel.message_encoding!r} with schema "
                                          f"encoding {schema.encoding!r}: expected cdr with ros2msg")
                yield channel.topic, record, None
                continue
            try:
                yield channel.topic, record, decoder(record.data)
            except Exception as exc:  # the CDR decoder raises struct/index/value errors on bad payloads
                raise EpisodeLogError(where, channel.topic, f"message at log time {record.log_time} does not decode "
                                      f"as {schema.name}: {type(exc).__name__}: {exc}") from None


def _labels(msg: Any) -> list[tuple[str, int]]:
    return [(d.label, int(d.size)) for d in msg.layout.dim]


def read_episode(path: str | Path) -> Episode:
    """Read an episode log written by :class:`EpisodeLogWriter` (also one cut short by a crash).

    Raises :class:`EpisodeLogError` naming the file and what is wrong for a file that is not MCAP,
    not a metarl episode log, of another layout version, corrupt, or inconsistent with its robot
    spec. Recoverable problems (a truncated tail, a last step cut in half, topics we do not know)
    are listed in ``Episode.warnings`` and issued as :class:`EpisodeLogWarning`.
    """
    path = Path(path)
    where = str(path)
    if path.is_dir():
        mcaps = sorted(str(p.name) for p in path.glob("*.mcap"))
        raise EpisodeLogError(where, "", f"is a directory; give the episode's .mcap file (found here: {mcaps})")
    if not path.is_file():
        raise EpisodeLogError(where, "", "file not found")
    notes: list[str] = []
    records, finished = _scan(path, notes)
    metadata = {r.name: dict(r.metadata) for r in records if isinstance(r, Metadata)}

    episode_meta = metadata.get(META_EPISODE)
    if episode_meta is None:
        topics = sorted({r.topic for r in records if isinstance(r, Channel)})
        raise EpisodeLogError(where, META_EPISODE, f"metadata record missing: not a metarl episode log (metadata "
                              f"records: {sorted(metadata)}, topics: {topics})")
    version = episode_meta.get("schema_version")
    if version != str(EPISODE_LOG_SCHEMA_VERSION):
        raise EpisodeLogError(where, f"{META_EPISODE}.schema_version", f"is {version!r}; this reader reads version "
                              f"{EPISODE_LOG_SCHEMA_VERSION} only (written by metarl-robot "
                              f"{episode_meta.get('software_version', '?')}; read it with that version)")
    robot, robot_hash = _robot_from_metadata(metadata.get(META_ROBOT), where)
    anchors = {}
    for key in ("wall_anchor_ns", "monotonic_anchor_ns"):
        try:
            anchors[key] = int(episode_meta[key])
        except (KeyError, ValueError):
            raise EpisodeLogError(where, f"{META_EPISODE}.{key}", f"must be an integer, got "
                                  f"{episode_meta.get(key)!r}") from None
    to_controller = anchors["monotonic_anchor_ns"] - anchors["wall_anchor_ns"]

    by_topic: dict[str, dict[int, tuple[int, Any]]] = {t: {} for t in STEP_TOPICS}
    safety: list[SafetyEventRecord] = []
    diagnostics: list[DiagnosticsRecord] = []
    unknown: dict[str, int] = {}
    for topic, record, msg in _decoded(records, where):
        if topic in by_topic:
            if record.sequence in by_topic[topic]:
                raise EpisodeLogError(where, topic, f"two messages for step {record.sequence}")
            by_topic[topic][record.sequence] = (record.log_time, msg)
        elif topic == TOPIC_SAFETY:
            safety.extend(_safety_events(msg, record.log_time + to_controller, where))
        elif topic == TOPIC_DIAGNOSTICS:
            diagnostics.append(DiagnosticsRecord(record.log_time + to_controller, tuple(
                DiagnosticEntry(s.name, _level_name(s.level), s.message, s.hardware_id,
                                {kv.key: kv.value for kv in s.values}) for s in msg.status)))
        else:
            unknown[topic] = unknown.get(topic, 0) + 1
    for topic, count in sorted(unknown.items()):
        notes.append(f"ignored {count} message(s) on topic {topic!r}, which is not part of the episode log layout")

    arrays = _assemble_steps(by_topic, robot, where, notes, truncated=not finished)
    end = metadata.get(META_END)
    if finished and end is None:
        notes.append(f"the file was finished but has no {META_END!r} record")
    if end is not None and end.get("steps") != str(len(arrays["step"])):
        notes.append(f"the end record says {end.get('steps')} steps, the file holds {len(arrays['step'])}")
    for note in notes:
        warnings.warn(f"{where}: {note}", EpisodeLogWarning, stacklevel=2)

    task_json = metadata.get(META_TASK, {}).get("params_json")
    task = None if task_json is None else _json_value(task_json, where, f"{META_TASK}.params_json")
    extra = {k: _json_value(v, where, f"{META_EXTRA}.{k}") for k, v in metadata.get(META_EXTRA, {}).items()}
    return Episode(
        path=path, schema_version=EPISODE_LOG_SCHEMA_VERSION, robot=robot, robot_interface_sha256=robot_hash,
        bundle=metadata.get(META_BUNDLE), task=task, extra=extra, metadata=metadata,
        software={k: episode_meta.get(k, "unknown") for k in ("software_version", "git_commit", "created")},
        complete=finished and end is not None, end_reason="" if end is None else end.get("end_reason", ""),
        safety_events=safety, diagnostics=diagnostics, warnings=notes, **arrays)


def _robot_from_metadata(record: dict[str, str] | None, where: str) -> tuple[RobotSpec, str]:
    field_name = f"{META_ROBOT}.spec_json"
    if record is None or "spec_json" not in record:
        raise EpisodeLogError(where, field_name, "missing: the log does not say which robot it is for")
    try:
        robot = robot_from_dict(_json_value(record["spec_json"], where, field_name), f"{where}: {field_name}")
    except EpisodeLogError:
        raise
    except SpecError as exc:
        raise EpisodeLogError(where, f"{field_name}: {exc.field}", exc.problem) from None
    recorded = record.get("interface_sha256", "")
    if robot.interface_hash != recorded:
        raise EpisodeLogError(where, f"{META_ROBOT}.interface_sha256", f"the recorded spec hashes to "
                              f"{robot.interface_hash}, the record says {recorded!r}: the metadata was altered")
    return robot, recorded


def _json_value(text: str, where: str, field_name: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise EpisodeLogError(where, field_name, f"not valid JSON: {exc}") from None


def _level_name(level: Any) -> str:
    code = level[0] if isinstance(level, bytes) else int(level)
    return next((name for name, c in DIAGNOSTIC_LEVELS.items() if c == code), str(code))


def _safety_events(msg: Any, time_ns: int, where: str) -> list[SafetyEventRecord]:
    events = []
    for status in msg.status:
        values = {kv.key: kv.value for kv in status.values}
        missing = [k for k in SAFETY_KEYS if k not in values]
        if missing:
            raise EpisodeLogError(where, TOPIC_SAFETY, f"status {status.name!r} lacks keys {missing}")
        try:
            step = int(values["step"])
            state_seq = int(values["state_seq"]) if values["state_seq"] else None
        except ValueError:
            raise EpisodeLogError(where, TOPIC_SAFETY, f"status {status.name!r}: step/state_seq are not integers "
                                  f"({values['step']!r}, {values['state_seq']!r})") from None
        events.append(SafetyEventRecord(
            time_ns=time_ns, step=step, kind=values["kind"], level=_level_name(status.level), message=status.message,
            action=values["action"], state_seq=state_seq,
            values={k: v for k, v in values.items() if k not in SAFETY_KEYS}))
    return events


def _assemble_steps(by_topic: dict[str, dict[int, tuple[int, Any]]], robot: RobotSpec, where: str,
                    notes: list[str], truncated: bool) -> dict[str, Any]:
    """Per-step arrays from the step topics, checking layouts against the robot and cross-topic consistency."""
    steps = by_topic[TOPIC_STEP]
    indices = sorted(steps)
    if indices != list(range(len(indices))):
        gaps = sorted(set(range(max(indices, default=-1) + 1)) - set(indices))
        raise EpisodeLogError(where, TOPIC_STEP, f"steps are not consecutive from 0: missing {gaps[:10]}")
    all_ints = np.zeros((len(indices), len(STEP_FIELDS)), dtype=np.int64)
    for k in indices:
        _expect_layout(steps[k][1], [(f, 1) for f in STEP_FIELDS], where, TOPIC_STEP, k)
        all_ints[k] = steps[k][1].data
        if all_ints[k, 0] != k:
            raise EpisodeLogError(where, TOPIC_STEP, f"message with MCAP sequence {k} says step {all_ints[k, 0]}")
    codes = {}
    for name, table in (("command_source", COMMAND_SOURCES), ("safety_state", SAFETY_STATES)):
        codes[name] = all_ints[:, STEP_FIELDS.index(name)]
        if np.any((codes[name] < 0) | (codes[name] >= len(table))):
            raise EpisodeLogError(where, f"{TOPIC_STEP}.{name}", f"codes must be 0..{len(table) - 1}")
    nothing_sent = COMMAND_SOURCES.index("none")

    def whole(k: int) -> bool:
        sent = all_ints[k, STEP_FIELDS.index("command_source")] != nothing_sent
        return k in by_topic[TOPIC_OBSERVATION] and (k in by_topic[TOPIC_COMMAND]) == sent

    complete = len(indices)

    # A crash can split the last step's messages across the lost chunk: drop a tail step missing a part.
    while complete and not whole(complete - 1):
        complete -= 1
    if complete < len(indices):
        if not truncated:
            raise EpisodeLogError(where, TOPIC_OBSERVATION, f"step {complete}: no observation or no command")
        notes.append(f"dropped the last {len(indices) - complete} step(s) (from step {complete}): cut in half by the "
                     "end of the file")
    for topic in STEP_TOPICS:
        extra = sorted(s for s in by_topic[topic] if s >= complete)
        if extra and topic != TOPIC_STEP:
            if not truncated:
                raise EpisodeLogError(where, topic, f"messages for steps {extra[:10]} that have no {TOPIC_STEP}")
            if len(extra) > 1 or extra[0] != complete:
                raise EpisodeLogError(where, topic, f"messages for steps {extra[:10]} beyond the last step")
    n = complete

    obs_layout = [(f.name, f.size) for f in robot.measured_fields]
    action_layout = [(a.name, 1) for a in robot.action]
    ints = all_ints[:n]
    log_time = np.zeros(n, dtype=np.int64)
    obs = np.zeros((n, robot.obs_dim))
    command = np.zeros((n, robot.action_dim))
    for k in range(n):
        t = steps[k][0]
        log_time[k] = t
        if not whole(k):
            source = COMMAND_SOURCES[ints[k, STEP_FIELDS.index("command_source")]]
            raise EpisodeLogError(where, TOPIC_STEP, f"step {k}: no observation, or a command message that "
                                  f"disagrees with its command_source {source!r}")
        for topic, out, layout in ((TOPIC_OBSERVATION, obs, obs_layout), (TOPIC_COMMAND, command, action_layout)):
            if k not in by_topic[topic]:
                out[k] = np.nan  # a step on which nothing was sent
                continue
            t_other, other = by_topic[topic][k]
            _expect_same_time(t_other, t, where, topic, k)
            _expect_layout(other, layout, where, topic, k)
            out[k] = other.data
    if n > 1 and np.any(np.diff(ints[:, 1]) <= 0):
        raise EpisodeLogError(where, TOPIC_STEP, "time_ns does not strictly increase")
    codes = {name: values[:n] for name, values in codes.items()}

    task_params = _optional_blocks(by_topic[TOPIC_TASK], log_time, n, where, TOPIC_TASK, every_step=True)
    adaptation = _optional_blocks(by_topic[TOPIC_ADAPTATION], log_time, n, where, TOPIC_ADAPTATION, every_step=False)
    adapted = np.array([k in by_topic[TOPIC_ADAPTATION] for k in range(n)], dtype=bool)
    adapter_action = adaptation.pop(ADAPTER_ACTION_LABEL, np.full((n, robot.action_dim), np.nan))
    if adapter_action.shape != (n, robot.action_dim):
        raise EpisodeLogError(where, f"{TOPIC_ADAPTATION}.action", f"has size {adapter_action.shape[1]}, the robot "
                              f"has {robot.action_dim} actions")
    column = {name: ints[:, i].copy() for i, name in enumerate(STEP_FIELDS)}
    return {
        "step": column["step"], "time_ns": column["time_ns"], "log_time_ns": log_time,
        "state_seq": column["state_seq"], "robot_stamp_ns": column["robot_stamp_ns"],
        "receive_time_ns": column["receive_time_ns"], "applied_command_seq": column["applied_command_seq"],
        "obs": obs, "command": command,
        "command_seq": column["command_seq"], "command_answers_seq": column["command_answers_seq"],
        "command_expires_ns": column["command_expires_ns"],
        "command_source": np.array([COMMAND_SOURCES[c] for c in codes["command_source"]], dtype=str).reshape(n),
        "safety_state": np.array([SAFETY_STATES[c] for c in codes["safety_state"]], dtype=str).reshape(n),
        "task_params": {name: values[:, 0] for name, values in task_params.items()},
        "adapted": adapted, "adapter_action": adapter_action, "adaptation": adaptation,
    }


def _optional_blocks(messages: dict[int, tuple[int, Any]], log_time: np.ndarray, n: int, where: str, topic: str,
                     every_step: bool) -> dict[str, np.ndarray]:
    """Named blocks of a Float64MultiArray topic → (n, size) arrays, NaN on steps without a message."""
    present = [k for k in range(n) if k in messages]
    if not present:
        return {}
    if every_step and len(present) != n:
        missing = sorted(set(range(n)) - set(present))
        raise EpisodeLogError(where, topic, f"missing for steps {missing[:10]} (it is written on every step)")
    layout = _labels(messages[present[0]][1])
    out = {label: np.full((n, size), np.nan) for label, size in layout}
    for k in present:
        t, msg = messages[k]
        _expect_same_time(t, int(log_time[k]), where, topic, k)
        _expect_layout(msg, layout, where, topic, k)
        data = np.asarray(msg.data, dtype=np.float64)
        start = 0
        for label, size in layout:
            out[label][k] = data[start:start + size]
            start += size
    return out


def _expect_layout(msg: Any, layout: list[tuple[str, int]], where: str, topic: str, step: int) -> None:
    found = _labels(msg)
    if found != layout:
        raise EpisodeLogError(where, topic, f"step {step}: fields {found} differ from {layout} (robot spec / first "
                              "message)")
    if len(msg.data) != sum(size for _, size in layout):
        raise EpisodeLogError(where, topic, f"step {step}: {len(msg.data)} values for fields of total size "
                              f"{sum(size for _, size in layout)}")


def _expect_same_time(t: int, step_time: int, where: str, topic: str, step: int) -> None:
    if t != step_time:
        raise EpisodeLogError(where, topic, f"step {step}: log time {t} differs from its {TOPIC_STEP} log time "
                              f"{step_time}")


__all__ = [
    "COMMAND_SOURCES", "DEFAULT_CHUNK_SIZE", "DEFAULT_MAX_CHUNK_AGE_S", "EPISODE_LOG_SCHEMA_VERSION", "SAFETY_STATES",
    "STEP_FIELDS",
    "TOPIC_ADAPTATION", "TOPIC_COMMAND", "TOPIC_DIAGNOSTICS", "TOPIC_JOINT_STATES", "TOPIC_OBSERVATION",
    "TOPIC_SAFETY", "TOPIC_STEP", "TOPIC_TASK", "TOPIC_TYPES", "DiagnosticEntry", "DiagnosticsRecord", "Episode",
    "EpisodeLogError", "EpisodeLogWarning", "EpisodeLogWriter", "SafetyEventRecord", "concatenated_definition",
    "joint_state_map", "read_episode",
]
