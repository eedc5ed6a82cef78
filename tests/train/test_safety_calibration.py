"""``metarl calibrate-safety``: a threshold from the bundle's own sim episodes, as node parameters."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml

from metarl_robot.replay.calibration import count_prediction_trips
from metarl_robot.runtime.safety import SafetyConfig
from metarl_robot.spec.schema import SpecError
from metarl_robot.train.safety_calibration import PARAMS_FILE, REPORT_FILE, calibrate_safety


@pytest.mark.slow
def test_calibrate_safety_writes_node_parameters_and_an_honest_check(tmp_path):
    result = subprocess.run([sys.executable, "-m", "metarl_robot.cli", "calibrate-safety", "policies/cartpole_mb",
                             "--episodes", "1", "--check-episodes", "1", "--quantile", "0.5", "--steps", "3",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / REPORT_FILE).read_text())
    threshold = report["threshold"]
    assert threshold > 0 and report["prediction_error_steps"] == 3
    assert f"{threshold:.4g}" in result.stdout and "trip(s)" in result.stdout
    # margin 2 x the median of the calibration levels: their maximum is at least that median.
    assert report["calibration"]["max_persistent_level"] >= threshold / 2 > 0
    assert report["check"]["split"] == "test" and isinstance(report["check"]["trips"], int)
    # What metarl replay --calibration compares a robot's log with: in-distribution levels, overall and per field.
    levels = report["levels"]
    assert levels["episodes"] == 1 and levels["after_steps"] == 9  # the context window (8) has filled
    assert levels["prediction_error_median_max"] > 0
    assert set(levels["field_error_median_max"]) == {"cart_pos", "pole_angle", "cart_vel", "pole_angvel"}
    params = yaml.safe_load((tmp_path / PARAMS_FILE).read_text())["/**"]["ros__parameters"]["safety"]
    assert params == {"prediction_error_threshold": threshold, "prediction_error_steps": 3}
    SafetyConfig.from_mapping(params)  # the node's safety section accepts it as is


def test_trip_count_is_what_the_safety_layer_would_do():
    errors = np.array([np.nan, 0.1, 0.5, 0.5, 0.5, 0.1, 0.5, 0.5])
    assert count_prediction_trips([errors], threshold=0.3, steps=3) == 1


@pytest.mark.parametrize("args, fragment", [(["--episodes", "0"], "episodes must be >= 1"),
                                            (["--steps", "0"], "prediction_error_steps")])
def test_bad_arguments_are_named(tmp_path, args, fragment):
    result = subprocess.run([sys.executable, "-m", "metarl_robot.cli", "calibrate-safety", "policies/cartpole_mb",
                             "--out", str(tmp_path), *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and fragment in result.stderr, result.stderr


def test_a_context_policy_bundle_is_refused_by_name(pearl_bundle, tmp_path):
    with pytest.raises(SpecError) as err:
        calibrate_safety(pearl_bundle, tmp_path)
    assert err.value.field == "kind" and "'context_policy' bundle has no dynamics model" in str(err.value)
    assert not any(tmp_path.iterdir())  # nothing written
