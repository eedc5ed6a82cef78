"""Conformance of every registered family: gymnasium API, determinism, task semantics, bad input."""

from __future__ import annotations

import re

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from metarl_robot.envs import FAMILY_ENV_IDS
from metarl_robot.spec.schema import SpecError
from tests.conftest import FAMILIES

STEPS = 40


def _make(name):
    return gym.make(FAMILY_ENV_IDS[name]).unwrapped


def _run(env, task, seed=0, steps=STEPS, actions_seed=1):
    env.set_task(task)
    obs, _ = env.reset(seed=seed)
    rng = np.random.default_rng(actions_seed)
    observations, rewards = [obs], []
    for _ in range(steps):
        obs, reward, *_ = env.step(rng.uniform(env.robot.action_low, env.robot.action_high))
        observations.append(obs)
        rewards.append(reward)
    return np.array(observations), np.array(rewards)


def test_every_shipped_family_is_registered():
    assert sorted(FAMILY_ENV_IDS) == FAMILIES
    for env_id in FAMILY_ENV_IDS.values():
        assert re.fullmatch(r"metarl/[A-Za-z]+-v\d+", env_id), env_id


@pytest.mark.parametrize("name", FAMILIES)
def test_gymnasium_env_checker(name):
    check_env(_make(name), skip_render_check=True)


@pytest.mark.parametrize("name", FAMILIES)
def test_same_seed_same_trajectory(name):
    task = _make(name).family.sample(np.random.default_rng(0), "test", 1)[0]
    a, ra = _run(_make(name), task)
    b, rb = _run(_make(name), task)
    assert np.array_equal(a, b) and np.array_equal(ra, rb)
    c, _ = _run(_make(name), task, seed=1)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("name", FAMILIES)
def test_each_dynamics_parameter_changes_the_trajectory(name):
    env = _make(name)
    family = env.family
    nominal, _ = _run(env, family.nominal())
    for p in family.params:
        lo, hi = p.bounds
        low, r_low = _run(env, {p.name: lo})
        if p.kind == "dynamics":
            high, _ = _run(env, {p.name: hi})
            assert np.max(np.abs(low - high)) > 1e-3, f"{p.name} does not change the motion"
        else:  # a reward parameter changes the reward, never the physics
            # Compare with the midpoint: the ends of a periodic range (a heading in [-pi, pi]) coincide.
            mid, r_mid = _run(env, {p.name: (lo + hi) / 2})
            assert np.array_equal(low, nominal) and np.array_equal(mid, nominal), p.name
            assert not np.allclose(r_low, r_mid), f"{p.name} does not change the reward"


@pytest.mark.parametrize("name", FAMILIES)
def test_info_carries_task_and_reward_components_and_reward_is_reproducible_from_obs(name):
    env = _make(name)
    task = env.family.sample(np.random.default_rng(2), "train", 1)[0]
    obs, info = env.reset(seed=0, options={"task": task})
    assert info["task"] == task and env.get_task() == task
    assert info["privileged"].shape == (env.robot.privileged_dim,)
    action = env.action_space.sample()
    next_obs, reward, terminated, truncated, info = env.step(action)
    assert info["task"] == task
    assert set(info["reward_components"]) and not terminated and not truncated
    # The reward is a function of (obs, action, next_obs, reward params) alone: the runtime can compute it.
    again, components = env.reward_fn(env.robot, obs, info["sent_action"], next_obs, env.reward_params)
    assert float(again) == reward
    assert {k: float(v) for k, v in components.items()} == info["reward_components"]
    # Batched evaluation over a leading axis gives the same numbers.
    sent = info["sent_action"]
    batch, _ = env.reward_fn(env.robot, np.stack([obs, obs]), np.stack([sent, sent]), np.stack([next_obs, next_obs]),
                             env.reward_params)
    assert batch.shape == (2,) and np.all(batch == reward)


@pytest.mark.parametrize("name", FAMILIES)
def test_episodes_truncate_at_episode_steps(name):
    env = _make(name)
    env.reset(seed=0)
    zero = env.robot.safe_action
    for step in range(env.family.spec.episode_steps):
        _, _, terminated, truncated, _ = env.step(zero)
        assert truncated == (step == env.family.spec.episode_steps - 1)
        assert not terminated


@pytest.mark.parametrize("name", FAMILIES)
def test_bad_tasks_are_rejected_with_the_allowed_range(name):
    env = _make(name)
    p = env.family.params[0]
    lo, hi = p.bounds
    before = env.get_task()
    for bad, fragment in [({p.name: hi + (hi - lo) + 1.0}, "is out of bounds; allowed range"),
                          ({p.name: float("nan")}, "must be finite"),
                          ({"no_such_param": 1.0}, "unknown parameter")]:
        with pytest.raises(SpecError, match=re.escape(fragment)):
            env.set_task(bad)
        assert env.get_task() == before  # a rejected task changes nothing
    with pytest.raises(SpecError, match="give a task mapping or a split name: train, test"):
        env.reset(options={"task": "validation"})
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(options={"tsak": {}})


@pytest.mark.parametrize("name", FAMILIES)
def test_bad_actions(name):
    env = _make(name)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action must have shape"):
        env.step(np.zeros(env.robot.action_dim + 1))
    with pytest.raises(ValueError, match="NaN or Inf"):
        env.step(np.full(env.robot.action_dim, np.nan))
    for _ in range(3):  # the rate limit may need a few periods to reach the top of the box
        _, _, _, _, info = env.step(np.full(env.robot.action_dim, 5.0))
    assert info["action_clipped"] and np.all(info["applied_action"] == env.robot.action_high)
    for _ in range(3):
        _, _, _, _, info = env.step(env.robot.safe_action)
    assert not info["action_clipped"]


def test_commands_are_rate_limited_as_the_robot_will_limit_them():
    env = _make("cartpole_swingup")  # max_rate 25/s at 25 Hz: at most 1.0 per control period
    env.reset(seed=0)
    _, _, _, _, info = env.step(np.array([1.0]))
    assert not info["action_rate_limited"] and info["sent_action"][0] == 1.0
    _, _, _, _, info = env.step(np.array([-1.0]))
    assert info["action_rate_limited"] and info["sent_action"][0] == pytest.approx(0.0)
    _, _, _, _, info = env.step(np.array([-1.0]))
    assert not info["action_rate_limited"] and info["sent_action"][0] == pytest.approx(-1.0)
    env.reset(seed=0)  # after a reset the last sent command is the safe command again
    _, _, _, _, info = env.step(np.array([-1.0]))
    assert info["sent_action"][0] == pytest.approx(-1.0)


@pytest.mark.parametrize("name", FAMILIES)
def test_tasks_drawn_from_the_env_rng_are_seeded(name):
    env = _make(name)
    env.reset(seed=5, options={"task": "test"})
    first = env.get_task()
    env.reset(seed=5, options={"task": "test"})
    assert env.get_task() == first
    env.reset(seed=6, options={"task": "test"})
    assert env.get_task() != first


@pytest.mark.parametrize("blowup", ["qvel", "qacc"])
def test_diverged_physics_terminates_instead_of_teleporting(blowup):
    env = _make("cartpole_swingup")
    env.reset(seed=0)
    env.step(env.robot.safe_action)
    if blowup == "qvel":
        env.data.qvel[:] = 1e11  # MuJoCo resets the state on a huge velocity (mjWARN_BADQVEL)
    else:
        env.data.qfrc_applied[:] = np.nan  # and on a non-finite acceleration (mjWARN_BADQACC)
    _, _, terminated, _, info = env.step(env.robot.safe_action)
    assert terminated and info["physics_diverged"]
    _, _, terminated, _, info = env.step(env.robot.safe_action)
    assert not info["physics_diverged"]  # counted once, not for every later step
    env.data.qvel[:] = 1e11  # a second blow-up in the same episode (MuJoCo's counter stays at 1)
    _, _, terminated, _, info = env.step(env.robot.safe_action)
    assert terminated and info["physics_diverged"]


def test_registration_skips_a_broken_family_with_a_warning_and_refuses_duplicate_ids(sim_copy):
    from metarl_robot.envs.registry import register_families

    (sim_copy / "tasks" / "broken.yaml").write_text("schema_version: 1\nname: broken\n")
    with pytest.warns(UserWarning, match="task family 'broken' not registered: .*missing required key"):
        ids = register_families()
    assert "broken" not in ids and "cartpole_swingup" in ids
    (sim_copy / "tasks" / "broken.yaml").unlink()
    dup = (sim_copy / "tasks" / "cartpole_swingup.yaml").read_text().replace("name: cartpole_swingup", "name: twin")
    (sim_copy / "tasks" / "twin.yaml").write_text(dup)
    with pytest.raises(SpecError, match="'metarl/CartpoleSwingup-v0' is already the id of family 'cartpole_swingup'"):
        register_families()


@pytest.mark.parametrize("name", FAMILIES)
def test_step_flags_are_python_bools(name):
    # a vector env merges Python bools into bool arrays, numpy bools into object arrays
    env = _make(name)
    env.reset(seed=0)
    _, _, terminated, truncated, info = env.step(np.full(env.robot.action_dim, 5.0))
    for flag in (terminated, truncated, info["action_clipped"], info["action_rate_limited"], info["physics_diverged"]):
        assert type(flag) is bool
