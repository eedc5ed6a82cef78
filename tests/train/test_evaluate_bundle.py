"""``metarl eval`` on a context_policy (PEARL) bundle: the meta-test run by the robot-side adapter over the ONNX
graphs, with the oracle planning as the bundle's run config recorded. A smoke test of the whole command, plus the
protocol it records and that it acts exactly as the bundle's adapter does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.runtime.kinds.context_policy import ContextPolicyBundle
from metarl_robot.train.evaluate import evaluate

pytestmark = pytest.mark.slow


def test_metarl_eval_grades_a_context_policy_bundle_with_the_meta_test(pearl_bundle: Path, tmp_path: Path):
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "metarl_robot.cli", "eval", str(pearl_bundle), "--tasks", "2",
                           "--set", "samples=16", "--set", "horizon=5", "--set", "iterations=1", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "after_0" in proc.stdout and "source: bundle" in proc.stdout
    report = json.loads((out / "eval.json").read_text())
    assert report["algo"] == "pearl" and report["source_kind"] == "bundle" and len(report["tasks"]) == 2
    assert report["controller"]["z_mode"] == "mean" and report["controller"]["keep_context"] is True
    assert "ContextPolicyAdapter" in report["controller"]["runtime"]
    assert report["oracle_planner"] == "run config (bundle provenance)"
    assert report["planner"]["samples"] == 16 and report["planner"]["horizon"] == 5
    for row in report["tasks"]:
        for k in ContextPolicyBundle.meta_test_episodes:
            assert np.isfinite(row[f"return_after_{k}"]) and row[f"gap_after_{k}"] == pytest.approx(
                row["return_oracle"] - row[f"return_after_{k}"])
        # The first episode starts on the prior; the evidence of each episode is kept for the next.
        assert row["belief_var_after_0"] == pytest.approx(1.0)
        assert row["belief_var_after_2"] < row["belief_var_after_1"] < 1.0
    assert (out / "eval_returns.png").stat().st_size > 10_000


def test_the_bundle_meta_test_acts_as_the_adapter_does(pearl_bundle: Path, tmp_path: Path):
    """The first episode's return equals one driven by a plain bundle adapter on the same task and start."""
    from metarl_robot.train.gap import run_episodes

    bundle = load_bundle(pearl_bundle)
    task = {**bundle.family.nominal(), "pole_length": 1.3}
    report = evaluate(pearl_bundle, tmp_path / "eval", tasks=[task], seed=4, oracle=False, progress=False)

    class Direct:
        def __init__(self) -> None:
            self.adapter = bundle.make_adapter(batch=1)
            self.params = {k: np.array([task[k]]) for k in bundle.family.reward_names}

        def reset(self) -> None:
            self.adapter.reset()

        def act(self, obs):
            return self.adapter.act(obs, self.params)[0]

        def observe(self, obs, action, next_obs):
            self.adapter.observe(obs, action, next_obs)

    direct = run_episodes(bundle.family, bundle.robot, [task], [4], Direct())
    assert report["tasks"][0]["return_after_0"] == pytest.approx(float(direct.returns.sum()), rel=1e-6)
    with pytest.raises(ValueError, match="--no-unadapted is for model-based"):
        evaluate(pearl_bundle, tmp_path / "e2", tasks=[task], oracle=False, unadapted=False, progress=False)
