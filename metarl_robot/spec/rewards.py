"""Rewards as pure numpy functions of ``(obs, action, next_obs, reward params)``.

The simulator and the robot-side planner compute rewards with the *same* function, so a reward
may read only measured observation fields (never privileged ones) and the action. Every function
is batched: arrays carry any leading batch shape ``(..., dim)`` and parameter values may be
scalars or arrays broadcastable to that batch shape. Each returns the total and its components.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from metarl_robot.spec.robot import RobotSpec
from metarl_robot.spec.schema import SpecError

Params = Mapping[str, float | np.ndarray]
RewardOut = tuple[np.ndarray, dict[str, np.ndarray]]


@dataclass(frozen=True)
class RewardFunction:
    """A reward with the observation fields and reward parameters it needs (checked at env creation)."""

    fn: Callable[[RobotSpec, np.ndarray, np.ndarray, np.ndarray, Params], RewardOut]
    """``fn(robot, obs, action, next_obs, params) -> (total, components)``."""
    obs_fields: tuple[str, ...]
    """Measured observation fields the function reads."""
    params: tuple[str, ...]
    """Reward parameters of the family it reads."""
    max_per_step: float | None = None
    """Upper bound of the per-step reward if one exists (for normalised returns)."""
    success: tuple[str, float] | None = None
    """``(component, threshold)``: an episode succeeds if that reward component averages at least the
    threshold over its last fifth (e.g. the pole stayed upright at the end)."""

    def __call__(self, robot: RobotSpec, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray,
                 params: Params) -> RewardOut:
        return self.fn(robot, obs, action, next_obs, params)


def _field(robot: RobotSpec, obs: np.ndarray, name: str) -> np.ndarray:
    return obs[..., robot.obs_slices[name]]


def _gauss(x: np.ndarray, width: float) -> np.ndarray:
    return np.exp(-0.5 * np.square(x / width))


def _cartpole_swingup(robot: RobotSpec, obs, action, next_obs, params) -> RewardOut:
    # dm_control-style smooth reward in [0, 1]: a product of bounded factors, so no term can be
    # traded against another and an upright, centred, calm pole scores 1 per step.
    x = _field(robot, next_obs, "cart_pos")[..., 0]
    theta = _field(robot, next_obs, "pole_angle")[..., 0]
    theta_dot = _field(robot, next_obs, "pole_angvel")[..., 0]
    u = action[..., 0] / robot.action_high[0]
    upright = (1.0 + np.cos(theta)) / 2.0
    centered = (1.0 + _gauss(x - np.asarray(params["target_x"]), 0.5)) / 2.0  # in [0.5, 1]
    small_control = (4.0 + (1.0 - np.square(u))) / 5.0  # in [0.8, 1] for |u| <= 1
    small_velocity = (1.0 + _gauss(theta_dot, 5.0)) / 2.0  # in [0.5, 1]
    total = upright * centered * small_control * small_velocity
    return total, {"upright": upright, "centered": centered, "small_control": small_control,
                   "small_velocity": small_velocity}


CHEETAH_CTRL_COST = 0.05
"""Weight of sum(a^2) in the HalfCheetah velocity reward (PEARL's 0.5 * 1e-1)."""


def _half_cheetah_velocity(robot: RobotSpec, obs, action, next_obs, params) -> RewardOut:
    # PEARL/VariBAD HalfCheetahVel: -|v - v*| - 0.05 |a|^2. They take v from the x displacement over
    # the control step; we read the measured forward velocity at the end of the step (a robot has
    # no x position), which differs slightly: compare with published numbers with that in mind.
    velocity = _field(robot, next_obs, "root_vel")[..., 0]
    velocity_error = np.abs(velocity - np.asarray(params["target_velocity"]))
    ctrl_cost = CHEETAH_CTRL_COST * np.sum(np.square(action), axis=-1)
    return -velocity_error - ctrl_cost, {"velocity": velocity, "velocity_error": velocity_error,
                                         "ctrl_cost": ctrl_cost}


ANT_CTRL_COST = 0.5
"""Weight of sum(a^2) in the Ant rewards (Gymnasium Ant's ``ctrl_cost_weight``)."""
ANT_HEALTHY_Z = (0.2, 1.0)
"""Torso height band (m) that earns the survive bonus (Gymnasium Ant's ``healthy_z_range``)."""


def _ant_common(robot: RobotSpec, action, next_obs) -> tuple[np.ndarray, np.ndarray]:
    z = _field(robot, next_obs, "torso_height")[..., 0]
    healthy = ((z >= ANT_HEALTHY_Z[0]) & (z <= ANT_HEALTHY_Z[1])).astype(np.float64)
    ctrl_cost = ANT_CTRL_COST * np.sum(np.square(action), axis=-1)
    return healthy, ctrl_cost


def _ant_direction(robot: RobotSpec, obs, action, next_obs, params) -> RewardOut:
    # Velocity along a commanded heading (PEARL AntDir generalised from ±x to any angle), minus a
    # control cost, plus a survive bonus while the torso is in the healthy height band.
    angle = np.asarray(params["direction"])
    velocity = _field(robot, next_obs, "torso_linvel")[..., :2]
    progress = velocity[..., 0] * np.cos(angle) + velocity[..., 1] * np.sin(angle)
    healthy, ctrl_cost = _ant_common(robot, action, next_obs)
    return progress - ctrl_cost + healthy, {"progress": progress, "ctrl_cost": ctrl_cost, "healthy": healthy}


def _ant_goal(robot: RobotSpec, obs, action, next_obs, params) -> RewardOut:
    # PEARL AntGoal: negative L1 distance of the torso to a goal in the plane, minus a control
    # cost, plus a survive bonus.
    xy = _field(robot, next_obs, "torso_xy")
    distance = np.abs(xy[..., 0] - np.asarray(params["goal_x"])) + np.abs(xy[..., 1] - np.asarray(params["goal_y"]))
    healthy, ctrl_cost = _ant_common(robot, action, next_obs)
    return -distance - ctrl_cost + healthy, {"goal_distance": distance, "ctrl_cost": ctrl_cost, "healthy": healthy}


REWARDS: dict[str, RewardFunction] = {
    "cartpole_swingup": RewardFunction(
        _cartpole_swingup, ("cart_pos", "pole_angle", "pole_angvel"), ("target_x",), max_per_step=1.0,
        success=("upright", 0.975),  # cos(angle) >= 0.95 on average over the last 2 s: swung up and balanced
    ),
    "half_cheetah_velocity": RewardFunction(_half_cheetah_velocity, ("root_vel",), ("target_velocity",)),
    "ant_direction": RewardFunction(_ant_direction, ("torso_linvel", "torso_height"), ("direction",)),
    "ant_goal": RewardFunction(_ant_goal, ("torso_xy", "torso_height"), ("goal_x", "goal_y")),
}
"""Reward functions by the name a task family's ``reward:`` key uses."""


def get_reward(name: str) -> RewardFunction:
    try:
        return REWARDS[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; known rewards: {sorted(REWARDS)}") from None


def check_reward_inputs(reward_name: str, robot: RobotSpec, reward_params: list[str], where: str) -> None:
    """Refuse a family whose robot lacks a measured field, or which lacks a parameter, that its reward reads."""
    if reward_name not in REWARDS:
        raise SpecError(where, "reward", f"unknown reward {reward_name!r}; known rewards: {sorted(REWARDS)}")
    reward = REWARDS[reward_name]
    for name in reward.obs_fields:
        if name not in robot.obs_slices:
            raise SpecError(where, "reward", f"{reward_name} reads measured observation field {name!r}, "
                            f"which robot {robot.name!r} lacks (measured fields: {list(robot.obs_slices)})")
    for name in reward.params:
        if name not in reward_params:
            raise SpecError(where, "reward", f"{reward_name} reads reward parameter {name!r}, which the family "
                            f"lacks (reward parameters: {reward_params})")
