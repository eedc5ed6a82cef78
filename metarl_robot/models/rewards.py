"""Torch twins of the rewards in :mod:`metarl_robot.spec.rewards`: differentiable in the state, the action
and the reward parameters, for gradients through a learned model (the AdMRL gap gradient) and for torch
planners (the pytorch-mppi peer in bench/planner_latency.py). Each is the numpy reward's own formula run on
torch tensors (:data:`TORCH_OPS`) and returns the total reward only; tests/models/test_torch_rewards.py checks
every twin against its numpy original.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from metarl_robot.spec.rewards import REWARDS, ArrayOps, RewardFunction
from metarl_robot.spec.robot import RobotSpec

TORCH_OPS = ArrayOps(
    column=lambda x, i: x[..., i], param=lambda x: x, cos=torch.cos, sin=torch.sin, exp=torch.exp, abs=torch.abs,
    square=torch.square, sum_squares=lambda x: torch.square(x).sum(-1),
    in_band=lambda x, low, high: ((x >= low) & (x <= high)).to(x.dtype))
"""Batched torch tensors; reward parameters are passed as tensors (so gradients reach them)."""

TorchReward = Callable[[RobotSpec, torch.Tensor, torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor]],
                       torch.Tensor]


def _twin(reward: RewardFunction) -> TorchReward:
    def total(robot, obs, action, next_obs, params) -> torch.Tensor:
        return reward.fn(robot, obs, action, next_obs, params, TORCH_OPS)[0]
    return total


TORCH_REWARDS: dict[str, TorchReward] = {name: _twin(reward) for name, reward in REWARDS.items()}
"""Torch twins of :data:`metarl_robot.spec.rewards.REWARDS` (the total only), for gradients through the model."""


def get_torch_reward(name: str) -> TorchReward:
    try:
        return TORCH_REWARDS[name]
    except KeyError:
        raise KeyError(f"reward {name!r} has no torch twin; rewards with one: {sorted(TORCH_REWARDS)}") from None
