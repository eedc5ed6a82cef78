"""``metarl eval --effect``: every episode (adapted, unadapted, oracle) runs with the out-of-family effects, and
``eval.json`` records them and what the oracle sees of them. A 20-step cart-pole and a tiny planner."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from metarl_robot.envs.out_of_family import OutOfFamily
from metarl_robot.envs.rollout import random_policy
from metarl_robot.paths import REPO_ROOT
from metarl_robot.train.evaluate import evaluate
from metarl_robot.train.gap import OracleReturns, oracle_episodes, run_episodes
from tests.train.test_gap import PLANNER, STEPS, short  # noqa: F401  (short: the 20-step family fixture)

BUNDLE = REPO_ROOT / "policies" / "cartpole_mb"
DELAY = OutOfFamily(delay_periods=2)


def test_learner_and_oracle_episodes_run_with_the_effects(short):  # noqa: F811
    family, robot = short
    task = family.nominal()
    policy = lambda: random_policy(robot.action_low, robot.action_high, 0)  # noqa: E731
    plain = run_episodes(family, robot, [task], 0, policy())
    delayed = run_episodes(family, robot, [task], 0, policy(), effects=DELAY)
    assert np.array_equal(delayed.actions, plain.actions)  # the same commands sent ...
    assert not np.array_equal(delayed.next_obs, plain.next_obs)  # ... reach the motors later
    assert np.array_equal(run_episodes(family, robot, [task], 0, policy(), effects=OutOfFamily()).next_obs,
                          plain.next_obs)
    oracle_plain = oracle_episodes(family, robot, [task], PLANNER, 0)
    oracle_delayed = oracle_episodes(family, robot, [task], PLANNER, 0, effects=DELAY)
    assert not np.array_equal(oracle_delayed.next_obs, oracle_plain.next_obs)
    assert oracle_delayed.rewards.shape == (1, STEPS)


def test_oracle_cache_is_keyed_by_the_effects(short, tmp_path):  # noqa: F811
    family, robot = short
    cache = tmp_path / "oracle.json"
    plain = OracleReturns(family, robot, PLANNER, cache_file=cache)
    assert "out_of_family" not in plain.identity  # caches written before effects existed stay valid
    plain([family.nominal()], seed=0)
    with pytest.raises(ValueError, match="computed for"):
        OracleReturns(family, robot, PLANNER, cache_file=cache, effects=DELAY)
    assert OracleReturns(family, robot, PLANNER, effects=DELAY).identity["out_of_family"]["delay_periods"] == 2


def test_evaluate_runs_every_mode_with_the_effects_and_records_them(short, tmp_path):  # noqa: F811
    family, _ = short
    effects = OutOfFamily(delay_periods=2, sensor_bias={"pole_angle": 0.05})
    overrides = {"samples": 8, "horizon": 4, "iterations": 1}
    common = dict(family="cartpole_swingup", tasks=[family.nominal()], seed=0, planner_overrides=overrides,
                  progress=False)
    plain = evaluate(BUNDLE, tmp_path / "plain", **common)
    report = evaluate(BUNDLE, tmp_path / "effects", effects=effects, **common)
    assert plain["out_of_family"] is None
    assert report["out_of_family"] == {"effects": effects.as_dict(), "label": "delay=2 bias=pole_angle:0.05",
                                       "oracle": effects.oracle_record()}
    oracle = report["out_of_family"]["oracle"]
    assert oracle["plans_through"] == ["delay_periods"] and "true MuJoCo state" in oracle["not_given"]["sensor_bias"]
    assert json.loads((tmp_path / "effects" / "eval.json").read_text())["out_of_family"] == report["out_of_family"]
    for mode in ("adapted", "unadapted", "oracle"):
        assert report["tasks"][0][f"return_{mode}"] != plain["tasks"][0][f"return_{mode}"], mode
    again = evaluate(BUNDLE, tmp_path / "again", effects=replace(effects), **common)
    assert again["tasks"][0]["return_adapted"] == report["tasks"][0]["return_adapted"]  # reproducible


def test_eval_cli_rejects_a_bad_effect_naming_it():
    result = subprocess.run([sys.executable, "-m", "metarl_robot.cli", "eval", str(BUNDLE), "--effect", "delay=two"],
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 2 and "metarl eval: error: --effect 'delay=two': delay_periods" in result.stderr
