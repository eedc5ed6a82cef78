"""``metarl eval`` on MB-MPO (kind ``meta_policy``): the meta-test with the robot's adapter taking its inner step at
each episode start, for the exported bundle and for the run folder, and the same numbers as a plain adapter."""

from __future__ import annotations

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
