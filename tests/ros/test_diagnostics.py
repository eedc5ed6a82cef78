"""The node's /diagnostics levels from real numbers, without a ROS graph: the control loop graded against its
thresholds (rate error, jitter, compute time, overruns), through the loop statistics and through the real control
loop with an adapter slower than the control period; a failing episode log is a WARN of its own status."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from metarl_robot_ros.control_loop import ControlLoop, LoopStats, LoopThresholds, judge_loop
from metarl_robot_ros.params import parse_parameters
from metarl_robot_ros.recorder import RecordWorker

from metarl_robot.runtime.safety import SafetyLayer
from metarl_robot.spec.robot import RobotSpec, load_robot
from metarl_robot.telemetry.protocol import CommandFrame, StateFrame

PERIOD_S = 0.04
RATE_HZ = 1 / PERIOD_S
OK, WARN, ERROR = 0, 1, 2


def fed_stats(periods_ms: list[float], compute_ms: float | list[float]) -> LoopStats:
    """Loop statistics of commands sent ``periods_ms`` apart, each after ``compute_ms`` of adapter time."""
    stats = LoopStats(period_s=PERIOD_S)
    computes = compute_ms if isinstance(compute_ms, list) else [compute_ms] * (len(periods_ms) + 1)
    sent_ns = 1_000_000_000
    for k in range(len(periods_ms) + 1):
        if k:
            sent_ns += round(periods_ms[k - 1] * 1e6)
        stats.record(sent_ns=sent_ns, latency_ns=round(computes[k] * 1e6) + 200_000,
                     compute_ns=round(computes[k] * 1e6), control=True)
    return stats


def judged(stats: LoopStats, new_overruns: int = 0, thresholds: LoopThresholds | None = None) -> tuple[int, str]:
    level, problems = judge_loop(stats.snapshot(time.monotonic_ns()), RATE_HZ, thresholds or LoopThresholds(),
                                 new_overruns)
    return level, "; ".join(problems)


@pytest.mark.parametrize(("periods_ms", "compute_ms", "level", "fragment"), [
    ([40.0] * 60, 10.0, OK, ""),
    ([42.5] * 60, 10.0, WARN, "loop rate 23.53 Hz, expected 25 Hz (6% > 5%)"),
    ([45.0] * 60, 10.0, ERROR, "loop rate 22.22 Hz, expected 25 Hz (11% > 10%)"),
    ([34.0, 46.0] * 30, 10.0, WARN, "period jitter 6.00 ms std of 40 ms (15% > 10%)"),
    ([24.0, 56.0] * 30, 10.0, ERROR, "period jitter 16.00 ms std of 40 ms (40% > 25%)"),
    ([40.0] * 60, 28.0, WARN, "compute 28.00 ms mean of the 40 ms period (70% > 60%)"),
    ([40.0] * 60, 37.0, ERROR, "compute 37.00 ms mean of the 40 ms period (92% > 90%)"),
    ([40.0] * 5, 10.0, OK, ""),  # too few periods to grade
])
def test_the_loop_is_graded_against_its_thresholds(periods_ms, compute_ms, level, fragment):
    got, problems = judged(fed_stats(periods_ms, compute_ms))
    assert got == level, problems
    assert fragment in problems


def test_an_overrun_is_an_error_in_the_report_after_it_and_thresholds_are_parameters():
    compute = [10.0] * 30 + [45.0] + [10.0] * 30
    stats = fed_stats([40.0] * 60, compute)
    assert stats.overruns == 1 and stats.snapshot(0)["compute_ms_max"] == pytest.approx(45.0)
    level, problems = judged(stats, new_overruns=1)
    assert level == ERROR and "1 overrun(s) since the last report (compute longer than the 40 ms period; worst " \
                              "45.00 ms)" in problems
    assert judged(stats, new_overruns=0)[0] == OK  # the next report, if no other came
    # The same loop under tighter limits from the node's parameters.
    cfg = parse_parameters({"bundle": "b", "diagnostics.threshold.execution_time.mean.warn": 0.2,
                            "diagnostics.threshold.execution_time.mean.error": 0.3})
    assert judged(stats, thresholds=cfg.loop_thresholds)[0] == WARN


# ---- the real control loop, with an adapter slower than the control period -----------------------------------
class ClockLink:
    """A robot link whose robot publishes a frame every control period on the monotonic clock (latest state)."""

    def __init__(self, robot: RobotSpec) -> None:
        self.robot = robot
        self.session_lost = False
        self.armed = True
        self.sent: list[CommandFrame] = []
        self._t0 = time.monotonic()
        self._last_seq = 0

    def handshake(self, robot: RobotSpec, timeout_s: float = 3.0) -> None:
        self.armed = True

    def receive_state(self, timeout_s: float = 0.0) -> StateFrame | None:
        end = time.monotonic() + timeout_s
        while True:
            seq = int((time.monotonic() - self._t0) / PERIOD_S) + 1
            if seq > self._last_seq:
                self._last_seq = seq
                return StateFrame(seq=seq, stamp_ns=seq * round(PERIOD_S * 1e9), obs=np.zeros(self.robot.obs_dim),
                                  session=1)
            if time.monotonic() >= end:
                return None
            time.sleep(min(0.002, max(0.0, end - time.monotonic())))

    def send_command(self, action, answers: StateFrame, *, valid_for_s: float | None = None) -> CommandFrame:
        frame = CommandFrame(seq=len(self.sent) + 1, answers_seq=answers.seq, expires_ns=answers.stamp_ns,
                             session=1, action=np.asarray(action, dtype=np.float64))
        self.sent.append(frame)
        return frame


class SlowAdapter:
    """Acts in 1.3 control periods: every step overruns."""

    observes_sent_commands = False

    def observe(self, obs, action, next_obs) -> None:
        pass

    def act(self, obs, task_params):
        time.sleep(1.3 * PERIOD_S)
        return np.zeros((1, 1)), {}


def test_a_slow_adapter_in_the_real_loop_is_an_error_naming_the_overruns():
    robot = load_robot("cartpole")
    safety = SafetyLayer(robot)
    safety.on_handshake(True, time.monotonic())
    stats = LoopStats(period_s=robot.ctrl_dt)
    recorder = RecordWorker(robot)
    recorder.open_episode(None)
    loop = ControlLoop(robot=robot, link=ClockLink(robot), safety=safety, adapter=SlowAdapter(), task_params={},
                       recorder=recorder, lock=threading.Lock(), stats=stats, episode_steps=12)
    loop.start()
    assert loop.join(30.0) and loop.outcome.error is None, loop.outcome
    recorder.stop()
    assert loop.steps == 12 and stats.overruns == 12
    level, problems = judged(stats, new_overruns=stats.overruns)
    assert level == ERROR
    assert "12 overrun(s) since the last report" in problems, problems
    assert "compute" in problems and "mean of the 40 ms period" in problems and "loop rate" in problems


# ---- the episode log ------------------------------------------------------------------------------------------
def test_a_log_folder_that_cannot_be_written_is_a_warn_and_a_good_one_ok(tmp_path: Path):
    robot = load_robot("cartpole")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the log folder should be")
    recorder = RecordWorker(robot)
    try:
        assert recorder.status(running=False, logging=True)[:2] == (OK, "no episode yet")
        recorder.open_episode(blocker / "logs" / "ep.mcap")
        recorder.close_episode("test").wait(10)
        level, message, values = recorder.status(running=True, logging=True)
        assert level == WARN and message.startswith(f"cannot open episode log {blocker / 'logs' / 'ep.mcap'}")
        assert values["log_error"] == message and values["log_file"] == str(blocker / "logs" / "ep.mcap")
        recorder.open_episode(tmp_path / "logs" / "ep2.mcap")  # the next episode's log opens: OK again
        recorder.close_episode("test").wait(10)
        assert recorder.status(running=False, logging=True)[:2] == (OK, f"closed {tmp_path / 'logs' / 'ep2.mcap'}")
        assert recorder.status(running=False, logging=False)[1] == "no episode logs (log_dir is '')"
    finally:
        recorder.stop()
