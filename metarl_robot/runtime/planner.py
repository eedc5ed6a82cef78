"""Sampling-based MPC (MPPI and CEM) over any rollout model, batched over robots/envs. numpy only.

The same planner runs in training (over the torch model), on the robot (over ONNX graphs) and in
evaluation as the oracle (over MuJoCo itself): only the :class:`RolloutModel` differs. Action
sequences always respect the robot's box limits and rate limits from robot.yaml, starting from
the last command actually sent, so the first planned action is one the safety layer would pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from metarl_robot.spec.rewards import RewardFunction
from metarl_robot.spec.robot import RobotSpec


@dataclass
class PlannerConfig:
    """Sampling MPC settings."""

    method: Literal["mppi", "cem"] = "mppi"
    """``mppi``: exponentially weighted average of all samples; ``cem``: refit to the elite samples."""
    horizon: int = 25
    """Planned control steps."""
    samples: int = 128
    """Action sequences evaluated per iteration (the current mean is always one of them)."""
    iterations: int = 2
    """Refinements per control step (warm-started from the previous step's plan)."""
    particles: int = 1
    """Model rollouts per action sequence (each on its own ensemble member); returns are averaged."""
    noise_std: float = 0.5
    """Sampling std as a fraction of half the action range (MPPI: fixed; CEM: initial)."""
    noise_correlation: float = 0.0
    """AR(1) coefficient of the sampling noise along the horizon, in [0, 1): smooth, low-frequency
    perturbations explore swing-up-like motions far better than white noise (iCEM's coloured noise)."""
    temperature: float = 0.3
    """MPPI: weights are exp(z / temperature) with z the returns standardised per plan (scale-free)."""
    elite_fraction: float = 0.1
    """CEM: fraction of samples refitted to."""
    momentum: float = 0.1
    """CEM: weight of the old mean/std when refitting."""
    min_std: float = 0.05
    """CEM: floor of the sampling std (fraction of half range)."""
    seed: int = 0
    """Seed of the sampling noise: the planner is deterministic given it."""

    def validate(self) -> None:
        checks = [
            (self.method in ("mppi", "cem"), "method", "must be 'mppi' or 'cem'"),
            (self.horizon >= 1, "horizon", "must be >= 1"),
            (self.samples >= 2, "samples", "must be >= 2"),
            (self.iterations >= 1, "iterations", "must be >= 1"),
            (self.particles >= 1, "particles", "must be >= 1"),
            (self.noise_std > 0, "noise_std", "must be > 0"),
            (self.temperature > 0, "temperature", "must be > 0"),
            (0 < self.elite_fraction <= 1, "elite_fraction", "must be in (0, 1]"),
            (0 <= self.momentum < 1, "momentum", "must be in [0, 1)"),
            (0 <= self.noise_correlation < 1, "noise_correlation", "must be in [0, 1)"),
        ]
        for ok, name, problem in checks:
            if not ok:
                raise ValueError(f"planner.{name} = {getattr(self, name)!r}: {problem}")


class RolloutModel(Protocol):
    """Predicts where action sequences lead. ``start`` is whatever the model needs to begin from."""

    def rollout(self, start: Any, actions: np.ndarray, particles: int) -> np.ndarray:
        """``actions (B, N, H, a)`` → predicted next observations ``(B, N, P, H, o)``."""
        ...


@dataclass
class PlanResult:
    """What one planning step decided, batched over B."""

    action: np.ndarray
    """``(B, a)`` first action of the plan: the command to send."""
    plan: np.ndarray
    """``(B, H, a)`` the planned sequence."""
    expected_return: np.ndarray
    """``(B,)`` predicted return of the plan's best evaluated sample."""
    returns_std: np.ndarray
    """``(B,)`` spread of sample returns (a flat landscape means the planner saw no difference)."""


def limit_sequences(actions: np.ndarray, last: np.ndarray, low: np.ndarray, high: np.ndarray,
                    max_step: np.ndarray) -> np.ndarray:
    """Map ``(..., H, a)`` sequences into the box and to ``|a_t - a_{t-1}| <= max_step`` from ``last (..., a)``.

    Vectorised over H (no recursion): each increment ``x_t - x_{t-1}`` (``x_{-1} = last``) is clipped to
    ``±max_step``, the clipped increments are summed from ``last``, and the sums are clipped to the box. Box
    clipping moves no two values further apart, so the rate limit survives it, the first step included when
    ``last`` is in the box (the last command sent is; from outside it, the sequence still comes back into the box,
    within ``max_step`` of ``last`` clipped to it). Unlike the sequential projection (each step clipped to within
    ``max_step`` of the previous *limited* one), an increment cut short is never caught up: the rest of the
    sequence keeps its shape, shifted. Sequences already within both limits (as the safety layer and the sim env
    check them) come back unchanged bit for bit, so the planner's current mean, its sample 0, is not moved. Both
    constraints are convex, so averages of limited sequences are limited too, up to round-off. ``last`` broadcasts
    against the leading axes; the result is a new float64 array.
    """
    x = np.asarray(actions, dtype=np.float64)
    last = np.asarray(last, dtype=np.float64)[..., None, :]
    shape = np.broadcast_shapes(x.shape[:-2], last.shape[:-2]) + x.shape[-2:]
    lo, hi = np.empty(shape), np.empty(shape)  # the rate window of each step around its predecessor
    np.subtract(last, max_step, out=lo[..., :1, :])
    np.subtract(x[..., :-1, :], max_step, out=lo[..., 1:, :])
    np.add(last, max_step, out=hi[..., :1, :])
    np.add(x[..., :-1, :], max_step, out=hi[..., 1:, :])
    # Accumulate corrections (each step clipped into its window, minus the step), not clipped increments: they are
    # exact zeros wherever the step was within the window as the safety layer computes it (``prev ± max_step``), so
    # x + their sum is x itself there rather than x rebuilt by a rounding cumulative sum.
    out = np.maximum(x, lo, out=lo)
    np.minimum(out, hi, out=out)
    np.subtract(out, x, out=out)
    np.add.accumulate(out, axis=-2, out=out)  # np.cumsum's wrapper costs more than the sum at this size
    np.add(x, out, out=out)
    np.maximum(out, low, out=out)
    np.minimum(out, high, out=out)
    return out


def after(pending: list[np.ndarray], samples: np.ndarray) -> np.ndarray:
    """``(B, N, H, a)`` sequences as the motors apply them: each env's ``pending`` ``(k, a)`` commands first, then
    the first ``H - k`` planned ones."""
    out, h = samples, samples.shape[2]
    for b, commands in enumerate(pending):
        k = min(len(commands), h)
        if k:
            out = samples.copy() if out is samples else out
            out[b, :, k:] = samples[b, :, :h - k]
            out[b, :, :k] = commands[:k]
    return out


class Planner:
    """MPPI / CEM with warm start, batched over ``batch`` independent robots or envs."""

    def __init__(self, cfg: PlannerConfig, robot: RobotSpec, reward: RewardFunction, model: RolloutModel,
                 batch: int = 1) -> None:
        cfg.validate()
        self.cfg, self.robot, self.reward, self.model, self.batch = cfg, robot, reward, model, batch
        self.low, self.high = robot.action_low, robot.action_high
        self.max_step = robot.action_max_rate * robot.ctrl_dt
        self.half_range = (self.high - self.low) / 2
        self.rng = np.random.default_rng(cfg.seed)
        # AR(1) along the horizon as one matrix: x_t = beta x_{t-1} + sqrt(1 - beta^2) w_t, x_0 = w_0.
        t = np.arange(cfg.horizon)
        beta = cfg.noise_correlation
        self._ar = np.where(t[:, None] >= t[None], beta ** np.maximum(t[:, None] - t[None], 0), 0.0)
        self._ar[:, 1:] *= np.sqrt(1.0 - beta**2)
        self.mean = np.zeros((batch, cfg.horizon, robot.action_dim))
        self.std = np.zeros_like(self.mean)
        self.reset()

    def reset(self, which: np.ndarray | None = None) -> None:
        """Forget the warm start (of the envs in the bool mask ``which``, default all)."""
        which = np.ones(self.batch, dtype=bool) if which is None else np.asarray(which, dtype=bool)
        self.mean[which] = self.robot.safe_action
        self.std[which] = self.cfg.noise_std * self.half_range

    def _noise(self, b: int, h: int, a: int) -> np.ndarray:
        """Unit-variance Gaussian noise ``(B, N, H, a)``, AR(1)-correlated along H."""
        white = self.rng.standard_normal((b, self.cfg.samples, h, a))
        if self.cfg.noise_correlation == 0.0:
            return white
        # (H, H) @ (H, a) for every sample in one batched matmul: np.einsum(optimize=True) took 1.6x as long for one
        # env and a = 1, 15x for 16 envs and ~100x for a = 6 (its path search and the loop it chose).
        return np.matmul(self._ar, white)

    def returns(self, obs: np.ndarray, start: Any, actions: np.ndarray, reward_params: Mapping[str, Any]
                ) -> np.ndarray:
        """``(B, N)`` predicted return of each sequence, averaged over particles; non-finite → -inf."""
        cfg = self.cfg
        pred = self.model.rollout(start, actions, cfg.particles)  # (B, N, P, H, o)
        b = obs.shape[0]
        prev = np.concatenate([np.broadcast_to(obs[:, None, None, None, :], (*pred.shape[:3], 1, obs.shape[-1])),
                               pred[..., :-1, :]], axis=-2)
        params = {k: np.asarray(v, dtype=np.float64).reshape(b, 1, 1, 1) for k, v in reward_params.items()}
        rewards, _ = self.reward(self.robot, prev, actions[:, :, None], pred, params)
        total = rewards.sum(axis=-1).mean(axis=-1)
        return np.where(np.isfinite(total), total, -np.inf)

    def plan(self, obs: np.ndarray, start: Any, reward_params: Mapping[str, Any], last_action: np.ndarray,
             pending: list[np.ndarray] | None = None) -> PlanResult:
        """Refine the warm-started plan for every env and return the first actions.

        ``pending``: per env, ``(k, a)`` commands already sent that the motors will apply before the one planned
        now (actuator latency, :mod:`metarl_robot.runtime.latency`): each sequence is rolled out after them, over
        the same horizon."""
        cfg = self.cfg
        b, h, a = self.mean.shape
        if obs.shape[0] != b:
            raise ValueError(f"planner was built for batch {b}, got observations for {obs.shape[0]}")
        last = np.asarray(last_action, dtype=np.float64)
        # The warm start is not limited here: sample 0 of every iteration is the mean limited (noise 0), and each
        # later mean averages limited samples (CEM's momentum term takes sample 0, not the unlimited mean).
        mean, std = self.mean, self.std
        n_elite = max(1, round(cfg.elite_fraction * cfg.samples))
        best_return = np.full(b, -np.inf)
        spread = np.zeros(b)
        for _ in range(cfg.iterations):
            noise = self._noise(b, h, a)
            noise[:, 0] = 0.0  # sample 0 is the current mean: a warm start is never lost
            noise *= std[:, None]
            noise += mean[:, None]
            samples = limit_sequences(noise, last[:, None], self.low, self.high, self.max_step)
            returns = self.returns(obs, start, samples if pending is None else after(pending, samples),
                                   reward_params)
            finite = np.isfinite(returns)
            best_return = np.maximum(best_return, returns.max(axis=1))
            # Mean and spread of each env's finite returns (0 where none is), for all envs at once.
            count = np.maximum(finite.sum(axis=1), 1)
            mu = np.where(finite, returns, 0.0).sum(axis=1) / count
            spread = np.sqrt(np.square(np.where(finite, returns - mu[:, None], 0.0)).sum(axis=1) / count)
            if cfg.method == "mppi":
                scaled = (returns - mu[:, None]) / (spread[:, None] + 1e-8) / cfg.temperature
                scaled = np.where(finite, scaled, -np.inf)
                weights = np.exp(scaled - scaled.max(axis=1, keepdims=True))
                weights = np.where(np.isfinite(weights), weights, 0.0)
                # No finite return at all: keep the current mean (sample 0) rather than the all-zero average, which
                # is no average of limited samples and so could break the limits.
                weights[:, 0] += weights.sum(axis=1) == 0
                weights /= weights.sum(axis=1, keepdims=True)
                mean = np.einsum("bn,bnha->bha", weights, samples)
            else:
                elite_idx = np.argsort(-returns, axis=1)[:, :n_elite]
                elites = np.take_along_axis(samples, elite_idx[:, :, None, None], axis=1)
                mean = cfg.momentum * samples[:, 0] + (1 - cfg.momentum) * elites.mean(axis=1)
                std = cfg.momentum * std + (1 - cfg.momentum) * elites.std(axis=1)
                std = np.maximum(std, cfg.min_std * self.half_range)
        plan = mean  # a fresh array: every iteration replaced it
        # The average of limited samples is within the limits only up to round-off (~1e-16), but the safety layer
        # (safety.py `_limit`) and the sim env compare the command with exact (in)equalities and would count and
        # report it as rate limited. Clipping the first action their way (rate then box: the same for a last command
        # in the box) moves it by that round-off at most; the rest of the plan is only the next warm start.
        first = plan[:, 0]
        np.maximum(first, last - self.max_step, out=first)
        np.minimum(first, last + self.max_step, out=first)
        np.maximum(first, self.low, out=first)
        np.minimum(first, self.high, out=first)
        # Warm start for the next control step: shift by one, repeat the last action.
        self.mean = np.concatenate([plan[:, 1:], plan[:, -1:]], axis=1)
        if cfg.method == "cem":
            self.std = np.concatenate([std[:, 1:], np.full_like(std[:, -1:], cfg.noise_std) * self.half_range], 1)
        return PlanResult(action=plan[:, 0].copy(), plan=plan, expected_return=best_return, returns_std=spread)
