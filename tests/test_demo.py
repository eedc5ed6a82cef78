"""The demo's reading of the twin's watchdog (metarl_robot/demo.py::watchdog_timing), and the demo end to end with a
context_policy (PEARL) bundle (``--bundle``; the shipped model-based bundle's run is in tests/test_cli.py).

Why: `metarl demo` ends the node's episode before it stops the twin, so the twin's watchdog rightly engages
once after the node's last command; the demo must tell that apart from a gap in the commands while the node
was still running, from the twin's own trace and summary, not by assumption. The whole demo runs in
tests/test_cli.py (slow); this checks the classification on traces shaped like the twin's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from metarl_robot.demo import BUNDLE, StageError, ood_task_the_bundle_swings_up, run_demo, watchdog_timing
from metarl_robot.paths import REPO_ROOT
from metarl_robot.runtime.bundle import load_bundle

PERIOD = 0.04


def trace(commanded: range, periods: int) -> dict[str, np.ndarray]:
    """A twin trace: ``safe`` is False exactly in the commanded periods."""
    safe = np.ones(periods, dtype=bool)
    safe[list(commanded)] = False
    return {"t": np.arange(periods) * PERIOD, "safe": safe}


def summary(*times: float) -> dict:
    return {"watchdog": {"events": [{"t_s": t, "reason": "expired", "ms_since_last_command": 150.0}
                                    for t in times]}}


def test_an_engagement_after_the_last_command_is_expected():
    # As measured in `metarl demo --skip-train`: commands from period 12 to 265, watchdog at 10.64 s.
    out = watchdog_timing(summary(266 * PERIOD), trace(range(12, 266), 268))
    assert out["engagements"] == 1 and out["after_last_command"] == 1 and out["while_commanding"] == 0
    assert out["last_command_s"] == 265 * PERIOD
    assert "expected" in out["text"] and "WHILE" not in out["text"]


def test_an_engagement_while_the_node_was_commanding_is_reported_as_a_gap():
    # Commands stopped for 5 periods mid-episode (watchdog at 5.0 s), then resumed, and the usual one at the end.
    periods = [*range(12, 120), *range(130, 266)]
    out = watchdog_timing(summary(5.0, 266 * PERIOD), {"t": np.arange(268) * PERIOD,
                                                       "safe": ~np.isin(np.arange(268), periods)})
    assert out["while_commanding"] == 1 and out["after_last_command"] == 1
    assert "WHILE the node was commanding (at 5.00 s" in out["text"]


def test_no_engagement_and_no_command_at_all():
    assert watchdog_timing(summary(), trace(range(12, 266), 268))["text"] == "watchdog: never engaged"
    # The node never commanded: any engagement cannot be "after its last command".
    out = watchdog_timing(summary(1.0), trace(range(0), 50))
    assert out["last_command_s"] is None and out["while_commanding"] == 1 and "no node command ever ran" in out["text"]



def _eval_json(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"tasks": rows}))
    return path


def test_twin_task_of_a_model_based_evaluation_is_swung_up_adapted_and_unadapted_first(tmp_path: Path):
    row = {"ood": True, "success_adapted": True, "success_unadapted": False, "return_adapted": 190.0}
    rows = [{**row, "task": {"i": 0}},
            {**row, "task": {"i": 1}, "success_unadapted": True, "return_adapted": 150.0},  # robust: wins
            {**row, "task": {"i": 2}, "success_adapted": False, "success_unadapted": True, "return_adapted": 200.0},
            {**row, "task": {"i": 3}, "ood": False, "success_unadapted": True, "return_adapted": 210.0}]
    assert ood_task_the_bundle_swings_up(_eval_json(tmp_path, rows)) == {"i": 1}


def test_twin_task_of_a_context_policy_evaluation_is_swung_up_from_the_prior_belief(tmp_path: Path):
    # The node runs one episode from the prior: "after 0 exploration episodes" must have swung up.
    row = {"ood": True, "success_after_0": True, "success_after_1": True, "success_after_2": True,
           "return_after_0": 150.0}
    rows = [{**row, "task": {"i": 0}, "success_after_2": False, "return_after_0": 190.0},
            {**row, "task": {"i": 1}},  # swung up after 0, 1 and 2: wins over a higher but unstable return
            {**row, "task": {"i": 2}, "success_after_0": False, "return_after_0": 200.0},
            {**row, "task": {"i": 3}, "ood": False, "return_after_0": 210.0}]
    assert ood_task_the_bundle_swings_up(_eval_json(tmp_path, rows)) == {"i": 1}
    with pytest.raises(StageError, match="no out-of-distribution task the bundle swings up"):
        ood_task_the_bundle_swings_up(_eval_json(tmp_path, rows[2:]))


def test_twin_task_of_a_pooling_meta_policy_evaluation_reads_its_own_columns(tmp_path: Path):
    # MB-MPO evaluated with episodes_per_step 2: the columns are after 0, 2 and 4 episodes.
    row = {"ood": True, "success_after_0": True, "success_after_2": True, "success_after_4": True,
           "return_after_0": 150.0}
    rows = [{**row, "task": {"i": 0}, "success_after_4": False, "return_after_0": 190.0},
            {**row, "task": {"i": 1}}]
    assert ood_task_the_bundle_swings_up(_eval_json(tmp_path, rows)) == {"i": 1}


def test_shipped_pearl_bundle_gets_a_twin_task_from_its_own_evaluation():
    eval_json = REPO_ROOT / "policies" / "cartpole_pearl" / "eval" / "eval.json"
    rows = json.loads(eval_json.read_text())["tasks"]
    task = ood_task_the_bundle_swings_up(eval_json)
    chosen = next(r for r in rows if r["task"] == task)
    assert chosen["ood"] and chosen["success_after_0"] and chosen["success_after_1"] and chosen["success_after_2"]


@pytest.mark.slow
@pytest.mark.integration
def test_demo_runs_a_context_policy_bundle_through_node_replay_and_identification(pearl_bundle: Path, tmp_path: Path,
                                                                                 capsys: pytest.CaptureFixture):
    # The shortest episode the demo takes, at robot speed: the PEARL adapter needs well under a control period.
    # Without out-of-family effects: what identification calls identified must then be right.
    assert run_demo(tmp_path / "demo", seed=1, bundle=pearl_bundle, episode_steps=75, speed=1.0, effects=[]) == 0
    out = capsys.readouterr().out
    assert "(--bundle)" in out and "context_policy bundle 'pearl_tiny'" in out
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert summary["bundle_kind"] == "context_policy" and summary["bundle"] == str(pearl_bundle.resolve())
    # A fresh export has no eval/ of its own: the twin's task is the shipped bundle's choice.
    assert summary["task_chosen_from"] == str(REPO_ROOT / BUNDLE / "eval" / "eval.json")
    # The node's log of the PEARL bundle, replayed through it: every action reproduced, no prediction error.
    assert summary["replay"]["reproduced"] is True
    assert summary["replay"]["prediction_error"]["applicable"] is False
    metrics = json.loads(Path(summary["replay"]["metrics"]).read_text())["episodes"][0]
    assert metrics["bundle"]["sha256"] == load_bundle(pearl_bundle).sha256 and metrics["adapter_steps"] == 75
    assert summary["identify"]["params"], "the identification ran on the PEARL episode's log"
    # The twin's exact sensors and in-family physics: the family explains its log, with no delay.
    identified = summary["identify"]
    assert identified["fit"]["verdict"] == "explained" and identified["delay"] == 0, identified
    assert summary["effects"] == [] and summary["adaptation_off"]["adapt"] is False
    # What identification calls identified is within 0.1 of the truth (boxes 0.3-2.5 wide); anything else must be
    # flagged, never silently wrong.
    for name, p in summary["identify"]["params"].items():
        assert not p["identified"] or p["value"] == pytest.approx(p["true"], abs=0.1), (name, p)


def test_demo_refuses_a_bundle_it_cannot_load_naming_the_stage(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert run_demo(tmp_path / "demo", bundle=tmp_path / "missing") == 1
    err = capsys.readouterr().err
    assert "stage 2/9 (bundle) failed: --bundle" in err and "what to do: give a bundle folder" in err


def test_demo_refuses_an_effect_the_twin_cannot_take_before_it_starts(tmp_path: Path):
    with pytest.raises(ValueError, match=r"joint_friction.slider.*cart_friction"):
        run_demo(tmp_path / "demo", effects=["friction=slider:0.1"])
    with pytest.raises(ValueError, match="expected KIND=VALUE"):
        run_demo(tmp_path / "demo", effects=["wobble=3"])
    assert not (tmp_path / "demo").exists()
