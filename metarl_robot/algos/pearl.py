"""PEARL: off-policy meta-RL with a probabilistic context encoder and a latent-conditioned SAC.

Read top to bottom: the configs, an iteration's exploration rounds, then the algorithm. Its parts
live in their own modules: the task-aware replay (:mod:`~metarl_robot.algos.task_replay`: per task
an RL buffer and an encoder buffer, and why the two are kept apart), the controller and its belief
(:mod:`~metarl_robot.algos.pearl_controller`) and one exploration round per task
(:mod:`~metarl_robot.algos.pearl_exploration`).

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

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from metarl_robot.algos.base import Algorithm, Collection, IterationReport
from metarl_robot.algos.pearl_controller import Posterior
from metarl_robot.algos.pearl_exploration import CollectionSchedule, explore_tasks
from metarl_robot.algos.task_replay import Context, TaskReplay, TransitionBatch
from metarl_robot.envs.rollout import Rollout, make_vector_env
from metarl_robot.models.pearl import PEARLAgent, PEARLNetConfig, kl_to_standard_normal
from metarl_robot.runtime.planner import PlannerConfig
from metarl_robot.spec.family import Task
from metarl_robot.spec.robot import RobotSpec
from metarl_robot.spec.schema import SpecError
from metarl_robot.train.loop_config import LoopConfig, RunConfig


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


@dataclass
class PEARLTrainConfig(RunConfig):
    """Everything a PEARL training run needs (docs/pearl.md); ``metarl train <this.yaml>``."""

    algo: Literal["pearl"]
    """Learning algorithm: a context-inference policy (PEARL)."""
    pearl_net: PEARLNetConfig = field(default_factory=PEARLNetConfig)
    """Sizes of the encoder, the actor and the critics."""
    pearl: PEARLConfig = field(default_factory=PEARLConfig)
    """Optimisation and replay settings."""
    pearl_schedule: CollectionSchedule = field(default_factory=CollectionSchedule)
    """Episodes of each task's exploration round: prior, posterior and RL-only."""
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    """The oracle's MPC (through the true physics), which grades the adversarial sampler and ``metarl eval``."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """The outer loop."""

    def validate(self, where: str) -> None:
        self._validate_shared(where, [])
        for section, obj in (("pearl", self.pearl), ("pearl_schedule", self.pearl_schedule)):
            try:
                obj.validate()
            except ValueError as exc:  # "PEARLConfig.meta_batch must be > 0, ..." -> field pearl.meta_batch
                named = re.match(r"\w+\.(\w+)", str(exc))
                raise SpecError(where, f"{section}.{named.group(1)}" if named else section, str(exc)) from exc
        net = self.pearl_net
        for name in ("latent_dim", "hidden", "layers", "encoder_hidden", "encoder_layers"):
            if getattr(net, name) < 1:
                raise SpecError(where, f"pearl_net.{name}", f"must be >= 1, got {getattr(net, name)}")
        if not net.min_factor_var > 0:
            raise SpecError(where, "pearl_net.min_factor_var", f"must be > 0, got {net.min_factor_var}")
        if not net.log_std_min < net.log_std_max:
            raise SpecError(where, "pearl_net.log_std_min", f"must be < log_std_max ({net.log_std_max}), got "
                            f"{net.log_std_min}")
        if self.loop.task_sampler == "adversarial" and \
                self.pearl_schedule.posterior_episodes + self.pearl_schedule.extra_rl_episodes < 1:
            raise SpecError(where, "pearl_schedule", "the adversarial sampler grades each candidate's first "
                            "episode under the posterior: posterior_episodes + extra_rl_episodes must be >= 1")


# ---- an iteration's exploration rounds -----------------------------------------------------------
@dataclass
class ExplorationRounds(Collection):
    """Each task's exploration round, by phase (``prior``, ``posterior``, ``extra_rl``; one row per task)."""

    rounds: dict[str, Rollout] = field(default_factory=dict)
    """Phase → its rollout (the phases the schedule runs)."""

    def take_rows(self, index: np.ndarray) -> dict[str, Any]:
        return {"rounds": {name: rollout.take(index) for name, rollout in self.rounds.items()}}


# ---- the algorithm -------------------------------------------------------------------------------
def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float32)


class PEARL(Algorithm):
    """Holds the agent, its optimisers, its task replay and the math; the runner owns the loop."""

    name = "pearl"
    config_class = PEARLTrainConfig
    sections = ("pearl_net", "pearl", "pearl_schedule")
    bundle_kind = "context_policy"
    initial_sampler = "initial"
    exporters: ClassVar[dict[str, str]] = {"context_policy": "metarl_robot.export.bundle_writer:export_context_policy"}
    store_file = "replay.npz"

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
        self.replay = TaskReplay(robot.obs_dim, robot.action_dim, cfg.replay_capacity, cfg.encoder_capacity,
                                 cfg.max_tasks)
        """Every trained task's RL and encoder buffers (``replay.npz``)."""
        self.next_task_id = 0
        """The id the next stored task gets (a running count; tasks.jsonl maps ids to tasks)."""
        self.episodes_collected = 0
        """Training episodes stored so far (all phases of every kept exploration round)."""
        self.agent.eval()

    @classmethod
    def create(cls, cfg: PEARLTrainConfig, robot: RobotSpec) -> PEARL:
        return cls(robot, cfg.pearl_net, cfg.pearl, cfg.seed)

    @property
    def alpha(self) -> float:
        return float(self.log_alpha.detach().exp())

    # ---- collection -------------------------------------------------------------------------------
    def collect(self, tasks: list[Task], iteration: int, seed: int, starts: list[int] | None = None
                ) -> ExplorationRounds:
        """One exploration round per task (:func:`explore_tasks`, as ``pearl_schedule`` says) into a scratch
        replay, ``tasks_per_iteration`` sub-envs at a time; :meth:`store` moves the kept rounds to the replay.

        With ``starts``, a task's phases first reset with ``s``, ``s + 1``, ``s + 2``; the graded episode is
        the first one under the posterior of the round so far (after the prior episodes)."""
        run, schedule = self.run_cfg, self.run_cfg.pearl_schedule
        scratch = TaskReplay(self.robot.obs_dim, self.robot.action_dim, self.cfg.replay_capacity,
                             self.cfg.encoder_capacity)
        num = min(run.loop.tasks_per_iteration, len(tasks))
        envs: dict[int, Any] = {}
        parts: list[dict[str, Rollout]] = []
        try:
            for start in range(0, len(tasks), num):
                chunk = tasks[start:start + num]
                if len(chunk) not in envs:  # a smaller last chunk gets its own envs: no padded duplicates
                    envs[len(chunk)] = make_vector_env(self.family, len(chunk), run.loop.vector)
                chunk_seed = seed + start if starts is None else starts[start:start + num]
                parts.append(explore_tasks(self, scratch, envs[len(chunk)], self.family, chunk,
                                           list(range(start, start + len(chunk))), schedule, seed=chunk_seed))
        finally:
            for env in envs.values():
                env.close()
        rounds = {name: Rollout.concatenate([p[name] for p in parts]) for name in parts[0]}
        graded_phase = "posterior" if schedule.posterior_episodes else "extra_rl"
        graded = rounds[graded_phase].episode_returns()[:, 0] if graded_phase in rounds \
            else np.full(len(tasks), np.nan)  # only prior episodes: nothing to grade (validation refuses grading)
        return ExplorationRounds(
            graded, episodes_per_task=schedule.prior_episodes + schedule.posterior_episodes
            + schedule.extra_rl_episodes, graded_start_offset=1 if graded_phase == "posterior" else 2,
            grading_info={"graded_phase": graded_phase}, rounds=rounds)

    def store(self, tasks: list[Task], collection: ExplorationRounds) -> dict[str, Any]:
        """Each task under a new id, its round stored as :func:`explore_tasks` stores one."""
        ids = list(range(self.next_task_id, self.next_task_id + len(tasks)))
        self.next_task_id += len(tasks)
        for task_id, task in zip(ids, tasks, strict=True):
            self.replay.begin_exploration(task_id, self.family.to_vector(task))
        for name, rollout in collection.rounds.items():
            self.replay.add_rollout(ids, rollout, encoder=name != "extra_rl")
        self.episodes_collected += sum(r.episode_returns().size for r in collection.rounds.values())
        return {"task_ids": ids}

    def report(self, iteration: int, collection: ExplorationRounds, fit: dict[str, float],
               graded_return: float | None, counters: dict[str, float]) -> IterationReport:
        first = {name: float(np.mean(r.episode_returns()[:, 0])) for name, r in collection.rounds.items()}
        explore_return = first.get("prior", first.get("posterior", float("nan")))
        posterior_return = first.get("posterior", first.get("extra_rl", float("nan")))
        metrics = {
            "episode_return": explore_return, "posterior_return": posterior_return,
            "graded_episode_return": posterior_return if graded_return is None else graded_return,
            "tasks": float(len(self.replay)), "episodes": float(self.episodes_collected),
            "transitions": float(sum(len(store) for store in self.replay.rl.values())),
            **counters,
            **{f"fit_{k}": v for k, v in fit.items()},
        }
        line = (f"return {explore_return:.1f} exploring, {posterior_return:.1f} under the posterior, critic loss "
                f"{fit.get('critic_loss', float('nan')):.3g}, kl {fit.get('kl', float('nan')):.3g}")
        return IterationReport(metrics, line, {"post": f"{posterior_return:.1f}"})

    # ---- training -------------------------------------------------------------------------------
    def update(self, replay: TaskReplay | None = None, grad_steps: int | None = None) -> dict[str, float]:
        """Refit the input normalisers to the replay (by default its own), then take ``grad_steps`` (default
        ``cfg.grad_steps``) gradient steps on meta-batches of tasks. Returns the mean of each metric."""
        replay = self.replay if replay is None else replay
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

    def loop_state(self) -> dict[str, Any]:
        return {"next_task_id": self.next_task_id, "episodes_collected": self.episodes_collected}

    def load_loop_state(self, state: dict[str, Any]) -> None:
        self.next_task_id, self.episodes_collected = state["next_task_id"], state["episodes_collected"]

    def save_store(self, run_dir: Path) -> None:
        self.replay.save(run_dir / self.store_file)

    def load_store(self, run_dir: Path) -> None:
        self.replay = TaskReplay.load(run_dir / self.store_file)
