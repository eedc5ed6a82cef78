"""``metarl eval`` on an ``online_model`` bundle grades every adaptation mode the kind declares (both, context only,
online only, none) on the same tasks and starts, and compares the adapted model's one-step error with the
unadapted model's after 50 steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from metarl_robot.runtime.kinds.online_model import OnlineModelBundle
from metarl_robot.train.evaluate import ADAPTATION_STEPS, evaluate

pytestmark = pytest.mark.slow  # the tiny online run, 4 modes x 2 tasks x 250 steps


def test_every_adaptation_mode_is_graded_on_the_same_tasks(online_bundle: Path, tmp_path: Path):
    report = evaluate(online_bundle, tmp_path, tasks=2, oracle=False, planner_overrides={"samples": 16, "horizon": 5},
                      progress=False)
    modes = list(OnlineModelBundle.adaptation_modes)
    assert modes == ["adapted", "context_only", "online_only", "unadapted"]
    for row in report["tasks"]:
        assert all(np.isfinite(row[f"return_{m}"]) for m in modes)
    assert report["bundle_kind"] == "online_model"
    ratio = report["summary"][f"pred_err_ratio_after_{ADAPTATION_STEPS}"]
    assert ratio["mean"] > 0 and ratio["worst_task"] >= ratio["mean"] * 0.999
    # the adapted model's errors are its own, not the unadapted model's: with online updates they differ
    by_task = report["prediction_error_by_task"]
    assert not np.allclose(by_task["adapted"], by_task["unadapted"])
    assert json.loads((tmp_path / "eval.json").read_text())["summary"] == report["summary"]


def test_modes_limits_the_episodes_to_the_modes_asked_for(online_bundle: Path, tmp_path: Path):
    report = evaluate(online_bundle, tmp_path, tasks=1, oracle=False, planner_overrides={"samples": 16, "horizon": 5},
                      progress=False, modes=("online_only",))
    assert {k for k in report["tasks"][0] if k.startswith("return_")} == {"return_adapted", "return_online_only"}
    with pytest.raises(ValueError, match=r"\['warp'\] not among .*\['context_only', 'online_only', 'unadapted'\]"):
        evaluate(online_bundle, tmp_path / "bad", tasks=1, oracle=False, progress=False, modes=("warp",))
