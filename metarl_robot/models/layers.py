"""Small torch building blocks that export cleanly to ONNX (MatMul/Add/Mul only, no custom ops)."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


class Normalizer(nn.Module):
    """Fixed affine standardisation ``(x - mean) / std`` stored as buffers (so export bakes it in)."""

    def __init__(self, dim: int, min_std: float = 1e-6) -> None:
        super().__init__()
        self.min_std = min_std
        """Floor on the std so constant features do not blow up."""
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, data: np.ndarray | torch.Tensor) -> None:
        data = torch.as_tensor(data, dtype=torch.float32).reshape(-1, self.mean.numel())
        self.mean.copy_(data.mean(0))
        self.std.copy_(data.std(0).clamp_min(self.min_std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean


class EnsembleLinear(nn.Module):
    """``E`` independent linear layers applied to ``(E, N, in)`` → ``(E, N, out)`` in one batched matmul."""

    def __init__(self, members: int, fan_in: int, fan_out: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(fan_in)  # torch.nn.Linear's default init, per member
        self.weight = nn.Parameter(torch.empty(members, fan_in, fan_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(members, 1, fan_out).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


def mlp(fan_in: int, hidden: int, layers: int, fan_out: int) -> nn.Sequential:
    """``layers`` hidden layers of width ``hidden`` with SiLU, then a linear head."""
    mods: list[nn.Module] = []
    width = fan_in
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.SiLU()]
        width = hidden
    mods.append(nn.Linear(width, fan_out))
    return nn.Sequential(*mods)


def angle_features(obs: torch.Tensor, keep: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Replace periodic components by their sine and cosine: ``(..., o)`` → ``(..., o + len(angles))``.

    ``keep`` and ``angles`` are constant index tensors over the last axis (a Gather in ONNX, unlike a
    boolean mask): the non-periodic components keep their order, then come the sines and cosines.
    """
    if angles.numel() == 0:
        return obs
    a = obs.index_select(-1, angles)
    return torch.cat([obs.index_select(-1, keep), torch.sin(a), torch.cos(a)], dim=-1)
