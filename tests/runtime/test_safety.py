"""The runtime safety layer: every fault of docs/safety.md has its outcome, on the real cart-pole spec.

The layer never reads a clock, so these tests drive it with explicit times, exactly as the node (one
call per control period) and the shadow replay (logged times) do.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metarl_robot.paths import REPO_ROOT
from metarl_robot.replay.calibration import calibrate_prediction_threshold
from metarl_robot.runtime.safety import (
    EVENT_LEVELS,
    CommandSource,
    DiagnosticLevel,
    EventCode,
    SafetyConfig,
    SafetyDecision,
    SafetyLayer,
    SafetyState,
)
from metarl_robot.spec.robot import load_robot, robot_from_dict
from metarl_robot.spec.schema import SpecError

CARTPOLE = load_robot("cartpole")
DT = CARTPOLE.ctrl_dt
OBS = np.array([0.1, math.pi, 0.0, 0.0])
NS = round(DT * 1e9)


def cartpole_with(**action_changes) -> object:
    """The cart-pole spec with its action field changed (e.g. a slower motor, so the rate limit binds)."""
    data = CARTPOLE.to_dict()
    data["action"][0].update(action_changes)
    return robot_from_dict(data)


SLOW = cartpole_with(max_rate=5.0)
"""Max step 0.2 per period: a full-scale change takes 5 periods."""


class Link:
    """Plays the node: one control period per :meth:`period`, frames from a well-behaved robot by default."""

    def __init__(self, layer: SafetyLayer, t0: float = 100.0) -> None:
        self.layer, self.t, self.seq, self.stamp = layer, t0, 0, 5 * 10**9

    def handshake(self, ok: bool = True) -> None:
        self.layer.on_handshake(ok, self.t, "" if ok else "robot.yaml hash differs")

    def frame(self, obs: np.ndarray = OBS, seq_step: int = 1, stamp_step: int | None = None) -> bool:
        self.seq += seq_step
        self.stamp += NS * seq_step if stamp_step is None else stamp_step
        return self.layer.on_frame(self.seq, self.stamp, self.t, obs)

    def period(self, action=(0.0,), prediction_error=None, frame: bool = True, **frame_kw) -> SafetyDecision:
        """Advance one period; deliver a frame (unless ``frame=False``); filter the action if the frame is good."""
        self.t += DT
        usable = self.frame(**frame_kw) if frame else False
        if usable and action is not None:
            return self.layer.filter(np.asarray(action, dtype=float), prediction_error, self.t)
        return self.layer.tick(self.t)

    def arm(self) -> SafetyDecision:
        self.handshake()
        decision = self.period()
        assert self.layer.armed and decision.command is not None
        return decision


def armed_link(robot=CARTPOLE, fallback=None, **config) -> Link:
    link = Link(SafetyLayer(robot, SafetyConfig(**config), fallback_controller=fallback))
    link.arm()
    return link


def codes(decision: SafetyDecision) -> list[EventCode]:
    return [e.code for e in decision.events]


# ---- configuration -------------------------------------------------------------------------------------------
def test_defaults_are_valid_and_round_trip_through_a_mapping():
    config = SafetyConfig()
    config.validate()
    assert SafetyConfig.from_mapping(config.to_dict()) == config
    loaded = SafetyConfig.from_mapping({"stale_after_periods": 2, "prediction_error_threshold": 0.1})
    assert loaded.stale_after_periods == 2.0 and loaded.prediction_error_threshold == 0.1


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("stale_after_periods", 1.0, "[1.5, 50]"),
    ("stale_after_periods", 51, "[1.5, 50]"),
    ("max_lost_frames", -1, "[0, 100]"),
    ("recovery_fresh_frames", 0, "[1, 1000]"),
    ("prediction_error_threshold", 0.0, "> 0"),
    ("prediction_error_threshold", -1.0, "> 0"),
    ("prediction_error_steps", 0, "[1, 100]"),
    ("shutdown_periods", 0, "[1, 1000]"),
])
def test_out_of_range_values_are_refused_naming_the_field_and_range(key, value, allowed):
    with pytest.raises(SpecError) as err:
        SafetyConfig.from_mapping({key: value}, where="params.yaml: safety")
    assert err.value.field == key and allowed in err.value.problem and err.value.where == "params.yaml: safety"
    with pytest.raises(SpecError, match=key):
        SafetyLayer(CARTPOLE, SafetyConfig(**{key: value}))


def test_unknown_keys_and_wrong_types_are_refused():
    with pytest.raises(SpecError, match=r"unknown key 'stale_after_s'.*allowed keys here: stale_after_periods"):
        SafetyConfig.from_mapping({"stale_after_s": 0.1})
    with pytest.raises(SpecError, match=r"max_lost_frames: expected an integer, got 2\.5"):
        SafetyConfig.from_mapping({"max_lost_frames": 2.5})
    with pytest.raises(SpecError, match="stale_after_periods: must be finite"):
        SafetyConfig.from_mapping({"stale_after_periods": float("nan")})


def test_every_event_code_has_a_level():
    assert set(EVENT_LEVELS) == set(EventCode)


# ---- arming: nothing is ever sent before a handshake and a fresh frame --------------------------------------
def test_nothing_is_sent_before_a_handshake_even_with_frames_and_actions():
    link = Link(SafetyLayer(CARTPOLE))
    for _ in range(5):
        decision = link.period(action=(0.5,))
        assert decision.command is None and decision.state is SafetyState.DISARMED
    assert link.layer.counters.frames_ignored == 5
    assert link.layer.filter(np.array([0.5]), None, link.t).command is None  # no good frame: action refused


def test_a_handshake_alone_does_not_arm_only_the_first_fresh_frame_after_it():
    link = Link(SafetyLayer(CARTPOLE))
    link.handshake()
    decision = link.period(frame=False)
    assert decision.command is None and decision.state is SafetyState.DISARMED
    assert not link.frame(obs=np.array([np.nan, 0, 0, 0]))
    decision = link.layer.tick(link.t)
    assert decision.command is None and codes(decision) == [EventCode.OBS_NONFINITE]  # a NaN frame does not arm
    decision = link.period(action=(0.3,))
    assert EventCode.ARMED in codes(decision) and np.array_equal(decision.command, [0.3])
    assert decision.source is CommandSource.ADAPTER


def test_a_failed_handshake_disarms_and_nothing_is_sent_until_a_good_one():
    link = armed_link()
    link.handshake(ok=False)
    decisions = [link.period(action=(0.2,)) for _ in range(3)]
    assert all(d.command is None and d.state is SafetyState.DISARMED for d in decisions)
    assert codes(decisions[0]) == [EventCode.HANDSHAKE_FAILED] and "hash differs" in decisions[0].events[0].message
    assert link.layer.status().level is DiagnosticLevel.ERROR  # reported once, then disarmed is a warning
    assert link.layer.status().level is DiagnosticLevel.WARN


def test_a_new_handshake_starts_a_new_session_ramping_from_the_safe_command():
    link = armed_link(SLOW)
    for _ in range(5):
        link.period(action=(1.0,))
    assert link.layer.last_command[0] == pytest.approx(1.0)
    link.handshake()  # the robot restarted: its sequence starts over and its motor is on the safe command
    link.seq, link.stamp = 0, 0
    decision = link.period(action=(1.0,))
    assert EventCode.ARMED in codes(decision) and decision.command[0] == pytest.approx(0.2)


# ---- stale, frozen, lost ------------------------------------------------------------------------------------
@pytest.mark.parametrize("periods", [1.5, 2.5, 3.5, 10.0])
def test_stale_telemetry_gives_the_safe_command_within_one_period_of_the_deadline(periods):
    link = armed_link(stale_after_periods=periods)
    link.period(action=(0.6,))
    last_frame_at = link.t
    deadline = periods * DT
    while True:
        decision = link.period(frame=False)
        age = link.t - last_frame_at
        if decision.command is not None:
            break
        assert decision.state is SafetyState.OK and age <= deadline + 1e-9
    assert deadline - 1e-9 < age <= deadline + DT + 1e-9
    assert decision.state is SafetyState.SAFE_STOP and np.array_equal(decision.command, CARTPOLE.safe_action)
    assert EventCode.TELEMETRY_STALE in codes(decision)
    assert all(np.array_equal(link.period(frame=False).command, CARTPOLE.safe_action) for _ in range(3))


def test_a_gap_seen_only_when_the_next_frame_arrives_still_trips_stale():
    link = armed_link()  # the replay may deliver frames without ticks in between
    link.t += 10 * DT
    decision = link.period(action=(0.4,))
    assert EventCode.TELEMETRY_STALE in codes(decision) and decision.source is CommandSource.SAFE_COMMAND


@pytest.mark.parametrize("freeze", ["same_seq", "same_stamp", "stamp_backwards"])
def test_frozen_telemetry_gives_the_safe_command_like_stale(freeze):
    link = armed_link()
    step = {"same_seq": {"seq_step": 0, "stamp_step": 0}, "same_stamp": {"stamp_step": 0},
            "stamp_backwards": {"stamp_step": -NS}}[freeze]
    last_good_at, events = link.t, []
    while True:
        decision = link.period(action=(0.5,), **step)
        events += codes(decision)
        if decision.command is not None:
            break
    assert link.t - last_good_at <= 3.5 * DT + DT + 1e-9
    assert decision.state is SafetyState.SAFE_STOP and EventCode.TELEMETRY_FROZEN in events
    assert events.count(EventCode.FRAME_NOT_ADVANCING) == 1  # reported once per freeze, counted every frame
    assert link.layer.counters.frames_not_advancing >= 3 and link.layer.counters.frozen_trips == 1


def test_lost_frames_within_the_limit_are_reported_and_control_continues():
    link = armed_link(max_lost_frames=2)
    decision = link.period(action=(0.1,), seq_step=3)  # 2 frames lost
    assert decision.source is CommandSource.ADAPTER and decision.state is SafetyState.WARN
    assert EventCode.FRAMES_LOST in codes(decision) and link.layer.counters.frames_lost == 2


def test_a_burst_of_lost_frames_beyond_the_limit_gives_the_safe_command_at_once():
    link = armed_link(max_lost_frames=2, stale_after_periods=10)
    decision = link.period(action=(0.1,), seq_step=4)  # 3 lost: arrives on time, but the gap is too large
    assert decision.source is CommandSource.SAFE_COMMAND and decision.state is SafetyState.SAFE_STOP
    assert EventCode.LOSS_BURST in codes(decision) and link.layer.counters.loss_bursts == 1


# ---- NaN / Inf ---------------------------------------------------------------------------------------------
def test_nan_in_an_observation_gives_the_safe_command_in_that_period():
    link = armed_link()
    decision = link.period(action=(0.3,), obs=np.array([0.0, np.inf, 0.0, 0.0]))
    assert decision.source is CommandSource.SAFE_COMMAND and EventCode.OBS_NONFINITE in codes(decision)
    assert "pole_angle" in decision.events[0].message
    for _ in range(3):  # a sensor that keeps sending NaN: one event, every frame counted
        decision = link.period(action=(0.3,), obs=np.array([np.nan] * 4))
        assert decision.source is CommandSource.SAFE_COMMAND and EventCode.OBS_NONFINITE not in codes(decision)
    assert link.layer.counters.obs_nonfinite == 4


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_adapter_action_is_latched_until_an_operator_reset(bad):
    link = armed_link(SLOW)
    decision = link.period(action=(bad,))
    assert decision.source is CommandSource.SAFE_COMMAND and EventCode.ADAPTER_NONFINITE in codes(decision)
    for _ in range(10):  # good frames and good actions do not clear it
        decision = link.period(action=(0.5,))
        assert decision.state is SafetyState.SAFE_STOP and np.array_equal(decision.command, SLOW.safe_action)
    assert "ADAPTER_NONFINITE" in link.layer.status().values["faults"]
    link.layer.reset(link.t)
    decision = link.period(action=(0.5,))
    assert decision.source is CommandSource.ADAPTER and decision.command[0] == pytest.approx(0.2)  # ramps up


# ---- limits --------------------------------------------------------------------------------------------------
def test_actions_are_clamped_and_rate_limited_with_events_and_counters():
    link = armed_link(SLOW)
    decision = link.period(action=(7.0,))
    assert decision.command[0] == pytest.approx(0.2) and decision.state is SafetyState.WARN
    assert codes(decision) == [EventCode.ACTION_CLAMPED, EventCode.ACTION_RATE_LIMITED]
    sent = [link.period(action=(-1.0,)).command[0] for _ in range(8)]
    assert sent == pytest.approx([0.0, -0.2, -0.4, -0.6, -0.8, -1.0, -1.0, -1.0])
    c = link.layer.counters
    assert c.actions_clamped == 1 and c.actions_rate_limited == 6 and c.commands_adapter == 10


def test_an_action_within_limits_passes_unchanged_on_the_cartpole():
    link = armed_link()
    for value in (0.5, 1.0, 0.0, -1.0, -0.3):  # the cart-pole's max step is 25/s × 0.04 s = 1.0
        decision = link.period(action=(value,))
        assert decision.command[0] == value and decision.state is SafetyState.OK and not decision.events


def test_the_safe_command_is_sent_at_once_and_leaving_it_is_rate_limited():
    link = armed_link(SLOW)
    for _ in range(5):
        link.period(action=(1.0,))
    assert link.layer.last_command[0] == pytest.approx(1.0)
    decision = link.period(action=(1.0,), obs=np.full(4, np.nan))
    assert decision.command[0] == 0.0  # a jump of 1.0, five times the rate limit: the safe command is not ramped
    ramp = [link.period(action=(1.0,)).command[0] for _ in range(3 + 5)]
    # The third good frame in a row clears the fault and its command is the adapter's, ramped from the safe command.
    assert ramp == pytest.approx([0.0, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


# ---- recovery -------------------------------------------------------------------------------------------------
def test_a_link_fault_clears_after_the_configured_good_frames_in_a_row():
    link = armed_link(recovery_fresh_frames=4)
    link.period(frame=False)
    link.t += 5 * DT
    assert link.layer.tick(link.t).state is SafetyState.SAFE_STOP
    states = [link.period(action=(0.1,)) for _ in range(6)]
    # The frame that ends the gap is late, so it does not count; then 4 good frames clear the fault.
    assert [d.source for d in states] == [CommandSource.SAFE_COMMAND] * 4 + [CommandSource.ADAPTER] * 2
    assert EventCode.LINK_RECOVERED in codes(states[4]) and link.layer.counters.link_recoveries == 1


def test_recovery_restarts_after_a_frozen_frame_or_a_gap():
    link = armed_link(recovery_fresh_frames=3, max_lost_frames=0)
    link.period(seq_step=5)  # burst
    sources = [link.period().source for _ in range(2)]
    sources.append(link.period(seq_step=0, stamp_step=0).source)  # a duplicate restarts the count
    sources += [link.period().source for _ in range(2)]
    sources.append(link.period(seq_step=2).source)  # a new gap restarts it too
    sources += [link.period().source for _ in range(4)]
    assert sources == [CommandSource.SAFE_COMMAND] * 8 + [CommandSource.ADAPTER] * 2


def test_a_sequence_going_backwards_needs_a_new_handshake():
    link = armed_link()
    link.seq -= 10
    decision = link.period()
    assert EventCode.SEQUENCE_REGRESSED in codes(decision) and decision.state is SafetyState.SAFE_STOP
    for _ in range(30):  # even once the new sequence passes the old one, good frames do not clear it
        decision = link.period()
        assert decision.source is CommandSource.SAFE_COMMAND and EventCode.SEQUENCE_REGRESSED not in codes(decision)
    link.handshake()
    assert link.period().source is CommandSource.ADAPTER


# ---- prediction error --------------------------------------------------------------------------------------
def test_one_outlier_does_not_trip_the_fallback_but_persistence_does():
    link = armed_link(prediction_error_threshold=0.1, prediction_error_steps=3)
    for pe in (0.05, 0.5, 0.5, 0.05, 0.5, np.nan, 0.5, 0.05):  # streaks of 2 at most; NaN is not graded
        decision = link.period(action=(0.1,), prediction_error=pe)
        assert decision.source is CommandSource.ADAPTER
    assert link.layer.counters.prediction_error_exceedances == 4 and link.layer.counters.prediction_errors_graded == 7
    link.layer.status()
    decisions = [link.period(action=(0.1,), prediction_error=pe) for pe in (0.5, np.inf, 0.5)]
    assert [d.state for d in decisions] == [SafetyState.WARN, SafetyState.WARN, SafetyState.FALLBACK]
    assert EventCode.PREDICTION_ERROR_FALLBACK in codes(decisions[-1])
    assert decisions[-1].source is CommandSource.SAFE_COMMAND  # no fallback controller configured
    status = link.layer.status()
    assert status.level is DiagnosticLevel.ERROR and status.values["state"] == "FALLBACK"
    for _ in range(5):  # latched: low errors do not bring the adapter back (it no longer controls the robot)
        assert link.period(action=(0.1,), prediction_error=0.01).state is SafetyState.FALLBACK
    link.layer.reset(link.t)
    assert link.period(action=(0.1,), prediction_error=0.5).source is CommandSource.ADAPTER


def test_prediction_errors_are_graded_only_for_the_adapters_own_previous_command():
    link = armed_link(SLOW, prediction_error_threshold=0.1, prediction_error_steps=2)
    link.period(action=(1.0,), prediction_error=None)
    for i in range(5):  # every command is rate-limited: the adapter predicted for actions the robot never got
        link.period(action=(-1.0,) if i % 2 == 0 else (1.0,), prediction_error=9.0)
    assert link.layer.counters.prediction_errors_graded == 0
    hold = link.layer.last_command
    assert link.period(action=hold, prediction_error=9.0).state is SafetyState.OK  # the previous was limited
    assert link.period(action=hold, prediction_error=9.0).state is SafetyState.WARN  # graded: 1 of 2
    link.period(frame=False)  # a period without a frame: the next error spans two periods, not graded
    assert link.period(action=hold, prediction_error=9.0).state is SafetyState.OK
    assert link.period(action=hold, prediction_error=9.0).state is SafetyState.FALLBACK  # graded: 2 of 2
    assert link.layer.counters.prediction_errors_graded == 2


def test_the_fallback_controller_takes_over_rate_limited_and_a_broken_one_ends_in_the_safe_command():
    calls = []

    def pd(obs):
        calls.append(obs.copy())
        return np.array([-1.0]) if len(calls) < 4 else np.array([np.nan])

    link = armed_link(SLOW, fallback=pd, prediction_error_threshold=0.1, prediction_error_steps=1)
    link.period(action=(0.2,))
    decision = link.period(action=(0.2,), prediction_error=1.0)
    assert decision.state is SafetyState.FALLBACK and decision.source is CommandSource.FALLBACK_CONTROLLER
    assert decision.command[0] == pytest.approx(0.0) and np.array_equal(calls[0], OBS)  # ramps from 0.2
    assert link.period(frame=False).command is None  # no new frame: nothing new to act on
    assert link.period().command[0] == pytest.approx(-0.2)
    assert link.period().command[0] == pytest.approx(-0.4)
    decision = link.period()  # the fallback returns NaN
    assert decision.state is SafetyState.SAFE_STOP and EventCode.FALLBACK_FAILED in codes(decision)
    assert np.array_equal(decision.command, SLOW.safe_action)


def test_a_raising_fallback_controller_is_caught_and_latched():
    def broken(obs):
        raise RuntimeError("encoder offline")

    link = armed_link(fallback=broken, prediction_error_threshold=0.1, prediction_error_steps=1)
    link.period(action=(0.0,))
    decision = link.period(action=(0.0,), prediction_error=1.0)
    assert decision.source is CommandSource.SAFE_COMMAND and "encoder offline" in decision.events[-1].message


# ---- operator, shutdown, diagnostics -----------------------------------------------------------------------
def test_disable_sends_the_safe_command_as_a_warning_and_enable_resumes():
    link = armed_link()
    link.layer.set_enabled(False, link.t)
    decision = link.period(action=(0.5,))
    assert decision.source is CommandSource.SAFE_COMMAND and EventCode.OPERATOR_DISABLED in codes(decision)
    assert link.layer.status().level is DiagnosticLevel.WARN
    link.layer.set_enabled(True, link.t)
    assert link.period(action=(0.5,)).source is CommandSource.ADAPTER


def test_shutdown_sends_the_safe_command_for_the_configured_periods_and_stays_stopped():
    link = armed_link(shutdown_periods=7)
    link.period(action=(0.9,))
    decisions = link.layer.shutdown(link.t, "SIGTERM")
    assert len(decisions) == 7 and all(np.array_equal(d.command, CARTPOLE.safe_action) for d in decisions)
    assert codes(decisions[0]) == [EventCode.SHUTDOWN] and all(not d.events for d in decisions[1:])
    assert decisions[-1].counters.commands_safe == 7
    assert link.period(action=(0.9,)).source is CommandSource.SAFE_COMMAND


def test_shutdown_before_arming_sends_nothing():
    layer = SafetyLayer(CARTPOLE)
    layer.on_handshake(True, 0.0)
    assert layer.shutdown(0.1, "KeyboardInterrupt") == []


def test_status_reports_the_worst_level_since_the_previous_status():
    link = armed_link(stale_after_periods=1.5)
    assert link.layer.status().level is DiagnosticLevel.OK
    link.period(frame=False)
    link.period(frame=False)  # stale
    for _ in range(4):
        link.period()  # recovered after 3 good frames
    assert link.layer.state is SafetyState.OK
    status = link.layer.status()
    assert status.level is DiagnosticLevel.ERROR and status.values["stale_trips"] == "1"
    assert link.layer.status().level is DiagnosticLevel.OK
    assert {"state", "faults", "stale_after_s", "prediction_error_threshold", "commands_safe"} <= set(status.values)


def test_bad_inputs_raise_clear_errors():
    link = armed_link()
    with pytest.raises(ValueError, match=r"obs must have shape \(4,\).*cart_pos"):
        link.layer.on_frame(99, 10**12, link.t, np.zeros(3))
    with pytest.raises(ValueError, match=r"action must have shape \(1,\).*motor"):
        link.layer.filter(np.zeros(2), None, link.t)
    with pytest.raises(ValueError, match="now went backwards"):
        link.layer.tick(link.t - 1.0)
    with pytest.raises(ValueError, match="received_at went backwards"):
        link.layer.on_frame(99, 10**12, link.t - 1.0, OBS)
    with pytest.raises(ValueError, match="prediction_error must be one number"):
        link.layer.filter(np.zeros(1), np.zeros(2), link.t)


# ---- properties over arbitrary input sequences --------------------------------------------------------------
_action = st.one_of(*[st.floats(-0.2, 0.2)] * 8, st.floats(-5, 5), st.sampled_from([-5.0, -1.0, 1.0, 5.0]),
                    st.sampled_from([np.nan, np.inf, -np.inf, 1e300]))
"""Mostly actions the rate limit passes unchanged (so prediction errors get graded), some it limits, a few broken."""
_prediction_error = st.one_of(*[st.floats(0, 1)] * 4, st.none(), st.just(np.nan))
_FRAMES = {"good": (1, NS, True), "dup": (0, 0, True), "gap": (2, 2 * NS, True), "burst": (5, 5 * NS, True),
           "nan": (1, NS, False), "regress": (-3, NS, True), "stamp_stuck": (1, 0, True)}
_EXTRAS = [None] * 12 + ["handshake", "handshake_failed", "reset", "reset", "reset", "disable", "enable", "tick",
                         "late_tick", "filter_again"]
_periods = st.lists(st.tuples(
    st.sampled_from(["good"] * 10 + [*_FRAMES, "none"]), _action, _prediction_error, st.floats(0.5 * DT, 2 * DT),
    st.sampled_from(_EXTRAS),
), min_size=5, max_size=80)
"""The node's periods after a handshake: a frame of some kind (mostly good) or none, then ``filter`` if it was good,
else ``tick``; now and then something else happens after it (a new handshake, an operator action, an extra call)."""


MEDIUM = cartpole_with(max_rate=12.5)
"""Max step 0.5 per period: the rate limit binds, yet commands reach the limits within a few periods."""


def _run(periods, robot=MEDIUM) -> list[tuple]:
    """Play ``periods``; check every decision against the documented rules; return a trace for comparison."""
    layer = SafetyLayer(robot, SafetyConfig(prediction_error_threshold=0.3, prediction_error_steps=1,
                                            max_lost_frames=1, recovery_fresh_frames=2),
                        fallback_controller=lambda obs: np.array([obs[0] * 10]))
    t, seq, stamp = 0.0, 10, 10**9
    step = robot.action_max_rate * robot.ctrl_dt
    trace = []
    sent = {"prev": robot.safe_action.copy(), "handshake_ok": True, "good_since_handshake": False}

    def check(decision: SafetyDecision) -> None:
        cmd = decision.command
        if cmd is not None:
            assert sent["handshake_ok"] and sent["good_since_handshake"], "a command before handshake + fresh frame"
            assert np.isfinite(cmd).all() and (cmd >= robot.action_low).all() and (cmd <= robot.action_high).all()
            if decision.source is CommandSource.SAFE_COMMAND:
                assert np.array_equal(cmd, robot.safe_action)
            else:
                assert (np.abs(cmd - sent["prev"]) <= step + 1e-12).all(), (cmd, sent["prev"])
                assert decision.state in (SafetyState.OK, SafetyState.WARN, SafetyState.FALLBACK)
            sent["prev"] = cmd
        else:
            assert decision.source is CommandSource.NONE
        if decision.state is SafetyState.DISARMED:
            assert cmd is None
        trace.append((decision.state, decision.source, None if cmd is None else cmd.tolist(),
                      [(e.code, e.message, e.at) for e in decision.events]))

    def handshake(ok: bool) -> None:
        layer.on_handshake(ok, t, "" if ok else "refused")
        sent.update(prev=robot.safe_action.copy(), handshake_ok=ok, good_since_handshake=False)

    handshake(True)
    for kind, action, pe, dt, extra in periods:
        t += dt
        good = False
        if kind != "none":
            dseq, dstamp, finite = _FRAMES[kind]
            seq, stamp = seq + dseq, stamp + dstamp
            good = layer.on_frame(seq, stamp, t, OBS if finite else np.array([np.nan, 0, 0, 0]))
            sent["good_since_handshake"] |= good and sent["handshake_ok"]
        check(layer.filter(np.array([action]), pe, t) if good else layer.tick(t))
        if extra in ("handshake", "handshake_failed"):
            handshake(extra == "handshake")
        elif extra == "reset":
            layer.reset(t)
        elif extra in ("disable", "enable"):
            layer.set_enabled(extra == "enable", t)
        elif extra == "tick":
            check(layer.tick(t))
        elif extra == "late_tick":
            t += 5 * DT
            check(layer.tick(t))
        elif extra == "filter_again":  # the node offering a second action for the same frame: refused
            check(layer.filter(np.array([action]), pe, t))
    for decision in layer.shutdown(t, "end"):
        check(decision)
    return trace


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_periods)
def test_every_command_is_finite_within_limits_and_rate_limited_unless_it_is_the_safe_command(periods):
    _run(periods)


@settings(max_examples=100, deadline=None)
@given(_periods)
def test_the_layer_is_deterministic_given_the_same_inputs_and_times(periods):
    assert _run(periods) == _run(periods)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.05, 0.99), min_size=1, max_size=40), st.floats(1.5, 6.0))
def test_a_steady_stream_never_trips_and_silence_always_does(frame_gaps, periods):
    """Frames closer than the deadline never stop control; silence past it always does, within one period."""
    link = armed_link(stale_after_periods=periods)
    for fraction_of_deadline in frame_gaps:
        link.t += fraction_of_deadline * periods * DT
        assert link.frame()
        assert link.layer.filter(np.array([0.0]), None, link.t).source is CommandSource.ADAPTER
    last = link.t
    while (decision := link.period(frame=False)).command is None:
        pass
    assert periods * DT < link.t - last + 1e-9 <= periods * DT + DT + 1e-9
    assert decision.source is CommandSource.SAFE_COMMAND


# ---- the operator's guide names what the code does ---------------------------------------------------------
def _doc_table(name: str) -> list[list[str]]:
    text = (REPO_ROOT / "docs" / "safety.md").read_text()
    body = text.split(f"<!-- {name}:begin -->")[1].split(f"<!-- {name}:end -->")[0]
    rows = [line for line in body.strip().splitlines()[2:] if line.startswith("|")]
    return [[cell.strip().strip("`") for cell in row.strip("|").split("|")] for row in rows]


def test_the_guide_lists_every_config_key_with_its_default():
    documented = {row[0]: row[1] for row in _doc_table("config-table")}
    defaults = SafetyConfig().to_dict()
    assert set(documented) == set(defaults)
    for key, value in defaults.items():
        assert documented[key] == ("null" if value is None else str(value)), key
    named = [pair for row in _doc_table("fault-table") for pair in re.findall(r"([a-z_]+)`? \(([^ )=:]+)", row[3])]
    assert {key for key, _ in named} == set(defaults) - {"recovery_fresh_frames"}  # the recovery table has that one
    for key, default in named:  # the fault table's "config key (default)" column agrees with the code
        assert documented[key] == default, (key, default)


def test_the_guide_lists_every_event_code_with_its_level():
    documented = {row[0]: row[1] for row in _doc_table("event-table")}
    assert documented == {code.value: level.name for code, level in EVENT_LEVELS.items()}


# ---- the real adapter on the real cart-pole ------------------------------------------------------------------
@pytest.mark.slow
def test_calibrated_threshold_passes_nominal_episodes_and_catches_a_reversed_motor():
    """Calibrate on nominal episodes of the shipped bundle in MuJoCo; a held-out nominal episode never falls back,
    a cart-pole whose motor is wired backwards does, within a few steps, and then only the safe command goes out."""
    from metarl_robot.envs.meta_env import MetaMujocoEnv
    from metarl_robot.runtime.bundle import load_bundle

    bundle = load_bundle(REPO_ROOT / "policies" / "cartpole_mb")
    env = MetaMujocoEnv(bundle.family.name)
    steps = 5

    def episode(seed: int, task: str, layer: SafetyLayer | None = None, motor_sign: float = 1.0, n: int = 120):
        obs, _ = env.reset(seed=seed, options={"task": task})
        adapter = bundle.make_adapter(batch=1, seed=seed, planner_overrides={"samples": 32, "horizon": 20})
        params = {k: np.array([v]) for k, v in env.reward_params.items()}
        t, errors, decisions = 0.0, [], []
        if layer is not None:
            layer.on_handshake(True, t)
        for i in range(n):
            action, diag = adapter.act(obs[None], params)
            errors.append(float(diag["prediction_error"][0]))
            sent = action[0]
            if layer is not None:
                assert layer.on_frame(i, i * NS, t, obs)
                decision = layer.filter(action[0], diag["prediction_error"][0], t)
                decisions.append(decision)
                sent = decision.command
            next_obs, *_ = env.step(motor_sign * sent)
            adapter.observe(obs[None], sent[None], next_obs[None])
            obs, t = next_obs, t + DT
        return np.array(errors), decisions

    # 360 steps only (the documented default wants 1000 for the 0.99 quantile): a lower quantile, a wider margin.
    nominal = [episode(seed, "train")[0] for seed in range(3)]
    threshold = calibrate_prediction_threshold(nominal, steps=steps, quantile=0.95, margin=3.0)
    config = SafetyConfig(prediction_error_threshold=threshold, prediction_error_steps=steps)

    for seed, split in ((10, "train"), (11, "test")):  # held out: a new task, and an out-of-distribution one
        _, held_out = episode(seed, split, SafetyLayer(CARTPOLE, config))
        assert all(d.source is CommandSource.ADAPTER for d in held_out), f"{split} task fell back"

    _, reversed_motor = episode(20, "train", SafetyLayer(CARTPOLE, config), motor_sign=-1.0, n=40)
    first = next(i for i, d in enumerate(reversed_motor) if d.state is SafetyState.FALLBACK)
    assert first <= 4 * steps, f"fell back only at step {first}"
    assert EventCode.PREDICTION_ERROR_FALLBACK in codes(reversed_motor[first])
    assert all(np.array_equal(d.command, CARTPOLE.safe_action) for d in reversed_motor[first:])
