"""The model-based collection controller: the planning adapter with each env's own reward parameters."""

from __future__ import annotations

import numpy as np

from metarl_robot.runtime.adapter import ModelBasedAdapter


class MPCController:
    """Collection controller: the model-based adapter planning with each env's own reward parameters."""

    def __init__(self, adapter: ModelBasedAdapter, reward_params: dict[str, np.ndarray]) -> None:
        self.adapter, self.params = adapter, reward_params
        self.errors: list[np.ndarray] = []
        """Per step: each env's prediction error of the previous step (online adaptation, in scale units)."""
        self.last_diagnostics: dict[str, np.ndarray] = {}
        """The adapter's diagnostics of the latest step (its context, prediction, ...)."""

    def reset(self) -> None:
        self.adapter.reset()

    def act(self, obs: np.ndarray) -> np.ndarray:
        action, self.last_diagnostics = self.adapter.act(obs, self.params)
        self.errors.append(self.last_diagnostics["prediction_error"])
        return action

    def observe(self, obs: np.ndarray, sent_action: np.ndarray, next_obs: np.ndarray) -> None:
        self.adapter.observe(obs, sent_action, next_obs)
