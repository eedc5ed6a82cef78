"""Episodes grouped by task, sampled as (target transition, context window) pairs. numpy only.

The context of a target at step ``t`` is the last ``c`` transitions before ``t`` *in the same
episode*, with ``c`` drawn uniformly from 0..min(t, K): at deployment the adapter's memory starts
empty at every reset and fills up to K, so training sees every size it will meet, which is what
makes adaptation consistent (more context never hurts on average).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metarl_robot.envs.rollout import Rollout


@dataclass
class ContextBatch:
    """Targets ``(n, ·)`` and their context windows ``(n, K, ·)`` with a ``(n, K)`` 0/1 mask."""

    obs: np.ndarray
    act: np.ndarray
    next_obs: np.ndarray
    ctx_obs: np.ndarray
    ctx_act: np.ndarray
    ctx_next_obs: np.ndarray
    ctx_mask: np.ndarray


class EpisodeBuffer:
    """All collected episodes; every tenth is held out for validation (prediction error)."""

    def __init__(self, obs_dim: int, act_dim: int, holdout_every: int = 10) -> None:
        self.obs_dim, self.act_dim, self.holdout_every = obs_dim, act_dim, holdout_every
        self.obs = np.zeros((0, 0, obs_dim))
        self.act = np.zeros((0, 0, act_dim))
        self.next_obs = np.zeros((0, 0, obs_dim))
        self.valid = np.zeros((0, 0), dtype=bool)
        self.tasks = np.zeros((0, 0))

    def __len__(self) -> int:
        return len(self.obs)

    @property
    def transitions(self) -> int:
        return int(self.valid.sum())

    def add(self, rollout: Rollout, task_vectors: np.ndarray) -> None:
        """Split a rollout into its episodes (``task_vectors``: ``(E, task_dim)``, one per sub-env)."""
        starts = [*np.flatnonzero(rollout.episode_start), rollout.obs.shape[1]]
        for s, e in itertools.pairwise(starts):
            self._append(rollout.obs[:, s:e], rollout.actions[:, s:e], rollout.next_obs[:, s:e],
                         rollout.valid[:, s:e], task_vectors)

    def _append(self, obs, act, next_obs, valid, tasks) -> None:
        if len(self) and obs.shape[1] != self.obs.shape[1]:
            raise ValueError(f"episode length {obs.shape[1]} differs from the buffer's {self.obs.shape[1]}")
        join = (lambda old, new: new) if not len(self) else (lambda old, new: np.concatenate([old, new]))
        self.obs, self.act = join(self.obs, obs), join(self.act, act)
        self.next_obs, self.valid = join(self.next_obs, next_obs), join(self.valid, valid)
        self.tasks = join(self.tasks, np.asarray(tasks, dtype=np.float64))

    def split(self, holdout: bool) -> np.ndarray:
        """Episode indices of the training (``holdout=False``) or validation part."""
        idx = np.arange(len(self))
        held = (idx % self.holdout_every) == self.holdout_every - 1
        return idx[held] if holdout else idx[~held]

    def sample(self, rng: np.random.Generator, n: int, window: int, holdout: bool = False,
               context_size: int | None = None) -> ContextBatch:
        """``n`` valid targets with context windows of random size (or exactly ``context_size`` if possible)."""
        episodes = self.split(holdout)
        if not len(episodes):
            raise ValueError("no episodes in this part of the buffer yet")
        valid = self.valid[episodes]
        flat = np.flatnonzero(valid)
        pick = flat[rng.integers(0, len(flat), n)]
        ep, t = episodes[pick // valid.shape[1]], pick % valid.shape[1]
        available = np.minimum(t, window)
        size = rng.integers(0, available + 1) if context_size is None else np.minimum(available, context_size)
        offsets = np.arange(window) - window  # -K .. -1: the K steps before t, oldest first
        idx = t[:, None] + offsets[None]
        mask = offsets[None] >= -size[:, None]
        idx = np.where(mask, idx, 0)
        return ContextBatch(
            obs=self.obs[ep, t], act=self.act[ep, t], next_obs=self.next_obs[ep, t],
            ctx_obs=self.obs[ep[:, None], idx], ctx_act=self.act[ep[:, None], idx],
            ctx_next_obs=self.next_obs[ep[:, None], idx], ctx_mask=mask.astype(np.float32),
        )

    def training_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All valid training transitions flattened (for fitting normalisers)."""
        eps = self.split(False)
        mask = self.valid[eps]
        return self.obs[eps][mask], self.act[eps][mask], self.next_obs[eps][mask]

    def save(self, path: Path) -> None:
        np.savez_compressed(path, obs=self.obs, act=self.act, next_obs=self.next_obs, valid=self.valid,
                            tasks=self.tasks, holdout_every=self.holdout_every)

    @classmethod
    def load(cls, path: Path) -> EpisodeBuffer:
        data = np.load(path)
        buf = cls(data["obs"].shape[-1], data["act"].shape[-1], int(data["holdout_every"]))
        buf.obs, buf.act, buf.next_obs = data["obs"], data["act"], data["next_obs"]
        buf.valid, buf.tasks = data["valid"], data["tasks"]
        return buf
