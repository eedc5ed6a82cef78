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


# ---- sensor noise from a log at rest ------------------------------------------------------------------------
def _log_at_rest(path, noise_std: dict[str, float], steps: int = 200, motion: float = 0.0, lost=()):
    """A cart-pole log of the robot hanging still (safe command), each field read with Gaussian noise of
    ``noise_std`` (field units); ``motion``: the cart creeping along the rail at that speed (m/s) instead."""
    from metarl_robot.logs.writer import EpisodeLogWriter
    from metarl_robot.spec.robot import load_robot

    robot = load_robot("cartpole")
    rng = np.random.default_rng(0)
    std = np.array([noise_std[f.name] for f in robot.measured_fields])
    with EpisodeLogWriter(path, robot) as log:
        for k in range(steps):
            if k in lost:
                continue
            true = np.array([motion * k * robot.ctrl_dt, np.pi, motion, 0.0])
            log.write_step(obs=true + std * rng.standard_normal(4), state_seq=k + 1, robot_stamp_ns=k * 40_000_000,
                           receive_time_ns=k * 40_000_000, command=robot.safe_action, command_seq=k + 1,
                           command_source="safe_command", applied_command_seq=0, safety_state="SAFE_STOP")
    return path


def test_the_noise_of_each_sensor_is_read_from_a_log_at_rest(tmp_path):
    from metarl_robot.logs.reader import read_episode
    from metarl_robot.replay.calibration import sensor_noise_at_rest

    truth = {"cart_pos": 0.002, "pole_angle": 0.005, "cart_vel": 0.01, "pole_angvel": 0.05}
    noise = sensor_noise_at_rest(read_episode(_log_at_rest(tmp_path / "rest.mcap", truth, lost=(50, 51, 120))))
    assert list(noise) == list(truth)
    for name, std in truth.items():
        assert noise[name] == pytest.approx(std, rel=0.15), (name, noise)


def test_a_log_that_moves_or_is_too_short_is_refused_naming_why(tmp_path):
    from metarl_robot.logs.reader import read_episode
    from metarl_robot.replay.calibration import sensor_noise_at_rest

    truth = {"cart_pos": 0.002, "pole_angle": 0.005, "cart_vel": 0.01, "pole_angvel": 0.05}
    with pytest.raises(ValueError, match="observation field 'cart_pos' is not at rest: it spreads by"):
        sensor_noise_at_rest(read_episode(_log_at_rest(tmp_path / "creep.mcap", truth, motion=0.05)))
    with pytest.raises(ValueError, match="30 frames with finite observations; a noise calibration needs at least 50"):
        sensor_noise_at_rest(read_episode(_log_at_rest(tmp_path / "short.mcap", truth, steps=30)))


def test_cli_prints_the_robot_yaml_lines(tmp_path):
    import subprocess
    import sys

    import yaml

    truth = {"cart_pos": 0.002, "pole_angle": 0.005, "cart_vel": 0.01, "pole_angvel": 0.05}
    path = _log_at_rest(tmp_path / "rest.mcap", truth)
    result = subprocess.run([sys.executable, "-m", "metarl_robot.cli", "calibrate-noise", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)  # the lines paste into robot.yaml as they are
    assert set(printed) == set(truth) and printed["pole_angvel"]["noise_std"] == pytest.approx(0.05, rel=0.15)
