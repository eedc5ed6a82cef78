"""The control loop of the node, in its own thread; it hands each step to the recorder (:mod:`.recorder`).

Why a thread of its own: the loop's timing must not depend on the ROS executor. It blocks on the
robot link's newest state (latest-state semantics: the ZeroMQ state socket, or ros2_control's joint_states;
:mod:`.robot_link`) with the safety deadline as its timeout, so it wakes when a frame arrives or when the
safety layer must act (stale telemetry, or the next safe command of a SAFE_STOP), never on a timer callback.
Per decision it does only what the command needs (safety bookkeeping, the adapter, the command frame) and
hands a :class:`StepRecord` to a :class:`~metarl_robot_ros.recorder.RecordWorker` thread, which writes the MCAP
episode log and publishes the ROS messages, so neither disk I/O nor ROS publishing can delay a command.

One lock (owned by the node) guards the safety layer, the adapter and the loop statistics: the
loop holds it while deciding, the services (enable, reset) and the diagnostics timer take it for
microseconds. :class:`LoopStats` measures the loop and :func:`judge_loop` grades it for ``/diagnostics``
against :class:`LoopThresholds`. Nothing here imports rclpy.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from metarl_robot.runtime.safety import CommandSource, SafetyDecision, SafetyLayer, SafetyState
from metarl_robot.spec.robot import RobotSpec
from metarl_robot.telemetry.controller import DEFAULT_VALIDITY_PERIODS, HandshakeError
from metarl_robot.telemetry.protocol import CommandFrame, StateFrame
from metarl_robot_ros.recorder import RecordWorker, StepRecord
from metarl_robot_ros.robot_link import RobotLink

POLL_S = 0.05
"""Longest the loop blocks on the state socket before it looks at its stop flag (a frame wakes it at once)."""
DEADLINE_MARGIN_S = 0.001
"""The loop wakes this long after the safety deadline, so the deadline has passed when the layer checks it."""
REHANDSHAKE_BACKOFF_S = 0.5
"""Pause between handshake attempts after the robot's session was lost and a new handshake failed."""
STATS_WINDOW = 500
"""Control steps kept for the loop statistics (20 s at 25 Hz)."""
MIN_JUDGED_SAMPLES = 10
"""Periods (or compute times) the loop statistics need before :func:`judge_loop` grades them."""


class LoopStats:
    """Loop period, jitter, latency and compute time over the last :data:`STATS_WINDOW` control steps."""

    def __init__(self, window: int = STATS_WINDOW, period_s: float | None = None) -> None:
        self.period_s = period_s
        """The expected control period (the node sets it at configure); a compute time longer is an overrun."""
        self.periods_s: deque[float] = deque(maxlen=window)
        """Time between consecutive commands that answered a new frame."""
        self.latency_s: deque[float] = deque(maxlen=window)
        """Frame received → command sent."""
        self.compute_s: deque[float] = deque(maxlen=window)
        """Adapter observe + act."""
        self.control_steps = 0
        """Decisions on a fresh, good frame (the adapter ran)."""
        self.decisions = 0
        """All decisions (including ticks without a frame)."""
        self.commands_sent = 0
        """COMMAND frames sent (adapter, fallback and safe commands)."""
        self.overruns = 0
        """Control steps whose compute time exceeded :attr:`period_s` (cumulative)."""
        self.last_frame_received_ns: int | None = None
        """When the newest frame (any, good or not) arrived."""
        self._last_command_ns: int | None = None

    def record(self, *, sent_ns: int | None, latency_ns: int | None, compute_ns: int | None, control: bool) -> None:
        self.decisions += 1
        if sent_ns is not None:
            self.commands_sent += 1
        if not control:
            return
        self.control_steps += 1
        if compute_ns is not None:
            self.compute_s.append(compute_ns / 1e9)
            if self.period_s is not None and compute_ns / 1e9 > self.period_s:
                self.overruns += 1
        if sent_ns is None:
            return
        if latency_ns is not None:
            self.latency_s.append(latency_ns / 1e9)
        if self._last_command_ns is not None:
            self.periods_s.append((sent_ns - self._last_command_ns) / 1e9)
        self._last_command_ns = sent_ns

    def break_period(self) -> None:
        """The next period is not comparable to the previous one (a new episode or link session)."""
        self._last_command_ns = None

    def snapshot(self, now_ns: int) -> dict[str, float]:
        """Rates and percentiles (NaN where there is no data yet); times in milliseconds."""
        periods = np.asarray(self.periods_s)
        out: dict[str, float] = {"control_steps": float(self.control_steps), "decisions": float(self.decisions),
                                 "commands_sent": float(self.commands_sent), "overruns": float(self.overruns),
                                 "periods": float(periods.size), "compute_samples": float(len(self.compute_s))}
        if periods.size:
            median = float(np.median(periods))
            deviation = np.abs(periods - median)
            out.update(loop_rate_hz=1.0 / float(periods.mean()), period_ms_median=median * 1e3,
                       period_ms_max=float(periods.max()) * 1e3, jitter_ms_std=float(periods.std()) * 1e3,
                       jitter_ms_p99=float(np.percentile(deviation, 99)) * 1e3)
        else:
            out.update(loop_rate_hz=math.nan, period_ms_median=math.nan, period_ms_max=math.nan,
                       jitter_ms_std=math.nan, jitter_ms_p99=math.nan)
        for name, values in (("latency", self.latency_s), ("compute", self.compute_s)):
            arr = np.asarray(values)
            if arr.size:
                out[f"{name}_ms_mean"] = float(arr.mean()) * 1e3
                out[f"{name}_ms_p50"] = float(np.percentile(arr, 50)) * 1e3
                out[f"{name}_ms_p99"] = float(np.percentile(arr, 99)) * 1e3
                out[f"{name}_ms_max"] = float(arr.max()) * 1e3
            else:
                for stat in ("mean", "p50", "p99", "max"):
                    out[f"{name}_ms_{stat}"] = math.nan
        age = math.nan if self.last_frame_received_ns is None else (now_ns - self.last_frame_received_ns) / 1e9
        out["last_frame_age_s"] = age
        return out


@dataclass(frozen=True)
class LoopThresholds:
    """WARN and ERROR limits of the ``<node>: control loop`` status, as ros2_control's controller_manager has them
    (``diagnostics.threshold.*.periodicity.mean_error``, ``.standard_deviation``, ``execution_time``), but relative
    to the expected control period, so that one set fits a bundle of any rate. A value above ``warn`` is WARN,
    above ``error`` ERROR; a single compute time longer than the period (an overrun) is ERROR."""

    rate_error_warn: float = 0.05
    """WARN above this ``|loop_rate_hz - expected| / expected`` (ros2_control: periodicity mean error, whose
    defaults, 5 and 10 Hz at 100 Hz, are these 5 % and 10 %)."""
    rate_error_error: float = 0.10
    """ERROR above this rate error."""
    jitter_warn: float = 0.10
    """WARN above this standard deviation of the period / the expected period (periodicity standard deviation)."""
    jitter_error: float = 0.25
    """ERROR above this jitter."""
    compute_warn: float = 0.6
    """WARN above this mean compute time (``adapter.observe`` + ``act``) / the expected period (execution time)."""
    compute_error: float = 0.9
    """ERROR above this compute fraction."""


def judge_loop(snapshot: Mapping[str, float], expected_rate_hz: float, thresholds: LoopThresholds,
               new_overruns: int) -> tuple[int, list[str]]:
    """The level (0 OK, 1 WARN, 2 ERROR) of a :meth:`LoopStats.snapshot` and what is wrong, worst first.
    ``new_overruns``: overruns since the previous report (a past overrun stays in the window's statistics)."""
    period_ms = 1e3 / expected_rate_hz
    t = thresholds
    graded: list[tuple[int, str]] = []

    def grade(value: float, warn: float, error: float, text: str) -> None:
        level = 2 if value > error else 1 if value > warn else 0
        if level:
            limit = error if level == 2 else warn
            graded.append((level, f"{text} ({value:.0%} > {limit:.0%})"))

    if snapshot["periods"] >= MIN_JUDGED_SAMPLES:
        rate = snapshot["loop_rate_hz"]
        grade(abs(rate - expected_rate_hz) / expected_rate_hz, t.rate_error_warn, t.rate_error_error,
              f"loop rate {rate:.2f} Hz, expected {expected_rate_hz:g} Hz")
        grade(snapshot["jitter_ms_std"] / period_ms, t.jitter_warn, t.jitter_error,
              f"period jitter {snapshot['jitter_ms_std']:.2f} ms std of {period_ms:g} ms")
    if snapshot["compute_samples"] >= MIN_JUDGED_SAMPLES:
        grade(snapshot["compute_ms_mean"] / period_ms, t.compute_warn, t.compute_error,
              f"compute {snapshot['compute_ms_mean']:.2f} ms mean of the {period_ms:g} ms period")
    if new_overruns > 0:
        graded.append((2, f"{new_overruns} overrun(s) since the last report (compute longer than the "
                          f"{period_ms:g} ms period; worst {snapshot['compute_ms_max']:.2f} ms)"))
    graded.sort(key=lambda item: -item[0])
    return (graded[0][0] if graded else 0), [text for _, text in graded]


@dataclass
class LoopOutcome:
    """How an episode of the loop ended."""

    reason: str = ""
    """Why: ``deactivated``, ``SIGINT``, ``episode_steps reached``, ``exception: ...``."""
    final: bool = False
    """True when the safety layer was shut down (the process is ending)."""
    error: BaseException | None = None
    """The exception that ended it, if any."""
    safe_commands_sent: int = 0
    """Safe commands sent by the end-of-episode sequence."""
    traceback: str = ""
    """Formatted traceback of ``error``."""


@dataclass
class _Pending:
    """What the loop knows about the link between decisions (loop thread only)."""

    last_frame: StateFrame | None = None
    last_frame_received_ns: int = 0
    stamp_received_ns: int = 0
    """When the robot stamp of ``last_frame`` was first received: a frozen robot repeats old stamps, and a
    command's expiry counts from the stamp it answers."""
    prev_good: StateFrame | None = None
    last_good_s: float = -math.inf
    next_tick_s: float = 0.0
    unrecorded_events: tuple = ()

    def note_frame(self, frame: StateFrame, received_ns: int) -> None:
        if self.last_frame is None or frame.stamp_ns != self.last_frame.stamp_ns:
            self.stamp_received_ns = received_ns
        self.last_frame, self.last_frame_received_ns = frame, received_ns


class ControlLoop:
    """One episode of control: a thread that runs from :meth:`start` until :meth:`request_stop` (or an error).

    Per wake-up: the newest state frame (or none by the deadline) → ``safety.on_frame`` → the adapter
    (observe the transition that frame completes, with the command its ``observes_sent_commands`` asks for, then
    act) → ``safety.filter``/``tick`` → the command
    over the robot link → a :class:`StepRecord` to the recorder. At the end, the safe command for
    ``shutdown_periods`` control periods (deactivate: operator-disabled SAFE_STOP; process exit:
    ``safety.shutdown``), then the episode log is closed.
    """

    def __init__(self, *, robot: RobotSpec, link: RobotLink, safety: SafetyLayer, adapter: Any,
                 task_params: Mapping[str, float], recorder: RecordWorker, lock: threading.Lock,
                 stats: LoopStats, episode_steps: int = 0, handshake_timeout_s: float = 1.0,
                 on_finished: Callable[[LoopOutcome], None] | None = None,
                 clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self.robot, self.link, self.safety, self.adapter = robot, link, safety, adapter
        self.task_params = dict(task_params)
        self.recorder, self.lock, self.stats = recorder, lock, stats
        self.episode_steps = episode_steps
        self.handshake_timeout_s = handshake_timeout_s
        self.on_finished = on_finished
        self.clock_ns = clock_ns
        self.ctrl_dt = robot.ctrl_dt
        self.outcome: LoopOutcome | None = None
        """Set when the episode has ended (after the final safe commands and the log close)."""
        self.steps = 0
        """Control steps (decisions on a fresh, good frame) in this episode."""
        self._stop = threading.Event()
        self._stop_reason = ("stopped", False)
        self._finished = threading.Event()
        self._p = _Pending()
        self._thread = threading.Thread(target=self._run, name="metarl-control", daemon=True)

    # ---- control from other threads ------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def request_stop(self, reason: str, final: bool) -> None:
        """End the episode: ``final`` = the process is exiting (``safety.shutdown``), else a deactivation."""
        if not self._stop.is_set():
            self._stop_reason = (reason, final)
            self._stop.set()

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the end sequence and the log close; True once finished."""
        if not self._thread.is_alive() and not self._thread.ident:
            return True
        return self._finished.wait(timeout_s)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._finished.is_set()

    # ---- the thread ------------------------------------------------------------------------------
    def _now_s(self) -> float:
        return self.clock_ns() / 1e9

    def _run(self) -> None:
        outcome = LoopOutcome()
        try:
            self._control()
            outcome.reason, outcome.final = self._stop_reason
        except BaseException as exc:  # any failure ends in the safe command, never in a silent stop
            outcome.reason, outcome.final, outcome.error = f"exception: {type(exc).__name__}: {exc}", True, exc
            outcome.traceback = traceback.format_exc()
        try:
            outcome.safe_commands_sent = self._end_sequence(outcome.reason, outcome.final)
        except BaseException as exc:
            if outcome.error is None:
                outcome.error, outcome.traceback = exc, traceback.format_exc()
        finally:
            self.recorder.close_episode(outcome.reason).wait(10.0)
            self.outcome = outcome
            self._finished.set()
            if self.on_finished is not None:
                self.on_finished(outcome)

    def _control(self) -> None:
        p = self._p
        p.next_tick_s = self._now_s() + self.ctrl_dt
        while not self._stop.is_set():
            if self.episode_steps and self.steps >= self.episode_steps:
                self._stop_reason = (f"episode_steps reached ({self.episode_steps})", False)
                return
            if self.link.session_lost:
                self._rehandshake()
                continue
            wait = min(p.next_tick_s - self._now_s(), POLL_S)
            frame = self.link.receive_state(max(0.0, wait))
            received_ns = self.clock_ns()
            if frame is None and received_ns / 1e9 < p.next_tick_s:
                continue  # woke only to look at the stop flag
            self._decide(frame, received_ns)

    def _decide(self, frame: StateFrame | None, received_ns: int) -> None:
        p, safety = self._p, self.safety
        action = adaptation = None
        compute_ns = None
        with self.lock:
            now = received_ns / 1e9
            usable = False
            if frame is not None:
                p.note_frame(frame, received_ns)
                self.stats.last_frame_received_ns = received_ns
                usable = safety.on_frame(frame.seq, frame.stamp_ns, now, frame.obs)
            if usable:
                p.last_good_s = now
                t0 = time.perf_counter_ns()
                prev = p.prev_good
                if prev is not None and frame.seq == prev.seq + 1:
                    # The command sent since the previous frame, or the one the robot says its motors applied
                    # (they differ under actuator latency, which only some adapters model themselves).
                    driven_by = safety.last_command
                    if frame.applied_action is not None and not self.adapter.observes_sent_commands:
                        driven_by = frame.applied_action
                    self.adapter.observe(prev.obs[None], np.asarray(driven_by, dtype=np.float64)[None],
                                         frame.obs[None])
                p.prev_good = frame
                raw, adaptation = self.adapter.act(frame.obs[None], self.task_params)
                compute_ns = time.perf_counter_ns() - t0
                action = np.asarray(raw, dtype=np.float64)[0]
                error = adaptation.get("prediction_error")
                error = None if error is None else float(np.asarray(error, dtype=np.float64).ravel()[0])
                refused = adaptation.get("update_refused")
                decision = safety.filter(action, error, self._now_s(), update_refused=refused is not None
                                         and bool(np.asarray(refused).ravel()[0]))
                self.steps += 1
            else:
                decision = safety.tick(self._now_s())
            command = self._send(decision)
            sent_ns = self.clock_ns()
            latency = sent_ns - received_ns if (usable and command is not None) else None
            self.stats.record(sent_ns=sent_ns if command is not None else None, latency_ns=latency,
                              compute_ns=compute_ns, control=usable)
            self._schedule(sent_ns / 1e9)
        self._record(StepRecord(
            time_ns=sent_ns, frame=p.last_frame, receive_time_ns=p.last_frame_received_ns, decision=decision,
            command=command, task_params=self.task_params, adapter_action=action if usable else None,
            adaptation={k: np.asarray(v).copy() for k, v in adaptation.items()} if usable else None,
            latency_ns=latency, compute_ns=compute_ns, decide_ns=sent_ns - received_ns))

    def _record(self, record: StepRecord) -> None:
        """Hand a step to the recorder; before the first frame there is no step to log, so its events wait."""
        p = self._p
        events = (*p.unrecorded_events, *record.decision.events)
        if record.frame is None:
            p.unrecorded_events = events
            return
        p.unrecorded_events = ()
        self.recorder.step(dataclasses.replace(record, events=events))

    def _schedule(self, now: float) -> None:
        """When to decide next if no frame comes: at the next period while a safe or fallback command must be
        repeated, else just past the stale deadline (the safety layer then trips within one period)."""
        p, safety = self._p, self.safety
        if safety.state in (SafetyState.SAFE_STOP, SafetyState.FALLBACK) or not safety.armed:
            p.next_tick_s = now + self.ctrl_dt
        else:
            p.next_tick_s = max(p.last_good_s + safety.stale_after_s + DEADLINE_MARGIN_S, now + 1e-4)

    def _send(self, decision: SafetyDecision) -> CommandFrame | None:
        """Send the decision's command answering the newest frame; None when nothing is (or can be) sent."""
        p = self._p
        if decision.command is None or p.last_frame is None or not self.link.armed:
            return None
        valid_for = None
        if decision.source is CommandSource.SAFE_COMMAND:
            # A safe command may answer an old frame (telemetry stale, or frozen: duplicates of an old stamp keep
            # arriving): keep it valid for a few periods from now, counted from when that stamp first arrived, so
            # the robot applies it instead of rejecting it as expired.
            age = (self.clock_ns() - p.stamp_received_ns) / 1e9
            valid_for = age + DEFAULT_VALIDITY_PERIODS * self.ctrl_dt
        try:
            return self.link.send_command(decision.command, answers=p.last_frame, valid_for_s=valid_for)
        except HandshakeError:
            return None  # the robot's session changed under us; the next wake-up handshakes again

    def _rehandshake(self) -> None:
        """The robot restarted (or another controller armed it): handshake again, outside the lock."""
        try:
            self.link.handshake(self.robot, timeout_s=self.handshake_timeout_s)
            ok, reason = True, ""
        except HandshakeError as exc:
            ok, reason = False, str(exc)
        with self.lock:
            self.safety.on_handshake(ok, self._now_s(), reason)
            self._p.prev_good = self._p.last_frame = None
            self.stats.break_period()
        if not ok:
            self._stop.wait(REHANDSHAKE_BACKOFF_S)

    def _end_sequence(self, reason: str, final: bool) -> int:
        """The safe command for ``shutdown_periods`` periods (only if armed), each answering the newest frame."""
        p, safety = self._p, self.safety
        with self.lock:
            now = self._now_s()
            if final:
                planned: list[SafetyDecision] | None = safety.shutdown(now, reason)
                periods = len(planned)
            else:
                planned = None
                safety.set_enabled(False, now)
                periods = safety.config.shutdown_periods if safety.armed else 0
        sent = 0
        start = self._now_s()
        for k in range(periods):
            if k:
                until = start + k * self.ctrl_dt
                while (remaining := until - self._now_s()) > 0:
                    frame = self.link.receive_state(remaining) if self.link.armed else None
                    if frame is None:
                        if not self.link.armed:
                            time.sleep(max(0.0, remaining))
                        continue
                    received_ns = self.clock_ns()
                    p.note_frame(frame, received_ns)
                    if planned is None:
                        with self.lock:
                            safety.on_frame(frame.seq, frame.stamp_ns, received_ns / 1e9, frame.obs)
            with self.lock:
                decision = planned[k] if planned is not None else safety.tick(self._now_s())
                command = self._send(decision)
                sent_ns = self.clock_ns()
                self.stats.record(sent_ns=sent_ns if command is not None else None, latency_ns=None,
                                  compute_ns=None, control=False)
            sent += command is not None
            self._record(StepRecord(time_ns=sent_ns, frame=p.last_frame, receive_time_ns=p.last_frame_received_ns,
                                    decision=decision, command=command, task_params=self.task_params, ending=True))
        return sent
