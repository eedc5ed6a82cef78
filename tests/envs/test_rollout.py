"""Vectorised collection: one task per sub-env, reproducible across vector modes."""

from __future__ import annotations

import numpy as np
import pytest

from metarl_robot.envs.rollout import collect, make_vector_env, random_policy, set_tasks
from metarl_robot.spec.family import load_family
from metarl_robot.spec.robot import load_robot
from metarl_robot.spec.schema import SpecError

FAMILY = "cartpole_swingup"


def _collect(mode, seed, tasks, episodes=1):
    family = load_family(FAMILY)
    robot = load_robot(family.spec.robot)
    envs = make_vector_env(FAMILY, len(tasks), mode)
    try:
        return collect(envs, family, random_policy(robot.action_low, robot.action_high, seed), tasks, episodes, seed)
    finally:
        envs.close()


@pytest.fixture(scope="module")
def tasks():
    return load_family(FAMILY).sample(np.random.default_rng(0), "test", 3)


def test_sync_rollouts_are_reproducible_and_seed_dependent(tasks):
    a = _collect("sync", 3, tasks, episodes=2)
    b = _collect("sync", 3, tasks, episodes=2)
    c = _collect("sync", 4, tasks, episodes=2)
    assert np.array_equal(a.obs, b.obs) and np.array_equal(a.rewards, b.rewards)
    assert not np.array_equal(a.obs, c.obs)
    steps = load_family(FAMILY).spec.episode_steps
    assert a.obs.shape == (3, 2 * steps, 4) and a.actions.shape == (3, 2 * steps, 1)
    assert a.episode_returns().shape == (3, 2)
    assert np.flatnonzero(a.episode_start).tolist() == [0, steps]
    assert a.valid.all()
    # Within an episode, each step starts where the last one ended.
    np.testing.assert_array_equal(a.obs[:, 1:steps], a.next_obs[:, : steps - 1])


@pytest.mark.slow
def test_async_gives_the_same_trajectories_as_sync(tasks):
    a = _collect("sync", 7, tasks)
    b = _collect("async", 7, tasks)
    assert np.array_equal(a.obs, b.obs) and np.array_equal(a.next_obs, b.next_obs)
    assert np.array_equal(a.rewards, b.rewards)


def test_each_sub_env_runs_its_own_task(tasks):
    envs = make_vector_env(FAMILY, 3, "sync")
    try:
        set_tasks(envs, tasks)
        assert list(envs.get_attr("task")) == tasks
        with pytest.raises(ValueError, match="got 2 tasks for 3 envs"):
            set_tasks(envs, tasks[:2])
        with pytest.raises(SpecError, match="out of bounds"):
            set_tasks(envs, [{"pole_length": 9.0}] * 3)
    finally:
        envs.close()
    # Identical seeds per sub-env, different tasks: different motion.
    same_seed = _collect("sync", 1, tasks)
    assert not np.allclose(same_seed.obs[0], same_seed.obs[1])


def test_save_round_trip(tmp_path, tasks):
    rollout = _collect("sync", 0, tasks)
    path = tmp_path / "r.npz"
    rollout.save(str(path))
    data = np.load(path)
    assert list(data["task_names"]) == list(tasks[0])
    np.testing.assert_array_equal(data["tasks"][1], list(tasks[1].values()))
    np.testing.assert_array_equal(data["obs"], rollout.obs)


def test_bad_vector_arguments():
    with pytest.raises(ValueError, match="num_envs must be >= 1"):
        make_vector_env(FAMILY, 0)
    with pytest.raises(ValueError, match="mode must be 'sync' or 'async'"):
        make_vector_env(FAMILY, 1, "threads")


def _merged_by(vector_env, infos):
    merged = {}
    for i, info in enumerate(infos):
        merged = vector_env._add_info(merged, info, i)
    return merged


def _assert_same_infos(ours, gymnasium_s):
    assert list(ours) == list(gymnasium_s)  # same keys, masks included, in the same order
    for key, expected in gymnasium_s.items():
        if isinstance(expected, dict):
            _assert_same_infos(ours[key], expected)
        else:
            assert type(ours[key]) is type(expected) and ours[key].dtype == expected.dtype, key
            assert ours[key].shape == expected.shape and ours[key].tolist() == expected.tolist(), key


def test_vector_infos_are_merged_exactly_as_gymnasium_merges_them():
    import gymnasium as gym

    ours = make_vector_env(FAMILY, 3, "sync")
    reference = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * 3)
    try:
        ours.reset(seed=0)
        _, _, _, _, info = ours.step(np.full((3, 1), 0.7))
        real = [{k: (v[i] if not isinstance(v, dict) else {n: x[i] for n, x in v.items() if not n.startswith("_")})
                 for k, v in info.items() if not k.startswith("_")} for i in range(3)]
        assert info["action_clipped"].dtype == bool and info["physics_diverged"].dtype == bool  # not object arrays
        odd = [  # what any env may put in an info: keys some sub-envs lack, numpy scalars, objects, final_obs
            {"a": 1, "b": {"c": np.float32(2.0), "d": [1]}, "final_obs": np.zeros(2), "e": "text"},
            {"b": {"d": None}, "f": np.arange(3), "a": 2},
            {"f": np.arange(3) * 2, "g": True, "final_info": {"a": 1.5}},
        ]
        for infos in ([{k: v for k, v in r.items()} for r in real], odd):
            _assert_same_infos(_merged_by(ours, infos), _merged_by(reference, infos))
    finally:
        ours.close()
        reference.close()
