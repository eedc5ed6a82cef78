"""PEARL at collection and evaluation time: the belief over z and the controller that updates it online."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch

from metarl_robot.spec.rewards import RewardFunction
from metarl_robot.spec.robot import RobotSpec


@dataclass
class Posterior:
    """Gaussian belief over z per row: mean and variance ``(B, d)``."""

    mean: np.ndarray
    var: np.ndarray


class LatentPolicy(Protocol):
    """What the controller and an exploration round ask of the trained agent: :class:`~metarl_robot.algos.pearl.PEARL`
    (a protocol rather than the class, since the algorithm collects through this module)."""

    robot: RobotSpec

    def prior(self, batch: int) -> Posterior: ...

    def sample_z(self, posterior: Posterior, rng: np.random.Generator) -> np.ndarray: ...

    def transition_factors(self, obs: np.ndarray, act: np.ndarray, reward: np.ndarray, next_obs: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray]: ...

    def act(self, obs: np.ndarray, z: np.ndarray, deterministic: bool, generator: torch.Generator | None = None
            ) -> np.ndarray: ...



RewardFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""``(obs, sent_action, next_obs)`` batches → ``(B,)`` rewards: what the context's reward column holds."""


def family_reward_fn(reward: RewardFunction, robot: RobotSpec, params: Mapping[str, np.ndarray]) -> RewardFn:
    """The env's own reward with each sub-env's reward parameters (``params[name]``: ``(B,)``), so the
    controller's context holds exactly the rewards the env returns."""
    params = {k: np.asarray(v) for k, v in params.items()}

    def fn(obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray) -> np.ndarray:
        return np.asarray(reward(robot, obs, action, next_obs, params)[0], dtype=np.float64)
    return fn


class PEARLController:
    """A :class:`~metarl_robot.envs.rollout.Controller` for ``batch`` sub-envs, one task each.

    - ``reset()`` (every episode start): the context is cleared unless ``keep_context`` (then only
      :meth:`new_task` clears it, and successive episodes on one task accumulate evidence, PEARL's
      meta-test protocol). With ``z_mode="sample"``, z is then drawn once from the posterior of the
      context so far (the prior if it is empty) and held for the whole episode: posterior sampling.
    - ``observe()`` adds each transition's factor to the belief (one encoder pass per step).
    - ``act()``: ``z_mode="mean"`` uses the posterior mean of everything observed so far, updated every
      step (online adaptation, what a robot-side adapter does); actions are ``box(tanh(mean))`` if
      ``deterministic``, else sampled from the policy.

    ``z_mode`` defaults to ``"mean"`` when ``deterministic`` and ``"sample"`` otherwise. Rewards come
    from ``reward_fn`` (the env's reward with the task's parameters: :func:`family_reward_fn`) unless
    ``observe`` is given them; :meth:`absorb` adds earlier transitions in one pass. A transition with a
    non-finite number adds no evidence (counted in ``skipped``).
    """

    def __init__(self, algo: LatentPolicy, batch: int, deterministic: bool = False, reward_fn: RewardFn | None = None,
                 keep_context: bool = False, z_mode: Literal["sample", "mean"] | None = None,
                 context_window: int | None = None, seed: int = 0) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        z_mode = z_mode if z_mode is not None else ("mean" if deterministic else "sample")
        if z_mode not in ("sample", "mean"):
            raise ValueError(f"z_mode must be 'sample' or 'mean', got {z_mode!r}")
        if context_window is not None and context_window < 1:
            raise ValueError(f"context_window must be None or >= 1, got {context_window}")
        self.algo, self.batch, self.deterministic = algo, batch, deterministic
        self.reward_fn, self.keep_context, self.z_mode = reward_fn, keep_context, z_mode
        self.context_window = context_window
        """Only the last this-many transitions count (None: all since the context was cleared)."""
        self.rng = np.random.default_rng(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.skipped = np.zeros(batch, dtype=np.int64)
        """Per sub-env: transitions left out of the belief for non-finite numbers."""
        self._observed = 0
        # The belief's evidence: running sums when every transition counts (constant cost per step, as on the
        # robot), else the last ``context_window`` factors.
        self._precision_sum = np.zeros(1)
        self._weighted_mean_sum = np.zeros(1)
        self._precisions: deque[np.ndarray] = deque(maxlen=context_window)
        self._weighted_means: deque[np.ndarray] = deque(maxlen=context_window)
        self.z = self.algo.sample_z(self.algo.prior(batch), self.rng) if z_mode == "sample" else None
        """The episode's sampled z (``z_mode="sample"``), ``(batch, d)``."""

    @property
    def context_size(self) -> int:
        """Transitions the belief currently rests on (per sub-env, counting skipped ones)."""
        return self._observed if self.context_window is None else min(self._observed, self.context_window)

    def posterior(self) -> Posterior:
        """The current belief: prior times the factors of the (last ``context_window``) observed transitions."""
        if not self._observed:
            return self.algo.prior(self.batch)
        if self.context_window is None:
            precision_sum, weighted_mean_sum = self._precision_sum, self._weighted_mean_sum
        else:
            precision_sum, weighted_mean_sum = np.sum(self._precisions, axis=0), np.sum(self._weighted_means, axis=0)
        var = 1.0 / (1.0 + precision_sum)
        return Posterior((var * weighted_mean_sum).astype(np.float32), var.astype(np.float32))

    def new_task(self) -> None:
        """Forget all evidence (a new task); the next episode starts from the prior."""
        self._observed = 0
        self._precision_sum = self._weighted_mean_sum = np.zeros(1)
        self._precisions.clear()
        self._weighted_means.clear()

    def reset(self) -> None:
        if not self.keep_context:
            self.new_task()
        if self.z_mode == "sample":
            self.z = self.algo.sample_z(self.posterior(), self.rng)

    def current_z(self) -> np.ndarray:
        """The z the next action is conditioned on, ``(batch, d)``."""
        return self.z if self.z_mode == "sample" else self.posterior().mean

    def act(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs)
        if obs.shape[0] != self.batch:
            raise ValueError(f"expected observations for {self.batch} sub-envs, got shape {obs.shape}")
        return self.algo.act(obs, self.current_z(), self.deterministic, self.generator)

    def observe(self, obs: np.ndarray, sent_action: np.ndarray, next_obs: np.ndarray,
                reward: np.ndarray | None = None) -> None:
        """Add each sub-env's transition ``(batch, ·)`` to its belief."""
        if reward is None:
            if self.reward_fn is None:
                raise ValueError("PEARLController needs rewards: give reward_fn (family_reward_fn) or observe(reward=)")
            reward = self.reward_fn(obs, sent_action, next_obs)
        self.absorb(*(np.asarray(x)[:, None] for x in (obs, sent_action, np.reshape(reward, (self.batch,)), next_obs)))

    def absorb(self, obs: np.ndarray, act: np.ndarray, reward: np.ndarray, next_obs: np.ndarray,
               valid: np.ndarray | None = None) -> None:
        """Add ``T`` transitions per sub-env at once (``(batch, T, ·)``, rewards and ``valid`` ``(batch, T)``),
        in time order, e.g. a round's earlier episodes; steps where ``valid`` is False add nothing."""
        reward = np.asarray(reward, dtype=np.float64)
        finite = (np.isfinite(obs).all(-1) & np.isfinite(act).all(-1) & np.isfinite(next_obs).all(-1)
                  & np.isfinite(reward))
        wanted = np.ones_like(finite) if valid is None else np.asarray(valid, dtype=bool)
        use = finite & wanted
        clean = lambda x: np.where(use.reshape(*use.shape, *([1] * (np.ndim(x) - 2))), x, 0.0)  # noqa: E731
        mean, var = self.algo.transition_factors(clean(obs), clean(act), clean(reward), clean(next_obs))
        precision = np.where(use[..., None], 1.0 / var, 0.0)
        for t in range(precision.shape[1]):
            weighted = precision[:, t] * mean[:, t]
            if self.context_window is None:
                self._precision_sum = self._precision_sum + precision[:, t]
                self._weighted_mean_sum = self._weighted_mean_sum + weighted
            else:
                self._precisions.append(precision[:, t])
                self._weighted_means.append(weighted)
        self._observed += precision.shape[1]
        self.skipped += (wanted & ~finite).sum(axis=1)
