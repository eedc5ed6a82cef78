"""PEARL's task-aware replay: per task an RL buffer and an encoder buffer, and the batches drawn from them.

Each training task has two buffers (:class:`TaskReplay`):

- an **RL buffer** with everything ever collected on the task (off-policy SAC trains on it);
- an **encoder buffer** with only the data of the task's *current* round of exploration: cleared
  by :meth:`TaskReplay.begin_exploration` before each round, filled by the episodes the runner
  marks ``encoder=True``. Context for the encoder is drawn from it alone, so at training time the
  encoder sees what it will see at meta-test time: transitions the current policy collected under
  the current belief, never data of another task and never stale replay. Drawing context from the
  wrong place is a known reference bug: garage's PEARL (issue rlworkgroup/garage#1365, fixed in
  PR #1374) built its meta-test context from replay instead of the fresh exploration on the test
  task, and on HalfCheetah-Dir every evaluation ran one way. Here the meta-test context is what
  :class:`~metarl_robot.algos.pearl_controller.PEARLController` itself observed since its context
  was cleared, nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metarl_robot.envs.rollout import Rollout


@dataclass
class Context:
    """Context transitions ``(B, K, ·)``, rewards ``(B, K)``, and a ``(B, K)`` 1/0 mask (K may be 0)."""

    obs: np.ndarray
    act: np.ndarray
    reward: np.ndarray
    next_obs: np.ndarray
    mask: np.ndarray

    @classmethod
    def empty(cls, batch: int, obs_dim: int, act_dim: int) -> Context:
        """No transitions at all: its posterior is the prior."""
        return cls(np.zeros((batch, 0, obs_dim), np.float32), np.zeros((batch, 0, act_dim), np.float32),
                   np.zeros((batch, 0), np.float32), np.zeros((batch, 0, obs_dim), np.float32),
                   np.zeros((batch, 0), np.float32))


@dataclass
class TransitionBatch:
    """RL minibatches of ``T`` tasks: ``(T, n, ·)`` arrays and ``(T, n)`` rewards and terminal flags."""

    obs: np.ndarray
    act: np.ndarray
    reward: np.ndarray
    next_obs: np.ndarray
    done: np.ndarray



_FIELDS = ("obs", "act", "reward", "next_obs", "done")


class TransitionStore:
    """The transitions of one task, oldest first, at most ``capacity`` (the oldest are dropped)."""

    def __init__(self, obs_dim: int, act_dim: int, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.obs = np.zeros((0, obs_dim), np.float32)
        self.act = np.zeros((0, act_dim), np.float32)
        self.reward = np.zeros(0, np.float32)
        self.next_obs = np.zeros((0, obs_dim), np.float32)
        self.done = np.zeros(0, np.float32)

    def __len__(self) -> int:
        return len(self.reward)

    def add(self, obs: np.ndarray, act: np.ndarray, reward: np.ndarray, next_obs: np.ndarray,
            done: np.ndarray) -> None:
        new = {"obs": obs, "act": act, "reward": reward, "next_obs": next_obs, "done": done}
        n = len(reward)
        for name, value in new.items():
            old = getattr(self, name)
            value = np.asarray(value, dtype=np.float32)
            if value.shape != (n, *old.shape[1:]):
                raise ValueError(f"{name} must have shape {(n, *old.shape[1:])}, got {value.shape}")
            setattr(self, name, np.concatenate([old, value])[-self.capacity:])

    def clear(self) -> None:
        for name in _FIELDS:
            setattr(self, name, getattr(self, name)[:0])

    def sample(self, rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        """``n`` transitions drawn uniformly with replacement."""
        if not len(self):
            raise ValueError("cannot sample from an empty store")
        idx = rng.integers(0, len(self), n)
        return {name: getattr(self, name)[idx] for name in _FIELDS}


class TaskReplay:
    """Per task: an RL buffer (all its data) and an encoder buffer (its current exploration only).

    See the module docstring for why the two are kept apart. Tasks are keyed by an integer id the
    runner chooses (e.g. a running count of tasks drawn); ``task_vector`` is kept for diagnostics.
    """

    def __init__(self, obs_dim: int, act_dim: int, rl_capacity: int = 1_000_000, encoder_capacity: int = 100_000,
                 max_tasks: int = 0) -> None:
        self.obs_dim, self.act_dim = obs_dim, act_dim
        self.rl_capacity, self.encoder_capacity, self.max_tasks = rl_capacity, encoder_capacity, max_tasks
        self.rl: dict[int, TransitionStore] = {}
        """Task id → all its transitions (what SAC trains on)."""
        self.encoder: dict[int, TransitionStore] = {}
        """Task id → the transitions of its current exploration round (the only source of context)."""
        self.task_vectors: dict[int, np.ndarray] = {}
        """Task id → its parameter vector, if the runner gave one."""

    def __len__(self) -> int:
        return len(self.rl)

    def _ensure(self, task_id: int, task_vector: np.ndarray | None) -> None:
        task_id = int(task_id)
        if task_id not in self.rl:
            self.rl[task_id] = TransitionStore(self.obs_dim, self.act_dim, self.rl_capacity)
            self.encoder[task_id] = TransitionStore(self.obs_dim, self.act_dim, self.encoder_capacity)
            if self.max_tasks and len(self.rl) > self.max_tasks:
                oldest = next(iter(self.rl))
                del self.rl[oldest], self.encoder[oldest]
                self.task_vectors.pop(oldest, None)
        if task_vector is not None:
            self.task_vectors[task_id] = np.asarray(task_vector, dtype=np.float64)

    def begin_exploration(self, task_id: int, task_vector: np.ndarray | None = None) -> None:
        """Start a new exploration round on a task: its encoder buffer is emptied (its RL buffer is kept)."""
        self._ensure(task_id, task_vector)
        self.encoder[int(task_id)].clear()

    def add(self, task_id: int, obs: np.ndarray, act: np.ndarray, reward: np.ndarray, next_obs: np.ndarray,
            done: np.ndarray, encoder: bool) -> None:
        """Flat ``(N, ·)`` transitions of one task: always to its RL buffer, also to its encoder buffer if
        ``encoder`` (exploration data; PEARL's extra posterior-conditioned RL episodes pass False)."""
        self._ensure(task_id, None)
        self.rl[int(task_id)].add(obs, act, reward, next_obs, done)
        if encoder:
            self.encoder[int(task_id)].add(obs, act, reward, next_obs, done)

    def add_rollout(self, task_ids: Sequence[int], rollout: Rollout, encoder: bool,
                    task_vectors: np.ndarray | None = None) -> dict[str, int]:
        """Row ``i`` of ``rollout`` belongs to task ``task_ids[i]``. Only valid steps are stored; a step
        that ended its episode early (physics diverged) is terminal, the last step of an episode is a
        time limit (bootstrapped). Steps with non-finite numbers are left out and counted."""
        if len(task_ids) != rollout.obs.shape[0]:
            raise ValueError(f"got {len(task_ids)} task ids for a rollout of {rollout.obs.shape[0]} sub-envs")
        valid = rollout.valid
        next_valid = np.concatenate([valid[:, 1:], np.zeros_like(valid[:, :1])], axis=1)
        next_is_start = np.concatenate([rollout.episode_start[1:], [True]])
        done = valid & ~next_valid & ~next_is_start[None]
        finite = (np.isfinite(rollout.obs).all(-1) & np.isfinite(rollout.actions).all(-1)
                  & np.isfinite(rollout.next_obs).all(-1) & np.isfinite(rollout.rewards))
        keep = valid & finite
        for row, task_id in enumerate(task_ids):
            self._ensure(task_id, None if task_vectors is None else task_vectors[row])
            k = keep[row]
            self.add(task_id, rollout.obs[row, k], rollout.actions[row, k], rollout.rewards[row, k],
                     rollout.next_obs[row, k], done[row, k], encoder)
        return {"added": int(keep.sum()), "dropped_non_finite": int((valid & ~finite).sum())}

    def trainable_tasks(self) -> np.ndarray:
        """Ids of the tasks with both RL data and a current exploration context."""
        return np.array([t for t in self.rl if len(self.rl[t]) and len(self.encoder[t])], dtype=np.int64)

    def sample_batch(self, rng: np.random.Generator, task_ids: Sequence[int], n: int) -> TransitionBatch:
        """``n`` RL transitions per task, each from that task's RL buffer."""
        parts = [self.rl[int(t)].sample(rng, n) for t in task_ids]
        return TransitionBatch(**{name: np.stack([p[name] for p in parts]) for name in _FIELDS})

    def sample_context(self, rng: np.random.Generator, task_ids: Sequence[int], n: int,
                       min_size: int | None = None) -> Context:
        """``n`` context slots per task, drawn from that task's encoder buffer only. With ``min_size``,
        each task's first ``U(min_size, n)`` slots are filled and the rest masked out."""
        parts = []
        for t in task_ids:
            store = self.encoder[int(t)]
            if not len(store):
                raise ValueError(f"task {int(t)} has no exploration data in its encoder buffer; "
                                 "collect with encoder=True after begin_exploration first")
            parts.append(store.sample(rng, n))
        sizes = np.full(len(parts), n) if min_size is None else rng.integers(min_size, n + 1, len(parts))
        mask = (np.arange(n)[None] < sizes[:, None]).astype(np.float32)
        return Context(*(np.stack([p[name] for p in parts]) for name in ("obs", "act", "reward", "next_obs")),
                       mask=mask)

    def training_arrays(self, rng: np.random.Generator, most: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Up to ``most`` RL transitions drawn over all tasks (for fitting normalisers): obs, reward, next_obs."""
        obs = np.concatenate([s.obs for s in self.rl.values()])
        reward = np.concatenate([s.reward for s in self.rl.values()])
        next_obs = np.concatenate([s.next_obs for s in self.rl.values()])
        if len(reward) > most:
            idx = rng.choice(len(reward), most, replace=False)
            obs, reward, next_obs = obs[idx], reward[idx], next_obs[idx]
        return obs, reward, next_obs

    # ---- persistence (resume) -------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        arrays: dict[str, np.ndarray] = {
            "meta": np.array([self.obs_dim, self.act_dim, self.rl_capacity, self.encoder_capacity, self.max_tasks]),
            "task_ids": np.array(list(self.rl), dtype=np.int64),
        }
        for t in self.rl:
            for kind, stores in (("rl", self.rl), ("enc", self.encoder)):
                for name in _FIELDS:
                    arrays[f"{kind}_{t}_{name}"] = getattr(stores[t], name)
            if t in self.task_vectors:
                arrays[f"vec_{t}"] = self.task_vectors[t]
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> TaskReplay:
        data = np.load(path)
        obs_dim, act_dim, rl_cap, enc_cap, max_tasks = (int(v) for v in data["meta"])
        replay = cls(obs_dim, act_dim, rl_cap, enc_cap, max_tasks)
        for t in data["task_ids"].tolist():
            replay._ensure(t, data.get(f"vec_{t}"))
            for kind, stores in (("rl", replay.rl), ("enc", replay.encoder)):
                for name in _FIELDS:
                    setattr(stores[t], name, data[f"{kind}_{t}_{name}"])
        return replay
