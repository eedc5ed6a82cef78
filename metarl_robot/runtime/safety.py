"""The runtime safety layer: every control period, it decides what (if anything) is sent to the robot.

The ROS 2 node calls it once per control period, and the shadow replay calls it on logged episodes,
so it is a pure state machine over its inputs: it never reads a clock (every call takes ``now``, in
seconds of the controller's monotonic clock), draws no random numbers and imports numpy only.
Its inputs are primitives (sequence number, robot stamp, receive time, observation vector, adapter
action and prediction error), not telemetry-codec objects, so it does not depend on the wire format.

What it guards against, and the outcome of each (the operator's table is ``docs/safety.md``):

- no command before a successful handshake and a fresh, finite telemetry frame (``DISARMED``: nothing sent);
- stale telemetry (no fresh frame within ``stale_after_periods``), frozen telemetry (frames whose
  sequence number or robot stamp does not advance), a burst of more than ``max_lost_frames`` lost
  frames, a sequence number that goes backwards, and NaN/Inf in an observation → ``SAFE_STOP``: the
  safe command from robot.yaml, every period, until ``recovery_fresh_frames`` good frames in a row;
- NaN/Inf in the adapter's action → ``SAFE_STOP``, latched until an operator :meth:`SafetyLayer.reset`;
- the adapter's prediction error above a calibrated threshold for ``prediction_error_steps`` graded
  steps in a row → ``FALLBACK`` (a fallback controller, or the safe command), latched, diagnostics ERROR;
- every command is clamped to robot.yaml's limits and rate-limited to ``max_rate × ctrl_dt`` from the
  last command sent, each correction reported as an event and counted; the safe command itself is
  sent at once, without rate limiting;
- shutdown: :meth:`SafetyLayer.shutdown` gives ``shutdown_periods`` safe commands to send before exit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any

import numpy as np

from metarl_robot.spec.robot import RobotSpec
from metarl_robot.spec.schema import SpecError, build, to_plain


class StrEnum(str, Enum):
    """``enum.StrEnum`` of Python 3.11, here because ROS 2 Humble runs Python 3.10, which lacks it: ``str()`` and
    ``format()`` of a member give its value (``str(SafetyState.OK) == "OK"``), as the episode log and the node's
    messages expect; a plain ``(str, Enum)`` would give ``"SafetyState.OK"``."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, format_spec: str) -> str:
        return str.__format__(self, format_spec)


FallbackController = Callable[[np.ndarray], np.ndarray]
"""``obs (o,) → action (a,)``: a controller that does not depend on the adapter (e.g. a PD law)."""


class SafetyState(StrEnum):
    """What the layer is doing this period."""

    OK = "OK"
    """The adapter's command goes out unchanged."""
    WARN = "WARN"
    """A command goes out, but something was corrected or looked wrong this period (see the events)."""
    FALLBACK = "FALLBACK"
    """The adapter is not trusted (prediction error): the fallback controller or the safe command goes out."""
    SAFE_STOP = "SAFE_STOP"
    """The safe command from robot.yaml goes out every period."""
    DISARMED = "DISARMED"
    """Nothing is sent: no successful handshake, or no fresh frame since it."""


class CommandSource(StrEnum):
    """Where the command of a decision came from."""

    ADAPTER = "adapter"
    """The adapter's action (possibly clamped or rate-limited)."""
    FALLBACK_CONTROLLER = "fallback_controller"
    """The configured fallback controller's action (clamped and rate-limited like the adapter's)."""
    SAFE_COMMAND = "safe_command"
    """robot.yaml's ``safe_command``, sent as is."""
    NONE = "none"
    """Nothing is sent this period (the robot keeps its last command until that command expires)."""


class DiagnosticLevel(IntEnum):
    """Severity, with the byte values of ``diagnostic_msgs/DiagnosticStatus`` levels."""

    OK = 0
    WARN = 1
    ERROR = 2


class EventCode(StrEnum):
    """What happened. Each code has one fixed level (:data:`EVENT_LEVELS`)."""

    HANDSHAKE_OK = "HANDSHAKE_OK"
    HANDSHAKE_FAILED = "HANDSHAKE_FAILED"
    ARMED = "ARMED"
    FRAME_NOT_ADVANCING = "FRAME_NOT_ADVANCING"
    FRAMES_LOST = "FRAMES_LOST"
    TELEMETRY_STALE = "TELEMETRY_STALE"
    TELEMETRY_FROZEN = "TELEMETRY_FROZEN"
    LOSS_BURST = "LOSS_BURST"
    SEQUENCE_REGRESSED = "SEQUENCE_REGRESSED"
    OBS_NONFINITE = "OBS_NONFINITE"
    LINK_RECOVERED = "LINK_RECOVERED"
    ACTION_CLAMPED = "ACTION_CLAMPED"
    ACTION_RATE_LIMITED = "ACTION_RATE_LIMITED"
    ACTION_WITHOUT_FRAME = "ACTION_WITHOUT_FRAME"
    ADAPTER_NONFINITE = "ADAPTER_NONFINITE"
    MODEL_UPDATE_REFUSED = "MODEL_UPDATE_REFUSED"
    PREDICTION_ERROR_HIGH = "PREDICTION_ERROR_HIGH"
    PREDICTION_ERROR_FALLBACK = "PREDICTION_ERROR_FALLBACK"
    FALLBACK_FAILED = "FALLBACK_FAILED"
    OPERATOR_DISABLED = "OPERATOR_DISABLED"
    OPERATOR_ENABLED = "OPERATOR_ENABLED"
    LATCHES_RESET = "LATCHES_RESET"
    SHUTDOWN = "SHUTDOWN"


_OK, _WARN, _ERROR = DiagnosticLevel.OK, DiagnosticLevel.WARN, DiagnosticLevel.ERROR
EVENT_LEVELS: dict[EventCode, DiagnosticLevel] = {
    EventCode.HANDSHAKE_OK: _OK, EventCode.HANDSHAKE_FAILED: _ERROR, EventCode.ARMED: _OK,
    EventCode.FRAME_NOT_ADVANCING: _WARN, EventCode.FRAMES_LOST: _WARN, EventCode.TELEMETRY_STALE: _ERROR,
    EventCode.TELEMETRY_FROZEN: _ERROR, EventCode.LOSS_BURST: _ERROR, EventCode.SEQUENCE_REGRESSED: _ERROR,
    EventCode.OBS_NONFINITE: _ERROR, EventCode.LINK_RECOVERED: _OK, EventCode.ACTION_CLAMPED: _WARN,
    EventCode.ACTION_RATE_LIMITED: _WARN, EventCode.ACTION_WITHOUT_FRAME: _WARN, EventCode.ADAPTER_NONFINITE: _ERROR,
    EventCode.MODEL_UPDATE_REFUSED: _WARN,
    EventCode.PREDICTION_ERROR_HIGH: _WARN, EventCode.PREDICTION_ERROR_FALLBACK: _ERROR,
    EventCode.FALLBACK_FAILED: _ERROR, EventCode.OPERATOR_DISABLED: _WARN, EventCode.OPERATOR_ENABLED: _OK,
    EventCode.LATCHES_RESET: _OK, EventCode.SHUTDOWN: _WARN,
}
"""The diagnostic level of every event code."""

LINK_FAULTS = (EventCode.TELEMETRY_STALE, EventCode.TELEMETRY_FROZEN, EventCode.LOSS_BURST,
               EventCode.SEQUENCE_REGRESSED, EventCode.OBS_NONFINITE)
"""Faults of the telemetry link: SAFE_STOP until ``recovery_fresh_frames`` good frames in a row (a sequence
regression, a robot restarted behind our back, clears only with a new handshake)."""
LATCHED_FAULTS = (EventCode.ADAPTER_NONFINITE, EventCode.PREDICTION_ERROR_FALLBACK, EventCode.FALLBACK_FAILED)
"""Faults of the controller: they hold until an operator calls :meth:`SafetyLayer.reset`."""


@dataclass(frozen=True)
class SafetyEvent:
    """One thing the layer noticed or did; the node logs every event and the replay grades them."""

    code: EventCode
    """What happened."""
    level: DiagnosticLevel
    """Its severity (fixed per code)."""
    message: str
    """Human-readable detail: values, limits, sequence numbers."""
    at: float
    """Controller time (s) of the call that produced it."""


@dataclass
class SafetyCounters:
    """Cumulative counts since the layer was built (a new handshake does not reset them)."""

    frames_received: int = 0
    """Every frame passed to ``on_frame``."""
    frames_ignored: int = 0
    """Frames received with no successful handshake in force (never used)."""
    frames_good: int = 0
    """Frames that advanced sequence and stamp and were finite: usable by the adapter."""
    frames_not_advancing: int = 0
    """Frames whose sequence number or robot stamp did not advance (duplicate or frozen)."""
    frames_lost: int = 0
    """Frames missing in sequence gaps."""
    loss_bursts: int = 0
    """Sequence gaps larger than ``max_lost_frames`` (each a LOSS_BURST trip when armed)."""
    sequence_regressions: int = 0
    """Frames whose sequence number went backwards."""
    obs_nonfinite: int = 0
    """Frames with NaN or Inf in the observation."""
    stale_trips: int = 0
    """TELEMETRY_STALE trips."""
    frozen_trips: int = 0
    """TELEMETRY_FROZEN trips."""
    link_recoveries: int = 0
    """Link faults cleared by good frames."""
    periods_without_frame: int = 0
    """Decisions taken with no new good frame since the previous one (nothing new to act on)."""
    actions_clamped: int = 0
    """Commands clamped to the action box of robot.yaml."""
    actions_rate_limited: int = 0
    """Commands limited to ``max_rate × ctrl_dt`` from the previous command."""
    actions_without_frame: int = 0
    """Adapter actions offered with no new good frame since the previous decision (ignored)."""
    adapter_nonfinite: int = 0
    """Adapter actions with NaN or Inf."""
    model_updates_refused: int = 0
    """Online model updates the adapter refused (it kept its last good model)."""
    prediction_errors_graded: int = 0
    """Prediction errors compared with the threshold."""
    prediction_error_exceedances: int = 0
    """Graded prediction errors above the threshold."""
    prediction_error_trips: int = 0
    """Switches to FALLBACK after ``prediction_error_steps`` exceedances in a row."""
    fallback_failures: int = 0
    """Fallback controller calls that raised or returned NaN/Inf."""
    commands_adapter: int = 0
    """Commands sent from the adapter."""
    commands_fallback: int = 0
    """Commands sent from the fallback controller."""
    commands_safe: int = 0
    """Safe commands sent (including those of ``shutdown``)."""
    handshakes_ok: int = 0
    """Successful handshakes."""
    handshakes_failed: int = 0
    """Failed handshakes."""

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SafetyDecision:
    """What to do this control period."""

    command: np.ndarray | None
    """``(a,)`` float64 command to send now, or None: send nothing."""
    state: SafetyState
    """The layer's state for this period."""
    source: CommandSource
    """Where ``command`` came from."""
    events: tuple[SafetyEvent, ...]
    """Everything noticed since the previous decision, in order (including ``on_frame``'s)."""
    counters: SafetyCounters
    """A snapshot of the cumulative counters after this decision."""


@dataclass(frozen=True)
class SafetyStatus:
    """A ``/diagnostics`` entry: the worst level since the previous status, a summary, and key-values."""

    level: DiagnosticLevel
    """Worst level of any state or event since the previous :meth:`SafetyLayer.status` call, and of the current
    state (so an ERROR that cleared between two diagnostics messages is still reported once)."""
    message: str
    """One line: the current state and why."""
    values: dict[str, str]
    """Key-values (``diagnostic_msgs/KeyValue``): state, faults, thresholds and every counter."""


@dataclass
class SafetyConfig:
    """Safety settings. Timing keys count control periods of robot.yaml (``ctrl_dt``), so one file suits 25-50 Hz."""

    stale_after_periods: float = 3.5
    """Deadline, in control periods: no fresh, finite frame for longer than this → SAFE_STOP (stale or frozen)."""
    max_lost_frames: int = 2
    """Largest tolerated sequence gap (frames missing between two received frames); larger → SAFE_STOP."""
    recovery_fresh_frames: int = 3
    """Good frames in a row, each on time, that clear a link fault (stale, frozen, burst, NaN observation)."""
    prediction_error_threshold: float | None = None
    """Adapter prediction error (RMS, robot.yaml scale units) above which a step counts as bad; null: not checked.
    Calibrate it with :func:`metarl_robot.replay.calibration.calibrate_prediction_threshold`."""
    prediction_error_steps: int = 5
    """Consecutive graded steps above the threshold that switch to FALLBACK (so a short transient does not)."""
    shutdown_periods: int = 5
    """Safe commands to send, one per control period, on SIGINT/SIGTERM/exception before the process exits."""

    def validate(self, where: str = "safety") -> None:
        """Raise :class:`SpecError` naming the first field out of its allowed range."""
        checks = [
            # Below 1.5 periods a frame a little late (jitter, float round-off of the clock) would trip it.
            ("stale_after_periods", _is_number(self.stale_after_periods) and 1.5 <= self.stale_after_periods <= 50.0,
             "must be a number of control periods in [1.5, 50]"),
            ("max_lost_frames", _is_int(self.max_lost_frames) and 0 <= self.max_lost_frames <= 100,
             "must be an integer in [0, 100]"),
            ("recovery_fresh_frames", _is_int(self.recovery_fresh_frames) and 1 <= self.recovery_fresh_frames <= 1000,
             "must be an integer in [1, 1000]"),
            ("prediction_error_threshold", self.prediction_error_threshold is None
             or (_is_number(self.prediction_error_threshold) and self.prediction_error_threshold > 0),
             "must be null (not checked) or a finite number > 0 (RMS error in robot.yaml scale units)"),
            ("prediction_error_steps", _is_int(self.prediction_error_steps) and 1 <= self.prediction_error_steps <= 100,
             "must be an integer in [1, 100]"),
            ("shutdown_periods", _is_int(self.shutdown_periods) and 1 <= self.shutdown_periods <= 1000,
             "must be an integer in [1, 1000]"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise SpecError(where, name, f"{allowed}, got {getattr(self, name)!r}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "safety") -> SafetyConfig:
        """Build from a YAML mapping or ROS parameters; unknown keys, wrong types and bad ranges are refused."""
        config = build(cls, dict(data), where)
        config.validate(where)
        return config

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- the layer ------------------------------------------------------------------------------------------
class SafetyLayer:
    """The safety state machine for one robot link. See the module docstring and ``docs/safety.md``.

    Call order per control period (``now`` from the controller's monotonic clock, in seconds)::

        if a frame arrived:   usable = layer.on_frame(seq, stamp_ns, received_at, obs)
        if usable:            decision = layer.filter(adapter_action, prediction_error, now)
        else:                 decision = layer.tick(now)
        if decision.command is not None: send(decision.command)
    """

    def __init__(self, robot: RobotSpec, config: SafetyConfig | None = None,
                 fallback_controller: FallbackController | None = None) -> None:
        self.robot = robot
        """The robot spec: limits, rate limits, control period and safe command."""
        self.config = config or SafetyConfig()
        """The safety settings (validated here)."""
        self.config.validate()
        self.fallback_controller = fallback_controller
        """Used in FALLBACK instead of the safe command when set: ``obs (o,) → action (a,)``."""
        self.counters = SafetyCounters()
        """Cumulative counts."""
        self.ctrl_dt = robot.ctrl_dt
        self.stale_after_s = self.config.stale_after_periods * robot.ctrl_dt
        """The stale deadline in seconds."""
        self.low, self.high = robot.action_low.astype(np.float64), robot.action_high.astype(np.float64)
        self.max_step = (robot.action_max_rate * robot.ctrl_dt).astype(np.float64)
        """Largest change of a command from the previous one: ``max_rate × ctrl_dt`` per action field."""
        self.safe_action = robot.safe_action.astype(np.float64)
        self._action_names = [a.name for a in robot.action]

        self._events: list[SafetyEvent] = []
        self._handshake_ok = False
        self._armed = False
        self._enabled = True
        self._shutdown = False
        self._latched: dict[EventCode, str] = {}
        self._new_session()
        self._last_now = -math.inf
        self._last_received = -math.inf
        self._pe_streak = 0
        self._last_prediction_error = math.nan
        self._gradable = False
        self._worst_since_status = DiagnosticLevel.OK
        self._state = SafetyState.DISARMED

    def _new_session(self) -> None:
        """Forget everything about the link: a handshake starts a new session with a (possibly restarted) robot."""
        self._last_seq: int | None = None
        self._last_stamp: int | None = None
        self._last_good_at = -math.inf
        self._link_fault: EventCode | None = None
        self._link_fault_message = ""
        self._recovery_count = 0
        self._not_advancing_since_good = False
        self._nonfinite_since_good = False
        self._frame_pending = False
        self._latest_obs: np.ndarray | None = None
        # The robot starts (and restarts) on its safe command: ramps are measured from there.
        self._last_sent = self.safe_action.copy()
        self._armed = False
        self._gradable = False

    # ---- properties ------------------------------------------------------------------------------------
    @property
    def armed(self) -> bool:
        """True once a handshake succeeded and a good frame followed it (commands may be sent)."""
        return self._armed

    @property
    def state(self) -> SafetyState:
        """The state as of the latest decision (or handshake, enable/disable, reset, shutdown)."""
        return self._state

    @property
    def last_command(self) -> np.ndarray:
        """The last command sent (the safe command before any): the reference of the rate limit."""
        return self._last_sent.copy()

    @property
    def active_faults(self) -> list[str]:
        """Codes of the faults in force: the link fault, latched faults, operator disable, shutdown."""
        faults = [self._link_fault.value] if self._link_fault is not None else []
        faults += [code.value for code in self._latched]
        if not self._enabled:
            faults.append(EventCode.OPERATOR_DISABLED.value)
        if self._shutdown:
            faults.append(EventCode.SHUTDOWN.value)
        return faults

    # ---- inputs ------------------------------------------------------------------------------------------
    def on_handshake(self, ok: bool, now: float, reason: str = "") -> None:
        """Result of a (re)handshake with the robot. Either way a new session starts: the layer is disarmed
        until the first good frame after a successful one (link faults clear, latched faults stay)."""
        self._new_session()
        self._handshake_ok = bool(ok)
        if ok:
            self.counters.handshakes_ok += 1
            self._emit(EventCode.HANDSHAKE_OK, "handshake succeeded; armed at the first fresh frame", now)
        else:
            self.counters.handshakes_failed += 1
            self._emit(EventCode.HANDSHAKE_FAILED, f"handshake failed, nothing will be sent: {reason or 'no reason'}",
                       now)
        self._state = self._current_state()

    def on_frame(self, seq: int, stamp_ns: int, received_at: float, obs: np.ndarray) -> bool:
        """A telemetry frame: robot sequence number, robot stamp (ns, robot clock), receive time (s, controller
        clock), observation ``(obs_dim,)``. Returns True when it is good (fresh and finite): the adapter may act
        on it and :meth:`filter` may send a command for it."""
        seq, stamp_ns, received_at = int(seq), int(stamp_ns), float(received_at)
        obs = np.asarray(obs, dtype=np.float64)
        if obs.shape != (self.robot.obs_dim,):
            raise ValueError(f"obs must have shape ({self.robot.obs_dim},) for the measured fields "
                             f"{[f.name for f in self.robot.measured_fields]}, got {obs.shape}")
        if received_at < self._last_received:
            raise ValueError(f"received_at went backwards ({received_at} < {self._last_received}): "
                             "pass a monotonic clock")
        self._last_received = received_at
        c = self.counters
        c.frames_received += 1
        if not self._handshake_ok:
            c.frames_ignored += 1
            return False
        if self._armed:
            self._check_deadline(received_at)
        on_time = self._armed and received_at - self._last_good_at <= self.stale_after_s

        if self._last_seq is not None and seq < self._last_seq:
            c.sequence_regressions += 1
            if self._armed and self._link_fault is not EventCode.SEQUENCE_REGRESSED:
                self._raise_link_fault(EventCode.SEQUENCE_REGRESSED,
                                       f"sequence went back from {self._last_seq} to {seq}: the robot restarted? "
                                       "a new handshake is needed", received_at)
            return False
        if self._last_seq is not None and (seq == self._last_seq or stamp_ns <= self._last_stamp):
            c.frames_not_advancing += 1
            self._recovery_count = 0
            if not self._not_advancing_since_good:
                self._emit(EventCode.FRAME_NOT_ADVANCING,
                           f"frame seq {seq} stamp {stamp_ns} ns does not advance past seq {self._last_seq} "
                           f"stamp {self._last_stamp} ns (duplicate or frozen)", received_at)
            self._not_advancing_since_good = True
            self._last_seq = max(seq, self._last_seq)
            return False

        gap = 0 if self._last_seq is None else seq - self._last_seq - 1
        self._last_seq, self._last_stamp = seq, stamp_ns
        if gap > 0:
            c.frames_lost += gap
            if gap > self.config.max_lost_frames:
                c.loss_bursts += 1
                if self._armed:
                    self._raise_link_fault(EventCode.LOSS_BURST, f"{gap} frames lost before seq {seq} "
                                           f"(limit max_lost_frames={self.config.max_lost_frames})", received_at)
            else:
                self._emit(EventCode.FRAMES_LOST, f"{gap} frame(s) lost before seq {seq}", received_at)
        if not np.isfinite(obs).all():
            c.obs_nonfinite += 1
            self._recovery_count = 0
            if not self._nonfinite_since_good:  # one event per run of bad frames, each one counted
                self._nonfinite_since_good = True
                bad = [f.name for f in self.robot.measured_fields
                       if not np.isfinite(obs[self.robot.obs_slices[f.name]]).all()]
                message = f"NaN/Inf in observation field(s) {bad} at seq {seq}"
                if self._armed:
                    self._raise_link_fault(EventCode.OBS_NONFINITE, message, received_at)
                else:
                    self._emit(EventCode.OBS_NONFINITE, message + " (not armed: frame ignored)", received_at)
            return False

        c.frames_good += 1
        tripped_by_this_frame = gap > self.config.max_lost_frames
        self._last_good_at = received_at
        self._not_advancing_since_good = self._nonfinite_since_good = False
        self._frame_pending = True
        self._latest_obs = obs.copy()
        if not self._armed:
            self._armed = True
            self._emit(EventCode.ARMED, f"armed at seq {seq}: handshake done and a fresh frame received", received_at)
        elif self._link_fault is not None and self._link_fault is not EventCode.SEQUENCE_REGRESSED:
            if tripped_by_this_frame or not on_time:
                self._recovery_count = 0
            else:
                self._recovery_count += 1
                if self._recovery_count >= self.config.recovery_fresh_frames:
                    c.link_recoveries += 1
                    self._emit(EventCode.LINK_RECOVERED, f"{self._link_fault.value} cleared after "
                               f"{self._recovery_count} good frames in a row (seq {seq})", received_at)
                    self._link_fault, self._recovery_count = None, 0
        return True

    def filter(self, action: np.ndarray | None, prediction_error: float | np.ndarray | None,
               now: float, update_refused: bool = False) -> SafetyDecision:
        """Decide this period's command from the adapter's ``action (a,)`` for the latest good frame and its
        ``prediction_error`` (RMS, robot.yaml scale units, for the previous step's prediction; NaN or None:
        unknown). ``action=None`` is the same as :meth:`tick`. ``update_refused``: the adapter refused its online
        model update this step (a diverging one) and acts with its last good model: a WARN event, counted; the
        action is still used (the model it comes from is the last good one)."""
        now = self._advance_clock(now)
        if update_refused:
            self.counters.model_updates_refused += 1
            self._emit(EventCode.MODEL_UPDATE_REFUSED, "the adapter refused an online model update (non-finite, not "
                       "positive definite or diverging) and keeps its last good model", now)
        if action is not None:
            action = np.asarray(action, dtype=np.float64)
            if action.shape != (self.robot.action_dim,):
                raise ValueError(f"action must have shape ({self.robot.action_dim},) for the action fields "
                                 f"{self._action_names}, got {action.shape}")
            if not self._frame_pending:
                self.counters.actions_without_frame += 1
                self._emit(EventCode.ACTION_WITHOUT_FRAME, "adapter action offered with no new good frame since the "
                           "previous decision: ignored", now)
                action = None
        pe = self._prediction_error_value(prediction_error)
        if action is not None:
            if not np.isfinite(action).all():
                self.counters.adapter_nonfinite += 1
                if EventCode.ADAPTER_NONFINITE not in self._latched:
                    self._latch(EventCode.ADAPTER_NONFINITE, f"adapter action {action.tolist()} is not finite", now)
                action = None
            else:
                self._grade_prediction_error(pe, now)
        return self._decide(action, now)

    def tick(self, now: float) -> SafetyDecision:
        """A period with nothing from the adapter (no new good frame, or the node did not run it): checks the
        deadline and returns the command of the current state (safe or fallback command, or None)."""
        now = self._advance_clock(now)
        return self._decide(None, now)

    def set_enabled(self, enabled: bool, now: float) -> None:
        """Operator enable/disable (the node's service). Disabled: SAFE_STOP (safe command) while armed."""
        if bool(enabled) == self._enabled:
            return
        self._enabled = bool(enabled)
        if enabled:
            self._emit(EventCode.OPERATOR_ENABLED, "enabled by the operator", now)
        else:
            self._emit(EventCode.OPERATOR_DISABLED, "disabled by the operator: safe command", now)
        self._state = self._current_state()

    def reset(self, now: float) -> None:
        """Operator reset: clear the latched controller faults (adapter NaN, prediction-error fallback, failed
        fallback). Reset the adapter at the same time: its memory saw the fault."""
        cleared = [code.value for code in self._latched]
        self._latched.clear()
        self._pe_streak = 0
        self._gradable = False
        self._emit(EventCode.LATCHES_RESET, f"operator reset; cleared: {cleared or 'nothing'}", now)
        self._state = self._current_state()

    def shutdown(self, now: float, reason: str) -> list[SafetyDecision]:
        """On SIGINT/SIGTERM/exception: the decisions to send, one per control period, before the process exits.

        ``config.shutdown_periods`` safe commands, or an empty list when the layer was never armed in this
        session (nothing may be sent). Afterwards every decision is the safe command (shutdown is final)."""
        self._shutdown = True
        if not self._armed:
            self._emit(EventCode.SHUTDOWN, f"shutdown ({reason}); not armed, so nothing is sent", now)
            self._state = SafetyState.DISARMED
            return []
        n = self.config.shutdown_periods
        self._emit(EventCode.SHUTDOWN, f"shutdown ({reason}): safe command for {n} periods "
                   f"({n * self.ctrl_dt:.3f} s)", now)
        self._state = SafetyState.SAFE_STOP
        self._note_level(DiagnosticLevel.WARN)
        decisions = []
        for _ in range(n):
            self._last_sent = self.safe_action.copy()
            self.counters.commands_safe += 1
            events, self._events = tuple(self._events), []
            decisions.append(SafetyDecision(self.safe_action.copy(), SafetyState.SAFE_STOP,
                                            CommandSource.SAFE_COMMAND, events, dataclasses.replace(self.counters)))
        return decisions

    def status(self) -> SafetyStatus:
        """The ``/diagnostics`` entry. Its level is the worst seen since the previous call (then forgotten)."""
        state = self._current_state()
        level = max(self._worst_since_status, self._state_level(state))
        self._worst_since_status = DiagnosticLevel.OK
        faults = self.active_faults
        message = f"{state.value}" + (f": {', '.join(faults)}" if faults else "")
        if self._link_fault is not None and self._link_fault_message:
            message += f" ({self._link_fault_message})"
        cfg = self.config
        values = {
            "state": state.value, "armed": str(self._armed), "handshake_ok": str(self._handshake_ok),
            "enabled": str(self._enabled), "faults": ",".join(faults), "last_command": str(self._last_sent.tolist()),
            "stale_after_s": f"{self.stale_after_s:.4f}", "max_lost_frames": str(cfg.max_lost_frames),
            "recovery_fresh_frames": str(cfg.recovery_fresh_frames),
            "recovery_progress": str(self._recovery_count),
            "prediction_error_threshold": str(cfg.prediction_error_threshold),
            "prediction_error_last": f"{self._last_prediction_error:.6g}",
            "prediction_error_streak": str(self._pe_streak),
            "fallback": "controller" if self.fallback_controller is not None else "safe_command",
        }
        values.update({k: str(v) for k, v in self.counters.as_dict().items()})
        return SafetyStatus(level, message, values)

    # ---- internals ------------------------------------------------------------------------------------------
    def _advance_clock(self, now: float) -> float:
        now = float(now)
        if not math.isfinite(now):
            raise ValueError(f"now must be a finite time in seconds, got {now}")
        if now < self._last_now:
            raise ValueError(f"now went backwards ({now} < {self._last_now}): pass a monotonic clock")
        self._last_now = now
        return now

    def _emit(self, code: EventCode, message: str, at: float) -> None:
        level = EVENT_LEVELS[code]
        self._events.append(SafetyEvent(code, level, message, float(at)))
        self._note_level(level)

    def _note_level(self, level: DiagnosticLevel) -> None:
        self._worst_since_status = max(self._worst_since_status, level)

    def _latch(self, code: EventCode, message: str, at: float) -> None:
        self._latched[code] = message
        self._pe_streak = 0
        self._emit(code, message + "; latched until an operator reset", at)

    def _raise_link_fault(self, code: EventCode, message: str, at: float) -> None:
        self._recovery_count = 0
        if code is EventCode.TELEMETRY_STALE:
            self.counters.stale_trips += 1
        elif code is EventCode.TELEMETRY_FROZEN:
            self.counters.frozen_trips += 1
        # A regression needs a new handshake, so it is never replaced by a fault that good frames could clear.
        if self._link_fault is not EventCode.SEQUENCE_REGRESSED:
            self._link_fault, self._link_fault_message = code, message
        self._emit(code, message + "; safe command", at)

    def _check_deadline(self, now: float) -> None:
        """Raise STALE/FROZEN once no good frame has come for longer than the deadline (while armed)."""
        age = now - self._last_good_at
        if age <= self.stale_after_s:
            return
        if self._link_fault is None:
            code = EventCode.TELEMETRY_FROZEN if self._not_advancing_since_good else EventCode.TELEMETRY_STALE
            what = "only non-advancing frames" if self._not_advancing_since_good else "no frame"
            self._raise_link_fault(code, f"{what} for {age:.3f} s since the last good frame (last seq seen "
                                   f"{self._last_seq}); deadline {self.stale_after_s:.3f} s = "
                                   f"{self.config.stale_after_periods} periods", now)
        else:
            self._recovery_count = 0

    def _prediction_error_value(self, prediction_error: float | np.ndarray | None) -> float:
        if prediction_error is None:
            return math.nan
        values = np.asarray(prediction_error, dtype=np.float64).ravel()
        if values.size != 1:
            raise ValueError(f"prediction_error must be one number (or None), got shape {np.shape(prediction_error)}")
        return float(values[0])

    def _grade_prediction_error(self, pe: float, now: float) -> None:
        """The persistence rule. The error grades the previous command's prediction, so it is only graded when
        that command was the adapter's own action, sent unchanged in the period just before: otherwise the
        adapter predicted the outcome of an action the robot never received."""
        self._last_prediction_error = pe
        threshold = self.config.prediction_error_threshold
        if threshold is None or math.isnan(pe) or not self._gradable:
            return
        self.counters.prediction_errors_graded += 1
        if pe <= threshold:
            self._pe_streak = 0
            return
        self.counters.prediction_error_exceedances += 1
        self._pe_streak += 1
        steps = self.config.prediction_error_steps
        if self._pe_streak >= steps:
            self.counters.prediction_error_trips += 1
            self._latch(EventCode.PREDICTION_ERROR_FALLBACK,
                        f"prediction error above {threshold:.4g} for {steps} steps in a row (now {pe:.4g}): "
                        f"{'fallback controller' if self.fallback_controller is not None else 'safe command'}", now)
        else:
            self._emit(EventCode.PREDICTION_ERROR_HIGH, f"prediction error {pe:.4g} > threshold {threshold:.4g} "
                       f"({self._pe_streak}/{steps})", now)

    def _current_state(self) -> SafetyState:
        if not (self._handshake_ok and self._armed):
            return SafetyState.DISARMED
        if (self._shutdown or self._link_fault is not None or not self._enabled
                or EventCode.ADAPTER_NONFINITE in self._latched or EventCode.FALLBACK_FAILED in self._latched):
            return SafetyState.SAFE_STOP
        if EventCode.PREDICTION_ERROR_FALLBACK in self._latched:
            return SafetyState.FALLBACK
        return SafetyState.OK

    def _state_level(self, state: SafetyState) -> DiagnosticLevel:
        if state in (SafetyState.OK,):
            return DiagnosticLevel.OK
        if state is SafetyState.SAFE_STOP:
            operator_only = self._link_fault is None and not self._latched
            return DiagnosticLevel.WARN if operator_only else DiagnosticLevel.ERROR
        if state is SafetyState.FALLBACK:
            return DiagnosticLevel.ERROR
        return DiagnosticLevel.WARN

    def _limit(self, proposed: np.ndarray, source: str, now: float) -> tuple[np.ndarray, bool]:
        """Clamp to the box, then to ``max_step`` from the last command (the order the sim env uses)."""
        clamped = np.minimum(np.maximum(proposed, self.low), self.high)
        limited = np.minimum(np.maximum(clamped, self._last_sent - self.max_step), self._last_sent + self.max_step)
        changed = False
        if (clamped != proposed).any():
            changed = True
            self.counters.actions_clamped += 1
            self._emit(EventCode.ACTION_CLAMPED, f"{source} action {proposed.tolist()} clamped to {clamped.tolist()} "
                       f"(limits {self.low.tolist()}..{self.high.tolist()})", now)
        if (limited != clamped).any():
            changed = True
            self.counters.actions_rate_limited += 1
            self._emit(EventCode.ACTION_RATE_LIMITED, f"{source} action {clamped.tolist()} rate-limited to "
                       f"{limited.tolist()} (max step {self.max_step.tolist()} from {self._last_sent.tolist()})", now)
        return limited, changed

    def _fallback_action(self, now: float) -> np.ndarray | None:
        """The fallback controller's action on the latest good frame, or None after latching FALLBACK_FAILED."""
        try:
            action = np.asarray(self.fallback_controller(self._latest_obs.copy()), dtype=np.float64)
        except Exception as exc:  # a broken fallback must still end in the safe command, never in a crash
            problem = f"raised {type(exc).__name__}: {exc}"
        else:
            if action.shape != (self.robot.action_dim,):
                problem = f"returned shape {action.shape}, expected ({self.robot.action_dim},)"
            elif not np.isfinite(action).all():
                problem = f"returned a non-finite action {action.tolist()}"
            else:
                return action
        self.counters.fallback_failures += 1
        self._latch(EventCode.FALLBACK_FAILED, f"fallback controller {problem}", now)
        return None

    def _decide(self, action: np.ndarray | None, now: float) -> SafetyDecision:
        if self._armed:
            self._check_deadline(now)
        pending, self._frame_pending = self._frame_pending, False
        if not pending:
            self.counters.periods_without_frame += 1
        gradable_next = False
        fallback: np.ndarray | None = None
        state = self._current_state()
        if state is SafetyState.FALLBACK and self.fallback_controller is not None and pending:
            fallback = self._fallback_action(now)
            state = self._current_state()  # SAFE_STOP if the fallback just failed
        command, source = None, CommandSource.NONE
        if state is SafetyState.SAFE_STOP or (state is SafetyState.FALLBACK and self.fallback_controller is None):
            command, source = self.safe_action.copy(), CommandSource.SAFE_COMMAND
            self.counters.commands_safe += 1
        elif state is SafetyState.FALLBACK and pending:
            command, _ = self._limit(fallback, "fallback", now)
            source = CommandSource.FALLBACK_CONTROLLER
            self.counters.commands_fallback += 1
        elif state is SafetyState.OK and action is not None:
            command, changed = self._limit(action, "adapter", now)
            source = CommandSource.ADAPTER
            self.counters.commands_adapter += 1
            gradable_next = not changed
        events, self._events = tuple(self._events), []
        if state is SafetyState.OK and any(e.level > DiagnosticLevel.OK for e in events):
            state = SafetyState.WARN
        if command is not None:
            self._last_sent = command.copy()
        self._gradable = gradable_next
        self._state = state
        self._note_level(self._state_level(state))
        return SafetyDecision(command, state, source, events, dataclasses.replace(self.counters))


__all__ = [
    "EVENT_LEVELS", "LATCHED_FAULTS", "LINK_FAULTS", "CommandSource", "DiagnosticLevel", "EventCode",
    "FallbackController", "SafetyConfig", "SafetyCounters", "SafetyDecision", "SafetyEvent", "SafetyLayer",
    "SafetyState", "SafetyStatus",
]
