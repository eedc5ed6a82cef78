"""The adaptation memory: the last K transitions of each robot/env since its last reset. numpy only."""

from __future__ import annotations

import numpy as np


class ContextWindow:
    """Ring buffer of ``(obs, action, next_obs)`` per env, read out right-aligned and oldest first.

    The layout matches training (:meth:`EpisodeBuffer.sample`): the filled slots are the last
    ``size`` of K, marked by the mask; the encoder pools over them, so order does not change ``z``.
    """

    def __init__(self, batch: int, window: int, obs_dim: int, act_dim: int) -> None:
        self.batch, self.window = batch, window
        self.obs = np.zeros((batch, window, obs_dim), dtype=np.float32)
        self.act = np.zeros((batch, window, act_dim), dtype=np.float32)
        self.next_obs = np.zeros((batch, window, obs_dim), dtype=np.float32)
        self.size = np.zeros(batch, dtype=np.int64)

    def reset(self, which: np.ndarray | None = None) -> None:
        which = np.ones(self.batch, dtype=bool) if which is None else np.asarray(which, dtype=bool)
        self.size[which] = 0

    def add(self, obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray) -> None:
        """Append one transition per env (shift left, newest in the last slot)."""
        for arr, new in ((self.obs, obs), (self.act, act), (self.next_obs, next_obs)):
            arr[:, :-1] = arr[:, 1:]
            arr[:, -1] = new
        self.size = np.minimum(self.size + 1, self.window)

    def mask(self) -> np.ndarray:
        """``(B, K)`` float mask: 1 for the filled (last ``size``) slots."""
        return (np.arange(self.window)[None] >= (self.window - self.size)[:, None]).astype(np.float32)
