"""Reading an episode log back: :func:`read_episode` (format: :mod:`.format`), also a file cut short by a crash.

Shadow replay, real-to-sim identification and the reports build on it. The file is scanned record by
record (:func:`_scan`), so every complete chunk of a file that was never closed is read, with a warning
saying what was dropped.

Robot-side module: numpy, mcap and mcap-ros2-support only (no torch, no MuJoCo, no ROS install).
"""

from __future__ import annotations

import io
import json
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from mcap.exceptions import EndOfFile
from mcap.opcode import Opcode
from mcap.records import Attachment, Channel, Footer, Message, Metadata, Schema
from mcap.stream_reader import StreamReader
from mcap_ros2.decoder import DecoderFactory

from metarl_robot.logs.format import (
    ADAPTER_ACTION_LABEL,
    ADAPTER_STATE_ATTACHMENT,
    COMMAND_SOURCES,
    COMPUTE_FIELDS,
    DIAGNOSTIC_LEVELS,
    META_BUNDLE,
    META_END,
    META_EPISODE,
    META_EXTRA,
    META_ROBOT,
    META_TASK,
    NOT_TIMED,
    READABLE_SCHEMA_VERSIONS,
    SAFETY_KEYS,
    SAFETY_STATES,
    STEP_FIELDS,
    STEP_FIELDS_BY_VERSION,
    STEP_TOPICS,
    TOPIC_ADAPTATION,
    TOPIC_COMMAND,
    TOPIC_DIAGNOSTICS,
    TOPIC_OBSERVATION,
    TOPIC_SAFETY,
    TOPIC_STEP,
    TOPIC_TASK,
    TOPIC_TYPES,
    DiagnosticEntry,
    DiagnosticsRecord,
    Episode,
    EpisodeLogError,
    EpisodeLogWarning,
    SafetyEventRecord,
)
from metarl_robot.spec.robot import RobotSpec, robot_from_dict
from metarl_robot.spec.schema import SpecError

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

    Reads every layout version in :data:`READABLE_SCHEMA_VERSIONS`; the fields an older version lacks read as their
    "not logged" value (the compute times of a version-1 log: :data:`NOT_TIMED`).
    Raises :class:`EpisodeLogError` naming the file and what is wrong for a file that is not MCAP,
    not a metarl episode log, of a version this reader does not know, corrupt, or inconsistent with its robot
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
    readable = {str(v): v for v in READABLE_SCHEMA_VERSIONS}
    if version not in readable:
        raise EpisodeLogError(where, f"{META_EPISODE}.schema_version", f"is {version!r}; this reader reads versions "
                              f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))} (written by metarl-robot "
                              f"{episode_meta.get('software_version', '?')}; read it with that version or later)")
    schema_version = readable[version]
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

    arrays = _assemble_steps(by_topic, robot, where, notes, truncated=not finished,
                             fields=STEP_FIELDS_BY_VERSION[schema_version])
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
    attachments = {r.name: r.data for r in records if isinstance(r, Attachment)}
    adapter_state = _adapter_state(attachments.get(ADAPTER_STATE_ATTACHMENT), where)
    return Episode(
        path=path, schema_version=schema_version, robot=robot, robot_interface_sha256=robot_hash,
        bundle=metadata.get(META_BUNDLE), task=task, extra=extra, metadata=metadata,
        software={k: episode_meta.get(k, "unknown") for k in ("software_version", "git_commit", "created")},
        complete=finished and end is not None, end_reason="" if end is None else end.get("end_reason", ""),
        safety_events=safety, diagnostics=diagnostics, warnings=notes, adapter_state=adapter_state, **arrays)


def _adapter_state(data: bytes | None, where: str) -> dict[str, np.ndarray]:
    """The adapter state attachment's arrays (empty without one); loaded without pickle."""
    if data is None:
        return {}
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise EpisodeLogError(where, ADAPTER_STATE_ATTACHMENT, f"not a numpy .npz of arrays: {exc}") from None


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
                    notes: list[str], truncated: bool, fields: tuple[str, ...] = STEP_FIELDS) -> dict[str, Any]:
    """Per-step arrays from the step topics, checking layouts against the robot and cross-topic consistency.
    ``fields``: the ``/metarl/step`` labels of the file's version; the columns of later versions it lacks read as
    their "not logged" value."""
    steps = by_topic[TOPIC_STEP]
    indices = sorted(steps)
    if indices != list(range(len(indices))):
        gaps = sorted(set(range(max(indices, default=-1) + 1)) - set(indices))
        raise EpisodeLogError(where, TOPIC_STEP, f"steps are not consecutive from 0: missing {gaps[:10]}")
    # An older version's fields are a prefix of today's (versions only append): fill the rest as not logged.
    all_ints = np.zeros((len(indices), len(STEP_FIELDS)), dtype=np.int64)
    all_ints[:, [STEP_FIELDS.index(f) for f in COMPUTE_FIELDS]] = NOT_TIMED
    for k in indices:
        _expect_layout(steps[k][1], [(f, 1) for f in fields], where, TOPIC_STEP, k)
        all_ints[k, :len(fields)] = steps[k][1].data
        if all_ints[k, 0] != k:
            raise EpisodeLogError(where, TOPIC_STEP, f"message with MCAP sequence {k} says step {all_ints[k, 0]}")
    codes = {}
    for name, table in (("command_source", COMMAND_SOURCES), ("safety_state", SAFETY_STATES)):
        codes[name] = all_ints[:, STEP_FIELDS.index(name)]
        if np.any((codes[name] < 0) | (codes[name] >= len(table))):
            raise EpisodeLogError(where, f"{TOPIC_STEP}.{name}", f"codes must be 0..{len(table) - 1}")
    for name in COMPUTE_FIELDS:
        if np.any(all_ints[:, STEP_FIELDS.index(name)] < NOT_TIMED):
            raise EpisodeLogError(where, f"{TOPIC_STEP}.{name}", f"must be >= 0 ns, or {NOT_TIMED} (not timed)")
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
        "adapter_compute_ns": column["adapter_compute_ns"], "node_compute_ns": column["node_compute_ns"],
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


__all__ = ["read_episode"]
