"""Calibration of the prediction-error threshold from nominal errors (metarl_robot/replay/calibration.py)."""

from __future__ import annotations

import numpy as np
import pytest

from metarl_robot.replay.calibration import (
    calibrate_prediction_threshold,
    count_prediction_trips,
    persistent_error_levels,
)


def test_calibration_is_the_quantile_of_the_persistent_level_times_the_margin():
    rng = np.random.default_rng(0)
    episodes = [np.concatenate([[np.nan], rng.uniform(0, 1, 500)]) for _ in range(4)]
    levels = persistent_error_levels(episodes, steps=3)
    assert levels.size == 4 * 498 and np.isclose(levels[0], np.min(episodes[0][1:4]))
    threshold = calibrate_prediction_threshold(episodes, steps=3, quantile=0.99, margin=1.5)
    assert threshold == pytest.approx(1.5 * np.quantile(levels, 0.99))
    assert count_prediction_trips(episodes, threshold, 3) == 0
    assert count_prediction_trips([np.array([0.0, threshold * 2, np.nan, threshold * 2, threshold * 2])],
                                  threshold, 3) == 1  # NaN neither counts nor breaks a streak


def test_calibration_refuses_too_little_or_unhealthy_data():
    with pytest.raises(ValueError, match="needs at least 1000"):
        calibrate_prediction_threshold([np.ones(500)], steps=1, quantile=0.99)
    with pytest.raises(ValueError, match=r"errors\[1\]: prediction errors contain Inf"):
        calibrate_prediction_threshold([np.ones(2000), np.array([np.inf])], quantile=0.99)
    with pytest.raises(ValueError, match="cannot be negative"):
        calibrate_prediction_threshold([-np.ones(2000)])
    with pytest.raises(ValueError, match="quantile must be in"):
        calibrate_prediction_threshold([np.ones(2000)], quantile=1.0)
    with pytest.raises(ValueError, match="margin must be in"):
        calibrate_prediction_threshold([np.ones(2000)], margin=0.5)
    with pytest.raises(ValueError, match="is 0"):
        calibrate_prediction_threshold([np.zeros(2000)], steps=1)
