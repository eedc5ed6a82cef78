"""Rewards as pure numpy functions of ``(obs, action, next_obs, reward params)``.

The simulator and the robot-side planner compute rewards with the *same* function, so a reward
may read only measured observation fields (never privileged ones) and the action. Every function
is batched: arrays carry any leading batch shape ``(..., dim)`` and parameter values may be
scalars or arrays broadcastable to that batch shape. Each returns the total and its components.

Each formula is written once against :class:`ArrayOps` (``cos``, ``exp``, a column, ...): numpy for batches,
Python floats for one transition (:meth:`RewardFunction.one`) and torch for gradients
(:mod:`metarl_robot.models.rewards`) run the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from metarl_robot.spec.robot import RobotSpec
from metarl_robot.spec.schema import SpecError

Params = Mapping[str, float | np.ndarray]
RewardOut = tuple[np.ndarray, dict[str, np.ndarray]]


@dataclass(frozen=True)
class ArrayOps:
    """The few array functions a reward calls, for one kind of number: each reward is written once against these,
    so the numpy reward (env, planner), its float twin (one robot transition, where numpy's per-call cost is most
    of the work) and its torch twin (:mod:`metarl_robot.models.rewards`) are one formula. Arithmetic operators are
    used directly (every kind has them)."""

    column: Callable[[Any, int], Any]
    """``x[..., i]``: component ``i`` of the last axis."""
    param: Callable[[Any], Any]
    """A reward parameter as this kind's number (numpy: ``np.asarray``)."""
    cos: Callable[[Any], Any]
    sin: Callable[[Any], Any]
    exp: Callable[[Any], Any]
    abs: Callable[[Any], Any]
    square: Callable[[Any], Any]
    sum_squares: Callable[[Any], Any]
    """Sum of squares over the last axis."""
    in_band: Callable[[Any, float, float], Any]
    """1.0 where ``low <= x <= high``, else 0.0, as floats."""


NUMPY_OPS = ArrayOps(
    column=lambda x, i: x[..., i], param=np.asarray, cos=np.cos, sin=np.sin, exp=np.exp, abs=np.abs,
    square=np.square, sum_squares=lambda x: np.sum(np.square(x), axis=-1),
    in_band=lambda x, low, high: ((x >= low) & (x <= high)).astype(np.float64))
"""Batched numpy arrays ``(..., dim)``."""

FLOAT_OPS = ArrayOps(
    column=lambda x, i: x[i], param=float, cos=math.cos, sin=math.sin, exp=math.exp, abs=abs,
    square=lambda x: x * x, sum_squares=lambda x: sum(v * v for v in x),
    in_band=lambda x, low, high: float(low <= x <= high))
"""One transition as Python floats (sequences of floats for obs and action): what :meth:`RewardFunction.one` uses."""


@dataclass(frozen=True)
class RewardFunction:
    """A reward with the observation fields and reward parameters it needs (checked at env creation)."""

    fn: Callable[..., RewardOut]
    """``fn(robot, obs, action, next_obs, params, ops=NUMPY_OPS) -> (total, components)``, written against
    :class:`ArrayOps` so one formula serves numpy, floats and torch."""
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
        return self.fn(robot, obs, action, next_obs, params, NUMPY_OPS)

    def one(self, robot: RobotSpec, obs: Sequence[float], action: Sequence[float], next_obs: Sequence[float],
            params: Mapping[str, float]) -> float:
        """The total for one transition given as Python floats (``obs.tolist()``), computed with :mod:`math`: the
        same formula as :meth:`__call__` (equal to within float64 rounding of ``cos``/``exp``), at a fraction of
        numpy's per-call cost on a batch of one (the robot-side PEARL step computes one per control period). Where
        :mod:`math` refuses a value numpy would carry (``exp`` past float64's range), numpy computes it: ``inf`` or
        ``nan`` as :meth:`__call__` gives, for the caller's finiteness check to refuse."""
        try:
            return self.fn(robot, obs, action, next_obs, params, FLOAT_OPS)[0]
        except (OverflowError, ValueError):
            return float(self.fn(robot, np.asarray(obs), np.asarray(action), np.asarray(next_obs),
                                 {k: np.asarray(v) for k, v in params.items()}, NUMPY_OPS)[0])


def _column(robot: RobotSpec, ops: ArrayOps, obs, name: str, k: int = 0):
    """Component ``k`` of measured field ``name``."""
    return ops.column(obs, robot.obs_slices[name].start + k)


def _gauss(ops: ArrayOps, x, width: float):
    return ops.exp(-0.5 * ops.square(x / width))


def _cartpole_swingup(robot: RobotSpec, obs, action, next_obs, params, ops: ArrayOps = NUMPY_OPS) -> RewardOut:
    # dm_control-style smooth reward in [0, 1]: a product of bounded factors, so no term can be
    # traded against another and an upright, centred, calm pole scores 1 per step.
    x = _column(robot, ops, next_obs, "cart_pos")
    theta = _column(robot, ops, next_obs, "pole_angle")
    theta_dot = _column(robot, ops, next_obs, "pole_angvel")
    u = ops.column(action, 0) / float(robot.action_high[0])
    upright = (1.0 + ops.cos(theta)) / 2.0
    centered = (1.0 + _gauss(ops, x - ops.param(params["target_x"]), 0.5)) / 2.0  # in [0.5, 1]
    small_control = (4.0 + (1.0 - ops.square(u))) / 5.0  # in [0.8, 1] for |u| <= 1
    small_velocity = (1.0 + _gauss(ops, theta_dot, 5.0)) / 2.0  # in [0.5, 1]
    total = upright * centered * small_control * small_velocity
    return total, {"upright": upright, "centered": centered, "small_control": small_control,
                   "small_velocity": small_velocity}


CHEETAH_CTRL_COST = 0.05
"""Weight of sum(a^2) in the HalfCheetah velocity reward (PEARL's 0.5 * 1e-1)."""


def _half_cheetah_velocity(robot: RobotSpec, obs, action, next_obs, params, ops: ArrayOps = NUMPY_OPS) -> RewardOut:
    # PEARL/VariBAD HalfCheetahVel: -|v - v*| - 0.05 |a|^2. They take v from the x displacement over
    # the control step; we read the measured forward velocity at the end of the step (a robot has
    # no x position), which differs slightly: compare with published numbers with that in mind.
    velocity = _column(robot, ops, next_obs, "root_vel")
    velocity_error = ops.abs(velocity - ops.param(params["target_velocity"]))
    ctrl_cost = CHEETAH_CTRL_COST * ops.sum_squares(action)
    return -velocity_error - ctrl_cost, {"velocity": velocity, "velocity_error": velocity_error,
                                         "ctrl_cost": ctrl_cost}


ANT_CTRL_COST = 0.5
"""Weight of sum(a^2) in the Ant rewards (Gymnasium Ant's ``ctrl_cost_weight``)."""
ANT_HEALTHY_Z = (0.2, 1.0)
"""Torso height band (m) that earns the survive bonus (Gymnasium Ant's ``healthy_z_range``)."""


def _ant_common(robot: RobotSpec, ops: ArrayOps, action, next_obs):
    healthy = ops.in_band(_column(robot, ops, next_obs, "torso_height"), *ANT_HEALTHY_Z)
    ctrl_cost = ANT_CTRL_COST * ops.sum_squares(action)
    return healthy, ctrl_cost


def _ant_direction(robot: RobotSpec, obs, action, next_obs, params, ops: ArrayOps = NUMPY_OPS) -> RewardOut:
    # Velocity along a commanded heading (PEARL AntDir generalised from ±x to any angle), minus a
    # control cost, plus a survive bonus while the torso is in the healthy height band.
    angle = ops.param(params["direction"])
    progress = (_column(robot, ops, next_obs, "torso_linvel", 0) * ops.cos(angle)
                + _column(robot, ops, next_obs, "torso_linvel", 1) * ops.sin(angle))
    healthy, ctrl_cost = _ant_common(robot, ops, action, next_obs)
    return progress - ctrl_cost + healthy, {"progress": progress, "ctrl_cost": ctrl_cost, "healthy": healthy}


def _ant_goal(robot: RobotSpec, obs, action, next_obs, params, ops: ArrayOps = NUMPY_OPS) -> RewardOut:
    # PEARL AntGoal: negative L1 distance of the torso to a goal in the plane, minus a control
    # cost, plus a survive bonus.
    distance = (ops.abs(_column(robot, ops, next_obs, "torso_xy", 0) - ops.param(params["goal_x"]))
                + ops.abs(_column(robot, ops, next_obs, "torso_xy", 1) - ops.param(params["goal_y"])))
    healthy, ctrl_cost = _ant_common(robot, ops, action, next_obs)
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
