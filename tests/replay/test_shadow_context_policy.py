"""Shadow replay of a context_policy (PEARL) bundle: a real MuJoCo episode of the tiny PEARL bundle logged to MCAP,
replayed through the same bundle.

The replay reproduces the logged actions and belief; the model prediction error is reported as not applicable
(there is no dynamics model), never as a number; the report, the metrics and the CLI say so; a model-based
candidate on a PEARL log (and the other way round) is a counterfactual. The node's own log of a PEARL bundle is
replayed in tests/ros/test_node.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metarl_robot.logs.reader import read_episode
from metarl_robot.paths import REPO_ROOT
from metarl_robot.real2sim.sim_record import record_sim_episode
from metarl_robot.replay.report import aggregate, terminal_summary, write_report
from metarl_robot.replay.shadow import NO_DYNAMICS_MODEL, REPRODUCTION_TOLERANCE, replay_episode, replay_episodes
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.runtime.kinds.context_policy import ContextPolicyBundle

MB_BUNDLE = REPO_ROOT / "policies" / "cartpole_mb"
TASK = {"pole_mass_scale": 2.0, "pole_length": 1.3, "motor_gain_scale": 0.7}
STEPS = 40


@pytest.fixture(scope="module")
def bundle(pearl_bundle: Path):
    return load_bundle(pearl_bundle)


@pytest.fixture(scope="module")
def logged(bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    task = {**bundle.family.nominal(), **TASK}
    return record_sim_episode(bundle, task, tmp_path_factory.mktemp("logs") / "pearl.mcap", STEPS, seed=2)


@pytest.fixture(scope="module")
def replay(logged: Path, bundle):
    return replay_episode(logged, bundle)


def test_the_same_pearl_bundle_reproduces_the_logged_actions_and_belief(replay, logged: Path, bundle) -> None:
    assert bundle.kind == ContextPolicyBundle.kind
    ep = read_episode(logged)
    assert ep.adapted.all() and set(ep.adaptation) == {"context_mean", "context_var", "context_size"}
    cf = replay.counterfactual
    assert cf.same_bundle_as_log is True and cf.steps_compared == STEPS
    assert cf.reproduced and cf.max_abs_diff_adapter <= REPRODUCTION_TOLERANCE
    np.testing.assert_allclose(replay.logged.context, ep.adaptation["context_mean"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(replay.logged.context_var, ep.adaptation["context_var"], rtol=0, atol=1e-7)
    # The belief starts at the prior N(0, I) and narrows as transitions arrive.
    np.testing.assert_array_equal(replay.logged.context_empty, np.zeros(bundle.latent_dim))
    assert ep.adaptation["context_var"][0] == pytest.approx(np.ones(bundle.latent_dim))
    assert replay.logged.context_var[-1].max() < 1.0
    assert replay.logged.observed.sum() == STEPS - 1


def test_prediction_error_is_not_applicable_and_said_so(replay, tmp_path: Path) -> None:
    assert replay.errors is None
    metrics = replay.metrics()
    assert metrics["bundle_kind"] == ContextPolicyBundle.kind
    assert metrics["prediction_error"] == {"applicable": False, "reason": NO_DYNAMICS_MODEL}
    assert metrics["context"]["transitions_observed"] == STEPS - 1
    assert 0 < metrics["context"]["final_var_mean"] < 1
    assert any("not applicable" in n for n in replay.notes)
    assert aggregate([replay])["prediction_error_one_step"]["applicable"] is False

    paths = write_report([replay, replay], tmp_path / "report")
    text = paths["report"].read_text()
    assert f"| model prediction error | {NO_DYNAMICS_MODEL} |" in text
    assert "belief at the last adapter step" in text and "reproduced" in text
    assert "aggregate_plot" not in paths and f"Prediction error over all episodes: {NO_DYNAMICS_MODEL}." in text
    assert paths["plot0"].stat().st_size > 10_000
    saved = json.loads(paths["metrics"].read_text())
    assert saved["episodes"][0]["prediction_error"]["applicable"] is False
    summary = terminal_summary([replay], paths)
    assert "n/a" in summary and "reproduced 1/1" in summary


def test_candidates_of_the_other_kind_are_counterfactuals(logged: Path, bundle, tmp_path: Path) -> None:
    mb = load_bundle(MB_BUNDLE)
    on_pearl_log = replay_episode(logged, bundle, candidate=mb)
    cc = on_pearl_log.candidate_counterfactual
    assert cc.same_bundle_as_log is False and cc.reproduced is None and cc.max_abs_diff_command > 0
    assert on_pearl_log.candidate_errors is not None  # the model-based candidate's model is graded on the PEARL log
    assert "one_step" in on_pearl_log.metrics()["candidate"]["prediction_error"]

    mb_log = record_sim_episode(mb, mb.family.nominal(), tmp_path / "mb.mcap", 15, seed=1)
    on_mb_log = replay_episode(mb_log, mb, candidate=bundle)
    assert on_mb_log.counterfactual.reproduced and on_mb_log.errors is not None
    assert on_mb_log.candidate_errors is None
    assert on_mb_log.metrics()["candidate"]["prediction_error"]["applicable"] is False
    assert NO_DYNAMICS_MODEL in write_report([on_mb_log], tmp_path / "report")["report"].read_text()
    # A PEARL bundle replaying a model-based log: a counterfactual, not a reproduction.
    crossed = replay_episodes([mb_log], bundle)[0]
    assert crossed.counterfactual.same_bundle_as_log is False and crossed.counterfactual.reproduced is False


def test_metarl_replay_cli_on_a_pearl_log(logged: Path, pearl_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "metarl_robot.cli", "replay", str(logged), "--bundle",
                           str(pearl_bundle), "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "n/a" in proc.stdout and "reproduced 1/1" in proc.stdout
    assert json.loads((out / "metrics.json").read_text())["aggregate"]["reproduced"] == "1/1"
