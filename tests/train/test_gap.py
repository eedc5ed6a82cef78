"""The oracle side of the sub-optimality gap: per (task, reset seed) returns, their cache file, and
the shared start that makes ``oracle - learner`` compare like with like. Runs on a 20-step cart-pole
with a tiny planner."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from metarl_robot.envs.rollout import random_policy
from metarl_robot.paths import REPO_ROOT
from metarl_robot.runtime.planner import PlannerConfig
from metarl_robot.spec.family import load_family
from metarl_robot.spec.robot import load_robot
from metarl_robot.train.gap import ORACLE_CACHE_SCHEMA_VERSION, OracleReturns, oracle_episodes, run_episodes

STEPS = 20
PLANNER = PlannerConfig(samples=8, horizon=4, iterations=1, noise_correlation=0.9)


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """The cart-pole family with 20-step episodes (a copy of sim/ the loaders use for this module) and its robot."""
    dst = tmp_path_factory.mktemp("short") / "sim"
    shutil.copytree(REPO_ROOT / "sim", dst)
    path = dst / "tasks" / "cartpole_swingup.yaml"
    path.write_text(path.read_text().replace("episode_steps: 250", f"episode_steps: {STEPS}"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("METARL_SIM_DIR", str(dst))
        family = load_family("cartpole_swingup")
        assert family.spec.episode_steps == STEPS
        yield family, load_robot(family.spec.robot)


@pytest.fixture(scope="module")
def tasks(short):
    family, _ = short
    return family.sample(np.random.default_rng(7), "train", 3)


def test_a_tasks_oracle_return_does_not_depend_on_what_it_is_asked_with(short, tasks):
    family, robot = short
    a, b, c = tasks
    first = OracleReturns(family, robot, PLANNER)
    together = first([a, b, a], seed=3)
    assert first.episodes_run == 2 and together[0] == together[2]
    other = OracleReturns(family, robot, PLANNER)
    reordered = other([c, b, a], seed=3)
    assert reordered[2] == together[0] and reordered[1] == together[1]
    # It is the return of that task's oracle episode reset (and its planner seeded) with the seed.
    alone = oracle_episodes(family, robot, [a], replace(PLANNER, seed=3), 3)
    assert alone.returns[0] == together[0]
    assert alone.rewards.shape == (1, STEPS) and np.isfinite(alone.returns).all()
    # Another start is another record.
    assert other([a], seed=4)[0] != together[0] and other.episodes_run == 4
    flags = other.success([c, b, a], seed=3)
    assert flags is not None and flags.dtype == bool and flags.shape == (3,)


def test_cache_file_round_trip(short, tasks, tmp_path):
    family, robot = short
    a, b, c = tasks
    cache = tmp_path / "oracle" / "cartpole.json"
    first = OracleReturns(family, robot, PLANNER, cache_file=cache)
    returns = first([a, b], seed=1)
    data = json.loads(cache.read_text())
    assert data["schema_version"] == ORACLE_CACHE_SCHEMA_VERSION and len(data["records"]) == 2
    assert data["identity"]["family"] == "cartpole_swingup" and data["identity"]["episode_steps"] == STEPS

    second = OracleReturns(family, robot, PLANNER, cache_file=cache)
    assert second([b, a], seed=1).tolist() == returns[::-1].tolist()
    assert second.episodes_run == 0  # nothing simulated: all from the file
    assert second.success([a, b], seed=1).tolist() == first.success([a, b], seed=1).tolist()
    # The planner's seed is the reset seed, whatever the config says: the cache serves any run seed alike.
    third = OracleReturns(family, robot, replace(PLANNER, seed=42), cache_file=cache)
    assert third([a], seed=1)[0] == returns[0] and third.episodes_run == 0
    third([c], seed=1)
    assert third.episodes_run == 1 and len(json.loads(cache.read_text())["records"]) == 3


def test_cache_for_another_planner_family_or_schema_is_refused(short, tasks, tmp_path):
    family, robot = short
    cache = tmp_path / "oracle.json"
    OracleReturns(family, robot, PLANNER, cache_file=cache)(tasks[:1], seed=0)
    with pytest.raises(ValueError, match="use another cache file") as err:
        OracleReturns(family, robot, replace(PLANNER, samples=16), cache_file=cache)
    assert str(cache) in str(err.value) and "'samples': 16" in str(err.value)
    long_family = load_family(REPO_ROOT / "sim" / "tasks" / "cartpole_swingup.yaml")  # 250-step episodes
    with pytest.raises(ValueError, match="use another cache file"):
        OracleReturns(long_family, robot, PLANNER, cache_file=cache)
    data = json.loads(cache.read_text())
    data["schema_version"] = ORACLE_CACHE_SCHEMA_VERSION + 1
    cache.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"oracle cache schema {ORACLE_CACHE_SCHEMA_VERSION + 1}, this version reads "
                                         rf"{ORACLE_CACHE_SCHEMA_VERSION}; delete the file to recompute"):
        OracleReturns(family, robot, PLANNER, cache_file=cache)


def test_oracle_and_learner_episodes_reset_with_one_seed_start_alike(short, tasks):
    family, robot = short
    a, b, c = tasks
    oracle = oracle_episodes(family, robot, [b], replace(PLANNER, seed=5), 5)
    # The runner's learner episodes: a batch of candidate tasks, every sub-env reset with the same seed.
    learner = run_episodes(family, robot, [a, b, c], [5, 5, 5], random_policy(robot.action_low, robot.action_high, 0))
    for i in range(3):
        np.testing.assert_array_equal(learner.obs[i, 0], oracle.obs[0, 0])
    other = run_episodes(family, robot, [b], 6, random_policy(robot.action_low, robot.action_high, 0))
    assert not np.array_equal(other.obs[0, 0], oracle.obs[0, 0])  # another seed starts elsewhere (reset noise)
    # What the learner did from there differs from the oracle: the gap compares two controllers, one start.
    assert not np.array_equal(learner.actions[1], oracle.actions[0])


def test_kept_trajectories_are_the_cached_episodes(short, tasks):
    family, robot = short
    oracle = OracleReturns(family, robot, PLANNER, keep_trajectories=True)
    returns = oracle(tasks[:2], seed=2)
    for task, ret in zip(tasks[:2], returns, strict=True):
        episode = oracle.trajectories[oracle.key(task, 2)]
        assert episode.returns[0] == ret and episode.obs.shape == (1, STEPS, robot.obs_dim)
        assert set(episode.components)  # the reward's components, recomputed from the transitions

