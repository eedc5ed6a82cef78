"""``metarl calibrate-safety``: the prediction-error threshold of a bundle's safety layer, from sim episodes.

The safety layer falls back when the adapter's one-step prediction error stays above a threshold
for ``prediction_error_steps`` periods in a row (docs/safety.md). The threshold must sit above
what a healthy robot produces, so it is calibrated on nominal episodes: the bundle's own adapter
drives the MuJoCo env on tasks of its family's training range (the robots it was built for),
every step's ``prediction_error`` diagnostic is recorded, and
:func:`~metarl_robot.replay.calibration.calibrate_prediction_threshold` turns them into a threshold.
It is then checked on held-out episodes (the test split by default, out of distribution: the
threshold must not trip there either) — the number of trips is reported, not hidden.

On a real robot, recalibrate from its own logged nominal episodes: sim errors are a lower bound.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from metarl_robot.algos.mpc_controller import MPCController
from metarl_robot.envs.rollout import collect, make_vector_env
from metarl_robot.replay.calibration import (
    calibrate_prediction_threshold,
    count_prediction_trips,
    persistent_error_levels,
)
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.runtime.manifest import LoadedBundle
from metarl_robot.runtime.safety import SafetyConfig
from metarl_robot.spec.schema import SpecError

PARAMS_FILE = "safety_params.yaml"
REPORT_FILE = "safety_calibration.json"


class _FieldErrors(MPCController):
    """The collection controller that also keeps each step's one-step error per observation entry (scale units):
    the adapter's ``predicted_next_obs`` against what was then observed."""

    def __init__(self, adapter: Any, reward_params: dict[str, np.ndarray], scale: np.ndarray) -> None:
        super().__init__(adapter, reward_params)
        self.scale = scale
        self.entry_errors: list[np.ndarray] = []
        """Per step ``(B, o)``: |predicted - observed| / scale."""
        self._predicted: np.ndarray | None = None

    def act(self, obs: np.ndarray) -> np.ndarray:
        action = super().act(obs)
        self._predicted = np.asarray(self.last_diagnostics["predicted_next_obs"], dtype=np.float64)
        return action

    def observe(self, obs: np.ndarray, sent_action: np.ndarray, next_obs: np.ndarray) -> None:
        super().observe(obs, sent_action, next_obs)
        self.entry_errors.append(np.abs(self._predicted - next_obs) / self.scale)


def record_prediction_errors(bundle: LoadedBundle, split: str, episodes: int, seed: int, progress: bool = False
                             ) -> tuple[np.ndarray, list[dict[str, float]], np.ndarray]:
    """``(episodes, T)`` prediction errors of the bundle's adapter on ``episodes`` tasks drawn from ``split``, the
    tasks, and ``(episodes, T, o)`` each step's error per observation entry (scale units).

    The first step of each episode is NaN (nothing was predicted yet), as on the robot.
    """
    family = bundle.family
    tasks = family.sample(np.random.default_rng(seed), split, episodes)
    adapter = bundle.make_adapter(batch=episodes, seed=seed)
    params = {k: np.array([t[k] for t in tasks]) for k in family.reward_names}
    controller = _FieldErrors(adapter, params, bundle.robot.obs_scale)
    envs = make_vector_env(family, episodes, "sync", tasks=tasks)
    try:
        collect(envs, family, controller, tasks, 1, seed=seed, progress=progress)
    finally:
        envs.close()
    return (np.stack(controller.errors, axis=1), [dict(t) for t in tasks],
            np.stack(controller.entry_errors, axis=1))


def in_distribution_levels(bundle: LoadedBundle, errors: np.ndarray, entry_errors: np.ndarray) -> dict[str, Any]:
    """What ``metarl replay --calibration`` compares a robot's log with: over these in-distribution episodes, the
    highest per-episode median of the one-step prediction error, overall (the adapter's ``prediction_error``) and
    per observation field (RMS over its entries), after the context window has filled."""
    start = getattr(bundle, "context_window", 0) + 1
    overall = np.nanmedian(errors[:, start:], axis=1)
    fields = {name: float(np.nanmedian(rms, axis=1).max())
              for name, rms in bundle.robot.field_rms(entry_errors[:, start - 1:]).items()}
    return {"after_steps": int(start), "prediction_error_median_max": float(overall.max()),
            "field_error_median_max": fields, "episodes": int(errors.shape[0])}


def calibrate_safety(bundle_path: str | Path, out_dir: str | Path, episodes: int = 8, split: str = "train",
                     check_split: str = "test", check_episodes: int = 8, steps: int | None = None,
                     quantile: float = 0.99, margin: float = 2.0, seed: int = 0, progress: bool = True
                     ) -> dict[str, Any]:
    """Calibrate on ``episodes`` tasks of ``split``, check on ``check_episodes`` of ``check_split``; write the
    node parameters (``safety_params.yaml``) and the report (``safety_calibration.json``) into ``out_dir``."""
    steps = SafetyConfig().prediction_error_steps if steps is None else steps
    SafetyConfig(prediction_error_steps=steps).validate("--steps")
    for name, value in (("episodes", episodes), ("check_episodes", check_episodes)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    bundle = load_bundle(bundle_path)
    if not bundle.has_dynamics_model:
        raise SpecError(str(bundle_path), "kind", f"a {bundle.kind!r} bundle has no dynamics model, so it reports no "
                        "prediction error and there is no threshold to calibrate; calibrate-safety takes bundles "
                        "of a kind with a dynamics model (the node's other safety checks need no calibration)")
    errors, tasks, entry_errors = record_prediction_errors(bundle, split, episodes, seed, progress)
    threshold = calibrate_prediction_threshold(list(errors), steps=steps, quantile=quantile, margin=margin)
    check, check_tasks, _ = record_prediction_errors(bundle, check_split, check_episodes, seed + 1, progress)
    check_levels = persistent_error_levels(list(check), steps)
    report = {
        "bundle": str(bundle_path), "bundle_sha256": bundle.sha256, "threshold": threshold,
        "prediction_error_steps": steps, "quantile": quantile, "margin": margin, "seed": seed,
        "calibration": {"split": split, "episodes": episodes, "steps_per_episode": int(errors.shape[1]),
                        "trips": count_prediction_trips(list(errors), threshold, steps),
                        "max_persistent_level": float(persistent_error_levels(list(errors), steps).max()),
                        "tasks": tasks},
        "levels": in_distribution_levels(bundle, errors, entry_errors),
        "check": {"split": check_split, "episodes": check_episodes,
                  "trips": count_prediction_trips(list(check), threshold, steps),
                  "max_persistent_level": float(check_levels.max()) if check_levels.size else None,
                  "tasks": check_tasks},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1))
    params = {"/**": {"ros__parameters": {"safety": {"prediction_error_threshold": threshold,
                                                     "prediction_error_steps": steps}}}}
    (out / PARAMS_FILE).write_text(
        f"# metarl calibrate-safety {bundle_path}: {episodes} {split} episodes, quantile {quantile}, margin {margin};\n"
        f"# {report['check']['trips']} trip(s) on {check_episodes} held-out {check_split} episodes. Pass it to the\n"
        "# node after its own parameters file (a later --params-file wins): docs/safety.md.\n"
        + yaml.safe_dump(params, sort_keys=False))
    return report


__all__ = ["PARAMS_FILE", "REPORT_FILE", "calibrate_safety", "in_distribution_levels", "record_prediction_errors"]
