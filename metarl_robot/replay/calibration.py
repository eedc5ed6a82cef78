"""Calibrations from logs: the safety layer's prediction-error threshold from recorded nominal prediction errors,
and each sensor's noise from a log of the robot at rest (:func:`sensor_noise_at_rest`, robot.yaml ``noise_std``).

The safety layer (:class:`metarl_robot.runtime.safety.SafetyLayer`) only compares each graded error with
``prediction_error_threshold``; choosing that number is offline work on recorded episodes: the
``prediction_error`` diagnostics of a real robot's logged nominal episodes (docs/safety.md), or of sim
episodes (``metarl calibrate-safety``, :mod:`metarl_robot.train.safety_calibration`). So it lives here, with
the other tools that run on logs, and not in the runtime file the robot runs.

numpy only (no torch, no MuJoCo): recalibrating from a robot's own logs must not need the sim stack.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from metarl_robot.logs.format import Episode


def _episodes(errors: np.ndarray | Iterable[np.ndarray]) -> list[np.ndarray]:
    """One float64 array per episode: a 1-D array is one episode, a 2-D array one per row."""
    if isinstance(errors, np.ndarray) and errors.ndim <= 1:
        errors = [errors]
    episodes = [np.asarray(e, dtype=np.float64).ravel() for e in errors]
    for i, e in enumerate(episodes):
        if np.isinf(e).any():
            raise ValueError(f"errors[{i}]: prediction errors contain Inf; nominal episodes must be healthy")
        if (e < 0).any():
            raise ValueError(f"errors[{i}]: prediction errors are RMS values and cannot be negative, got {e.min()}")
    return episodes


def persistent_error_levels(errors: np.ndarray | Iterable[np.ndarray], steps: int) -> np.ndarray:
    """The statistic the persistence rule tests: for every run of ``steps`` consecutive graded errors of an
    episode, the smallest (the run is above a threshold iff this is). NaN entries are not graded and skipped."""
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    levels = []
    for e in _episodes(errors):
        graded = e[~np.isnan(e)]
        if graded.size >= steps:
            levels.append(np.lib.stride_tricks.sliding_window_view(graded, steps).min(axis=1))
    return np.concatenate(levels) if levels else np.zeros(0)


def calibrate_prediction_threshold(errors: np.ndarray | Iterable[np.ndarray], steps: int = 5,
                                   quantile: float = 0.99, margin: float = 2.0) -> float:
    """``prediction_error_threshold`` from nominal episodes, for the persistence rule with ``steps`` (use the
    config's ``prediction_error_steps``).

    ``errors``: the adapter's ``prediction_error`` diagnostics on nominal (healthy robot, in-distribution)
    episodes, one array per episode; NaN entries (the first step has no prediction yet) are skipped.
    The threshold is ``margin ×`` the ``quantile`` of :func:`persistent_error_levels`, i.e. of the level the
    error stays above for ``steps`` steps in a row. Calibrating the statistic the rule tests, rather than
    single steps, keeps the short error spikes of nominal transients (a swing-up, a contact) from inflating
    the threshold. A quantile is only estimated reliably from many more samples than ``1 / (1 - quantile)``,
    so at least ``10 / (1 - quantile)`` runs are required (1000 for 0.99: 40 s of nominal data at 25 Hz).
    Check the result with :func:`count_prediction_trips` on held-out nominal episodes (expect 0).
    """
    if not (isinstance(quantile, int | float) and 0.5 <= quantile < 1.0):
        raise ValueError(f"quantile must be in [0.5, 1), got {quantile!r}")
    if not (isinstance(margin, int | float) and 1.0 <= margin <= 100.0):
        raise ValueError(f"margin must be in [1, 100], got {margin!r}")
    levels = persistent_error_levels(errors, steps)
    needed = math.ceil(10.0 / (1.0 - quantile))
    if levels.size < needed:
        raise ValueError(f"errors: {levels.size} runs of {steps} graded prediction errors; the {quantile} quantile "
                         f"needs at least {needed} (10 / (1 - quantile)): record more nominal steps or lower the "
                         "quantile")
    threshold = float(np.quantile(levels, quantile)) * float(margin)
    if not threshold > 0:
        raise ValueError(f"errors: the {quantile} quantile of the nominal prediction errors is 0; "
                         "a threshold must be > 0 (are these really the adapter's prediction errors?)")
    return threshold


def count_prediction_trips(errors: np.ndarray | Iterable[np.ndarray], threshold: float, steps: int) -> int:
    """How many times the persistence rule would trip on these episodes (one array per episode).

    A trip is ``steps`` graded errors above ``threshold`` in a row; NaN entries are not graded and do not
    break a streak; each episode starts with no streak, and a trip restarts the count (as an operator reset would).
    """
    trips = 0
    for episode in _episodes(errors):
        streak = 0
        for value in episode:
            if np.isnan(value):
                continue
            streak = streak + 1 if value > threshold else 0
            if streak >= steps:
                trips, streak = trips + 1, 0
    return trips


MIN_REST_FRAMES = 50
"""Fewest frames of a log at rest that :func:`sensor_noise_at_rest` accepts (2 s at 25 Hz)."""
REST_DRIFT_RATIO = 2.0
"""A field whose spread over the log exceeds this many times its frame-to-frame noise is moving, not at rest."""


def sensor_noise_at_rest(episode: Episode) -> dict[str, float]:
    """Per measured observation field, its sensor noise standard deviation in the field's units, from a log of the
    robot standing still (what robot.yaml's ``noise_std`` wants; docs/robot_spec.md).

    Each distinct frame counts once. The noise is read from the differences of consecutive frames (``std / sqrt 2``
    for white noise), robustly (1.4826 x the median absolute deviation), so a slow drift does not count as noise; a
    field that *moves* — its spread over the log more than :data:`REST_DRIFT_RATIO` times that noise — is refused,
    naming it. A field of several entries gets the RMS over them."""
    robot = episode.robot
    seq = np.asarray(episode.state_seq)
    first = np.ones(len(seq), dtype=bool)
    first[1:] = seq[1:] != seq[:-1]
    obs, seq = np.asarray(episode.obs)[first], seq[first]
    finite = np.isfinite(obs).all(axis=1)
    obs, seq = obs[finite], seq[finite]
    if len(obs) < MIN_REST_FRAMES:
        raise ValueError(f"{episode.path}: {len(obs)} frames with finite observations; a noise calibration needs at "
                         f"least {MIN_REST_FRAMES} (record the robot standing still for a few seconds, motors at their "
                         "safe command)")
    consecutive = np.diff(seq) == 1
    diffs = np.diff(obs, axis=0)[consecutive]
    if len(diffs) < MIN_REST_FRAMES - 1:
        raise ValueError(f"{episode.path}: {len(diffs)} pairs of consecutive frames; a noise calibration needs at "
                         f"least {MIN_REST_FRAMES - 1} (a log with fewer lost frames)")
    median = np.median(diffs, axis=0)
    per_entry = 1.4826 * np.median(np.abs(diffs - median), axis=0) / math.sqrt(2.0)
    spread = obs.std(axis=0)
    for f in robot.measured_fields:
        noise, moved = per_entry[robot.obs_slices[f.name]], spread[robot.obs_slices[f.name]]
        if (moved > REST_DRIFT_RATIO * noise + 1e-12 * f.scale).any():
            raise ValueError(f"{episode.path}: observation field {f.name!r} is not at rest: it spreads by "
                             f"{float(moved.max()):.3g} {f.units} over the log against a frame-to-frame noise of "
                             f"{float(noise.max()):.3g} {f.units}; record the robot standing still")
    return {name: float(rms) for name, rms in robot.field_rms(per_entry).items()}


__all__ = ["MIN_REST_FRAMES", "REST_DRIFT_RATIO", "calibrate_prediction_threshold", "count_prediction_trips",
           "persistent_error_levels", "sensor_noise_at_rest"]
