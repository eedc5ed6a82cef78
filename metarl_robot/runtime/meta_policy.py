"""MB-MPO's meta-policy on the robot: a Gaussian MLP that adapts to the robot by one vanilla policy-gradient step per
``episodes_per_step`` episodes, computed here in numpy from the robot's own transitions (no torch).

The policy is meta-trained (:mod:`metarl_robot.algos.mbmpo`) so that this one step, taken from the meta-parameters on
an episode of the meta-policy, turns it into a good policy for whichever dynamics produced the episode. On the robot:

- the first ``K = episodes_per_step`` episodes run the meta-policy (sampling its actions: the step needs the
  log-probability of what it did);
- at the episode start after the K-th (:meth:`MetaPolicyAdapter.reset`) the step is taken on those K episodes pooled,
  with the family's reward of each transition, ONE linear-feature baseline fitted over all their rows and advantages
  normalised over all of them (:func:`~metarl_robot.runtime.policy_gradient.advantages`), and the adapted weights act
  from then on;
- every further K episodes take one more step, from the current weights, on those K (K = 1, the default: a step at
  every episode start on the episode just ended); :meth:`MetaPolicyAdapter.forget` (the node's
  ``~/reset_adaptation``) goes back to the meta-parameters.

Why pool: meta-training's step sees ``rollouts_per_task x imagined_horizon`` imagined transitions per task (1,600 in
the cart-pole config), one robot episode a sixth of that, and the gradient of one episode is too noisy for the step
to raise the return on average (docs/mbmpo.md, bench/mbmpo_inner_step.py).

The adapted weights and the episodes pooled so far persist across episodes, so they are the adapter's
:meth:`carried_state` (logged by the node at every episode start, put back by the replay).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import Any, NamedTuple

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
from metarl_robot.spec.schema import SpecError

MeanFn = Callable[[PolicyParams, np.ndarray], np.ndarray]
"""``(params, features (N, F)) -> (N, a)`` mean action in normalised units."""


RUNTIME_SETTINGS: tuple[str, ...] = ("episodes_per_step",)
"""The inner-step settings a deployment may choose differently from the bundle (``make_adapter``'s
``planner_overrides``, ``metarl eval --set``): pooling more episodes per step lowers the gradient's noise and leaves
what it estimates unchanged. The others define the step meta-training differentiated through."""

PENDING_KEYS: tuple[str, ...] = ("pending_obs", "pending_sample", "pending_reward", "pending_lengths")
"""The :meth:`MetaPolicyAdapter.carried_state` arrays of the episodes pooled for the next step (``episodes_per_step``
> 1 only)."""


class InnerStepError(ValueError):
    """An invalid :class:`InnerStepConfig` value (``InnerStepConfig.<field> <problem>``)."""

    def __init__(self, field: str, problem: str) -> None:
        self.field, self.problem = field, problem
        super().__init__(f"InnerStepConfig.{field} {problem}")


class PolicyEpisode(NamedTuple):
    """One ended episode as the step sees it."""

    obs: np.ndarray
    """(T, o) the observation of each transition."""
    sample: np.ndarray
    """(T, a) the policy's sample ``u`` there (normalised units, before the box)."""
    reward: np.ndarray
    """(T,) the family's reward of each transition."""


@dataclass(frozen=True)
class InnerStepConfig:
    """The adaptation step, as meta-training took it (the bundle records it; the robot must not change it, except the
    :data:`RUNTIME_SETTINGS`)."""

    step_size: float = 0.01
    """Gradient-ascent step on ``mean(log pi(u|s) * advantage)`` (MB-MPO's ``fast_lr``; the paper's code sweeps 0.001
    to 0.01)."""
    discount: float = 0.99
    """Discount of the returns-to-go the advantages are taken from."""
    baseline_reg: float = 1e-5
    """Ridge regularisation of the linear-feature baseline."""
    min_transitions: int = 10
    """An episode with fewer transitions is not stepped on (too few to estimate a gradient from): it is not pooled."""
    episodes_per_step: int = 1
    """K: ended episodes of the weights acting that ONE step is taken on, pooled (one baseline fitted over all their
    rows, advantages normalised over all, the gradient the mean over all rows). 1: a step at every episode start on
    the episode just ended. Meta-training's step sees ``rollouts_per_task x imagined_horizon`` transitions per task, a
    robot episode far fewer: K > 1 brings the robot's gradient nearer the one the meta-policy was trained to step on
    (docs/mbmpo.md). A deployment may choose it (:data:`RUNTIME_SETTINGS`)."""

    def validate(self) -> None:
        """``InnerStepError`` (a ``ValueError``) naming the first invalid field."""
        if not self.step_size > 0:
            raise InnerStepError("step_size", f"must be > 0, got {self.step_size}")
        if not 0 < self.discount <= 1:
            raise InnerStepError("discount", f"must be in (0, 1], got {self.discount}")
        if not self.baseline_reg > 0:
            raise InnerStepError("baseline_reg", f"must be > 0, got {self.baseline_reg}")
        if self.min_transitions < 2:
            raise InnerStepError("min_transitions", f"must be >= 2, got {self.min_transitions}")
        k = self.episodes_per_step
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise InnerStepError("episodes_per_step", f"must be an integer >= 1, got {k!r}")

    def with_settings(self, settings: Mapping[str, Any] | None, refusal: str) -> InnerStepConfig:
        """This step with the :data:`RUNTIME_SETTINGS` in ``settings`` (a controller's ``planner_overrides``)
        changed, validated. Any other key is refused: ``SpecError`` on ``planner_overrides`` saying ``refusal`` (what
        the controller is) and the settings it takes."""
        return with_runtime_settings(self, settings, RUNTIME_SETTINGS, refusal, "episodes pooled per inner step")


def with_runtime_settings(config: Any, settings: Mapping[str, Any] | None, allowed: tuple[str, ...], refusal: str,
                          what: str) -> Any:
    """``config`` (a frozen dataclass with ``validate()``) with the ``allowed`` keys of ``settings`` (a controller's
    ``planner_overrides``) replaced, validated; any other key is refused: ``SpecError`` on ``planner_overrides``
    saying ``refusal`` (what the controller is), the settings it takes and ``what`` they are; an invalid value:
    ``SpecError`` on ``planner_overrides`` naming the field."""
    if not settings:
        return config
    if unknown := sorted(set(settings) - set(allowed)):
        raise SpecError("planner_overrides", "", f"{refusal}; of planner_overrides it takes only {', '.join(allowed)} "
                        f"({what}), got {unknown}")
    changed = replace(config, **settings)
    try:
        changed.validate()
    except (InnerStepError, SpecError) as exc:
        raise SpecError("planner_overrides", exc.field, exc.problem) from None
    return changed


class MetaPolicyAdapter:
    """The meta-policy and its inner step behind the :class:`~metarl_robot.runtime.adapter.Adapter` interface (see
    the module docstring). ``B`` envs, each with its own weights, its own episode record and its own pool of ended
    episodes (``inner.episodes_per_step`` of them make a step).

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
        self.pending: list[list[PolicyEpisode]] = [[] for _ in range(batch)]
        """Per env: the ended episodes of the weights acting, in order, pooled for the next step (fewer than
        ``inner.episodes_per_step``: the K-th takes the step and empties the pool)."""
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
        """A new episode starts: each env in ``which`` pools the episode it just ended (if it recorded at least
        ``min_transitions`` and ``adapt``); with ``episodes_per_step`` pooled it takes one step on them all from the
        weights acting and empties the pool; then it starts a new record."""
        for b in self._which(which):
            record = self._episode[b]
            if self.adapt and len(record["reward"]) >= self.inner.min_transitions:
                self._episode_ended(b, {k: np.array(v) for k, v in record.items()})
            self._episode[b] = self._empty_record()
        self.episodes_started += 1
        self.rng = np.random.default_rng((self.seed, self.episodes_started))

    def _episode_ended(self, b: int, record: dict[str, np.ndarray]) -> None:
        """Env ``b`` ended an episode long enough to adapt on (its record's arrays): pool it; the K-th steps."""
        self.pending[b].append(PolicyEpisode(record["obs"], record["sample"], record["reward"]))
        if len(self.pending[b]) == self.inner.episodes_per_step:
            self.params[b] = self.step_on(self.params[b], self.pending[b])
            self.inner_steps[b] += 1
            self.pending[b] = []

    def adapts_by(self) -> str:
        """How it adapts, in words (``metarl eval`` records it)."""
        k = self.inner.episodes_per_step
        return "one inner step at each episode start, kept across episodes" if k == 1 else \
            f"one inner step on every {k} episodes pooled, at the episode start after them, kept across episodes"

    def forget(self, which: np.ndarray | None = None) -> None:
        """Back to the meta-parameters (and an empty record and pool): what the operator's reset does."""
        for b in self._which(which):
            self.params[b] = self._meta_copy()
            self.inner_steps[b] = 0
            self._episode[b] = self._empty_record()
            self.pending[b] = []

    def step_on(self, params: PolicyParams, episodes: Sequence[PolicyEpisode], step_size: float | None = None
                ) -> PolicyParams:
        """One inner step from ``params`` on ``episodes`` pooled (any lengths): advantages from ONE linear-feature
        baseline fitted over all their rows and normalised over all, the gradient the mean over all rows. The same
        step meta-training differentiates through (on its imagined rollouts). ``step_size``: the inner step's own
        unless given (the bench compares others)."""
        if not episodes:
            raise ValueError("step_on: no episodes to step on")
        feats = [policy_features(self.robot, e.obs) for e in episodes]
        adv = advantages([e.reward for e in episodes], feats, self.inner.discount, self.inner.baseline_reg)
        return inner_step(params, np.concatenate(feats), np.concatenate([e.sample for e in episodes]),
                          np.concatenate(adv), self.inner.step_size if step_size is None else step_size)

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
        taken (``inner_steps`` (B,)), the episode starts so far (``episodes_started`` (B,), one count: the action
        noise's seed) and, with ``episodes_per_step`` K > 1, the episodes pooled for the next step: each env's, one
        after another, in ``pending_obs`` (B, P, o), ``pending_sample`` (B, P, a), ``pending_reward`` (B, P) (P the
        most rows any env pooled, zeros after an env's own) and their lengths ``pending_lengths`` (B, K - 1) (0: no
        episode)."""
        state = {f"param_{i}": np.stack([p[i] for p in self.params]) for i in range(len(self.meta_params))}
        state |= {"inner_steps": self.inner_steps.copy(),
                  "episodes_started": np.full(self.batch, self.episodes_started, dtype=np.int64)}
        if self.inner.episodes_per_step == 1:  # nothing is ever pooled: the state of every adapter before pooling
            return state
        return state | pack_episodes(self.pending, self.inner.episodes_per_step - 1, "pending",
                                     self._pending_widths())

    def _pending_widths(self) -> dict[str, tuple[int, ...]]:
        """Per :class:`PolicyEpisode` field, the shape of one of its rows."""
        return {"obs": (self.robot.obs_dim,), "sample": (self.robot.action_dim,), "reward": ()}

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        """Take back a :meth:`carried_state` (every array, with its shape and finite values, or ``ValueError`` naming
        it; nothing is changed then). An empty one (nothing carried: a log without adapter state, a candidate bundle's
        replay) is the meta-parameters; one without the ``pending_*`` arrays (``episodes_per_step`` 1, every state
        logged before pooling existed) has nothing pooled."""
        if not state:
            self.params = [self._meta_copy() for _ in range(self.batch)]
            self.inner_steps = np.zeros(self.batch, dtype=np.int64)
            self.episodes_started = 0
            self.rng = np.random.default_rng((self.seed, 0))
            self.pending = [[] for _ in range(self.batch)]
            return
        want = {f"param_{i}": (self.batch, *p.shape) for i, p in enumerate(self.meta_params)}
        want["inner_steps"] = want["episodes_started"] = (self.batch,)
        pooled = any(k in state for k in PENDING_KEYS)
        if set(state) != set(want) | (set(PENDING_KEYS) if pooled else set()):
            raise ValueError(f"carried state: expected arrays {sorted(want)} (and, with episodes pooled, all of "
                             f"{list(PENDING_KEYS)}), got {sorted(state)}")
        for name, shape in want.items():
            value = np.asarray(state[name])
            if value.shape != shape or not np.isfinite(value).all():
                raise ValueError(f"carried state {name!r}: expected finite values of shape {shape}, got "
                                 f"{value.shape}")
        started = np.asarray(state["episodes_started"])
        if (started != started[0]).any() or started[0] < 0:
            raise ValueError(f"carried state 'episodes_started': one count >= 0 for every env, got {started.tolist()}")
        pending = self._pending_from(state) if pooled else [[] for _ in range(self.batch)]
        self.params = [[np.array(state[f"param_{i}"][b], dtype=np.float64) for i in range(len(self.meta_params))]
                       for b in range(self.batch)]
        self.inner_steps = np.array(state["inner_steps"], dtype=np.int64)
        self.episodes_started = int(started[0])
        self.rng = np.random.default_rng((self.seed, self.episodes_started))
        self.pending = pending

    def _pending_from(self, state: Mapping[str, np.ndarray]) -> list[list[PolicyEpisode]]:
        """The pools a carried state's ``pending_*`` arrays hold (:func:`unpack_episodes`)."""
        return unpack_episodes(state, "pending", self.batch, self.inner.episodes_per_step - 1,
                               self.inner.min_transitions, self._pending_widths(), PolicyEpisode,
                               f"(episodes_per_step {self.inner.episodes_per_step})")

    def _rows(self, name: str, x: Any, width: int) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.shape != (self.batch, width):
            raise ValueError(f"{name}: expected shape {(self.batch, width)}, got {x.shape}")
        if not np.isfinite(x).all():
            bad = sorted({int(i) for i in np.argwhere(~np.isfinite(x))[:, 0]})
            raise ValueError(f"{name} contains NaN or Inf (env rows {bad}): refusing to adapt or act on it")
        return x


def pack_episodes(pools: Sequence[Sequence[NamedTuple]], slots: int, prefix: str,
                  widths: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Per env a list of at most ``slots`` episodes (NamedTuples with the fields of ``widths``: per row shapes) as
    arrays a carried state holds: each env's episodes one after another in ``<prefix>_<field>`` (B, P, ...) (P the
    most rows any env holds, zeros after an env's own) and their lengths ``<prefix>_lengths`` (B, slots) (0: no
    episode)."""
    lengths = np.zeros((len(pools), slots), dtype=np.int64)
    for b, pool in enumerate(pools):
        lengths[b, :len(pool)] = [len(e.reward) for e in pool]
    rows = int(lengths.sum(axis=1).max()) if len(pools) else 0
    padded = {name: np.zeros((len(pools), rows, *width)) for name, width in widths.items()}
    for b, pool in enumerate(pools):
        for name, array in padded.items():
            if pool:
                joined = np.concatenate([getattr(e, name) for e in pool])
                array[b, :len(joined)] = joined
    return {f"{prefix}_{name}": array for name, array in padded.items()} | {f"{prefix}_lengths": lengths}


def unpack_episodes(state: Mapping[str, np.ndarray], prefix: str, batch: int, slots: int, min_transitions: int,
                    widths: Mapping[str, tuple[int, ...]], episode: Callable[..., Any], slots_are: str = ""
                    ) -> list[list[Any]]:
    """The episodes :func:`pack_episodes` packed, checked (shapes, finite values, lengths it could have written for
    ``slots`` and ``min_transitions``); ``ValueError`` naming the array otherwise (``slots_are``: what sets the
    number of slots, for that message)."""
    lengths = np.asarray(state[f"{prefix}_lengths"])
    if lengths.shape != (batch, slots) or lengths.dtype.kind not in "iu":
        raise ValueError(f"carried state '{prefix}_lengths': expected integers of shape {(batch, slots)} "
                         f"{slots_are}, got {lengths.dtype} {lengths.shape}")
    counts = np.count_nonzero(lengths, axis=1)
    # Each env's episodes come first, in order; an episode shorter than min_transitions is never kept.
    if ((lengths != 0) & (lengths < min_transitions)).any() or (lengths[np.arange(slots) >= counts[:, None]] != 0
                                                                 ).any():
        raise ValueError(f"carried state '{prefix}_lengths': per env the episodes' lengths (each >= "
                         f"min_transitions {min_transitions}) then zeros, got {lengths.tolist()}")
    reward = np.asarray(state[f"{prefix}_reward"])
    if reward.ndim != 2:
        raise ValueError(f"carried state '{prefix}_reward': expected shape (B, P), got {reward.shape}")
    rows = reward.shape[1]
    arrays = {}
    for name, width in widths.items():
        key, value = f"{prefix}_{name}", np.asarray(state[f"{prefix}_{name}"])
        shape = (batch, rows, *width)
        floats = value.dtype.kind == "f"
        nonfinite = floats and not np.isfinite(value).all()
        if value.shape != shape or not floats or nonfinite:
            raise ValueError(f"carried state {key!r}: expected finite floats of shape {shape}, got {value.dtype} "
                             f"{value.shape}{' with NaN or Inf' if nonfinite else ''}")
        arrays[name] = np.asarray(value, dtype=np.float64)
    if (total := lengths.sum(axis=1)).max(initial=0) > rows:
        raise ValueError(f"carried state '{prefix}_lengths': envs hold {total.tolist()} rows, more than the "
                         f"{rows} of '{prefix}_reward'")
    pools: list[list[Any]] = []
    for b in range(batch):
        bounds = np.cumsum([0, *lengths[b, :counts[b]]])
        pools.append([episode(**{name: array[b, start:end].copy() for name, array in arrays.items()})
                      for start, end in pairwise(bounds)])
    return pools


__all__ = ["PENDING_KEYS", "RUNTIME_SETTINGS", "InnerStepConfig", "InnerStepError", "MetaPolicyAdapter",
           "PolicyEpisode", "pack_episodes", "unpack_episodes",
           "with_runtime_settings"]
