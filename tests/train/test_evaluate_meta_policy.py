"""``metarl eval`` on MB-MPO (kind ``meta_policy``): the meta-test with the robot's adapter taking its inner step at
each episode start (or on every ``episodes_per_step`` episodes pooled, ``--set episodes_per_step=K``), for the exported
bundle and for the run folder, and the same numbers as a plain adapter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metarl_robot.algos.mbmpo import PolicyController
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.train.evaluate import evaluate
from metarl_robot.train.gap import run_episodes

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("source", ["bundle", "run"])
def test_the_meta_test_grades_after_0_1_2_inner_steps(source, meta_policy_bundle: Path, mbmpo_run: Path,
                                                      tmp_path: Path):
    path = meta_policy_bundle if source == "bundle" else mbmpo_run
    report = evaluate(path, tmp_path / "eval", tasks=2, seed=1, oracle=False, progress=False)
    assert report["bundle_kind"] == "meta_policy" and report["source_kind"] == source
    assert report["exploration_episodes"] == [0, 1, 2] and report["controller"]["deterministic"] is False
    assert "MetaPolicyAdapter" in report["controller"]["runtime"]
    for row in report["tasks"]:
        assert all(np.isfinite(row[f"return_after_{k}"]) for k in (0, 1, 2))
        assert not any(key.startswith("belief_var") for key in row)  # no belief over the task to report
    assert "return_gain_after_2" in report["summary"]


def test_the_meta_test_is_the_adapter_stepping_between_episodes(meta_policy_bundle: Path, tmp_path: Path):
    bundle = load_bundle(meta_policy_bundle)
    task = bundle.family.sample(np.random.default_rng(5), "test", 1)[0]
    report = evaluate(meta_policy_bundle, tmp_path / "eval", tasks=[task], seed=4, oracle=False, progress=False)

    # What a robot runs: the bundle's adapter, reset at every episode start.
    direct = PolicyController(bundle.make_adapter(batch=1, seed=4),
                              {k: np.array([task[k]]) for k in bundle.family.reward_names})
    returns = [float(run_episodes(bundle.family, bundle.robot, [task], [4], direct, False).returns[0])
               for _ in range(3)]
    assert direct.adapter.inner_steps.tolist() == [2]
    assert [report["tasks"][0][f"return_after_{k}"] for k in (0, 1, 2)] == pytest.approx(returns, abs=1e-9)


@pytest.mark.parametrize("source", ["bundle", "run"])
def test_with_two_episodes_per_step_the_meta_test_grades_after_0_2_4(source, meta_policy_bundle: Path,
                                                                      mbmpo_run: Path, tmp_path: Path):
    path = meta_policy_bundle if source == "bundle" else mbmpo_run
    report = evaluate(path, tmp_path / "eval", tasks=1, seed=1, oracle=False, progress=False,
                      planner_overrides={"episodes_per_step": 2})
    assert report["exploration_episodes"] == [0, 2, 4] and report["controller"]["episodes_per_step"] == 2
    assert "every 2 episodes pooled" in report["controller"]["adapts"]
    row = report["tasks"][0]
    assert sorted(k for k in row if k.startswith("return_")) == ["return_after_0", "return_after_2", "return_after_4"]
    assert "return_gain_after_4" in report["summary"]
    assert (tmp_path / "eval" / "eval_returns.png").is_file()


def test_the_pooled_meta_test_is_the_adapter_stepping_every_k_episodes(meta_policy_bundle: Path, tmp_path: Path):
    bundle = load_bundle(meta_policy_bundle)
    task = bundle.family.sample(np.random.default_rng(5), "test", 1)[0]
    report = evaluate(meta_policy_bundle, tmp_path / "eval", tasks=[task], seed=4, oracle=False, progress=False,
                      planner_overrides={"episodes_per_step": 2})
    # What a robot runs with the same setting: every episode from 0 to 4, the adapter reset at each start.
    direct = PolicyController(bundle.make_adapter(batch=1, seed=4, planner_overrides={"episodes_per_step": 2}),
                              {k: np.array([task[k]]) for k in bundle.family.reward_names})
    returns = [float(run_episodes(bundle.family, bundle.robot, [task], [4], direct, False).returns[0])
               for _ in range(5)]
    assert direct.adapter.inner_steps.tolist() == [2]
    assert [report["tasks"][0][f"return_after_{k}"] for k in (0, 2, 4)] == pytest.approx(returns[::2], abs=1e-9)


def test_a_wrong_set_key_names_what_is_allowed(meta_policy_bundle: Path, tmp_path: Path):
    with pytest.raises(ValueError, match=r"--set episode_per_step: not a setting of this evaluation: a meta_policy "
                                         r"controller takes episodes_per_step; the oracle's planner takes .*horizon"):
        evaluate(meta_policy_bundle, tmp_path / "eval", tasks=1, oracle=False, progress=False,
                 planner_overrides={"episode_per_step": 2})
    with pytest.raises(ValueError, match=r"planner_overrides: episodes_per_step: must be an integer >= 1, got 0"):
        evaluate(meta_policy_bundle, tmp_path / "eval", tasks=1, oracle=False, progress=False,
                 planner_overrides={"episodes_per_step": 0})


def test_metarl_eval_set_episodes_per_step_prints_the_pooled_columns(meta_policy_bundle: Path, tmp_path: Path):
    def metarl_eval(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "metarl_robot.cli", "eval", str(meta_policy_bundle),
                               "--tasks", "1", "--no-oracle", "--out", str(tmp_path / "eval"), *args],
                              capture_output=True, text=True, timeout=600)

    proc = metarl_eval("--set", "episodes_per_step=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("task"))
    assert header.split()[2:5] == ["after_0", "after_2", "after_4"], header
    wrong = metarl_eval("--set", "samples=16", "--set", "episodes=2")
    assert wrong.returncode == 2 and "--set episodes: not a setting of this evaluation" in wrong.stderr
    assert "takes episodes_per_step" in wrong.stderr
