"""PEARL: off-policy meta-RL with a probabilistic context encoder and a latent-conditioned SAC.

Read top to bottom: the config, the task-aware replay, the algorithm, the controller.

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
  :class:`PEARLController` itself observed since its context was cleared, nothing else.

:meth:`PEARL.update` takes gradient steps on meta-batches of tasks: per task a posterior
``q(z | c)`` from an encoder-buffer context, one reparameterised ``z`` shared by that task's RL
minibatch; the critics' Bellman loss plus ``kl_weight * KL(q(z | c) || N(0, I))`` trains the
critics *and* the encoder; the actor and the entropy temperature train on a detached ``z`` (as in
the paper: the actor's gradient would teach the encoder to please the policy, not to identify the
task). The context transition is ``(obs, action, reward, next_obs)``: the next observation is what
reveals a dynamics shift (the reference code left it out at first, see katerakelly/oyster#4).

Differences from the reference code, each deliberate: the posterior includes the prior N(0, I) as
a factor (an empty context is exactly the prior); SAC with twin target critics instead of the
value network of SAC v1; automatic entropy tuning by default (the reference fixes alpha = 1 and
scales rewards by 5); the KL is summed over the meta-batch's tasks as in the reference.

Seed: Rakelly et al. 2019, "Efficient Off-Policy Meta-Reinforcement Learning via Probabilistic
Context Variables".
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F

from metarl_robot.envs.rollout import Rollout, collect
from metarl_robot.models.pearl import PEARLAgent, PEARLNetConfig, kl_to_standard_normal
from metarl_robot.spec.family import Task, TaskFamily
from metarl_robot.spec.rewards import RewardFunction, get_reward
from metarl_robot.spec.robot import RobotSpec


@dataclass
class PEARLConfig:
    """Optimisation and replay settings of PEARL."""

    actor_lr: float = 3e-4
    """Adam step size of the actor."""
    critic_lr: float = 3e-4
    """Adam step size of the twin critics."""
    encoder_lr: float = 3e-4
    """Adam step size of the context encoder."""
    alpha_lr: float = 3e-4
    """Adam step size of the log entropy temperature (automatic entropy tuning only)."""
    discount: float = 0.99
    """Discount factor of the Bellman target."""
    target_tau: float = 0.005
    """Polyak rate of the target critics per gradient step."""
    reward_scale: float = 1.0
    """Rewards are multiplied by this in the Bellman target (the reference uses 5 with a fixed alpha of 1)."""
    auto_entropy: bool = True
    """Tune the entropy temperature alpha towards ``target_entropy``; False keeps alpha at ``init_alpha``."""
    init_alpha: float = 1.0
    """Initial (or, without tuning, fixed) entropy temperature."""
    target_entropy: float | None = None
    """Target policy entropy for tuning; None = -action_dim (the SAC default)."""
    kl_weight: float = 0.1
    """β: weight of KL(q(z|c) || N(0, I)), summed over the meta-batch's tasks (the reference's 0.1)."""
    meta_batch: int = 16
    """Tasks per gradient step (drawn with replacement when fewer tasks have data)."""
    batch_size: int = 256
    """RL transitions per task per gradient step."""
    context_batch: int = 100
    """Context transitions per task per gradient step (the most the encoder sees in training)."""
    context_size_min: int | None = None
    """If set, each task's context size is drawn uniformly from context_size_min..context_batch (masked),
    so the encoder also trains on the small contexts an online controller starts with; None = always
    context_batch (the reference)."""
    grad_steps: int = 1000
    """Gradient steps per :meth:`PEARL.update` call (per training iteration)."""
    grad_clip: float = 0.0
    """Global gradient-norm clip per network; 0 = no clipping (the reference does not clip)."""
    replay_capacity: int = 1_000_000
    """Transitions kept per task in its RL buffer (oldest dropped first)."""
    encoder_capacity: int = 100_000
    """Transitions kept per task in its encoder buffer (cleared at each exploration round anyway)."""
    max_tasks: int = 0
    """Most tasks kept in the replay (the oldest task's buffers are dropped first); 0 = no limit."""
    normalizer_sample: int = 100_000
    """Most replay transitions the input normalisers are fitted on at each update."""

    def validate(self) -> None:
        """Refuse out-of-range settings, naming the field."""
        positive = ("actor_lr", "critic_lr", "encoder_lr", "alpha_lr", "init_alpha", "reward_scale", "meta_batch",
                    "batch_size", "context_batch", "replay_capacity", "encoder_capacity", "normalizer_sample")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"PEARLConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("grad_steps", "max_tasks", "kl_weight", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"PEARLConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= self.discount < 1.0:
            raise ValueError(f"PEARLConfig.discount must be in [0, 1), got {self.discount!r}")
        if not 0.0 < self.target_tau <= 1.0:
            raise ValueError(f"PEARLConfig.target_tau must be in (0, 1], got {self.target_tau!r}")
        if self.context_size_min is not None and not 1 <= self.context_size_min <= self.context_batch:
            raise ValueError(f"PEARLConfig.context_size_min must be None or in 1..context_batch "
                             f"({self.context_batch}), got {self.context_size_min!r}")


# ---- data ----------------------------------------------------------------------------------------
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


@dataclass
class Posterior:
    """Gaussian belief over z per row: mean and variance ``(B, d)``."""

    mean: np.ndarray
    var: np.ndarray


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


# ---- the algorithm -------------------------------------------------------------------------------
def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float32)


class PEARL:
    """Holds the agent, its optimisers and the math; the runner owns the loop and the data."""

    def __init__(self, robot: RobotSpec, net_cfg: PEARLNetConfig, cfg: PEARLConfig, seed: int = 0) -> None:
        cfg.validate()
        torch.manual_seed(seed)
        self.robot, self.net_cfg, self.cfg = robot, net_cfg, cfg
        self.agent = PEARLAgent(robot.obs_dim, robot.action_dim, robot.obs_periodic, robot.action_low,
                                robot.action_high, net_cfg)
        """Encoder, actor, critics and target critics being trained."""
        self.latent_dim = net_cfg.latent_dim
        self.actor_optimizer = torch.optim.Adam(self.agent.actor.parameters(), lr=cfg.actor_lr)
        self.critic_optimizer = torch.optim.Adam(self.agent.critic.parameters(), lr=cfg.critic_lr)
        self.encoder_optimizer = torch.optim.Adam(self.agent.encoder.parameters(), lr=cfg.encoder_lr)
        self.log_alpha = torch.tensor(float(np.log(cfg.init_alpha)), requires_grad=cfg.auto_entropy)
        """Log of the entropy temperature (a trained scalar with automatic entropy tuning)."""
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=cfg.alpha_lr) if cfg.auto_entropy else None
        self.target_entropy = -float(robot.action_dim) if cfg.target_entropy is None else cfg.target_entropy
        self.rng = np.random.default_rng(seed)
        self.normalizers_fitted = False
        """False until the first :meth:`update`: an untrained agent sees unnormalised inputs (mean 0, std 1)."""
        self.agent.eval()

    @property
    def alpha(self) -> float:
        return float(self.log_alpha.detach().exp())

    # ---- training -------------------------------------------------------------------------------
    def update(self, replay: TaskReplay, grad_steps: int | None = None) -> dict[str, float]:
        """Refit the input normalisers to the replay, then take ``grad_steps`` (default
        ``cfg.grad_steps``) gradient steps on meta-batches of tasks. Returns the mean of each metric."""
        tasks = replay.trainable_tasks()
        if not len(tasks):
            raise ValueError("no task has both RL data and exploration (encoder) data; nothing to train on")
        self.agent.inputs.fit(*replay.training_arrays(self.rng, self.cfg.normalizer_sample))
        self.normalizers_fitted = True
        steps = self.cfg.grad_steps if grad_steps is None else grad_steps
        cfg = self.cfg
        self.agent.train()
        totals: dict[str, float] = {}
        for _ in range(steps):
            ids = self.rng.choice(tasks, size=cfg.meta_batch, replace=len(tasks) < cfg.meta_batch)
            context = replay.sample_context(self.rng, ids, cfg.context_batch, cfg.context_size_min)
            batch = replay.sample_batch(self.rng, ids, cfg.batch_size)
            for k, v in self.train_step(context, batch).items():
                totals[k] = totals.get(k, 0.0) + v
        self.agent.eval()
        return {k: v / steps for k, v in totals.items()} if steps else {}

    def posterior_tensors(self, context: Context) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable posterior mean and variance ``(B, d)`` of a numpy context."""
        return self.agent.posterior(_tensor(context.obs), _tensor(context.act), _tensor(context.reward),
                                    _tensor(context.next_obs), _tensor(context.mask))

    def critic_loss(self, batch: TransitionBatch, z: torch.Tensor) -> torch.Tensor:
        """Twin-critic Bellman loss on ``(T, n, ·)`` transitions, task ``t`` under ``z[t]`` (``(T, d)``).

        Gradients reach ``z`` (hence the encoder) through ``Q(s, a, z)``; the target is computed
        under a detached ``z`` with the target critics and the current actor."""
        t, n = batch.reward.shape
        z_rows = z.unsqueeze(1).expand(t, n, z.shape[-1])
        obs, act, next_obs = _tensor(batch.obs), _tensor(batch.act), _tensor(batch.next_obs)
        reward, done = _tensor(batch.reward), _tensor(batch.done)
        with torch.no_grad():
            next_act, next_log_prob = self.agent.sample_action(next_obs, z_rows.detach())
            next_q = torch.minimum(*self.agent.q_values(next_obs, next_act, z_rows.detach(), target=True))
            soft_value = next_q - self.log_alpha.exp() * next_log_prob
            target = self.cfg.reward_scale * reward + self.cfg.discount * (1.0 - done) * soft_value
        q1, q2 = self.agent.q_values(obs, act, z_rows)
        return F.mse_loss(q1, target) + F.mse_loss(q2, target)

    def actor_loss(self, obs: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SAC policy loss ``E[alpha log pi - min Q]`` and the log-densities. ``z`` is detached here, so
        the encoder never learns from the actor (the paper's choice)."""
        z = z.detach()
        action, log_prob = self.agent.sample_action(obs, z)
        q = torch.minimum(*self.agent.q_values(obs, action, z))
        return (self.log_alpha.exp().detach() * log_prob - q).mean(), log_prob

    def train_step(self, context: Context, batch: TransitionBatch) -> dict[str, float]:
        """One gradient step on a meta-batch: critics + encoder, then actor, then alpha, then targets."""
        cfg = self.cfg
        mean, var = self.posterior_tensors(context)
        z = mean + var.sqrt() * torch.randn_like(mean)
        kl = kl_to_standard_normal(mean, var).sum()
        critic_loss = self.critic_loss(batch, z)
        self.critic_optimizer.zero_grad()
        self.encoder_optimizer.zero_grad()
        (critic_loss + cfg.kl_weight * kl).backward()
        self._clip(self.agent.critic.parameters(), self.agent.encoder.parameters())
        self.critic_optimizer.step()
        self.encoder_optimizer.step()

        t, n = batch.reward.shape
        obs = _tensor(batch.obs)
        actor_loss, log_prob = self.actor_loss(obs, z.unsqueeze(1).expand(t, n, z.shape[-1]))
        self.actor_optimizer.zero_grad()
        actor_loss.backward()
        self._clip(self.agent.actor.parameters())
        self.actor_optimizer.step()

        metrics = {"critic_loss": float(critic_loss.detach()), "kl": float(kl.detach()) / t,
                   "actor_loss": float(actor_loss.detach()), "entropy": -float(log_prob.detach().mean()),
                   "z_mean_abs": float(mean.detach().abs().mean()), "z_var": float(var.detach().mean())}
        if self.alpha_optimizer is not None:
            alpha_loss = -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()
            self.alpha_optimizer.zero_grad()
            alpha_loss.backward()
            self.alpha_optimizer.step()
        metrics["alpha"] = self.alpha
        self.agent.update_target(cfg.target_tau)
        return metrics

    def _clip(self, *params) -> None:
        if self.cfg.grad_clip:
            for group in params:
                torch.nn.utils.clip_grad_norm_(list(group), self.cfg.grad_clip)

    # ---- inference (numpy) ----------------------------------------------------------------------
    @torch.no_grad()
    def infer_posterior(self, context: Context) -> Posterior:
        """The belief ``q(z | context)`` per row; the prior N(0, I) for an empty context."""
        mean, var = self.posterior_tensors(context)
        return Posterior(mean.numpy(), var.numpy())

    def prior(self, batch: int) -> Posterior:
        """N(0, I) for ``batch`` rows."""
        return Posterior(np.zeros((batch, self.latent_dim), np.float32), np.ones((batch, self.latent_dim), np.float32))

    @staticmethod
    def sample_z(posterior: Posterior, rng: np.random.Generator) -> np.ndarray:
        """One ``z`` per row drawn from the posterior (posterior sampling: explore as if that task were true)."""
        return (posterior.mean + np.sqrt(posterior.var) * rng.standard_normal(posterior.mean.shape)).astype(np.float32)

    @torch.no_grad()
    def transition_factors(self, obs: np.ndarray, act: np.ndarray, reward: np.ndarray, next_obs: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray]:
        """Each transition's Gaussian factor (mean, variance) over z: ``(..., ·)`` → ``(..., d)`` each."""
        mean, var = self.agent.transition_factors(_tensor(obs), _tensor(act), _tensor(reward), _tensor(next_obs))
        return mean.numpy(), var.numpy()

    @torch.no_grad()
    def act(self, obs: np.ndarray, z: np.ndarray, deterministic: bool, generator: torch.Generator | None = None
            ) -> np.ndarray:
        """Actions ``(B, a)`` in the box: ``box(tanh(mean))`` if ``deterministic``, else a policy sample."""
        obs_t, z_t = _tensor(obs), _tensor(z)
        if deterministic:
            return self.agent.deterministic_action(obs_t, z_t).numpy().astype(np.float64)
        return self.agent.sample_action(obs_t, z_t, generator)[0].numpy().astype(np.float64)

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"agent": self.agent.state_dict(), "actor_optimizer": self.actor_optimizer.state_dict(),
                "critic_optimizer": self.critic_optimizer.state_dict(),
                "encoder_optimizer": self.encoder_optimizer.state_dict(),
                "alpha_optimizer": None if self.alpha_optimizer is None else self.alpha_optimizer.state_dict(),
                "log_alpha": float(self.log_alpha.detach()), "normalizers_fitted": self.normalizers_fitted,
                "rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict) -> None:
        self.agent.load_state_dict(state["agent"])
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.encoder_optimizer.load_state_dict(state["encoder_optimizer"])
        if (self.alpha_optimizer is None) != (state["alpha_optimizer"] is None):
            raise ValueError("checkpoint and config disagree on auto_entropy; load it with the config it was "
                             "saved with")
        if self.alpha_optimizer is not None:
            self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])
        with torch.no_grad():
            self.log_alpha.fill_(state["log_alpha"])
        self.normalizers_fitted = state["normalizers_fitted"]
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        self.agent.eval()


# ---- collection and evaluation -------------------------------------------------------------------
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

    def __init__(self, algo: PEARL, batch: int, deterministic: bool = False, reward_fn: RewardFn | None = None,
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


# ---- one exploration round (PEARL's data collection for a task) ----------------------------------
@dataclass
class CollectionSchedule:
    """Episodes per task in one exploration round (the reference counts steps; one episode = episode_steps)."""

    prior_episodes: int = 1
    """Episodes with z drawn from the prior at each episode start; to the encoder and RL buffers."""
    posterior_episodes: int = 0
    """Episodes with z sampled from the posterior of the round so far; to the encoder and RL buffers."""
    extra_rl_episodes: int = 1
    """Episodes with z sampled from the posterior of the round so far; to the RL buffer only (the
    reference's ``num_extra_rl_steps_posterior``: policy data under inferred beliefs, kept out of the
    context so the encoder trains on the same kind of context it gets at meta-test time)."""

    def validate(self) -> None:
        for name in ("prior_episodes", "posterior_episodes", "extra_rl_episodes"):
            if getattr(self, name) < 0:
                raise ValueError(f"CollectionSchedule.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.prior_episodes + self.posterior_episodes == 0:
            raise ValueError("CollectionSchedule: prior_episodes + posterior_episodes must be >= 1, or the round "
                             "leaves the encoder buffer empty")


def explore_tasks(algo: PEARL, replay: TaskReplay, envs: gym.vector.VectorEnv, family: TaskFamily,
                  tasks: Sequence[Task], task_ids: Sequence[int], schedule: CollectionSchedule,
                  seed: int | Sequence[int]) -> dict[str, Rollout]:
    """One exploration round on ``tasks`` (sub-env ``i`` runs ``tasks[i]``, stored as ``task_ids[i]``).

    Each task's encoder buffer is emptied first, then: ``prior_episodes`` with z from the prior,
    ``posterior_episodes`` and ``extra_rl_episodes`` with z resampled at each episode start from the
    posterior of everything this round has collected so far on the task. Every transition goes to
    the RL buffer; only prior and posterior episodes go to the encoder buffer. Actions are sampled
    from the policy (exploration). Returns the rollout of each non-empty phase by name
    (``prior``, ``posterior``, ``extra_rl``) for logging.

    ``seed``: an int resets sub-env ``i`` with ``seed + i`` (``seed + 1 + i`` and ``seed + 2 + i`` for the
    posterior and RL-only phases); a list gives each sub-env its own reset seed, and ``[s] * n`` starts
    every task's first episode of each phase from the same state (``s``, ``s + 1``, ``s + 2``), as a gap
    measurement against an oracle episode from that state needs.
    """
    schedule.validate()
    if len(tasks) != envs.num_envs or len(task_ids) != envs.num_envs:
        raise ValueError(f"got {len(tasks)} tasks and {len(task_ids)} ids for {envs.num_envs} sub-envs")
    params = {n: np.array([t[n] for t in tasks]) for n in family.reward_names}
    reward_fn = family_reward_fn(get_reward(family.spec.reward), algo.robot, params)
    for task_id, task in zip(task_ids, tasks, strict=True):
        replay.begin_exploration(task_id, family.to_vector(task))
    one_seed = isinstance(seed, int | np.integer)
    if not one_seed and len(seed) != envs.num_envs:
        raise ValueError(f"got {len(seed)} reset seeds for {envs.num_envs} sub-envs")

    def phase_seed(k: int) -> int | list[int]:
        return int(seed) + k if one_seed else [int(s) + k for s in seed]
    policy_seed = int(seed) if one_seed else int(seed[0])
    out: dict[str, Rollout] = {}
    if schedule.prior_episodes:
        prior = PEARLController(algo, envs.num_envs, reward_fn=reward_fn, keep_context=False, seed=policy_seed)
        out["prior"] = collect(envs, family, prior, tasks, schedule.prior_episodes, seed=phase_seed(0))
        replay.add_rollout(task_ids, out["prior"], encoder=True)
    # Posterior phases: one controller that keeps its context, primed with the prior episodes.
    posterior = PEARLController(algo, envs.num_envs, reward_fn=reward_fn, keep_context=True, seed=policy_seed + 1)
    if "prior" in out:
        r = out["prior"]
        posterior.absorb(r.obs, r.actions, r.rewards, r.next_obs, r.valid)
    for name, episodes, to_encoder, k in (("posterior", schedule.posterior_episodes, True, 1),
                                          ("extra_rl", schedule.extra_rl_episodes, False, 2)):
        if episodes:
            out[name] = collect(envs, family, posterior, tasks, episodes, seed=phase_seed(k))
            replay.add_rollout(task_ids, out[name], encoder=to_encoder)
    return out
