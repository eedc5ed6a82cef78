"""The actuator-latency estimate (metarl_robot/runtime/latency.py) and how the planner rolls out the commands still
on their way: which command drove a transition under each hypothesis, when another delay is chosen, what a reset
and a forget keep, and the config's refusals."""

from __future__ import annotations

import numpy as np
import pytest

from metarl_robot.runtime.latency import CommandLatency, LatencyConfig
from metarl_robot.runtime.planner import after

SAFE = np.array([0.0])


def test_each_hypothesis_names_the_command_sent_that_many_periods_earlier():
    lat = CommandLatency(LatencyConfig(max_delay=2), batch=1, safe_action=SAFE)
    # after a reset the pipeline holds the safe command
    np.testing.assert_array_equal(lat.candidates(np.array([[0.5]]))[0, :, 0], [0.5, 0.0, 0.0])
    for a in (0.1, 0.2, 0.3):
        lat.push(np.array([[a]]))
    np.testing.assert_array_equal(lat.candidates(np.array([[0.4]]))[0, :, 0], [0.4, 0.3, 0.2])
    lat.delay[:] = 2
    np.testing.assert_array_equal(lat.applied(np.array([[0.4]]))[0], [0.2])
    np.testing.assert_array_equal(lat.pending()[0][:, 0], [0.2, 0.3])  # oldest first: applied next, then after it
    lat.reset()  # a new episode: the pipeline restarts from the safe command, the estimate stays
    assert lat.delay[0] == 2 and (lat.sent == 0.0).all()
    lat.forget()
    assert lat.delay[0] == 0 and lat.seen[0] == 0 and (lat.error == 0).all()


def test_a_delay_is_chosen_only_when_clearly_better_and_after_enough_transitions():
    cfg = LatencyConfig(max_delay=2, memory=0.5, margin=0.3, min_transitions=3)
    lat = CommandLatency(cfg, batch=2, safe_action=SAFE)
    # env 0: hypothesis 1 predicts much better; env 1: hypothesis 2 only slightly better than 0 (within the margin)
    errors = np.array([[1.0, 0.1, 1.0], [1.0, 1.0, 0.8]])
    lat.score(errors)
    lat.score(errors)
    assert (lat.delay == 0).all()  # 2 transitions < min_transitions
    lat.score(errors)
    np.testing.assert_array_equal(lat.delay, [1, 0])
    lat.score(np.array([[np.nan, 0.0, 0.0], [1.0, 1.0, 0.8]]))  # a non-finite score is not counted
    np.testing.assert_array_equal(lat.seen, [3, 4])
    # once chosen, a delay is kept until another beats it by the margin
    for _ in range(3):
        lat.score(np.array([[0.1, 0.09, 1.0], [1.0, 1.0, 0.8]]))
    assert lat.delay[0] == 1


def test_no_latency_considered_is_the_plain_adapter():
    lat = CommandLatency(LatencyConfig(max_delay=0), batch=1, safe_action=SAFE)
    assert lat.hypotheses == 1 and lat.candidates(np.array([[0.3]])).shape == (1, 1, 1)
    lat.push(np.array([[0.3]]))
    assert lat.pending()[0].shape == (0, 1)


def test_the_planner_rolls_out_the_pending_commands_before_the_planned_ones():
    samples = np.arange(2 * 3 * 4, dtype=float).reshape(2, 3, 4, 1)  # (B, N, H, a)
    pending = [np.array([[-1.0], [-2.0]]), np.zeros((0, 1))]
    out = after(pending, samples)
    np.testing.assert_array_equal(out[0, :, :2, 0], [[-1, -2]] * 3)
    np.testing.assert_array_equal(out[0, :, 2:], samples[0, :, :2])  # the first planned action comes third
    np.testing.assert_array_equal(out[1], samples[1])  # env 1 has none
    assert after([np.zeros((0, 1))] * 2, samples) is samples  # nothing pending: no copy
    long = [np.full((6, 1), -1.0), np.zeros((0, 1))]  # more pending than the horizon: only the first H count
    assert (after(long, samples)[0] == -1.0).all()


@pytest.mark.parametrize(("field", "value", "match"), [
    ("max_delay", -1, "latency.max_delay"), ("max_delay", 1.5, "latency.max_delay"), ("memory", 1.0, "latency.memory"),
    ("margin", 1.0, "latency.margin"), ("min_transitions", -3, "latency.min_transitions")])
def test_a_bad_config_is_refused_naming_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        CommandLatency(LatencyConfig(**{field: value}), batch=1, safe_action=SAFE)
