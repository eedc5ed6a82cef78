"""Import hardware logs not recorded by the metarl node into the episode log format (docs/log_import.md).

Three inputs: a CSV file or an NPZ archive whose columns a mapping YAML assigns to robot.yaml's
observation and action fields, and a rosbag2 MCAP file (or bag folder) with ``sensor_msgs/JointState``
(and optionally a command topic). The output is an ordinary episode log (:mod:`metarl_robot.logs`), so
``metarl replay`` and ``metarl identify`` read it like one recorded by the node.

Nothing is lost silently: input that cannot be mapped is an :class:`LogImportError` naming the field and
the allowed values; what can be recovered (rows with NaN/Inf values, duplicate timestamps, messages off
the control grid) is dropped with an :class:`LogImportWarning` and listed in the import report, written as
JSON next to the output and into the log's ``metarl/extra`` metadata.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metarl_robot.logs.format import Episode, EpisodeLogError
from metarl_robot.logs.writer import EpisodeLogWriter, joint_state_kind
from metarl_robot.spec.robot import RobotSpec, load_robot
from metarl_robot.spec.schema import SpecError, parse_yaml

FORMATS = ("csv", "npz", "rosbag2")
"""Input formats :func:`import_log` reads."""
TIME_UNITS = {"s": 1_000_000_000, "ms": 1_000_000, "us": 1_000, "ns": 1}
"""Time-column units → nanoseconds per unit."""
IMPORTED_COMMAND_SOURCES = ("adapter", "fallback_controller", "safe_command")
"""What an imported command may be recorded as (``none`` is used where a step has no command)."""
REPORT_SUFFIX = ".import.json"
"""The import report is written to ``<out>`` with this suffix in place of ``.mcap``."""
ABSOLUTE_TIME_S = 1e9
"""Times from this many seconds up are taken as UNIX time (after 2001-09-09); smaller ones as relative."""

_TABLE_KEYS = {"format", "time", "observation", "action", "command_source", "task", "max_drop_fraction"}
_ROSBAG_KEYS = {"format", "joint_states", "command", "command_source", "task", "max_drop_fraction", "tolerance",
                "clock"}
_COLUMN_KEYS = {"column", "index", "scale", "offset", "units"}


class LogImportError(EpisodeLogError):
    """A log cannot be imported. ``where`` is the source (or mapping) file, ``field`` the field at fault."""


class LogImportWarning(UserWarning):
    """Something was dropped while importing (also listed in the import report)."""


@dataclass
class ImportReport:
    """What an import read, wrote, dropped and why (written as JSON next to the output)."""

    source: str
    """The imported file."""
    source_format: str
    """``csv``, ``npz`` or ``rosbag2``."""
    source_sha256: str
    """sha256 of the source file (of every file, concatenated in name order, for a bag folder)."""
    output: str
    """The episode log written."""
    robot: str
    """robot.yaml name."""
    samples_read: int = 0
    """Rows (CSV/NPZ) or JointState messages (rosbag2) read."""
    steps_written: int = 0
    """Steps in the episode log."""
    dropped: list[dict[str, Any]] = field(default_factory=list)
    """One entry per reason: ``reason``, ``count``, ``rows`` (source row/message indices, 0-based) and details."""
    warnings: list[str] = field(default_factory=list)
    """Every warning issued, in order."""
    period: dict[str, float] = field(default_factory=dict)
    """Step period statistics in seconds (``median``, ``min``, ``max``) beside robot.yaml's ``control_period``."""
    notes: list[str] = field(default_factory=list)
    """How fields were recorded (time base, command source, ...)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def summary(self) -> str:
        """A few lines for the terminal."""
        lines = [f"imported {self.source} ({self.source_format}) -> {self.output}: {self.steps_written} steps "
                 f"from {self.samples_read} samples"]
        if self.period:
            p = self.period
            lines.append(f"  step period median {p['median'] * 1e3:.3f} ms (min {p['min'] * 1e3:.3f},"
                         f" max {self.period['max'] * 1e3:.3f}); robot.yaml control period "
                         f"{self.period['control_period'] * 1e3:.3f} ms")
        for entry in self.dropped:
            lines.append(f"  dropped {entry['count']}: {entry['reason']}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def _warn(report: ImportReport, message: str) -> None:
    report.warnings.append(message)
    warnings.warn(message, LogImportWarning, stacklevel=3)


def _drop(report: ImportReport, reason: str, rows: list[int], **details: Any) -> None:
    if not rows:
        return
    report.dropped.append({"reason": reason, "count": len(rows), "rows": [int(r) for r in rows], **details})
    shown = ", ".join(str(r) for r in rows[:10]) + (", ..." if len(rows) > 10 else "")
    _warn(report, f"{report.source}: dropped {len(rows)} sample(s): {reason} (rows {shown})")


# ---- mapping --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ColumnSpec:
    """One value of a robot.yaml field taken from one source column: ``value = raw * scale + offset``."""

    column: str
    """Column name (CSV header, NPZ array key)."""
    index: int | None = None
    """Column of a 2-D NPZ array (None: the array is 1-D)."""
    scale: float = 1.0
    """Multiplier applied to the raw value."""
    offset: float = 0.0
    """Added after scaling."""


def _number(value: Any, where: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise LogImportError(where, name, f"must be a finite number, got {value!r}")
    return float(value)


def _check_keys(data: Any, allowed: set[str], where: str, name: str) -> dict:
    if not isinstance(data, dict):
        raise LogImportError(where, name, f"must be a mapping with keys {sorted(allowed)}, got {data!r}")
    unknown = sorted(set(map(str, data)) - allowed)
    if unknown:
        raise LogImportError(where, f"{name}.{unknown[0]}" if name else unknown[0],
                             f"unknown key; allowed: {sorted(allowed)}")
    return data


def _columns(spec: Any, size: int, units: str, where: str, name: str) -> list[ColumnSpec]:
    """Parse a field's column spec (a name, a ``{column, ...}`` mapping, or a list of them) into ``size`` columns."""
    items = spec if isinstance(spec, list) else [spec]
    if len(items) == 1 and isinstance(items[0], dict) and size > 1 and "index" not in items[0]:
        # One 2-D NPZ array for a whole multi-value field: its columns 0..size-1.
        items = [{**items[0], "index": i} for i in range(size)]
    elif len(items) == 1 and isinstance(items[0], str) and size > 1:
        items = [{"column": items[0], "index": i} for i in range(size)]
    if len(items) != size:
        raise LogImportError(where, name, f"robot.yaml says size {size}, the mapping gives {len(items)} column(s)")
    out = []
    for i, item in enumerate(items):
        at = f"{name}[{i}]" if size > 1 or isinstance(spec, list) else name
        if isinstance(item, str):
            item = {"column": item}
        item = _check_keys(item, _COLUMN_KEYS, where, at)
        if not isinstance(item.get("column"), str) or not item["column"]:
            raise LogImportError(where, f"{at}.column", f"must name a column, got {item.get('column')!r}")
        scale = _number(item.get("scale", 1.0), where, f"{at}.scale")
        offset = _number(item.get("offset", 0.0), where, f"{at}.offset")
        given_units = item.get("units")
        if given_units is not None and str(given_units) != units and "scale" not in item and "offset" not in item:
            raise LogImportError(where, f"{at}.units", f"the column is in {given_units!r} but robot.yaml "
                                 f"wants {units!r}; give scale/offset converting it "
                                 "(e.g. deg -> rad: scale 0.017453292519943295)")
        index = item.get("index")
        if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
            raise LogImportError(where, f"{at}.index", f"must be a column number >= 0, got {index!r}")
        out.append(ColumnSpec(item["column"], index, scale, offset))
    return out


@dataclass(frozen=True)
class TableMapping:
    """A CSV/NPZ mapping: the time column and the columns of every observation and action value."""

    time: ColumnSpec
    """The time column (``scale``: nanoseconds per unit)."""
    observation: list[ColumnSpec]
    """obs_dim columns, in robot.yaml observation order."""
    action: list[ColumnSpec] | None
    """action_dim columns in action-field order, or None (no command in the log)."""
    command_source: str
    """What the commands are recorded as (:data:`IMPORTED_COMMAND_SOURCES`)."""
    task: dict[str, float] | None
    """The true task parameters, if known."""
    max_drop_fraction: float
    """The import fails if more than this fraction of samples would be dropped."""
    raw: dict[str, Any]
    """The mapping as read (kept in the log's metadata)."""


def _common(data: dict, where: str) -> tuple[str, dict[str, float] | None, float]:
    source = data.get("command_source", "adapter")
    if source not in IMPORTED_COMMAND_SOURCES:
        raise LogImportError(where, "command_source", f"must be one of {list(IMPORTED_COMMAND_SOURCES)}, "
                             f"got {source!r}")
    task = data.get("task")
    if task is not None:
        if not isinstance(task, dict):
            raise LogImportError(where, "task", f"must map parameter names to numbers, got {task!r}")
        task = {str(k): _number(v, where, f"task.{k}") for k, v in task.items()}
    fraction = _number(data.get("max_drop_fraction", 0.1), where, "max_drop_fraction")
    if not 0 <= fraction <= 1:
        raise LogImportError(where, "max_drop_fraction", f"must be in [0, 1], got {fraction}")
    return source, task, fraction


def parse_table_mapping(data: Any, robot: RobotSpec, where: str = "mapping") -> TableMapping:
    """Validate a CSV/NPZ mapping (docs/log_import.md) against ``robot``."""
    data = _check_keys(data, _TABLE_KEYS, where, "")
    time_spec = data.get("time")
    if time_spec is None:
        raise LogImportError(where, "time", "missing: give {column: <name>, units: s|ms|us|ns}")
    if isinstance(time_spec, str):
        time_spec = {"column": time_spec}
    time_spec = _check_keys(time_spec, {"column", "units"}, where, "time")
    units = time_spec.get("units", "s")
    if units not in TIME_UNITS:
        raise LogImportError(where, "time.units", f"must be one of {list(TIME_UNITS)}, got {units!r}")
    if not isinstance(time_spec.get("column"), str):
        raise LogImportError(where, "time.column", f"must name a column, got {time_spec.get('column')!r}")
    time_col = ColumnSpec(time_spec["column"], scale=float(TIME_UNITS[units]))

    obs_map = data.get("observation")
    fields = {f.name: f for f in robot.measured_fields}
    if not isinstance(obs_map, dict):
        raise LogImportError(where, "observation", f"must map robot.yaml observation fields {list(fields)} to columns")
    unknown = [k for k in obs_map if k not in fields]
    if unknown:
        raise LogImportError(where, f"observation.{unknown[0]}", f"not an observation field of robot "
                             f"{robot.name!r}; allowed: {list(fields)}")
    missing = [name for name in fields if name not in obs_map]
    if missing:
        raise LogImportError(where, f"observation.{missing[0]}", f"missing: every measured field of robot "
                             f"{robot.name!r} needs a column ({list(fields)})")
    observation = [c for name, f in fields.items()
                   for c in _columns(obs_map[name], f.size, f.units, where, f"observation.{name}")]

    action = None
    act_map = data.get("action")
    if act_map is not None:
        names = [a.name for a in robot.action]
        if not isinstance(act_map, dict):
            raise LogImportError(where, "action", f"must map robot.yaml action fields {names} to columns")
        bad = [k for k in act_map if k not in names]
        if bad:
            raise LogImportError(where, f"action.{bad[0]}", f"not an action field of robot {robot.name!r}; "
                                 f"allowed: {names}")
        absent = [n for n in names if n not in act_map]
        if absent:
            raise LogImportError(where, f"action.{absent[0]}", f"missing: map all action fields {names} or none")
        action = [c for a in robot.action for c in _columns(act_map[a.name], 1, a.units, where, f"action.{a.name}")]
    source, task, fraction = _common(data, where)
    return TableMapping(time_col, observation, action, source, task, fraction, data)


# ---- reading tables -------------------------------------------------------------------------------------
def _read_csv(path: Path) -> dict[str, np.ndarray]:
    where = str(path)
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise LogImportError(where, "", "empty file: expected a header row of column names") from None
        rows = list(reader)
    if len(set(header)) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise LogImportError(where, "header", f"duplicate column names {dup}")
    values = np.full((len(rows), len(header)), np.nan)
    for r, row in enumerate(rows):
        if len(row) != len(header):
            raise LogImportError(where, f"row {r}", f"has {len(row)} values, the header {len(header)} (line {r + 2})")
        for c, text in enumerate(row):
            text = text.strip()
            if text == "" or text.lower() in ("nan", "na", "null"):
                continue  # a missing value is a NaN: the row is dropped and reported below
            try:
                values[r, c] = float(text)
            except ValueError:
                raise LogImportError(where, f"{header[c]} (line {r + 2})", f"not a number: {text!r}") from None
    return {name: values[:, c] for c, name in enumerate(header)}


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {k: np.asarray(archive[k]) for k in archive.files}
    except (OSError, ValueError) as exc:
        raise LogImportError(str(path), "", f"not a readable NPZ archive: {exc}") from None


def _column(table: dict[str, np.ndarray], spec: ColumnSpec, rows: int | None, where: str, name: str) -> np.ndarray:
    if spec.column not in table:
        raise LogImportError(where, name, f"column {spec.column!r} not in the file; columns: {sorted(table)}")
    arr = table[spec.column]
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
        raise LogImportError(where, name, f"column {spec.column!r} is not numeric (dtype {arr.dtype})")
    if spec.index is None:
        if arr.ndim != 1:
            raise LogImportError(where, name, f"column {spec.column!r} has shape {arr.shape}: give `index` for a "
                                 f"2-D array (0..{arr.shape[-1] - 1})")
    else:
        if arr.ndim != 2 or spec.index >= arr.shape[1]:
            raise LogImportError(where, f"{name}.index", f"{spec.index} out of range for column {spec.column!r} of "
                                 f"shape {arr.shape}" + (f" (allowed 0..{arr.shape[1] - 1})" if arr.ndim == 2 else ""))
        arr = arr[:, spec.index]
    if rows is not None and len(arr) != rows:
        raise LogImportError(where, name, f"column {spec.column!r} has {len(arr)} rows, the time column {rows}")
    return arr.astype(np.float64) * spec.scale + spec.offset


def _clean_steps(report: ImportReport, where: str, t_ns: np.ndarray, values: dict[str, np.ndarray],
                 max_drop_fraction: float) -> np.ndarray:
    """Indices of the samples to keep: finite values, strictly increasing time; drops are reported, errors raised."""
    n = len(t_ns)
    keep = np.ones(n, dtype=bool)
    bad_names: dict[int, list[str]] = {}
    for name, arr in values.items():
        for r in np.flatnonzero(~np.isfinite(arr)):
            bad_names.setdefault(int(r), []).append(name)
    nan_rows = sorted(bad_names)
    keep[nan_rows] = False
    columns = sorted({c for names in bad_names.values() for c in names})
    _drop(report, "NaN/Inf or missing value", nan_rows, fields=columns)
    kept = np.flatnonzero(keep)
    dup_rows = []
    last: int | None = None
    for r in kept:
        if last is not None:
            if t_ns[r] == t_ns[last]:
                dup_rows.append(int(r))
                keep[r] = False
                continue
            if t_ns[r] < t_ns[last]:
                raise LogImportError(where, "time", f"not monotonic: sample {r} has time {float(t_ns[r]) / 1e9!r} s, "
                                     f"before sample {last}'s {float(t_ns[last]) / 1e9!r} s; sort the log or fix "
                                     "its clock")
        last = int(r)
    _drop(report, "duplicate timestamp (the first sample with that time is kept)", dup_rows)
    kept = np.flatnonzero(keep)
    dropped = n - len(kept)
    if len(kept) < 2:
        raise LogImportError(where, "", f"{len(kept)} usable sample(s) of {n}: need at least 2 "
                             f"(see the dropped samples above)")
    if dropped > max_drop_fraction * n:
        raise LogImportError(where, "max_drop_fraction", f"{dropped} of {n} samples would be dropped "
                             f"({dropped / n:.1%} > {max_drop_fraction:.1%}); fix the log or raise max_drop_fraction "
                             "in the mapping. Reasons: "
                             + "; ".join(f"{d['count']} {d['reason']}" for d in report.dropped))
    return kept


def _period_stats(report: ImportReport, robot: RobotSpec, t_ns: np.ndarray, warn: bool) -> None:
    """Period statistics of the kept samples' own times; ``warn``: the steps keep those times (CSV/NPZ)."""
    period = np.diff(t_ns) / 1e9
    report.period = {"median": float(np.median(period)), "min": float(period.min()), "max": float(period.max()),
                     "control_period": float(robot.ctrl_dt)}
    if warn and abs(report.period["median"] - robot.ctrl_dt) > 0.05 * robot.ctrl_dt:
        _warn(report, f"{report.source}: median step period {report.period['median']!r} s differs from robot.yaml's "
              f"control period {robot.ctrl_dt!r} s by more than 5%; steps are taken as logged (replay and "
              "identification assume the control period)")


# ---- rosbag2 --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RosbagMapping:
    """A rosbag2 mapping: where the joints and (optionally) the commands are."""

    joint_topic: str | None
    """The JointState topic (None: the only JointState topic in the bag)."""
    joint_names: dict[str, str]
    """robot.yaml joint → name in the bag's JointState messages."""
    command_topic: str | None
    """Topic with the commands (Float64MultiArray ``data`` or JointState ``effort``/``position``/``velocity``)."""
    command_field: str
    """Field of the command message holding the values."""
    command_index: list[int | str]
    """Per action field: the index in the field (Float64MultiArray) or the joint name (JointState)."""
    command_scale: list[float]
    """Per action field: multiplier."""
    command_offset: list[float]
    """Per action field: added after scaling."""
    tolerance: float
    """Largest distance of a message from its control-grid time, as a fraction of the control period."""
    clock: str
    """``header`` (JointState ``header.stamp``) or ``log`` (the bag's receive time)."""
    command_source: str
    """What the commands are recorded as."""
    task: dict[str, float] | None
    """True task parameters, if known."""
    max_drop_fraction: float
    """The import fails if more than this fraction of messages would be dropped."""
    raw: dict[str, Any]
    """The mapping as read."""


def parse_rosbag_mapping(data: Any, robot: RobotSpec, where: str = "mapping") -> RosbagMapping:
    """Validate a rosbag2 mapping (all keys optional; docs/log_import.md) against ``robot``."""
    data = _check_keys(data or {}, _ROSBAG_KEYS, where, "")
    js = _check_keys(data.get("joint_states") or {}, {"topic", "joints"}, where, "joint_states")
    joints = js.get("joints") or {}
    if not isinstance(joints, dict):
        raise LogImportError(where, "joint_states.joints", "must map robot.yaml joint names to names in the bag")
    for j in joints:
        if j not in robot.joints:
            raise LogImportError(where, f"joint_states.joints.{j}", f"unknown joint; robot {robot.name!r} has "
                                 f"{list(robot.joints)}")
    names = {j: str(joints.get(j, j)) for j in robot.joints}
    cmd = _check_keys(data.get("command") or {}, {"topic", "field", "index", "scale", "offset"}, where, "command")
    n_act = robot.action_dim
    field_name = cmd.get("field", "data")
    if field_name not in ("data", "effort", "position", "velocity"):
        raise LogImportError(where, "command.field", f"must be one of ['data', 'effort', 'position', 'velocity'], "
                             f"got {field_name!r}")
    default_index: list[int | str] = (list(range(n_act)) if field_name == "data"
                                      else [robot.action[i].actuator for i in range(n_act)])
    index = cmd.get("index", default_index)

    def per_action(value: Any, key: str, default: float) -> list[float]:
        values = [default] * n_act if value is None else value if isinstance(value, list) else [value] * n_act
        if len(values) != n_act:
            raise LogImportError(where, f"command.{key}", f"needs {n_act} value(s) (action fields "
                                 f"{[a.name for a in robot.action]}), got {len(values)}")
        return [_number(v, where, f"command.{key}") for v in values]

    if not isinstance(index, list) or len(index) != n_act:
        raise LogImportError(where, "command.index", f"needs a list of {n_act} entries (one per action field "
                             f"{[a.name for a in robot.action]}), got {index!r}")
    tolerance = _number(data.get("tolerance", 0.25), where, "tolerance")
    if not 0 < tolerance < 0.5:
        raise LogImportError(where, "tolerance", f"must be in (0, 0.5) control periods, got {tolerance}")
    clock = data.get("clock", "header")
    if clock not in ("header", "log"):
        raise LogImportError(where, "clock", f"must be 'header' or 'log', got {clock!r}")
    source, task, fraction = _common(data, where)
    return RosbagMapping(js.get("topic"), names, cmd.get("topic"), field_name, index,
                         per_action(cmd.get("scale"), "scale", 1.0), per_action(cmd.get("offset"), "offset", 0.0),
                         tolerance, clock, source, task, fraction, data)


def _obs_from_joints(robot: RobotSpec, where: str) -> list[tuple[str, str, int]]:
    """Per observation value: (``position``|``velocity``, robot joint, obs index); errors for other sources."""
    out = []
    for f in robot.measured_fields:
        kind = joint_state_kind(f)
        if kind is None:
            raise LogImportError(where, f"observation.{f.name}", f"source {f.source.kind} {f.source.names} is not one "
                                 "value per hinge/slide joint, so sensor_msgs/JointState cannot give it; import this "
                                 "robot from CSV/NPZ instead")
        start = robot.obs_slices[f.name].start
        out.extend((kind, joint, start + i) for i, joint in enumerate(f.source.names))
    return out


def _read_rosbag(path: Path, robot: RobotSpec, mapping: RosbagMapping, report: ImportReport
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(grid time ns, message stamp ns, grid period index, obs, command or None) on robot.yaml's control grid."""
    from rosbags.highlevel import AnyReader

    where = str(path)
    sources = _obs_from_joints(robot, where)
    try:
        reader_cm = AnyReader([path])
        reader = reader_cm.__enter__()
    except Exception as exc:  # rosbags raises several unrelated types for unreadable input
        raise LogImportError(where, "", f"not a readable rosbag2 bag (MCAP file or bag folder): {exc}") from None
    try:
        joint_conns = [c for c in reader.connections if c.msgtype == "sensor_msgs/msg/JointState"]
        topics = sorted({(c.topic, c.msgtype) for c in reader.connections})
        if mapping.joint_topic is not None:
            joint_conns = [c for c in joint_conns if c.topic == mapping.joint_topic]
            if not joint_conns:
                raise LogImportError(where, "joint_states.topic", f"no sensor_msgs/msg/JointState topic "
                                     f"{mapping.joint_topic!r}; topics in the bag: {topics}")
        elif len({c.topic for c in joint_conns}) != 1:
            raise LogImportError(where, "joint_states.topic", f"{len({c.topic for c in joint_conns})} JointState "
                                 f"topics; name one in the mapping. Topics in the bag: {topics}")
        cmd_conns = []
        if mapping.command_topic is not None:
            cmd_conns = [c for c in reader.connections if c.topic == mapping.command_topic]
            allowed = ("std_msgs/msg/Float64MultiArray", "sensor_msgs/msg/JointState")
            if not cmd_conns or cmd_conns[0].msgtype not in allowed:
                raise LogImportError(where, "command.topic", f"{mapping.command_topic!r} must be a topic of type "
                                     f"{list(allowed)}; topics in the bag: {topics}")
        times, obs_rows, cmd_times, cmd_rows = [], [], [], []
        sample = 0
        for conn, log_time, raw in reader.messages(connections=joint_conns + cmd_conns):
            msg = reader.deserialize(raw, conn.msgtype)
            if conn in cmd_conns:
                cmd_times.append(int(log_time) if mapping.clock == "log" or conn.msgtype != "sensor_msgs/msg/JointState"
                                 else _stamp(msg, log_time))
                cmd_rows.append(_command_values(msg, conn.msgtype, mapping, where))
                if conn not in joint_conns:
                    continue
            names = list(msg.name)
            row = np.full(robot.obs_dim, np.nan)
            for kind, joint, i in sources:
                bag_name = mapping.joint_names[joint]
                if bag_name not in names:
                    raise LogImportError(where, f"joint_states.joints.{joint}", f"joint {bag_name!r} is not in the "
                                         f"JointState message {sample} (names {names}); map it in the mapping's "
                                         "joint_states.joints")
                values = getattr(msg, kind)
                if len(values) != len(names):
                    raise LogImportError(where, f"{conn.topic}.{kind}", f"message {sample} has {len(values)} {kind} "
                                         f"values for {len(names)} names; observation field needs {kind} of {joint!r}")
                row[i] = values[names.index(bag_name)]
            times.append(int(log_time) if mapping.clock == "log" else _stamp(msg, log_time))
            obs_rows.append(row)
            sample += 1
    finally:
        reader_cm.__exit__(None, None, None)
    report.samples_read = len(times)
    if not times:
        raise LogImportError(where, "joint_states", "no JointState messages")
    t = np.asarray(times, dtype=np.int64)
    obs = np.asarray(obs_rows)
    order = np.argsort(t, kind="stable")
    if not np.array_equal(order, np.arange(len(t))):
        _warn(report, f"{where}: JointState stamps are not in bag order; sorted by stamp")
        t, obs = t[order], obs[order]
    columns = {f"observation[{i}] ({joint} {kind})": obs[:, i] for kind, joint, i in sources}
    kept = _clean_steps(report, where, t, columns, mapping.max_drop_fraction)
    t, obs, sample_index = t[kept], obs[kept], order[kept]

    # Align to the control grid t0 + k * period: each grid point takes the nearest message within tolerance.
    period_ns = round(robot.ctrl_dt * 1e9)
    k = np.round((t - t[0]) / period_ns).astype(np.int64)
    off = np.abs(t - (t[0] + k * period_ns))
    within = off <= mapping.tolerance * period_ns
    chosen: dict[int, int] = {}
    for i in np.flatnonzero(within):
        if int(k[i]) not in chosen or off[i] < off[chosen[int(k[i])]]:
            chosen[int(k[i])] = int(i)
    used = sorted(chosen.values())
    # Not counted against max_drop_fraction: a bag recorded faster than the control rate is downsampled by design.
    _drop(report, f"not the message nearest a control-grid time t0 + k*{robot.ctrl_dt} s within {mapping.tolerance} "
          "periods (downsampled to robot.yaml's control period)",
          [int(sample_index[i]) for i in sorted(set(range(len(t))) - set(used))])
    grid = np.array(sorted(chosen), dtype=np.int64)
    missing = sorted(set(range(int(grid[-1]) + 1)) - set(grid.tolist()))
    if missing:
        report.dropped.append({"reason": "control periods without a JointState message (a gap in the steps)",
                               "count": len(missing), "periods": missing})
        _warn(report, f"{where}: {len(missing)} control period(s) have no JointState message within tolerance; "
              f"those steps are absent (state_seq jumps there)")
    grid_t = t[0] + grid * period_ns
    commands = None
    if mapping.command_topic is not None:
        commands = np.full((len(grid_t), robot.action_dim), np.nan)
        if cmd_times:
            ct = np.asarray(cmd_times, dtype=np.int64)
            corder = np.argsort(ct, kind="stable")
            ct, cv = ct[corder], np.asarray(cmd_rows)[corder]
            # Zero-order hold: the command in force at a step is the latest one at or before the step's JointState.
            pos = np.searchsorted(ct, t[used], side="right") - 1
            commands[pos >= 0] = cv[pos[pos >= 0]]
        before = int((np.isnan(commands).any(axis=1)).sum())
        if before:
            report.notes.append(f"{before} step(s) before the first command on {mapping.command_topic} are recorded "
                                "with command_source 'none'")
    # state_seq counts control periods, so a period with no message is a jump of one frame.
    return grid_t, t[used], grid, obs[used], commands


def _stamp(msg: Any, log_time: int) -> int:
    stamp = msg.header.stamp
    value = int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)
    return value if value > 0 else int(log_time)


def _command_values(msg: Any, msgtype: str, mapping: RosbagMapping, where: str) -> np.ndarray:
    if msgtype == "std_msgs/msg/Float64MultiArray":
        data = list(msg.data)
        out = []
        for i, idx in enumerate(mapping.command_index):
            if not isinstance(idx, int) or not 0 <= idx < len(data):
                raise LogImportError(where, f"command.index[{i}]", f"{idx!r} out of range for a Float64MultiArray of "
                                     f"{len(data)} values (allowed 0..{len(data) - 1})")
            out.append(data[idx])
    else:
        names = list(msg.name)
        values = list(getattr(msg, mapping.command_field))
        out = []
        for i, idx in enumerate(mapping.command_index):
            if idx not in names or len(values) != len(names):
                raise LogImportError(where, f"command.index[{i}]", f"joint {idx!r} has no {mapping.command_field} "
                                     f"value in the command JointState (names {names})")
            out.append(values[names.index(idx)])
    return np.asarray(out, dtype=np.float64) * np.asarray(mapping.command_scale) + np.asarray(mapping.command_offset)


# ---- the import -----------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        digest.update(p.read_bytes())
    return digest.hexdigest()


def _detect_format(path: Path) -> str:
    if path.is_dir() or path.suffix == ".mcap":
        return "rosbag2"
    if path.suffix in (".csv", ".npz"):
        return path.suffix[1:]
    raise LogImportError(str(path), "format", f"cannot tell the format from {path.name!r}; pass one of {list(FORMATS)}")


def import_log(source: str | Path, robot: RobotSpec | str, out: str | Path, *, mapping: dict | str | Path | None = None,
               format: str | None = None) -> ImportReport:
    """Convert ``source`` into the episode log ``out`` (must not exist) and write ``out``'s import report.

    ``robot``: a :class:`RobotSpec` or a robot name/robot.yaml path. ``mapping``: the mapping (a dict or a YAML
    path; required for csv/npz, optional for rosbag2). ``format``: one of :data:`FORMATS` (default: from the
    file name). Raises :class:`LogImportError` for input that cannot be imported; issues :class:`LogImportWarning`
    for everything dropped. Returns the report (also at ``out`` with :data:`REPORT_SUFFIX`).
    """
    source, out = Path(source), Path(out)
    spec = robot if isinstance(robot, RobotSpec) else load_robot(robot)
    if not source.exists():
        raise LogImportError(str(source), "", "no such file")
    fmt = format or _detect_format(source)
    if fmt not in FORMATS:
        raise LogImportError(str(source), "format", f"must be one of {list(FORMATS)}, got {fmt!r}")
    if out.exists():
        raise LogImportError(str(out), "out", "already exists; every episode needs a new file")
    map_where = "mapping"
    if isinstance(mapping, str | Path):
        map_where = str(mapping)
        try:
            mapping = parse_yaml(Path(mapping).read_text(), map_where)
        except (OSError, SpecError) as exc:
            raise LogImportError(map_where, "", f"cannot read the mapping: {exc}") from None
    report = ImportReport(str(source), fmt, _sha256(source), str(out), spec.name)
    where = str(source)

    if fmt == "rosbag2":
        rmap = parse_rosbag_mapping(mapping, spec, map_where)
        t_ns, stamps, rows, obs, commands = _read_rosbag(source, spec, rmap, report)
        source_name, task, raw = rmap.command_source, rmap.task, rmap.raw
        report.notes.append(f"steps on robot.yaml's control grid ({spec.ctrl_dt} s, tolerance {rmap.tolerance} "
                            f"periods) from the JointState {'header stamps' if rmap.clock == 'header' else 'log times'}"
                            "; commands held from the latest command message at or before each step")
    else:
        if mapping is None:
            raise LogImportError(str(source), "mapping", f"a {fmt} log needs a mapping (--mapping mapping.yaml); "
                                 "see docs/log_import.md")
        tmap = parse_table_mapping(mapping, spec, map_where)
        table = _read_csv(source) if fmt == "csv" else _read_npz(source)
        t_raw = _column(table, tmap.time, None, where, "time")
        n = len(t_raw)
        report.samples_read = n
        obs_all = np.stack([_column(table, c, n, where, f"observation[{i}]") for i, c in enumerate(tmap.observation)],
                           axis=1) if n else np.zeros((0, spec.obs_dim))
        cmd_all = (np.stack([_column(table, c, n, where, f"action[{i}]") for i, c in enumerate(tmap.action)], axis=1)
                   if tmap.action is not None else None)
        values = {"time": t_raw}
        names = [f"{f.name}[{i}]" if f.size > 1 else f.name for f in spec.measured_fields for i in range(f.size)]
        values.update({f"observation.{name} ({c.column})": obs_all[:, i]
                       for i, (name, c) in enumerate(zip(names, tmap.observation, strict=True))})
        if cmd_all is not None:
            values.update({f"action.{a.name} ({c.column})": cmd_all[:, i]
                           for i, (a, c) in enumerate(zip(spec.action, tmap.action, strict=True))})
        t_finite = np.where(np.isfinite(t_raw), t_raw, 0.0)
        t_all = np.round(t_finite).astype(np.int64)  # _column scaled it to ns
        kept = _clean_steps(report, where, t_all, values, tmap.max_drop_fraction)
        t_ns, rows, obs = t_all[kept], kept, obs_all[kept]
        stamps = t_ns
        commands = cmd_all[kept] if cmd_all is not None else None
        source_name, task, raw = tmap.command_source, tmap.task, tmap.raw
        report.notes.append("one step per kept row, at the row's time")
    _period_stats(report, spec, stamps, warn=fmt != "rosbag2")
    if commands is not None:
        _check_command_range(report, spec, commands)
    else:
        report.notes.append("no command in the source: every step has command_source 'none' (command NaN)")

    absolute = t_ns[0] / 1e9 >= ABSOLUTE_TIME_S
    wall_anchor = int(t_ns[0]) if absolute else time.time_ns()
    report.notes.append("time_ns = source time - first step's time (ns); log times = " +
                        ("the source's UNIX times" if absolute else "the import time + that offset (the source time "
                         "is relative)") + "; robot_stamp_ns = source time; state_seq = "
                        + ("control period index + 1" if fmt == "rosbag2" else "source row index + 1"))
    if commands is not None:
        report.notes.append(f"commands recorded with command_source {source_name!r} (a controller outside metarl; "
                            "no adapter ran: adapted is False on every step, and there is no bundle)")
    report.steps_written = len(t_ns)
    extra = {"import_source": {"path": str(source.resolve()), "format": fmt, "sha256": report.source_sha256,
                               "importer": __name__},
             "import_mapping": raw if raw is not None else {},
             "import_report": {"samples_read": report.samples_read, "steps_written": report.steps_written,
                               "dropped": [{k: v for k, v in d.items() if k != "rows"} for d in report.dropped],
                               "notes": report.notes}}
    out.parent.mkdir(parents=True, exist_ok=True)
    start = int(t_ns[0])
    log = EpisodeLogWriter(out, spec, task=task, extra_metadata=extra, clock_anchor=(wall_anchor, 0))
    try:
        for i in range(len(t_ns)):
            rel = int(t_ns[i]) - start
            cmd = None if commands is None or np.isnan(commands[i]).any() else commands[i]
            log.write_step(obs=obs[i], state_seq=int(rows[i]) + 1, robot_stamp_ns=int(stamps[i]),
                           receive_time_ns=rel, command=cmd, command_seq=None if cmd is None else i + 1,
                           command_source="none" if cmd is None else source_name, time_ns=rel)
    except BaseException:
        log.close("import failed")
        out.unlink()  # a half-written import is no episode: leave nothing behind
        raise
    log.close()
    report_path = out.with_suffix(REPORT_SUFFIX)
    report_path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _check_command_range(report: ImportReport, robot: RobotSpec, commands: np.ndarray) -> None:
    """Commands outside robot.yaml's limits are kept (they are what was sent) but reported: a scale may be wrong."""
    finite = np.where(np.isnan(commands), 0.0, commands)
    for j, a in enumerate(robot.action):
        outside = np.flatnonzero((finite[:, j] < a.low) | (finite[:, j] > a.high))
        if len(outside):
            _warn(report, f"{report.source}: {len(outside)} command(s) of action {a.name!r} outside robot.yaml's "
                  f"[{a.low}, {a.high}] ({a.units}), e.g. {commands[outside[0], j]!r}; kept as logged -- check the "
                  "mapping's scale/offset")


def import_source(episode: Episode) -> dict[str, Any] | None:
    """Where an imported episode came from (``path``, ``format``, ``sha256``, ``importer``); None for a node's log.

    Imported logs have no adapter steps (``adapted`` is False throughout): a replay that wants to run a bundle
    over one must treat its steps with finite observations as the usable frames.
    """
    source = episode.extra.get("import_source")
    return source if isinstance(source, dict) and source.get("importer") == __name__ else None


def run_cli(args: Any) -> int:
    """``metarl import-log``: import, print the report summary, return the exit code."""
    out = Path(args.out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LogImportWarning)  # the summary below lists every drop
        report = import_log(args.file, args.robot, out, mapping=args.mapping, format=args.format)
    print(report.summary())
    for w in report.warnings:
        print(f"warning: {w}")
    print(f"wrote {out} and {out.with_suffix(REPORT_SUFFIX)}")
    return 0
