"""MB-MPO's meta-policy on the robot: a Gaussian MLP that adapts to the robot by one vanilla policy-gradient step per
episode, computed here in numpy from the robot's own transitions (no torch).

The policy is meta-trained (:mod:`metarl_robot.algos.mbmpo`) so that this one step, taken from the meta-parameters on
an episode of the meta-policy, turns it into a good policy for whichever dynamics produced the episode. On the robot:

- episode 1 runs the meta-policy (sampling its actions: the step needs the log-probability of what it did);
- at the next episode start (:meth:`MetaPolicyAdapter.reset`) the step is taken on the episode just ended, with the
  family's reward of each transition, a linear-feature baseline and normalised advantages
  (:func:`~metarl_robot.runtime.policy_gradient.advantages`), and the adapted weights act from then on;
- every later episode start takes one more step, from the current weights, on the episode just ended (2 steps after
  2 episodes, ...); :meth:`MetaPolicyAdapter.forget` (the node's ``~/reset_adaptation``) goes back to the
  meta-parameters.

The adapted weights persist across episodes, so they are the adapter's :meth:`carried_state` (logged by the node at
every episode start, put back by the replay).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from metarl_robot.runtime.policy_gradient import (
    PolicyParams,
    advantages,
    inner_step,
    policy_features,
    policy_mean,
    to_env_action,
)
from metarl_robot.spec.rewards import RewardFunction
from metarl_robot.spec.robot import RobotSpec

MeanFn = Callable[[PolicyParams, np.ndarray], np.ndarray]
"""``(params, features (N, F)) -> (N, a)`` mean action in normalised units."""


@dataclass(frozen=True)
class InnerStepConfig:
    """The adaptation step, as meta-training took it (the bundle records it; the robot must not change it)."""

    step_size: float = 0.01
    """Gradient-ascent step on ``mean(log pi(u|s) * advantage)`` (MB-MPO's ``fast_lr``; the paper's code sweeps 0.001
    to 0.01)."""
    discount: float = 0.99
    """Discount of the returns-to-go the advantages are taken from."""
    baseline_reg: float = 1e-5
    """Ridge regularisation of the linear-feature baseline."""
    min_transitions: int = 10
    """An episode with fewer transitions takes no step (too few to estimate a gradient from)."""

    def validate(self) -> None:
        if not self.step_size > 0:
            raise ValueError(f"InnerStepConfig.step_size must be > 0, got {self.step_size}")
        if not 0 < self.discount <= 1:
            raise ValueError(f"InnerStepConfig.discount must be in (0, 1], got {self.discount}")
        if not self.baseline_reg > 0:
            raise ValueError(f"InnerStepConfig.baseline_reg must be > 0, got {self.baseline_reg}")
        if self.min_transitions < 2:
            raise ValueError(f"InnerStepConfig.min_transitions must be >= 2, got {self.min_transitions}")


class MetaPolicyAdapter:
    """The meta-policy and its per-episode inner step behind the :class:`~metarl_robot.runtime.adapter.Adapter`
    interface (see the module docstring). ``B`` envs, each with its own weights and its own episode record.

    ``act(obs, task_params)`` samples ``u ~ N(mean(s), exp(log_std))`` in normalised action units (the mean alone
    when ``deterministic``) and returns it mapped into the action box; ``observe`` records the transition with that
    sample and the family's reward. Diagnostics of :meth:`act`: ``policy_sample`` (B, a), the sample before it was
    mapped and clipped (what the step's log-probability is of), and ``inner_steps`` (B,), steps taken since the
    meta-parameters.

    ``adapt=False``: the meta-policy throughout (no step is ever taken), for comparisons.
    """

    observes_sent_commands = False
    """It models no actuator latency: it observes the command the motors applied."""

    def __init__(self, robot: RobotSpec, reward: RewardFunction, meta_params: PolicyParams, inner: InnerStepConfig,
                 batch: int = 1, seed: int = 0, adapt: bool = True, deterministic: bool = False,
                 mean_fn: MeanFn = policy_mean) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        inner.validate()
        self.robot, self.reward, self.inner, self.batch = robot, reward, inner, batch
        self.meta_params = [np.array(p, dtype=np.float64) for p in meta_params]
        """The meta-trained weights every env starts from (and :meth:`forget` returns to)."""
        self.adapt, self.deterministic, self.mean_fn = adapt, deterministic, mean_fn
        self.seed = seed
        self.episodes_started = 0
        """Episode starts (:meth:`reset` calls) so far. Each reseeds the action noise from ``(seed, this count)``, and
        the count is carried: a replay of any episode draws the node's noise from the logged state alone."""
        self.rng = np.random.default_rng((seed, 0))
        self.params: list[PolicyParams] = [self._meta_copy() for _ in range(batch)]
        """Per env: the weights acting now."""
        self.inner_steps = np.zeros(batch, dtype=np.int64)
        """Per env: steps taken since the meta-parameters."""
        self._episode: list[dict[str, list]] = [self._empty_record() for _ in range(batch)]
        self._sample: np.ndarray | None = None
        self._task_params: dict[str, np.ndarray] | None = None

    def _meta_copy(self) -> PolicyParams:
        return [p.copy() for p in self.meta_params]

    @staticmethod
    def _empty_record() -> dict[str, list]:
        return {"obs": [], "sample": [], "reward": []}

    # ---- episodes -------------------------------------------------------------------------------
    def _which(self, which: np.ndarray | None) -> np.ndarray:
        if which is None:
            return np.arange(self.batch)
        which = np.asarray(which, dtype=bool)
        if which.shape != (self.batch,):
            raise ValueError(f"which must be a bool mask of shape ({self.batch},), got {which.shape}")
        return np.flatnonzero(which)

    def reset(self, which: np.ndarray | None = None) -> None:
        """A new episode starts: each env in ``which`` takes one step on the episode it just ended (if it recorded
        at least ``min_transitions`` and ``adapt``), then starts a new record."""
        for b in self._which(which):
            record = self._episode[b]
            if self.adapt and len(record["reward"]) >= self.inner.min_transitions:
                self.params[b] = self.step_on(self.params[b], np.array(record["obs"]), np.array(record["sample"]),
                                              np.array(record["reward"]))
                self.inner_steps[b] += 1
            self._episode[b] = self._empty_record()
        self.episodes_started += 1
        self.rng = np.random.default_rng((self.seed, self.episodes_started))

    def forget(self, which: np.ndarray | None = None) -> None:
        """Back to the meta-parameters (and an empty record): what the operator's reset does."""
        for b in self._which(which):
            self.params[b] = self._meta_copy()
            self.inner_steps[b] = 0
            self._episode[b] = self._empty_record()

    def step_on(self, params: PolicyParams, obs: np.ndarray, samples: np.ndarray, rewards: np.ndarray
                ) -> PolicyParams:
        """One inner step from ``params`` on one episode: ``obs (T, o)``, the policy's samples ``(T, a)``, the
        rewards ``(T,)``. The same step meta-training differentiates through."""
        feats = policy_features(self.robot, obs)
        adv = advantages(rewards[None], feats[None], self.inner.discount, self.inner.baseline_reg)[0]
        return inner_step(params, feats, samples, adv, self.inner.step_size)

    # ---- control ----------------------------------------------------------------------------------
    def act(self, obs: np.ndarray, task_params: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        obs = self._rows("obs", obs, self.robot.obs_dim)
        missing = [p for p in self.reward.params if p not in task_params]
        if missing:
            raise ValueError(f"task_params lacks reward parameter(s) {missing}; the reward needs "
                             f"{list(self.reward.params)}, got {sorted(task_params)}")
        self._task_params = {k: np.broadcast_to(np.asarray(v, dtype=np.float64), (self.batch,))
                             for k, v in task_params.items()}
        feats = policy_features(self.robot, obs)
        sample = np.empty((self.batch, self.robot.action_dim))
        for b in range(self.batch):
            mean = self.mean_fn(self.params[b], feats[b:b + 1])[0]
            noise = 0.0 if self.deterministic else self.rng.standard_normal(mean.shape) * np.exp(self.params[b][-1])
            sample[b] = mean + noise
        if not np.isfinite(sample).all():
            raise ValueError("the policy returned a non-finite action (its weights or the observation are corrupt)")
        self._sample = sample
        return to_env_action(self.robot, sample), {"policy_sample": sample.copy(),
                                                   "inner_steps": self.inner_steps.copy()}

    def observe(self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray) -> None:
        """Record the transition that followed the last :meth:`act` (its sample, the family's reward)."""
        obs = self._rows("obs", obs, self.robot.obs_dim)
        action = self._rows("action", action, self.robot.action_dim)
        next_obs = self._rows("next_obs", next_obs, self.robot.obs_dim)
        if self._sample is None or self._task_params is None:
            raise ValueError("observe() follows act(): the step needs the sample the policy drew for this transition")
        if self.batch == 1:  # the robot: the reward's float path (RewardFunction.one), a sixth of numpy's cost
            reward = np.array((self.reward.one(self.robot, obs[0].tolist(), action[0].tolist(), next_obs[0].tolist(),
                                               {k: float(self._task_params[k][0]) for k in self.reward.params}),))
        else:
            reward = self.reward(self.robot, obs, action, next_obs, self._task_params)[0]
        for b in range(self.batch):
            record = self._episode[b]
            record["obs"].append(obs[b])
            record["sample"].append(self._sample[b])
            record["reward"].append(float(reward[b]))
        self._sample = None

    # ---- what persists across episodes --------------------------------------------------------------
    def carried_state(self) -> dict[str, np.ndarray]:
        """The weights acting now, per env (``param_<i>`` (B, ...), in the policy's parameter order), the steps
        taken (``inner_steps`` (B,)) and the episode starts so far (``episodes_started`` (B,), one count: the action
        noise's seed)."""
        state = {f"param_{i}": np.stack([p[i] for p in self.params]) for i in range(len(self.meta_params))}
        return state | {"inner_steps": self.inner_steps.copy(),
                        "episodes_started": np.full(self.batch, self.episodes_started, dtype=np.int64)}

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        """Take back a :meth:`carried_state` (every array, with its shape and finite values, or ``ValueError``); an
        empty one (nothing carried: a log without adapter state, a candidate bundle's replay) is the meta-parameters."""
        if not state:
            self.params = [self._meta_copy() for _ in range(self.batch)]
            self.inner_steps = np.zeros(self.batch, dtype=np.int64)
            self.episodes_started = 0
            self.rng = np.random.default_rng((self.seed, 0))
            return
        want = {f"param_{i}": (self.batch, *p.shape) for i, p in enumerate(self.meta_params)}
        want["inner_steps"] = want["episodes_started"] = (self.batch,)
        if set(state) != set(want):
            raise ValueError(f"carried state: expected arrays {sorted(want)}, got {sorted(state)}")
        for name, shape in want.items():
            value = np.asarray(state[name])
            if value.shape != shape or not np.isfinite(value).all():
                raise ValueError(f"carried state {name!r}: expected finite values of shape {shape}, got "
                                 f"{value.shape}")
        self.params = [[np.array(state[f"param_{i}"][b], dtype=np.float64) for i in range(len(self.meta_params))]
                       for b in range(self.batch)]
        self.inner_steps = np.array(state["inner_steps"], dtype=np.int64)
        started = np.asarray(state["episodes_started"])
        if (started != started[0]).any() or started[0] < 0:
            raise ValueError(f"carried state 'episodes_started': one count >= 0 for every env, got {started.tolist()}")
        self.episodes_started = int(started[0])
        self.rng = np.random.default_rng((self.seed, self.episodes_started))

    def _rows(self, name: str, x: Any, width: int) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.batch, width):
            raise ValueError(f"{name}: expected shape {(self.batch, width)}, got {x.shape}")
        if not np.isfinite(x).all():
            bad = sorted({int(i) for i in np.argwhere(~np.isfinite(x))[:, 0]})
            raise ValueError(f"{name} contains NaN or Inf (env rows {bad}): refusing to adapt or act on it")
        return x


__all__ = ["InnerStepConfig", "MetaPolicyAdapter"]
