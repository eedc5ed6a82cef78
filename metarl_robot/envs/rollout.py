"""Vectorised episode collection: one task per sub-env, sync or async across cores, reproducible.

Same ``seed`` → same trajectories, whichever vector mode runs them: sub-env ``i`` is reset with
``seed + i`` and actions come from the policy, whose own randomness is seeded from ``seed``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import gymnasium as gym
import numpy as np
from tqdm.auto import tqdm

from metarl_robot.envs.out_of_family import OutOfFamily
from metarl_robot.spec.family import Task, TaskFamily, load_family

Policy = Callable[[np.ndarray], np.ndarray]
"""Batch of observations ``(num_envs, obs_dim)`` → batch of actions ``(num_envs, action_dim)``."""


class Controller(Protocol):
    """A stateful policy: told when episodes start and what each step did (adapters need this)."""

    def reset(self) -> None: ...

    def act(self, obs: np.ndarray) -> np.ndarray: ...

    def observe(self, obs: np.ndarray, sent_action: np.ndarray, next_obs: np.ndarray) -> None: ...


class _Stateless:
    """A plain policy function as a :class:`Controller`."""

    def __init__(self, policy: Policy) -> None:
        self.act = policy

    def reset(self) -> None:
        pass

    def observe(self, obs: np.ndarray, sent_action: np.ndarray, next_obs: np.ndarray) -> None:
        pass

VectorMode = Literal["sync", "async"]


def make_vector_env(family: str | TaskFamily, num_envs: int, mode: VectorMode = "sync",
                    tasks: Sequence[Task] | None = None, effects: OutOfFamily | None = None) -> gym.vector.VectorEnv:
    """``num_envs`` copies of the family's env; ``async`` runs each in its own process.

    gymnasium's SyncVectorEnv / AsyncVectorEnv, with a cheaper merge of the sub-envs' infos (the same result:
    :class:`_LeanInfoMerge`).

    ``effects``: out-of-family effects every sub-env runs with (evaluation only; default none).

    Autoreset is disabled: :func:`collect` resets all sub-envs together at episode boundaries,
    which keeps every episode aligned in time across tasks.
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    if mode not in ("sync", "async"):
        raise ValueError(f"mode must be 'sync' or 'async', got {mode!r}")
    fam = family if isinstance(family, TaskFamily) else load_family(family)
    name = fam if isinstance(family, TaskFamily) else str(family)
    if tasks is not None and len(tasks) != num_envs:
        raise ValueError(f"got {len(tasks)} tasks for {num_envs} envs; give one task per env")
    fns = [_EnvFactory(name, None if tasks is None else dict(tasks[i]), effects or None) for i in range(num_envs)]
    cls = _AsyncVectorEnv if mode == "async" else _SyncVectorEnv
    return cls(fns, autoreset_mode=gym.vector.AutoresetMode.DISABLED)


class _LeanInfoMerge:
    """gymnasium's ``VectorEnv._add_info`` with the same result for any info, and less work per key.

    A vector step merges every sub-env's info dict into arrays, one per key, each with a ``_key`` presence mask,
    recursing into nested dicts. Our envs' info holds about 16 keys (the task and the reward components are
    nested), so that merge is a large part of a sync step; gymnasium's version also allocates a mask for every key
    of every sub-env only to drop it when the mask already exists. This one builds each array and mask once.
    """

    num_envs: int

    def _add_info(self, vector_infos: dict[str, Any], env_info: dict[str, Any], env_num: int) -> dict[str, Any]:
        num_envs = self.num_envs
        for key, value in env_info.items():
            if key == "final_obs":  # kept as an object array of single observations, as gymnasium does
                array = vector_infos["final_obs"] if "final_obs" in vector_infos else np.full(num_envs, None, object)
                array[env_num] = value
            elif isinstance(value, dict):
                array = self._add_info(vector_infos.get(key, {}), value, env_num)
            else:
                if key in vector_infos:
                    array = vector_infos[key]
                elif type(value) in (int, float, bool) or issubclass(type(value), np.number):
                    array = np.zeros(num_envs, dtype=type(value))
                elif isinstance(value, np.ndarray):
                    array = np.zeros((num_envs, *value.shape), dtype=value.dtype)
                else:
                    array = np.full(num_envs, fill_value=None, dtype=object)
                array[env_num] = value
            mask_key = f"_{key}"
            mask = vector_infos.get(mask_key)
            if mask is None:
                mask = np.zeros(num_envs, dtype=np.bool_)
            mask[env_num] = True
            vector_infos[key], vector_infos[mask_key] = array, mask
        return vector_infos


class _SyncVectorEnv(_LeanInfoMerge, gym.vector.SyncVectorEnv):
    """gymnasium's SyncVectorEnv, merging infos with :class:`_LeanInfoMerge`."""


class _AsyncVectorEnv(_LeanInfoMerge, gym.vector.AsyncVectorEnv):
    """gymnasium's AsyncVectorEnv, merging the workers' infos with :class:`_LeanInfoMerge`."""


@dataclass
class _EnvFactory:
    """Picklable env constructor for async workers."""

    family: str | TaskFamily
    task: Task | None
    effects: OutOfFamily | None = None

    def __call__(self) -> gym.Env:
        from metarl_robot.envs.registry import make_env

        # Without effects the env is built exactly as before (no extra keyword reaches gym.make).
        extra = {} if self.effects is None else {"effects": self.effects}
        return make_env(self.family, task=self.task, **extra)


def set_tasks(vec_env: gym.vector.VectorEnv, tasks: Sequence[Task]) -> None:
    """Give sub-env ``i`` task ``tasks[i]`` (validated inside each env)."""
    if len(tasks) != vec_env.num_envs:
        raise ValueError(f"got {len(tasks)} tasks for {vec_env.num_envs} envs; give one task per env")
    vec_env.set_attr("task", [dict(t) for t in tasks])


def random_policy(action_low: np.ndarray, action_high: np.ndarray, seed: int) -> Policy:
    """Uniform random actions in the action box, from a generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)

    def act(obs: np.ndarray) -> np.ndarray:
        return rng.uniform(action_low, action_high, size=(len(obs), len(action_low)))
    return act


@dataclass
class Rollout:
    """Transitions of ``E`` sub-envs over ``T`` steps (several episodes are concatenated along T)."""

    obs: np.ndarray
    """``(E, T, obs_dim)`` observation before each action."""
    actions: np.ndarray
    """``(E, T, action_dim)`` the commands the envs sent (clipped and rate-limited): what drove the motion."""
    next_obs: np.ndarray
    """``(E, T, obs_dim)`` observation after each action."""
    rewards: np.ndarray
    """``(E, T)``."""
    valid: np.ndarray
    """``(E, T)`` bool: False after a sub-env's episode terminated early (physics diverged)."""
    episode_start: np.ndarray
    """``(T,)`` bool: True at the first step of each episode."""
    tasks: list[Task]
    """Task of each sub-env."""

    def episode_returns(self) -> np.ndarray:
        """``(E, episodes)`` sum of valid rewards per episode."""
        starts = np.flatnonzero(self.episode_start)
        masked = np.where(self.valid, self.rewards, 0.0)
        return np.stack([masked[:, s:e].sum(axis=1) for s, e in zip(starts, [*starts[1:], masked.shape[1]],
                                                                        strict=True)], axis=1)

    def take(self, rows: np.ndarray) -> Rollout:
        """The sub-envs ``rows`` (an index array) of this rollout."""
        rows = np.asarray(rows, dtype=int)
        return Rollout(self.obs[rows], self.actions[rows], self.next_obs[rows], self.rewards[rows], self.valid[rows],
                       self.episode_start, [self.tasks[i] for i in rows])

    @staticmethod
    def concatenate(parts: Sequence[Rollout]) -> Rollout:
        """Rollouts of the same length stacked along the sub-env axis."""
        if len({len(p.episode_start) for p in parts}) != 1:
            raise ValueError("rollouts to concatenate must have the same number of steps")
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return Rollout(cat("obs"), cat("actions"), cat("next_obs"), cat("rewards"), cat("valid"),
                       parts[0].episode_start, [t for p in parts for t in p.tasks])

    @staticmethod
    def chain(parts: Sequence[Rollout]) -> Rollout:
        """Rollouts of the same sub-envs joined along the time axis, one after another (their episodes in order)."""
        if len(parts) == 1:
            return parts[0]
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts], axis=1)  # noqa: E731
        return Rollout(cat("obs"), cat("actions"), cat("next_obs"), cat("rewards"), cat("valid"),
                       np.concatenate([p.episode_start for p in parts]), parts[0].tasks)

    def save(self, path: str) -> None:
        """Write to ``.npz`` (task parameters as a ``(E, dim)`` array with their names)."""
        names = list(self.tasks[0]) if self.tasks else []
        np.savez_compressed(path, obs=self.obs, actions=self.actions, next_obs=self.next_obs, rewards=self.rewards,
                            valid=self.valid, episode_start=self.episode_start, task_names=np.array(names),
                            tasks=np.array([[t[n] for n in names] for t in self.tasks]))


def collect(vec_env: gym.vector.VectorEnv, family: TaskFamily, policy: Policy | Controller, tasks: Sequence[Task],
            episodes: int = 1, seed: int | list[int] = 0, progress: bool = False) -> Rollout:
    """Run ``episodes`` full episodes on every sub-env, sub-env ``i`` on ``tasks[i]``.

    ``policy`` is a function of the observations, or a :class:`Controller` that is reset at every
    episode start and shown every transition (with the command the env actually sent).
    """
    controller = policy if hasattr(policy, "observe") else _Stateless(policy)
    set_tasks(vec_env, tasks)
    steps = family.spec.episode_steps
    num = vec_env.num_envs
    total = episodes * steps
    obs_dim = vec_env.single_observation_space.shape[0]
    act_dim = vec_env.single_action_space.shape[0]
    out = Rollout(
        obs=np.zeros((num, total, obs_dim)), actions=np.zeros((num, total, act_dim)),
        next_obs=np.zeros((num, total, obs_dim)), rewards=np.zeros((num, total)),
        valid=np.ones((num, total), dtype=bool), episode_start=np.zeros(total, dtype=bool),
        tasks=[dict(t) for t in tasks],
    )
    # disable=None: bars on a terminal only, so logs and CI output stay readable.
    bar = tqdm(total=total * num, unit="step", desc=f"{family.name} x{num}", disable=None if progress else True)
    t = 0
    for episode in range(episodes):
        obs, _ = vec_env.reset(seed=seed if episode == 0 else None)
        controller.reset()
        alive = np.ones(num, dtype=bool)
        out.episode_start[t] = True
        for _ in range(steps):
            action = np.asarray(controller.act(obs), dtype=np.float64)
            next_obs, reward, terminated, _, info = vec_env.step(action)
            sent = info["sent_action"]
            controller.observe(obs, sent, next_obs)
            out.obs[:, t], out.actions[:, t], out.next_obs[:, t], out.rewards[:, t] = obs, sent, next_obs, reward
            out.valid[:, t] = alive
            alive &= ~terminated
            obs = next_obs
            t += 1
            bar.update(num)
    bar.close()
    return out
