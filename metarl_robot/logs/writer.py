"""Writing an episode log: :class:`EpisodeLogWriter`, one MCAP file per episode (format: :mod:`.format`).

The ROS 2 node writes one writer per episode (from its recorder thread); ``metarl import-log`` and the
sim recordings write the same files.

Crash tolerance: messages collect in an in-memory chunk that is compressed and handed to the OS
when it exceeds ``chunk_size`` bytes, when its oldest step is ``max_chunk_age_s`` old, and right
after every safety event; metadata goes to the OS as soon as it is written. A crash (even SIGKILL)
therefore loses at most the open chunk, and :func:`~metarl_robot.logs.reader.read_episode` reads
every complete chunk of a file that was never closed, with a warning saying what was dropped.

Robot-side module: numpy, mcap and mcap-ros2-support only (no torch, no MuJoCo, no ROS install).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from mcap.writer import CompressionType
from mcap_ros2.writer import Writer as Ros2McapWriter

from metarl_robot.logs.format import (
    ADAPTER_ACTION_LABEL,
    ADAPTER_STATE_ATTACHMENT,
    COMMAND_SOURCES,
    DIAGNOSTIC_LEVELS,
    EPISODE_LOG_SCHEMA_VERSION,
    META_BUNDLE,
    META_END,
    META_EPISODE,
    META_EXTRA,
    META_ROBOT,
    META_TASK,
    NOT_TIMED,
    SAFETY_KEYS,
    SAFETY_NAME_PREFIX,
    SAFETY_STATES,
    STEP_FIELDS,
    TOPIC_ADAPTATION,
    TOPIC_COMMAND,
    TOPIC_DIAGNOSTICS,
    TOPIC_JOINT_STATES,
    TOPIC_OBSERVATION,
    TOPIC_SAFETY,
    TOPIC_STEP,
    TOPIC_TASK,
    TOPIC_TYPES,
    EpisodeLogError,
    concatenated_definition,
)
from metarl_robot.provenance import git_commit, software_version
from metarl_robot.spec.robot import ObsField, RobotSpec

DEFAULT_CHUNK_SIZE = 32 * 1024
"""Bytes of uncompressed messages per chunk (~28 cart-pole steps, ~1.1 s at 25 Hz): bounds what a crash loses."""
DEFAULT_MAX_CHUNK_AGE_S = 1.0
"""A chunk is written once its oldest step is this old (controller clock), however small it is."""

_INT64_MAX = 2**63 - 1
_MAX_SEQUENCE = 2**32 - 1
"""MCAP's per-message ``sequence`` is uint32; it carries the step index."""
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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
                 adapter_state: Mapping[str, Any] | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 max_chunk_age_s: float = DEFAULT_MAX_CHUNK_AGE_S, compression: str = "zstd", fsync: bool = False,
                 clock_anchor: tuple[int, int] | None = None) -> None:
        """Create ``path`` (parents too) and write the metadata records.

        ``bundle``: a loaded :class:`~metarl_robot.runtime.bundle.Bundle` or a mapping with ``name``,
        ``sha256`` (and optionally ``path``). ``task``: the true task parameters if known (JSON values).
        ``extra_metadata``: anything else worth keeping (JSON values), e.g. the node's parameters.
        ``adapter_state``: what the adapter carried into this episode from earlier ones (named finite arrays,
        e.g. an online model's last layer), written as an ``.npz`` attachment so the replay starts where the node
        did; empty or None: it started from its prior (nothing written).
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
        state_npz = _npz(adapter_state, where)

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
        if state_npz is not None:
            now = time.time_ns()
            self._inner.add_attachment(create_time=now, log_time=now, name=ADAPTER_STATE_ATTACHMENT,
                                       media_type="application/x-npz", data=state_npz)

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
                   adaptation: Mapping[str, Any] | None = None, time_ns: int | None = None,
                   adapter_compute_ns: int = NOT_TIMED, node_compute_ns: int = NOT_TIMED) -> int:
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
        ``adapter_compute_ns``: ns spent in the adapter's ``observe`` + ``act`` this step (only on a step it ran on);
        ``node_compute_ns``: ns from the node's wake-up (frame received, or the safety deadline) to the command sent,
        the adapter included; each :data:`NOT_TIMED` (-1, the default) where not measured.
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
        compute = [_duration(adapter_compute_ns, where, "adapter_compute_ns"),
                   _duration(node_compute_ns, where, "node_compute_ns")]
        if compute[0] != NOT_TIMED and adapter_action is None:
            raise EpisodeLogError(where, "adapter_compute_ns", f"is {compute[0]} on a step without adapter_action: "
                                  f"the adapter did not run, so its time is {NOT_TIMED} (not timed)")
        ints += compute
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


def joint_state_kind(field: ObsField) -> str | None:
    """``"position"`` or ``"velocity"`` when a ``sensor_msgs/JointState`` carries the observation ``field``: one value
    per joint it names, in its order; else None.

    Only single-value joints (hinge, slide) named whole by a field map; free/ball joints and indexed
    sources do not (their components are not one value per joint).
    """
    src = field.source
    if src.kind not in ("joint_pos", "joint_vel") or src.index is not None or field.size != len(src.names):
        return None
    return "position" if src.kind == "joint_pos" else "velocity"


def joint_state_map(robot: RobotSpec) -> tuple[list[str], list[int], list[int]]:
    """Joints whose position or velocity is an observation component: names, and obs indices (-1: not observed).
    Fields :func:`joint_state_kind` refuses are left out."""
    pos: dict[str, int] = {}
    vel: dict[str, int] = {}
    for f in robot.measured_fields:
        kind = joint_state_kind(f)
        if kind is None:
            continue
        start = robot.obs_slices[f.name].start
        target = pos if kind == "position" else vel
        for i, joint in enumerate(f.source.names):
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


def _duration(value: Any, where: str, name: str) -> int:
    """A compute time in ns: >= 0, or NOT_TIMED."""
    value = _as_int(value, where, name)
    if value < NOT_TIMED:
        raise EpisodeLogError(where, name, f"must be a duration >= 0 ns, or {NOT_TIMED} (not timed), got {value}")
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


def _npz(state: Mapping[str, Any] | None, where: str) -> bytes | None:
    """Named finite numeric arrays as ``.npz`` bytes (None for no state); refuses anything else, naming it."""
    if not state:
        return None
    arrays = {}
    for key, value in state.items():
        array = np.asarray(value)
        if not (isinstance(key, str) and key.isidentifier()):
            raise EpisodeLogError(where, "adapter_state", f"array names must be identifiers, got {key!r}")
        if array.dtype.kind not in "fiu" or not np.isfinite(array).all():
            raise EpisodeLogError(where, f"adapter_state.{key}", f"must be finite numbers, got {array.dtype} "
                                  f"{'with NaN/Inf' if array.dtype.kind == 'f' else ''}".rstrip())
        arrays[key] = array
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


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


__all__ = ["DEFAULT_CHUNK_SIZE", "DEFAULT_MAX_CHUNK_AGE_S", "EpisodeLogWriter", "joint_state_kind",
           "joint_state_map"]
