from __future__ import annotations

import numpy as np
import pytest

from metarl_robot.spec.rewards import REWARDS, check_reward_inputs, get_reward
from metarl_robot.spec.robot import load_robot
from metarl_robot.spec.schema import SpecError


def _obs(robot, **fields):
    obs = np.zeros(robot.obs_dim)
    for name, value in fields.items():
        obs[robot.obs_slices[name]] = value
    return obs


def test_cartpole_reward_is_one_when_upright_centred_and_still():
    robot = load_robot("cartpole")
    reward = get_reward("cartpole_swingup")
    total, parts = reward(robot, _obs(robot), np.zeros(1), _obs(robot, cart_pos=0.3), {"target_x": 0.3})
    assert total == pytest.approx(1.0)
    hanging, _ = reward(robot, _obs(robot), np.zeros(1), _obs(robot, pole_angle=np.pi), {"target_x": 0.0})
    assert hanging == pytest.approx(0.0)
    assert set(parts) == {"upright", "centered", "small_control", "small_velocity"}
    pushing, _ = reward(robot, _obs(robot), np.ones(1), _obs(robot), {"target_x": 0.0})
    assert pushing == pytest.approx(0.8)


def test_half_cheetah_velocity_reward():
    robot = load_robot("half_cheetah")
    total, parts = get_reward("half_cheetah_velocity")(
        robot, _obs(robot), np.full(6, 0.5), _obs(robot, root_vel=[2.0, 0.3]), {"target_velocity": 1.5})
    assert parts["velocity_error"] == pytest.approx(0.5)
    assert total == pytest.approx(-0.5 - 0.05 * 6 * 0.25)


def test_ant_rewards():
    robot = load_robot("ant")
    nxt = _obs(robot, torso_linvel=[1.0, 2.0, 0.0], torso_height=0.5, torso_xy=[1.0, -1.0])
    total, parts = get_reward("ant_direction")(robot, nxt, np.zeros(8), nxt, {"direction": np.pi / 2})
    assert parts["progress"] == pytest.approx(2.0) and parts["healthy"] == 1.0 and total == pytest.approx(3.0)
    fallen = _obs(robot, torso_height=0.1)
    assert get_reward("ant_direction")(robot, fallen, np.zeros(8), fallen, {"direction": 0.0})[1]["healthy"] == 0
    total, parts = get_reward("ant_goal")(robot, nxt, np.zeros(8), nxt, {"goal_x": 2.0, "goal_y": 1.0})
    assert parts["goal_distance"] == pytest.approx(3.0) and total == pytest.approx(-2.0)


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_rewards_broadcast_over_batches_and_task_parameters(name):
    robot = load_robot({"cartpole_swingup": "cartpole", "half_cheetah_velocity": "half_cheetah"}.get(name, "ant"))
    reward = REWARDS[name]
    rng = np.random.default_rng(0)
    obs, nxt = rng.normal(size=(2, 5, 7, robot.obs_dim))
    act = rng.uniform(-1, 1, (5, 7, robot.action_dim))
    params = {p: rng.uniform(0, 1, (5, 7)) for p in reward.params}
    total, parts = reward(robot, obs, act, nxt, params)
    assert total.shape == (5, 7) and all(v.shape == (5, 7) for v in parts.values())
    one, _ = reward(robot, obs[2, 3], act[2, 3], nxt[2, 3], {p: v[2, 3] for p, v in params.items()})
    assert float(one) == pytest.approx(float(total[2, 3]), abs=1e-12)


def test_reward_inputs_are_checked_against_robot_and_family():
    cheetah = load_robot("half_cheetah")
    with pytest.raises(SpecError, match="reads measured observation field 'cart_pos'"):
        check_reward_inputs("cartpole_swingup", cheetah, ["target_x"], "f.yaml")
    with pytest.raises(SpecError, match="reads reward parameter 'target_x', which the family lacks"):
        check_reward_inputs("cartpole_swingup", load_robot("cartpole"), [], "f.yaml")
    with pytest.raises(SpecError, match="unknown reward 'dance'"):
        check_reward_inputs("dance", cheetah, [], "f.yaml")
    # A privileged field can never feed a reward: the robot-side planner would not have it.
    with pytest.raises(SpecError, match="'foot_contact'"):
        from metarl_robot.spec import rewards
        fake = rewards.RewardFunction(lambda *a: None, ("foot_contact",), ())
        rewards.REWARDS["uses_contact"] = fake
        try:
            check_reward_inputs("uses_contact", load_robot("ant"), [], "f.yaml")
        finally:
            del rewards.REWARDS["uses_contact"]


@pytest.mark.parametrize("name", sorted(REWARDS))
def test_the_float_path_is_the_numpy_reward_of_one_transition(name):
    # RewardFunction.one runs the same formula on Python floats (the robot-side PEARL step): it must agree with the
    # numpy reward to float64 rounding, on transitions across the state space (the Ant's band edges included).
    robot = load_robot({"cartpole_swingup": "cartpole", "half_cheetah_velocity": "half_cheetah"}.get(name, "ant"))
    reward = REWARDS[name]
    rng = np.random.default_rng(1)
    obs, nxt = rng.normal(0, 3, (2, 200, robot.obs_dim))
    if "torso_height" in robot.obs_slices:
        nxt[:, robot.obs_slices["torso_height"]] = rng.uniform(0.0, 1.2, (200, 1))
        nxt[:2, robot.obs_slices["torso_height"]] = [[0.2], [1.0]]  # exactly on the edges: inside
    act = rng.uniform(robot.action_low, robot.action_high, (200, robot.action_dim))
    params = {p: rng.normal(size=200) for p in reward.params}
    total = reward(robot, obs, act, nxt, params)[0]
    one = [reward.one(robot, obs[i].tolist(), act[i].tolist(), nxt[i].tolist(), {p: float(v[i]) for p, v in
                                                                                  params.items()}) for i in range(200)]
    assert all(type(x) is float for x in one)
    np.testing.assert_allclose(one, total, rtol=1e-14, atol=1e-14)


def test_the_float_path_leaves_what_math_refuses_to_numpy():
    # A reward whose exp overflows: math raises, numpy gives inf; the float path must give numpy's value, not raise.
    from metarl_robot.spec.rewards import RewardFunction

    reward = RewardFunction(lambda robot, obs, action, next_obs, params, ops: (ops.exp(ops.column(next_obs, 0)), {}),
                            ("cart_pos",), ())
    robot = load_robot("cartpole")
    with np.errstate(over="ignore"):
        assert reward.one(robot, [0.0] * 4, [0.0], [1000.0, 0, 0, 0], {}) == np.inf
    assert reward.one(robot, [0.0] * 4, [0.0], [1.0, 0, 0, 0], {}) == pytest.approx(np.e)
