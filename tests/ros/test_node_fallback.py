"""The prediction-error fallback through the whole stack: the installed node, a threshold no model can meet, the
twin. The outcome (the node's own safe command, latched, ERROR) is measured at the twin and in the episode log."""

from __future__ import annotations

import numpy as np
import pytest

from tests.ros.test_faults import PERIOD, run_scenario

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 5
"""safety.prediction_error_steps for this run."""


def test_prediction_error_beyond_the_threshold_falls_back_to_the_safe_command_and_stays(colcon_install, tmp_path):
    run = run_scenario(colcon_install, tmp_path, faults=[], duration=3.0,
                       node_params={"safety.prediction_error_threshold": 1e-9,
                                    "safety.prediction_error_steps": STEPS})
    ep, tr = run.episode, run.trace
    kinds = run.events()
    assert "PREDICTION_ERROR_FALLBACK" in kinds, kinds
    trip = next(e for e in ep.safety_events if e.kind == "PREDICTION_ERROR_FALLBACK")
    assert trip.level == "ERROR"
    # In the log: the adapter commanded until the trip, then only the safe command, latched to the end.
    sent = ep.command_source != "none"
    adapter_steps = np.flatnonzero(sent & (ep.command_source == "adapter"))
    after = np.flatnonzero(sent & (np.arange(sent.size) > trip.step))
    assert adapter_steps.size >= STEPS, "the adapter ran (and was graded) before the fallback"
    assert after.size > 10 and (ep.command_source[after] == "safe_command").all()
    assert set(ep.safety_state[after]) <= {"FALLBACK", "SAFE_STOP"}, set(ep.safety_state[after])  # SAFE_STOP: exit
    # At the robot: the node's commands, not the robot's watchdog, and the last ones are the safe command (0).
    commanded = np.flatnonzero(~tr["safe"])
    assert commanded.size > 10, "the node commanded the twin"
    tail = commanded[-10:]
    assert np.allclose(tr["applied"][tail], 0.0), tr["applied"][tail]
    assert tr["t"][commanded[-1]] > tr["t"][commanded[0]] + 10 * PERIOD
