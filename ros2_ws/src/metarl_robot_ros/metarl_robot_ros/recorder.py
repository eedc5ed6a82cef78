"""The node's recorder: a thread that writes the MCAP episode log and publishes each control step.

The control loop (:mod:`.control_loop`) hands it one :class:`StepRecord` per decision through
:class:`RecordWorker`'s queue and never waits for it, so neither disk I/O nor ROS publishing can delay a
command. The queue protocol is the worker's public methods: ``open_episode`` → ``step`` / ``diagnostics``
… → ``close_episode`` (its event is set once the file is closed), and ``stop`` to end the thread; items
are handled in the order they were queued. Nothing here imports rclpy: publishing is the ``publish_step``
callback the node passes in.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metarl_robot.logs.format import NOT_TIMED
from metarl_robot.logs.writer import EpisodeLogWriter
from metarl_robot.runtime.safety import CommandSource, SafetyDecision, SafetyEvent
from metarl_robot.spec.robot import RobotSpec
from metarl_robot.telemetry.protocol import CommandFrame, StateFrame


@dataclass(frozen=True)
class StepRecord:
    """One control-period decision, handed from the loop thread to the recorder/publisher."""

    time_ns: int
    """Controller monotonic clock when the command was sent (or the decision taken, if nothing was sent)."""
    frame: StateFrame | None
    """The state frame the decision was about (the newest received; repeated when no new one came); None
    before the first frame (such a step is not recorded)."""
    receive_time_ns: int
    """When that frame was received (controller monotonic clock)."""
    decision: SafetyDecision
    """The safety layer's decision (state, source, events, counters)."""
    command: CommandFrame | None
    """The COMMAND frame sent, or None when nothing was sent."""
    task_params: Mapping[str, float]
    """Task/reward parameters given to the adapter."""
    events: tuple[SafetyEvent, ...] = ()
    """Safety events to record with this step: the decision's, after those of earlier decisions that had no
    frame to record yet (the handshake's, before the first frame), so no event is lost."""
    adapter_action: np.ndarray | None = None
    """The adapter's raw action ``(a,)`` when it ran this period."""
    adaptation: Mapping[str, np.ndarray] | None = None
    """The adapter's diagnostics when it ran this period."""
    latency_ns: int | None = None
    """Frame received → command sent, for periods on which the adapter ran and a command went out."""
    compute_ns: int | None = None
    """Time spent in ``adapter.observe`` + ``adapter.act``."""
    decide_ns: int | None = None
    """The whole decision: the loop's wake-up (frame received, or the safety deadline) → command sent (or the
    decision taken, if nothing was sent), the adapter included; None where not timed (the end-of-episode sequence)."""
    ending: bool = False
    """True for the safe commands of the end-of-episode sequence."""


class RecordWorker:
    """A thread that writes the episode log and publishes the loop's step records, off the control thread.

    ``publish_step`` (optional) is called for every record, ``on_error`` with a message when logging fails
    (the episode then continues without a log: losing the log must not stop a robot that is balancing).
    """

    def __init__(self, robot: RobotSpec, publish_step: Callable[[StepRecord], None] | None = None,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.robot = robot
        self.publish_step = publish_step
        self.on_error = on_error
        self.log_path: Path | None = None
        """The open (or last) episode log."""
        self.log_error = ""
        """Why logging stopped, if it did."""
        self.episodes_closed = 0
        """Episode logs closed so far."""
        self.publish_errors = 0
        """Records whose ROS publishing raised."""
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: EpisodeLogWriter | None = None
        self._last_step_ns: int | None = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metarl-recorder", daemon=True)
        self._thread.start()

    # ---- called from other threads --------------------------------------------------------------
    def open_episode(self, path: Path | None, **writer_kwargs: Any) -> None:
        """Start a new episode log at ``path`` (None: no log for this episode)."""
        self._queue.put(("open", path, writer_kwargs))

    def step(self, record: StepRecord) -> None:
        self._queue.put(("step", record))

    def diagnostics(self, statuses: list[Any], time_ns: int) -> None:
        self._queue.put(("diagnostics", statuses, time_ns))

    def close_episode(self, reason: str) -> threading.Event:
        """Close the log after everything queued before; the returned event is set once it is closed."""
        done = threading.Event()
        self._queue.put(("close", reason, done))
        return done

    def stop(self, timeout_s: float = 5.0) -> None:
        """Drain the queue, close any open log and end the thread."""
        self._queue.put(("stop",))
        self._thread.join(timeout_s)

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def status(self, running: bool, logging: bool) -> tuple[int, str, dict[str, str]]:
        """The ``<node>: episode log`` diagnostics status as (level, message, values): WARN (1) once logging failed
        (the episode goes on without its log, so it must not pass unnoticed) until the next episode's log opens,
        else OK (0). ``running``: an episode is under way; ``logging``: the node has a log folder."""
        values = {"log_file": str(self.log_path or ""), "log_error": self.log_error,
                  "recorder_backlog": str(self.backlog), "episodes_closed": str(self.episodes_closed),
                  "publish_errors": str(self.publish_errors)}
        if self.log_error:
            return 1, self.log_error, values
        if not logging:
            return 0, "no episode logs (log_dir is '')", values
        if self.log_path is None:
            return 0, "no episode yet", values
        return 0, f"{'writing' if running else 'closed'} {self.log_path}", values

    # ---- the thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            kind = item[0]
            try:
                if kind == "open":
                    self._open(item[1], item[2])
                elif kind == "step":
                    self._step(item[1])
                elif kind == "diagnostics":
                    if self._writer is not None:
                        self._log(lambda w, it=item: w.write_diagnostics(it[1], time_ns=it[2]))
                elif kind == "close":
                    self._close(item[1])
                    item[2].set()
                elif kind == "stop":
                    self._close("node stopped")
                    return
            except Exception:  # never let one bad record end the recorder
                self._fail(f"recorder: {traceback.format_exc(limit=3)}")

    def _open(self, path: Path | None, kwargs: dict[str, Any]) -> None:
        self._close("superseded by a new episode")
        self.log_path, self.log_error, self._last_step_ns = path, "", None
        if path is None:
            return
        try:
            self._writer = EpisodeLogWriter(path, self.robot, **kwargs)
        except Exception as exc:
            self._fail(f"cannot open episode log {path}: {exc}")

    def _step(self, record: StepRecord) -> None:
        if self._writer is not None:
            self._log(lambda w: self._write_step(w, record))
        if self.publish_step is not None:
            try:
                self.publish_step(record)
            except Exception as exc:  # a publishing problem must not stop the log
                self.publish_errors += 1
                if self.publish_errors == 1 and self.on_error is not None:
                    self.on_error(f"publishing a step failed: {exc!r}")

    def _write_step(self, writer: EpisodeLogWriter, r: StepRecord) -> None:
        decision = r.decision
        step_index = writer.step_count
        for event in r.events:
            writer.write_safety_event(event.code.value, event.message, level=int(event.level),
                                      action=decision.source.value, state_seq=r.frame.seq, step=step_index,
                                      time_ns=round(event.at * 1e9))
        time_ns = r.time_ns
        if self._last_step_ns is not None and time_ns <= self._last_step_ns:
            time_ns = self._last_step_ns + 1  # two decisions within one clock tick: keep step times strictly ordered
        self._last_step_ns = time_ns
        sent = r.command is not None
        adapted = r.adapter_action is not None and r.adaptation is not None
        writer.write_step(
            obs=r.frame.obs, state_seq=r.frame.seq, robot_stamp_ns=r.frame.stamp_ns,
            receive_time_ns=r.receive_time_ns, applied_command_seq=r.frame.applied_command_seq,
            command=r.command.action if sent else None, command_seq=r.command.seq if sent else None,
            command_source=decision.source.value if sent else CommandSource.NONE.value,
            command_answers_seq=r.command.answers_seq if sent else None,
            command_expires_ns=r.command.expires_ns if sent else 0, safety_state=decision.state.value,
            task_params=dict(r.task_params) or None,
            adapter_action=r.adapter_action if adapted else None, adaptation=dict(r.adaptation) if adapted else None,
            time_ns=time_ns,
            # The writer refuses a negative duration, which would end this episode's log: clamp what an injected
            # (test) clock could produce rather than lose the log.
            adapter_compute_ns=r.compute_ns if adapted and r.compute_ns is not None else NOT_TIMED,
            node_compute_ns=NOT_TIMED if r.decide_ns is None else max(r.decide_ns, 0))

    def _log(self, write: Callable[[EpisodeLogWriter], None]) -> None:
        try:
            write(self._writer)
        except Exception as exc:
            self._fail(f"episode log {self.log_path}: {exc}; logging stopped for this episode")
            with contextlib.suppress(Exception):
                self._writer.close(f"exception: {exc}")
            self._writer = None

    def _close(self, reason: str) -> None:
        if self._writer is None:
            return
        writer, self._writer = self._writer, None
        try:
            writer.close(reason)
            self.episodes_closed += 1
        except Exception as exc:
            self._fail(f"closing episode log {self.log_path}: {exc}")

    def _fail(self, message: str) -> None:
        self.log_error = message
        if self.on_error is not None:
            self.on_error(message)
