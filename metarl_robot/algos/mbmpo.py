"""MB-MPO (Clavera et al. 2018): a policy meta-learned in the imagination of a learned dynamics ensemble, so that one
vanilla policy-gradient step adapts it to any member, then adapted on the robot the same way from real episodes.

Read top to bottom: the configs, the imagined tasks, then the algorithm. Each iteration:

1. **Real data** (:meth:`MBMPO.collect`): random actions at iteration 0; afterwards, per task, ``inner.
   episodes_per_step`` (K, default 1) episodes of the meta-policy, one inner step on them pooled
   (:class:`~metarl_robot.runtime.meta_policy.MetaPolicyAdapter`, the robot's own numpy code), and one episode of the
   adapted policy (the graded one). All go into ``context_mbrl``'s buffer.
2. **Model** (:meth:`MBMPO.update`): ``context_mbrl``'s fit of the context-conditioned ensemble on all data.
3. **Meta-policy** (:meth:`MBMPO.meta_update`): ``meta_steps`` TRPO steps, each on fresh imagined rollouts. An
   imagined task is one ensemble member with the context of one stored real episode (and that episode's reward
   parameters): the paper's tasks are the members alone; conditioning each on a real episode's context also spreads
   the imagined dynamics over the family the data came from. Per task: rollouts of the meta-policy, one inner step
   on them (:func:`~metarl_robot.models.meta_policy.adapt`, the same arithmetic as the robot's numpy step), rollouts
   of the adapted policy; the outer objective is the adapted policies' importance-weighted advantage, maximised under
   a KL trust region (TRPO, as the paper's code: conjugate gradient on the Fisher-vector product, backtracking line
   search), differentiated through the inner step (second-order MAML).

What differs from the paper's code (jonasrothfuss/model_ensemble_meta_learning), and why: the ensemble is
``context_mbrl``'s (Gaussian heads, a context encoder) rather than 5 deterministic 512x512 MLPs; the Fisher-vector
product is exact (double backward) rather than finite differences; budgets (tasks, rollouts, horizon) are scaled to
one CPU core. docs/mbmpo.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from metarl_robot.algos.base import IterationReport
from metarl_robot.algos.context_mbrl import Collected, ContextMBRL, ContextMBRLConfig, TrainConfig
from metarl_robot.envs.rollout import Rollout, collect, make_vector_env
from metarl_robot.models.context_dynamics import ContextDynamicsConfig
from metarl_robot.models.meta_policy import (
    GaussianMLPPolicy,
    adapt,
    functional_log_prob,
    functional_mean,
    kl_divergence,
)
from metarl_robot.runtime.meta_policy import InnerStepConfig, InnerStepError, MetaPolicyAdapter
from metarl_robot.runtime.policy_gradient import advantages, feature_dim, policy_features, policy_mean, to_env_action
from metarl_robot.spec.family import Task
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import RobotSpec
from metarl_robot.spec.schema import SpecError


@dataclass
class MBMPOConfig:
    """The meta-policy, its inner step and its meta-optimisation (the paper's code's values in brackets)."""

    hidden: list[int] = field(default_factory=lambda: [32, 32])
    """Hidden layer widths of the Gaussian MLP policy, tanh after each [32, 32]."""
    init_std: float = 1.0
    """Initial standard deviation of the policy in normalised action units [1.0]."""
    inner: InnerStepConfig = field(default_factory=InnerStepConfig)
    """The inner step (step size, discount, baseline), taken the same way in imagination and on the robot; its
    ``episodes_per_step`` is the real collection's (and the exported bundle's): meta-policy episodes per task pooled
    for the step before the adapted episode (imagination pools ``rollouts_per_task`` rollouts anyway)."""
    meta_steps: int = 30
    """TRPO meta-steps per iteration, each on fresh imagined rollouts [30]."""
    imagined_tasks: int = 8
    """Imagined tasks per meta-step, spread evenly over the ensemble members [20 over 5 members]."""
    rollouts_per_task: int = 16
    """Imagined rollouts per task, for the inner step and again for the outer objective [50]."""
    imagined_horizon: int = 100
    """Steps of an imagined rollout [200, the paper's episode length]."""
    visited_start_fraction: float = 0.5
    """Fraction of imagined rollouts starting at states visited in stored episodes; the rest start where stored
    episodes started (the reset distribution) [0: env.reset() only]."""
    max_kl: float = 0.01
    """TRPO's trust region: mean KL between the adapted policies before and after the meta-step [0.01]."""
    cg_iterations: int = 10
    """Conjugate-gradient iterations solving for the natural gradient [10]."""
    cg_damping: float = 1e-5
    """Added to the Fisher-vector product (damping) [1e-5]."""
    backtrack_ratio: float = 0.8
    """Line-search shrink factor [0.8]."""
    max_backtracks: int = 15
    """Line-search steps before the meta-step is rejected [15]."""

    def validate(self, where: str) -> None:
        for name in ("meta_steps", "imagined_tasks", "rollouts_per_task", "imagined_horizon", "cg_iterations",
                     "max_backtracks"):
            if getattr(self, name) < 1:
                raise SpecError(where, f"mbmpo.{name}", f"must be >= 1, got {getattr(self, name)}")
        if not self.hidden or min(self.hidden) < 1:
            raise SpecError(where, "mbmpo.hidden", f"must be a non-empty list of widths >= 1, got {self.hidden}")
        for name in ("init_std", "max_kl"):
            if not getattr(self, name) > 0:
                raise SpecError(where, f"mbmpo.{name}", f"must be > 0, got {getattr(self, name)}")
        if not 0 < self.backtrack_ratio < 1:
            raise SpecError(where, "mbmpo.backtrack_ratio", f"must be in (0, 1), got {self.backtrack_ratio}")
        if not 0 <= self.visited_start_fraction <= 1:
            raise SpecError(where, "mbmpo.visited_start_fraction",
                            f"must be in [0, 1], got {self.visited_start_fraction}")
        try:
            self.inner.validate()
        except InnerStepError as exc:
            raise SpecError(where, f"mbmpo.inner.{exc.field}", str(exc)) from exc


@dataclass
class MBMPOTrainConfig(TrainConfig):
    """Everything an mbmpo training run needs: ``context_mbrl``'s model and its fit, and the ``mbmpo`` section;
    ``metarl train <this.yaml>``. ``planner`` is the oracle's MPC only (the adversary's grading, ``metarl eval``)."""

    algo: Literal["mbmpo"]
    """Learning algorithm: MB-MPO's meta-policy over the context ensemble."""
    mbmpo: MBMPOConfig = field(default_factory=MBMPOConfig)
    """The meta-policy and its optimisation."""

    def validate(self, where: str) -> None:
        super().validate(where)
        self.mbmpo.validate(where)


# ---- imagined tasks and rollouts ---------------------------------------------------------------
@dataclass
class ImaginedTasks:
    """One meta-step's tasks: task ``i`` is member ``i % E`` with the context of a stored episode."""

    z: np.ndarray
    """``(tasks, d)`` each task's context (encoded from a full window of its episode)."""
    reward_params: dict[str, np.ndarray]
    """Each task's reward parameters ``(tasks,)`` (its episode's)."""
    starts: np.ndarray
    """``(tasks, rollouts, o)`` start observations."""


@dataclass
class ImaginedRollouts:
    """Rollouts of one policy per task through its member: ``(tasks, rollouts, horizon, ·)`` arrays."""

    feats: np.ndarray
    """Policy features of each state."""
    samples: np.ndarray
    """The policy's samples ``u`` (normalised action units, before the box)."""
    rewards: np.ndarray
    """The family's reward of each transition."""
    mean: np.ndarray
    """The sampling policy's mean at each state (the TRPO ratio's and KL's old policy)."""
    log_std: np.ndarray
    """``(tasks, a)`` the sampling policy's log standard deviation."""

    def advantages(self, inner: InnerStepConfig) -> np.ndarray:
        """``(tasks, rollouts, horizon)`` per task: returns-to-go minus its own linear baseline, normalised."""
        return np.stack([advantages(r, f, inner.discount, inner.baseline_reg)
                         for r, f in zip(self.rewards, self.feats, strict=True)])


@dataclass
class AdaptationEpisodes(Collected):
    """An iteration's real episodes after iteration 0: per task the meta-policy's (``pre``) and, after one inner step on
    them, the adapted policy's (``rollout``, graded)."""

    pre: Rollout | None = None
    """The meta-policy's episodes (``inner.episodes_per_step`` of them, one after another along the time axis), one
    sub-env row per task."""

    def take_rows(self, index: np.ndarray) -> dict[str, Any]:
        return {**super().take_rows(index), "pre": self.pre.take(index)}


# ---- the algorithm -------------------------------------------------------------------------------
class MBMPO(ContextMBRL):
    """``context_mbrl``'s data and model, with MB-MPO's meta-policy learned in its imagination (module docstring)."""

    name = "mbmpo"
    config_class = MBMPOTrainConfig
    sections = ("model", "training", "mbmpo")
    bundle_kind = "meta_policy"
    exporters: ClassVar[dict[str, str]] = {"meta_policy": "metarl_robot.export.meta_policy_graphs:export_meta_policy"}
    differentiable_model = False  # the adversary's reward gradient differentiates a planner's return, not a policy's

    def __init__(self, robot: RobotSpec, model_cfg: ContextDynamicsConfig, cfg: ContextMBRLConfig,
                 mbmpo: MBMPOConfig, seed: int = 0) -> None:
        super().__init__(robot, model_cfg, cfg, seed)
        self.mbmpo = mbmpo
        self.policy = GaussianMLPPolicy(feature_dim(robot), robot.action_dim, tuple(mbmpo.hidden), mbmpo.init_std)
        """The meta-policy (its parameters are what the robot adapts from)."""
        self.policy_rng = np.random.default_rng(seed + 1)
        """Imagined tasks, starts and the policies' sampling noise."""

    @classmethod
    def create(cls, cfg: MBMPOTrainConfig, robot: RobotSpec) -> MBMPO:
        return cls(robot, cfg.model, cfg.training, cfg.mbmpo, cfg.seed)

    def make_policy_adapter(self, batch: int, seed: int, adapt: bool = True, deterministic: bool = False,
                            settings: dict[str, Any] | None = None) -> MetaPolicyAdapter:
        """The robot's adapter over the current meta-policy (collection, evaluation of a run); ``settings``: the
        inner step's :data:`~metarl_robot.runtime.meta_policy.RUNTIME_SETTINGS` changed, as a bundle's
        ``planner_overrides`` change them."""
        inner = self.mbmpo.inner.with_settings(settings, "an mbmpo run's meta-policy does not plan")
        return MetaPolicyAdapter(self.robot, get_reward(self.family.spec.reward), self.policy.numpy_params(),
                                 inner, batch=batch, seed=seed, adapt=adapt, deterministic=deterministic)

    # ---- real data ---------------------------------------------------------------------------------
    def collect(self, tasks: list[Task], iteration: int, seed: int, starts: list[int] | None = None) -> Collected:
        """Random actions at iteration 0 (``context_mbrl``'s); afterwards per task K = ``inner.episodes_per_step``
        episodes of the meta-policy, one inner step on them pooled and the adapted policy's episode (graded),
        ``tasks_per_iteration`` sub-envs at a time. With ``starts``, a task's episodes reset with ``s``, ``s + 1``,
        ..., ``s + K`` (the adapted one)."""
        if iteration == 0:
            return super().collect(tasks, iteration, seed, starts)
        run, family, k = self.run_cfg, self.family, self.mbmpo.inner.episodes_per_step
        num = min(run.loop.tasks_per_iteration, len(tasks))
        envs = make_vector_env(family, num, run.loop.vector)
        pre: list[Rollout] = []
        post: list[Rollout] = []
        try:
            for start in range(0, len(tasks), num):
                chunk = tasks[start:start + num]
                chunk = chunk + [chunk[-1]] * (num - len(chunk))  # pad the last chunk; duplicates dropped below
                reset = [seed + start + i for i in range(num)] if starts is None else starts[start:start + num]
                reset = reset + [reset[-1]] * (num - len(reset))
                params = {n: np.array([t[n] for t in chunk]) for n in family.reward_names}
                controller = PolicyController(self.make_policy_adapter(num, seed + start), params)
                keep = np.arange(len(tasks[start:start + num]))
                # collect() resets the controller before each episode: the adapter pools the k episodes of the
                # meta-policy, and takes its inner step on them at the adapted episode's start.
                pre.append(Rollout.chain([collect(envs, family, controller, chunk, 1, seed=[s + j for s in reset])
                                          .take(keep) for j in range(k)]))
                post.append(collect(envs, family, controller, chunk, 1, seed=[s + k for s in reset]).take(keep))
        finally:
            envs.close()
        rollout = Rollout.concatenate(post)
        return AdaptationEpisodes(rollout.episode_returns()[:, 0], episodes_per_task=k + 1, rollout=rollout,
                                  seed=seed, graded_start_offset=k, grading_info={"graded_episode": "adapted"},
                                  pre=Rollout.concatenate(pre))

    def store(self, tasks: list[Task], collection: Collected) -> dict[str, Any]:
        vectors = np.stack([self.family.to_vector(t) for t in tasks])
        if isinstance(collection, AdaptationEpisodes):
            self.buffer.add(collection.pre, vectors)
        self.buffer.add(collection.rollout, vectors)
        return {}

    def report(self, iteration: int, collection: Collected, fit: dict[str, float], graded_return: float | None,
               counters: dict[str, float]) -> IterationReport:
        report = super().report(iteration, collection, fit, graded_return, counters)
        post = float(np.mean(collection.rollout.episode_returns()[:, 0]))
        pre = float(np.mean(collection.pre.episode_returns())) if isinstance(collection, AdaptationEpisodes) \
            else float("nan")  # iteration 0: random actions, no policy; else the mean over the pooled episodes
        report.metrics = {**report.metrics, "pre_adaptation_return": pre, "post_adaptation_return": post,
}
        if isinstance(collection, AdaptationEpisodes):
            report.line = f"return {pre:.1f} -> {post:.1f} after one step; " + report.line.split(", ", 1)[1]
            report.postfix = {**report.postfix, "pre": f"{pre:.1f}", "post": f"{post:.1f}"}
        return report

    # ---- model and meta-policy ------------------------------------------------------------------------
    def update(self, buffer=None) -> dict[str, float]:
        """``context_mbrl``'s model fit, then ``meta_steps`` meta-policy steps in its imagination."""
        fit = super().update(buffer)
        return {**fit, **self.meta_update(self.buffer if buffer is None else buffer)}

    def meta_update(self, buffer) -> dict[str, float]:
        """``meta_steps`` TRPO steps of the meta-policy, each on fresh imagined rollouts; mean metrics."""
        totals: dict[str, float] = {}
        for _ in range(self.mbmpo.meta_steps):
            for k, v in self.meta_step(self.imagined_tasks(buffer)).items():
                totals[k] = totals.get(k, 0.0) + v
        return {k: v / self.mbmpo.meta_steps for k, v in totals.items()}

    @torch.no_grad()
    def imagined_tasks(self, buffer) -> ImaginedTasks:
        """Draw a meta-step's tasks: a stored training episode each (its context, from a full window at a random step,
        and its reward parameters) and the rollouts' start states."""
        cfg, rng, k = self.mbmpo, self.policy_rng, self.window
        episodes = buffer.split(False)
        picked = episodes[rng.integers(0, len(episodes), cfg.imagined_tasks)]
        t = rng.integers(k, buffer.obs.shape[1], cfg.imagined_tasks)
        window = t[:, None] + np.arange(-k, 0)[None]
        f = lambda x: torch.as_tensor(x, dtype=torch.float32)  # noqa: E731
        z = self.model.encode(f(buffer.obs[picked[:, None], window]), f(buffer.act[picked[:, None], window]),
                              f(buffer.next_obs[picked[:, None], window]), torch.ones(len(picked), k)).numpy()
        index = {n: self.family.names.index(n) for n in self.family.reward_names}
        reward_params = {n: buffer.tasks[picked, i] for n, i in index.items()}
        # Starts: episode starts (the reset distribution) and visited states, from any training episode.
        shape = (cfg.imagined_tasks, cfg.rollouts_per_task)
        ep = episodes[rng.integers(0, len(episodes), shape)]
        visited = rng.random(shape) < cfg.visited_start_fraction
        step = np.where(visited, rng.integers(0, buffer.obs.shape[1], shape), 0)
        return ImaginedTasks(z=z, reward_params=reward_params, starts=buffer.obs[ep, step])

    @torch.no_grad()
    def imagine(self, params: list[list[np.ndarray]], tasks: ImaginedTasks) -> ImaginedRollouts:
        """Roll each task's policy (``params[i]``, numpy) through its member from its starts for ``imagined_horizon``
        steps, sampling actions; the model's mean next state, kept inside ±100 observation scales (a diverging model
        must not overflow the features)."""
        cfg, robot, e = self.mbmpo, self.robot, self.ensemble_size
        n_tasks, rollouts, h = cfg.imagined_tasks, cfg.rollouts_per_task, cfg.imagined_horizon
        per_member = -(-n_tasks // e)
        # Model layout (E, M, ·): task i sits in member i % E, block i // E of that member's rows.
        slot = [(i % e, (i // e) * rollouts) for i in range(n_tasks)]
        rows = per_member * rollouts
        z_rows = np.zeros((e, rows, tasks.z.shape[1]), np.float32)
        params_rows = {n: np.zeros((e, rows)) for n in tasks.reward_params}
        for i, (m, r) in enumerate(slot):
            z_rows[m, r:r + rollouts] = tasks.z[i]
            for n, v in tasks.reward_params.items():
                params_rows[n][m, r:r + rollouts] = v[i]
        reward = get_reward(self.family.spec.reward)
        a = robot.action_dim
        feats = np.zeros((n_tasks, rollouts, h, feature_dim(robot)))
        samples, means = np.zeros((n_tasks, rollouts, h, a)), np.zeros((n_tasks, rollouts, h, a))
        rewards = np.zeros((n_tasks, rollouts, h))
        log_std = np.stack([p[-1] for p in params])
        limit = 100.0 * robot.obs_scale
        state = tasks.starts.copy()
        obs_rows = np.zeros((e, rows, robot.obs_dim), np.float32)
        act_rows = np.zeros((e, rows, a), np.float32)
        for step in range(h):
            f = policy_features(robot, state)
            for i in range(n_tasks):
                means[i, :, step] = policy_mean(params[i], f[i])
            u = means[:, :, step] + self.policy_rng.standard_normal(means[:, :, step].shape) * np.exp(log_std)[:, None]
            action = to_env_action(robot, u)
            for i, (m, r) in enumerate(slot):
                obs_rows[m, r:r + rollouts], act_rows[m, r:r + rollouts] = state[i], action[i]
            nxt = np.clip(self.step(obs_rows, act_rows, z_rows).astype(np.float64), -limit, limit)
            r_rows = reward(robot, obs_rows.astype(np.float64), act_rows.astype(np.float64), nxt, params_rows)[0]
            feats[:, :, step], samples[:, :, step] = f, u
            for i, (m, r) in enumerate(slot):
                rewards[i, :, step] = r_rows[m, r:r + rollouts]
                state[i] = nxt[m, r:r + rollouts]
        return ImaginedRollouts(feats=feats, samples=samples, rewards=rewards, mean=means, log_std=log_std)

    def meta_step(self, tasks: ImaginedTasks) -> dict[str, float]:
        """One TRPO step of the meta-policy on ``tasks`` (module docstring); metrics of the step."""
        cfg, inner = self.mbmpo, self.mbmpo.inner
        theta = [p.detach().clone() for p in self.policy.param_list()]
        meta = [p.numpy().astype(np.float64) for p in theta]
        pre = self.imagine([meta] * cfg.imagined_tasks, tasks)
        pre_adv = pre.advantages(inner)
        t = lambda x: torch.as_tensor(x, dtype=torch.float32)  # noqa: E731
        a = self.robot.action_dim
        pre_feats = [t(pre.feats[i].reshape(-1, pre.feats.shape[-1])) for i in range(cfg.imagined_tasks)]
        pre_u = [t(pre.samples[i].reshape(-1, a)) for i in range(cfg.imagined_tasks)]
        pre_a = [t(pre_adv[i].reshape(-1)) for i in range(cfg.imagined_tasks)]

        def adapted(params: list[torch.Tensor], create_graph: bool) -> list[list[torch.Tensor]]:
            return [adapt(params, pre_feats[i], pre_u[i], pre_a[i], inner.step_size, create_graph=create_graph)
                    for i in range(cfg.imagined_tasks)]

        post_params = [[p.detach().numpy().astype(np.float64) for p in task]
                       for task in adapted([p.clone().requires_grad_(True) for p in theta], False)]
        post = self.imagine(post_params, tasks)
        post_adv = post.advantages(inner)
        feats = [t(post.feats[i].reshape(-1, post.feats.shape[-1])) for i in range(cfg.imagined_tasks)]
        u = [t(post.samples[i].reshape(-1, a)) for i in range(cfg.imagined_tasks)]
        adv = [t(post_adv[i].reshape(-1)) for i in range(cfg.imagined_tasks)]
        old_mean = [t(post.mean[i].reshape(-1, a)) for i in range(cfg.imagined_tasks)]
        old_log_std = [t(post.log_std[i]) for i in range(cfg.imagined_tasks)]
        old_logp = [functional_log_prob([t(p) for p in post_params[i]], feats[i], u[i]).detach()
                    for i in range(cfg.imagined_tasks)]

        def surrogate_and_kl(params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            surr, kl = [], []
            for i, task in enumerate(adapted(params, True)):
                ratio = torch.exp(functional_log_prob(task, feats[i], u[i]) - old_logp[i])
                surr.append((ratio * adv[i]).mean())
                kl.append(kl_divergence(old_mean[i], old_log_std[i], functional_mean(task, feats[i]), task[-1]).mean())
            return torch.stack(surr).mean(), torch.stack(kl).mean()

        params = [p.clone().requires_grad_(True) for p in theta]
        surrogate, _ = surrogate_and_kl(params)
        grad = _flat(torch.autograd.grad(surrogate, params))

        def fisher_vector(v: torch.Tensor) -> torch.Tensor:
            _, kl = surrogate_and_kl(params)
            g = _flat(torch.autograd.grad(kl, params, create_graph=True))
            return _flat(torch.autograd.grad(g @ v, params)) + cfg.cg_damping * v

        direction = _conjugate_gradient(fisher_vector, grad, cfg.cg_iterations)
        curvature = float(direction @ fisher_vector(direction))
        metrics = {"imagined_pre_return": float(pre.rewards.sum(-1).mean()),
                   "imagined_post_return": float(post.rewards.sum(-1).mean()),
                   "surrogate_gain": 0.0, "meta_kl": 0.0, "backtracks": float(cfg.max_backtracks), "accepted": 0.0}
        if not (curvature > 0 and math.isfinite(curvature)):
            return metrics  # a degenerate direction: no step this time
        full_step = direction * math.sqrt(2 * cfg.max_kl / curvature)
        base = float(surrogate.detach())
        with torch.no_grad():
            flat_theta = _flat(theta)
        for k in range(cfg.max_backtracks):
            candidate = _unflat(flat_theta + cfg.backtrack_ratio ** k * full_step, theta)
            new_surrogate, new_kl = surrogate_and_kl([p.requires_grad_(True) for p in candidate])
            if float(new_kl.detach()) <= cfg.max_kl and float(new_surrogate.detach()) > base:
                with torch.no_grad():
                    for p, c in zip(self.policy.param_list(), candidate, strict=True):
                        p.copy_(c)
                metrics.update(surrogate_gain=float(new_surrogate.detach()) - base, meta_kl=float(new_kl.detach()),
                               backtracks=float(k), accepted=1.0)
                break
        return metrics

    # ---- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {**super().state_dict(), "policy": self.policy.state_dict(),
                "policy_rng": self.policy_rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.policy.load_state_dict(state["policy"])
        self.policy_rng.bit_generator.state = state["policy_rng"]


class PolicyController:
    """Collection (and meta-test) controller: the meta-policy adapter with each env's own reward parameters, reset at
    every episode start, where it pools the episode just ended and steps on every ``episodes_per_step``-th."""

    def __init__(self, adapter: MetaPolicyAdapter, reward_params: dict[str, np.ndarray]) -> None:
        self.adapter, self.params = adapter, reward_params

    def reset(self) -> None:
        self.adapter.reset()

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.adapter.act(obs, self.params)[0]

    def observe(self, obs: np.ndarray, sent_action: np.ndarray, next_obs: np.ndarray) -> None:
        self.adapter.observe(obs, sent_action, next_obs)


def _flat(tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in tensors])


def _unflat(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for p in like:
        out.append(flat[i:i + p.numel()].reshape(p.shape).detach().clone())
        i += p.numel()
    return out


def _conjugate_gradient(matvec, b: torch.Tensor, iterations: int, tolerance: float = 1e-10) -> torch.Tensor:
    """Approximately solve ``matvec(x) = b`` (a symmetric positive-definite operator)."""
    x, r = torch.zeros_like(b), b.clone()
    p, rr = r.clone(), float(r @ r)
    for _ in range(iterations):
        if rr < tolerance:
            break
        ap = matvec(p)
        alpha = rr / float(p @ ap)
        x += alpha * p
        r -= alpha * ap
        new_rr = float(r @ r)
        p = r + (new_rr / rr) * p
        rr = new_rr
    return x


__all__ = ["MBMPO", "AdaptationEpisodes", "ImaginedRollouts", "ImaginedTasks", "MBMPOConfig", "MBMPOTrainConfig",
           "PolicyController"]
