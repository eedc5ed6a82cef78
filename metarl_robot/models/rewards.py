"""Torch twins of the rewards in :mod:`metarl_robot.spec.rewards`: differentiable in the state, the action
and the reward parameters, for gradients through a learned model (the AdMRL gap gradient) and for torch
planners (the pytorch-mppi peer in bench/planner_latency.py). Each returns the total reward only;
tests/models/test_torch_rewards.py checks every twin against its numpy original.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from metarl_robot.spec.rewards import ANT_CTRL_COST, ANT_HEALTHY_Z, CHEETAH_CTRL_COST
from metarl_robot.spec.robot import RobotSpec


def _field(robot: RobotSpec, obs: torch.Tensor, name: str) -> torch.Tensor:
    return obs[..., robot.obs_slices[name]]


def _gauss(x: torch.Tensor, width: float) -> torch.Tensor:
    return torch.exp(-0.5 * torch.square(x / width))


def _torch_cartpole_swingup(robot, obs, action, next_obs, params) -> torch.Tensor:
    x = _field(robot, next_obs, "cart_pos")[..., 0]
    theta = _field(robot, next_obs, "pole_angle")[..., 0]
    theta_dot = _field(robot, next_obs, "pole_angvel")[..., 0]
    u = action[..., 0] / float(robot.action_high[0])
    upright = (1.0 + torch.cos(theta)) / 2.0
    centered = (1.0 + _gauss(x - params["target_x"], 0.5)) / 2.0
    small_control = (4.0 + (1.0 - torch.square(u))) / 5.0
    small_velocity = (1.0 + _gauss(theta_dot, 5.0)) / 2.0
    return upright * centered * small_control * small_velocity


def _torch_half_cheetah_velocity(robot, obs, action, next_obs, params) -> torch.Tensor:
    velocity = _field(robot, next_obs, "root_vel")[..., 0]
    return -torch.abs(velocity - params["target_velocity"]) - CHEETAH_CTRL_COST * torch.square(action).sum(-1)


def _torch_ant_common(robot, action, next_obs) -> torch.Tensor:
    z = _field(robot, next_obs, "torso_height")[..., 0]
    healthy = ((z >= ANT_HEALTHY_Z[0]) & (z <= ANT_HEALTHY_Z[1])).to(next_obs.dtype)
    return healthy - ANT_CTRL_COST * torch.square(action).sum(-1)


def _torch_ant_direction(robot, obs, action, next_obs, params) -> torch.Tensor:
    velocity = _field(robot, next_obs, "torso_linvel")[..., :2]
    angle = params["direction"]
    progress = velocity[..., 0] * torch.cos(angle) + velocity[..., 1] * torch.sin(angle)
    return progress + _torch_ant_common(robot, action, next_obs)


def _torch_ant_goal(robot, obs, action, next_obs, params) -> torch.Tensor:
    xy = _field(robot, next_obs, "torso_xy")
    distance = torch.abs(xy[..., 0] - params["goal_x"]) + torch.abs(xy[..., 1] - params["goal_y"])
    return -distance + _torch_ant_common(robot, action, next_obs)


TorchReward = Callable[[RobotSpec, torch.Tensor, torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor]],
                       torch.Tensor]
TORCH_REWARDS: dict[str, TorchReward] = {
    "cartpole_swingup": _torch_cartpole_swingup,
    "half_cheetah_velocity": _torch_half_cheetah_velocity,
    "ant_direction": _torch_ant_direction,
    "ant_goal": _torch_ant_goal,
}
"""Torch twins of :data:`metarl_robot.spec.rewards.REWARDS` (the total only), for gradients through the model.
tests/train/test_reward_adversary.py checks each against the numpy reward."""



def get_torch_reward(name: str) -> TorchReward:
    try:
        return TORCH_REWARDS[name]
    except KeyError:
        raise KeyError(f"reward {name!r} has no torch twin; rewards with one: {sorted(TORCH_REWARDS)}") from None
