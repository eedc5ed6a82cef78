"""AdMRL's gradient adversary on our stack, for the reward parameters of a task family.

The learner whose gap is differentiated is a *surrogate* of the MPC controller the runner trains:
an open-loop Gaussian policy over the first ``horizon`` control steps from the episode's start
state, pre-squash mean φ ∈ R^{H×m}, fixed σ, actions ``a = centre + half_width · tanh(φ + σ ε)``.
It adapts to a task θ by maximising, through the trained :class:`ContextMBRL` model (ensemble
mean, context z from real transitions of the task), the sample-average model value

    J(φ, θ) = (1/N) Σ_i Σ_t r_θ(ŝ_t, a_it, ŝ_t+1) − (λ/2) ‖φ‖²        (fixed noise ε_1..N)

by Adam steps then Newton-CG steps to a stationary point φ*(θ). Then
:func:`metarl_robot.train.implicit_gradient.implicit_gap_gradient` gives ∇_θ gap with

- H v by double backward through the model (Pearlmutter), on J;
- g = ∇_φ V(φ*, θ) by REINFORCE from open-loop rollouts of the real task in MuJoCo
  (:class:`MujocoOracle`, batched, from the env's start state);
- ∂_θ V = E[Σ_t ∂_θ r] on those real rollouts, ∇_θ V* = the same sum on the oracle's episodes
  (∂_θ r by central differences of the family's numpy reward: generic over rewards);
- the mixed term (∂²V̂/∂θ∂φ) x by REINFORCE on fresh model rollouts (``mixed_term="reinforce"``,
  the paper's estimator) or exactly by autograd of J (``"exact"``).

Only reward parameters move: they enter the reward alone, so the model rollouts, the context
and the real dynamics do not depend on θ — the premise of the REINFORCE mixed term. docs/admrl.md
has the derivation, the assumptions and where this departs from the paper.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch

from metarl_robot.envs.meta_env import MetaMujocoEnv
from metarl_robot.envs.oracle import MujocoOracle
from metarl_robot.envs.rollout import make_vector_env
from metarl_robot.models.context_dynamics import ContextDynamics
from metarl_robot.models.rewards import get_torch_reward
from metarl_robot.spec.family import Task, TaskFamily
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import RobotSpec
from metarl_robot.train.implicit_gradient import (
    ImplicitGradientConfig,
    ImplicitGradientResult,
    conjugate_gradient,
    implicit_gap_gradient,
    model_value_derivatives,
    reinforce_gradient,
    reinforce_mixed_term,
)


class ModelBasedLearner(Protocol):
    """What the gap gradient asks of the model-based learner (:class:`~metarl_robot.algos.context_mbrl.ContextMBRL`;
    a protocol rather than the class, since the run config, which the algorithm's module imports, imports this
    module's settings)."""

    model: ContextDynamics
    window: int
    ensemble_size: int

    def encode(self, ctx_obs: np.ndarray, ctx_act: np.ndarray, ctx_next_obs: np.ndarray, ctx_mask: np.ndarray
               ) -> np.ndarray: ...

F64 = torch.float64


KINKED_IN_THETA = frozenset({"half_cheetah_velocity", "ant_goal"})
"""Rewards with |· − θ| terms: ∂_θ r is piecewise constant, so the θ-derivative of the sample-average
policy gradient (the exact mixed term) is 0 almost everywhere; only the REINFORCE mixed term sees how
the *expected* policy gradient turns with θ."""


# ---- configuration ----------------------------------------------------------------------------------
@dataclass
class RewardGradientConfig:
    """The surrogate learner and the estimators of the gap gradient."""

    horizon: int = 25
    """H: control steps of the open-loop surrogate; the gap is over steps [window_start, window_start + H)."""
    window_start: int = 0
    """t0: the real env replays the oracle's first t0 commands before the window (cart-pole swing-up earns
    almost nothing while the pole hangs, so a window later in the episode says more about target_x)."""
    sigma: float = 0.3
    """Standard deviation of the pre-squash Gaussian policy (fixed, not adapted)."""
    model_samples: int = 32
    """N: fixed noise draws of the learner's sample-average model value J (and of the exact mixed term)."""
    action_l2: float = 1e-2
    """λ: weight of −½‖φ‖² in J; keeps H negative definite where the model is flat in some action."""
    adapt_steps: int = 100
    """Adam steps on J from φ = 0 (actions at the centre of the box) before Newton polishing."""
    adapt_lr: float = 0.05
    """Adam step size of the adaptation."""
    newton_steps: int = 10
    """Most Newton-CG steps after Adam, each with a backtracking line search on J."""
    stationarity_tol: float = 1e-6
    """Newton stops when ‖∇_φ J‖ falls below this (the IFT needs a stationary point)."""
    real_samples: int = 256
    """Open-loop rollouts in MuJoCo for g (REINFORCE) and ∂_θ V."""
    mixed_term: Literal["reinforce", "exact"] = "reinforce"
    """Mixed term (∂²V̂/∂θ∂φ) x: REINFORCE on fresh model rollouts (AdMRL) or autograd of J."""
    mixed_samples: int = 1024
    """Model rollouts of the REINFORCE mixed term."""
    context: Literal["oracle", "empty"] = "oracle"
    """z from the first K transitions of the oracle episode (real data of the task), or the empty context."""
    fd_step: float = 1e-4
    """Central-difference step for ∂_θ r, as a fraction of each reward parameter's train range."""
    solver: ImplicitGradientConfig = field(default_factory=lambda: ImplicitGradientConfig(cg_iters=50, cg_tol=1e-8,
                                                                                           damping=1e-4))
    """CG settings of the solve H x = g."""
    threads: int = 1
    """Threads of the MuJoCo rollout pool."""

    def __post_init__(self) -> None:
        for name in ("horizon", "model_samples", "real_samples", "mixed_samples"):
            if getattr(self, name) < 2:
                raise ValueError(f"RewardGradientConfig.{name} must be >= 2, got {getattr(self, name)}")
        for name in ("sigma", "adapt_lr", "fd_step", "stationarity_tol"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RewardGradientConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.window_start < 0:
            raise ValueError(f"RewardGradientConfig.window_start must be >= 0, got {self.window_start}")
        if self.action_l2 < 0 or self.adapt_steps < 0 or self.newton_steps < 0 or self.threads < 1:
            raise ValueError("RewardGradientConfig: action_l2, adapt_steps and newton_steps must be >= 0 and "
                             f"threads >= 1, got {self.action_l2}, {self.adapt_steps}, {self.newton_steps}, "
                             f"{self.threads}")
        if self.mixed_term not in ("reinforce", "exact"):
            raise ValueError(f"RewardGradientConfig.mixed_term must be 'reinforce' or 'exact', got {self.mixed_term!r}")
        if self.context not in ("oracle", "empty"):
            raise ValueError(f"RewardGradientConfig.context must be 'oracle' or 'empty', got {self.context!r}")


# ---- oracle episodes -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Trajectories:
    """Real transitions of one task, ``(episodes, T, ·)``: the oracle's episodes (gap.py's ``Episodes`` fits)."""

    obs: np.ndarray
    """``(n, T, obs_dim)``."""
    actions: np.ndarray
    """``(n, T, action_dim)`` the commands sent."""
    next_obs: np.ndarray
    """``(n, T, obs_dim)``."""

    @staticmethod
    def of(source: Any) -> Trajectories:
        """From anything with ``obs``/``actions``/``next_obs`` (attributes or keys), ``(T, ·)`` or ``(n, T, ·)``."""
        get = (lambda k: source[k]) if isinstance(source, Mapping) else (lambda k: getattr(source, k))
        try:
            arrays = [np.asarray(get(k), dtype=np.float64) for k in ("obs", "actions", "next_obs")]
        except (KeyError, AttributeError) as err:
            raise ValueError(f"oracle trajectories need obs, actions and next_obs; missing {err}") from None
        arrays = [a[None] if a.ndim == 2 else a for a in arrays]
        if any(a.ndim != 3 for a in arrays) or len({a.shape[:2] for a in arrays}) != 1:
            raise ValueError("oracle trajectories: obs, actions and next_obs must be (T, dim) or (n, T, dim) with "
                             f"matching n and T, got {[a.shape for a in arrays]}")
        return Trajectories(*arrays)


def reward_param_grads(family: TaskFamily, robot: RobotSpec, theta: Mapping[str, float], obs: np.ndarray,
                       actions: np.ndarray, next_obs: np.ndarray, fd_step: float) -> np.ndarray:
    """``(..., p)`` central differences ∂_θ r of the family's numpy reward, one column per reward parameter."""
    reward = get_reward(family.spec.reward)
    names = family.reward_names
    out = np.empty((*obs.shape[:-1], len(names)))
    for k, name in enumerate(names):
        lo, hi = family.param(name).train
        h = fd_step * max(hi - lo, 1e-12)
        plus, minus = dict(theta), dict(theta)
        plus[name], minus[name] = theta[name] + h, theta[name] - h
        out[..., k] = (reward(robot, obs, actions, next_obs, plus)[0]
                       - reward(robot, obs, actions, next_obs, minus)[0]) / (2 * h)
    return out


# ---- the surrogate learner ----------------------------------------------------------------------------
class SurrogateLearner:
    """The open-loop Gaussian policy, its model value J(φ, θ) through the model, and its adaptation."""

    def __init__(self, algo: ModelBasedLearner, family: TaskFamily, robot: RobotSpec, start_obs: np.ndarray,
                 context: np.ndarray, cfg: RewardGradientConfig, rng: np.random.Generator) -> None:
        self.family, self.robot, self.cfg = family, robot, cfg
        # A float64 copy: H and the CG solve need more precision than the float32 training weights give.
        self.model = copy.deepcopy(algo.model).to(F64).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.ensemble = algo.ensemble_size
        self.start = torch.as_tensor(start_obs, dtype=F64)
        self.z = torch.as_tensor(context, dtype=F64).reshape(1, -1)
        self.reward = get_torch_reward(family.spec.reward)
        self.names = family.reward_names
        low, high = robot.action_low, robot.action_high
        self.centre = torch.as_tensor((high + low) / 2, dtype=F64)
        self.half_width = torch.as_tensor((high - low) / 2, dtype=F64)
        self.shape = (cfg.horizon, robot.action_dim)
        self.rng = rng
        self.noise = self.draw_noise(cfg.model_samples)
        """The learner's fixed noise ε (N, H, m): J is a deterministic function of φ (sample-average approximation)."""

    @property
    def dim(self) -> int:
        return self.shape[0] * self.shape[1]

    def draw_noise(self, n: int) -> torch.Tensor:
        return torch.as_tensor(self.rng.standard_normal((n, *self.shape)), dtype=F64)

    def actions(self, phi: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """``a = centre + half_width · tanh(φ + σ ε)``: ``(N, H, m)``."""
        return self.centre + self.half_width * torch.tanh(phi.reshape(self.shape) + self.cfg.sigma * eps)

    def score(self, eps: torch.Tensor) -> torch.Tensor:
        """∇_φ log N(u; φ, σ²I) at u = φ + σ ε: ε / σ, flat ``(N, H·m)``."""
        return eps.reshape(eps.shape[0], -1) / self.cfg.sigma

    def model_states(self, actions: torch.Tensor) -> torch.Tensor:
        """Ensemble-mean model rollout from the start state: ``(N, H + 1, obs_dim)``."""
        n = actions.shape[0]
        s = self.start.expand(n, -1)
        z = self.z.expand(self.ensemble, n, -1)
        states = [s]
        for t in range(actions.shape[1]):
            mean, _ = self.model(s.expand(self.ensemble, n, -1), actions[:, t].expand(self.ensemble, n, -1), z)
            s = mean.mean(0)
            states.append(s)
        return torch.stack(states, 1)

    def theta_params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: theta[k] for k, name in enumerate(self.names)}

    def objective(self, phi: torch.Tensor, theta: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """J(φ, θ): the mean model return over the noise ``eps`` (default: the learner's own) minus the λ term."""
        eps = self.noise if eps is None else eps
        a = self.actions(phi, eps)
        s = self.model_states(a)
        r = self.reward(self.robot, s[:, :-1], a, s[:, 1:], self.theta_params(theta))
        return r.sum(1).mean() - 0.5 * self.cfg.action_l2 * torch.sum(phi**2)

    def adapt(self, theta: torch.Tensor, init: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """φ*(θ): Adam on J from φ = 0, then Newton-CG to a stationary point. Returns (φ*, ‖∇_φ J(φ*)‖).

        With ``init`` (a nearby task's φ*) only the Newton polish runs from there: it follows the same
        local maximum as θ moves, which is the branch the implicit function theorem describes.
        """
        cfg = self.cfg
        start = torch.zeros(self.dim, dtype=F64) if init is None else init.detach().reshape(-1).to(F64)
        phi = start.clone().requires_grad_(True)
        opt = torch.optim.Adam([phi], lr=cfg.adapt_lr)
        for _ in range(cfg.adapt_steps if init is None else 0):
            opt.zero_grad()
            (-self.objective(phi, theta)).backward()
            opt.step()
        phi = phi.detach()
        residual = self._grad_norm(phi, theta)
        for _ in range(cfg.newton_steps):
            if residual <= cfg.stationarity_tol:
                break
            phi = self._newton_step(phi, theta)
            residual = self._grad_norm(phi, theta)
        return phi, residual

    def _grad_norm(self, phi: torch.Tensor, theta: torch.Tensor) -> float:
        p = phi.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.objective(p, theta), p)
        return float(torch.linalg.vector_norm(grad))

    def _newton_step(self, phi: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        derivs = model_value_derivatives(self.objective, phi, theta)
        grad = derivs.gradient_phi
        direction, info = conjugate_gradient(lambda v: -derivs.hvp(v), grad, iters=self.cfg.solver.cg_iters, tol=1e-10,
                                             damping=self.cfg.solver.damping)
        if info.negative_curvature or float(direction @ grad) <= 0:
            direction = grad  # not concave along the Newton path here: fall back to a gradient step
        step, value = 1.0, derivs.value
        with torch.no_grad():
            while step > 1e-8:
                candidate = phi + step * direction
                if float(self.objective(candidate, theta)) >= value + 1e-4 * step * float(direction @ grad):
                    return candidate
                step *= 0.5
        return phi


# ---- the gradient -----------------------------------------------------------------------------------
@dataclass
class RewardGapGradient:
    """∇_θ gap for one task, with what the surrogate learner did (numpy; θ in ``names`` order)."""

    names: list[str]
    """The reward parameters θ."""
    theta: np.ndarray
    """Their values."""
    implicit: ImplicitGradientResult
    """The gradient and its parts (``implicit.gradient`` is ∇_θ gap)."""
    stationarity_residual: float
    """‖∇_φ J(φ*)‖ after adaptation: the IFT assumes 0."""
    model_value: float
    """J(φ*, θ): what the learner expects over the window."""
    real_return: float
    """Mean real return of the adapted surrogate over the window (its V(φ*, θ))."""
    oracle_return: float
    """Mean return of the oracle episodes over the same window (their V*(θ))."""
    start_offset: float
    """‖start state of the surrogate's rollouts − the first oracle episode's obs at t0‖ (0 when the seeds match)."""
    adapted: np.ndarray = field(repr=False)
    """φ*, ``(H, m)`` pre-squash means."""

    @property
    def gradient(self) -> np.ndarray:
        return self.implicit.gradient

    @property
    def gap(self) -> float:
        """Surrogate gap over the window: oracle_return − real_return."""
        return self.oracle_return - self.real_return

    def as_log(self) -> dict[str, float]:
        """Flat scalars for a metrics row; per-parameter entries are named ``<part>_<parameter>``."""
        out = dict(self.implicit.as_log())
        for part in ("gradient", "oracle_term", "direct_term", "correction"):
            for i, name in enumerate(self.names):
                out[f"{part}_{name}"] = out.pop(f"{part}_{i}")
        return {**out, "stationarity_residual": self.stationarity_residual, "model_value": self.model_value,
                "real_return": self.real_return, "oracle_return": self.oracle_return, "gap": self.gap,
                "start_offset": self.start_offset}


def _context(algo: ModelBasedLearner, oracle: Trajectories, cfg: RewardGradientConfig) -> np.ndarray:
    # The K real transitions before the window (what the MPC learner would condition on there); at
    # t0 = 0 there are none yet, so the episode's first K stand in (the dynamics are the task's either way).
    k, t0 = algo.window, cfg.window_start
    rows = slice(max(0, t0 - k), t0) if t0 > 0 else slice(0, k)
    obs, act, nxt = oracle.obs[0, rows], oracle.actions[0, rows], oracle.next_obs[0, rows]
    mask = np.ones(len(obs)) if cfg.context == "oracle" else np.zeros(len(obs))
    return algo.encode(obs[None], act[None], nxt[None], mask[None])[0]


def _real_env(family: TaskFamily, task: Task, seed: int, replay: np.ndarray) -> tuple[MetaMujocoEnv, np.ndarray, Any]:
    """The task's env reset with ``seed``, then stepped through the commands ``replay`` (the oracle's prefix)."""
    vec = make_vector_env(family, 1, "sync", tasks=[task])
    env = vec.envs[0].unwrapped
    obs, _ = env.reset(seed=seed)
    for command in replay:
        obs, *_ = env.step(command)
    return env, obs, vec


def real_rollouts(env: MetaMujocoEnv, start_obs: np.ndarray, actions: np.ndarray, family: TaskFamily,
                  robot: RobotSpec, params: Mapping[str, float], threads: int = 1
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Open-loop ``actions`` ``(N, H, m)`` from ``env``'s current state in MuJoCo (batched, no env stepping).

    Returns ``obs`` and ``next_obs`` ``(N, H, obs_dim)`` and the family's rewards ``(N, H)`` — what
    ``env.step`` would give for the same commands, as long as no command needs the rate limit.
    """
    next_obs = MujocoOracle(threads).rollout([env], actions[None], particles=1)[0, :, 0]
    obs = np.concatenate([np.broadcast_to(start_obs, (len(actions), 1, robot.obs_dim)), next_obs[:, :-1]], axis=1)
    return obs, next_obs, get_reward(family.spec.reward)(robot, obs, actions, next_obs, params)[0]


def reward_gap_gradient(algo: ModelBasedLearner, family: TaskFamily, robot: RobotSpec, task: Mapping[str, float],
                        oracle: Any, cfg: RewardGradientConfig | None = None,
                        rng: np.random.Generator | None = None, seed: int = 0) -> RewardGapGradient:
    """AdMRL's ∇_θ gap over the reward parameters of ``task`` for the model in ``algo``.

    ``oracle`` holds the oracle's episodes of this task (``obs``/``actions``/``next_obs``, ``(T, ·)``
    or ``(n, T, ·)``, at least ``window_start + horizon`` steps). ``seed`` resets the real env, which
    then replays the first episode's first ``window_start`` commands: pass that episode's seed so the
    surrogate's window starts where the oracle's did (``start_offset`` reports the mismatch). Further
    episodes only average into ∇_θ V*.
    """
    cfg = cfg or RewardGradientConfig()
    rng = rng or np.random.default_rng(seed)
    if not family.reward_names:
        raise ValueError(f"family {family.name!r} has no reward parameters; the gradient adversary moves only those")
    task = family.validate(task)
    traj = Trajectories.of(oracle)
    h, t0 = cfg.horizon, cfg.window_start
    if traj.obs.shape[1] < t0 + h:
        raise ValueError(f"oracle episodes have {traj.obs.shape[1]} steps, fewer than window_start + horizon = "
                         f"{t0} + {h}")
    if traj.obs.shape[-1] != robot.obs_dim or traj.actions.shape[-1] != robot.action_dim:
        raise ValueError(f"oracle episodes have obs/action dims {traj.obs.shape[-1]}/{traj.actions.shape[-1]}, "
                         f"robot {robot.name!r} has {robot.obs_dim}/{robot.action_dim}")
    if cfg.mixed_term == "exact" and family.spec.reward in KINKED_IN_THETA:
        raise ValueError(f"mixed_term='exact' is 0 almost everywhere for reward {family.spec.reward!r} (|x - theta| "
                         "terms: the sample-average policy gradient is piecewise constant in theta); use 'reinforce'")
    names = family.reward_names
    theta_np = np.array([task[n] for n in names])
    theta = torch.as_tensor(theta_np, dtype=F64)
    reward = get_reward(family.spec.reward)
    params = {n: task[n] for n in names}

    env, start_obs, vec = _real_env(family, task, seed, traj.actions[0, :t0])
    try:
        learner = SurrogateLearner(algo, family, robot, start_obs, _context(algo, traj, cfg), cfg, rng)
        phi, residual = learner.adapt(theta)
        derivs = model_value_derivatives(learner.objective, phi, theta)

        # Real environment: g by REINFORCE, ∂_θ V as the mean feature-derivative sum.
        eps_real = learner.draw_noise(cfg.real_samples)
        a_real = learner.actions(phi, eps_real).numpy()
        prev_obs, next_obs, rewards = real_rollouts(env, start_obs, a_real, family, robot, params, cfg.threads)
        returns = rewards.sum(1)
        g = reinforce_gradient(learner.score(eps_real), returns)
        eta = reward_param_grads(family, robot, params, prev_obs, a_real, next_obs, cfg.fd_step).sum(1).mean(0)
    finally:
        vec.close()

    window = slice(t0, t0 + h)
    o, a, n = traj.obs[:, window], traj.actions[:, window], traj.next_obs[:, window]
    eta_star = reward_param_grads(family, robot, params, o, a, n, cfg.fd_step).sum(1).mean(0)
    oracle_return = float(reward(robot, o, a, n, params)[0].sum(1).mean())

    if cfg.mixed_term == "exact":
        mixed = derivs.mixed
    else:
        with torch.no_grad():
            eps_model = learner.draw_noise(cfg.mixed_samples)
            a_model = learner.actions(phi, eps_model)
            states = learner.model_states(a_model).numpy()
        d_model = reward_param_grads(family, robot, params, states[:, :-1], a_model.numpy(), states[:, 1:],
                                     cfg.fd_step).sum(1)
        score_model = learner.score(eps_model)

        def mixed(x: torch.Tensor):
            return reinforce_mixed_term(score_model, d_model, x)

    result = implicit_gap_gradient(derivs.hvp, mixed, g.mean, eta, eta_star, cfg.solver)
    return RewardGapGradient(names=list(names), theta=theta_np, implicit=result, stationarity_residual=residual,
                             model_value=derivs.value, real_return=float(returns.mean()), oracle_return=oracle_return,
                             start_offset=float(np.linalg.norm(start_obs - traj.obs[0, t0])),
                             adapted=phi.reshape(learner.shape).numpy())


# ---- the adversary ------------------------------------------------------------------------------------
OracleSource = Callable[[Task], Any]
"""task → the oracle's episodes of that task (anything :meth:`Trajectories.of` reads)."""


@dataclass
class RewardAdversaryConfig:
    """Projected gradient ascent of the gap over the reward coordinates."""

    steps: int = 1
    """Gradient steps per proposal (each needs the oracle's episodes of the current task)."""
    step_size: float = 0.2
    """Move per step as a fraction of each reward parameter's train range, along the normalised gradient."""
    gradient: RewardGradientConfig = field(default_factory=RewardGradientConfig)
    """The gap-gradient estimator."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"RewardAdversaryConfig.steps must be >= 1, got {self.steps}")
        if not 0 < self.step_size <= 1:
            raise ValueError(f"RewardAdversaryConfig.step_size must be in (0, 1], got {self.step_size}")


class RewardGradientAdversary:
    """Proposes the next training task by ascending ∇_θ gap on the reward coordinates inside the train box.

    Dynamics coordinates of the task are kept as given. Steps are taken in coordinates scaled by
    each parameter's train range, along the unit gradient there, and projected onto the box (the
    projection is reported in :attr:`history`, not hidden). A non-finite gradient (a diverging
    model rollout) leaves the task where it is, with ``gradient_finite = 0`` in the history.
    """

    def __init__(self, algo: ModelBasedLearner, family: TaskFamily, robot: RobotSpec,
                 cfg: RewardAdversaryConfig | None = None, seed: int = 0) -> None:
        if not family.reward_names:
            raise ValueError(f"family {family.name!r} has no reward parameters; use the CEM adversary")
        self.algo, self.family, self.robot = algo, family, robot
        self.cfg = cfg or RewardAdversaryConfig()
        self.rng = np.random.default_rng(seed)
        self.history: list[dict[str, float]] = []
        """One log row per gradient step: the gradient's parts, the step and whether the box clipped it."""

    def propose(self, task: Mapping[str, float], oracle: OracleSource, seed: int = 0) -> Task:
        """The task after ``steps`` projected ascent steps from ``task``; ``oracle(task)`` gives its episodes."""
        current = self.family.validate(task)
        names = self.family.reward_names
        lo = np.array([self.family.param(n).train[0] for n in names])
        hi = np.array([self.family.param(n).train[1] for n in names])
        width = hi - lo
        for _ in range(self.cfg.steps):
            est = reward_gap_gradient(self.algo, self.family, self.robot, current, oracle(current),
                                      self.cfg.gradient, self.rng, seed)
            scaled = est.gradient * width  # the gradient in range-normalised coordinates
            norm = float(np.linalg.norm(scaled))
            move = np.zeros_like(scaled) if norm == 0 or not np.isfinite(norm) else scaled / norm
            target = est.theta + self.cfg.step_size * move * width
            projected = np.clip(target, lo, hi)
            self.history.append({**est.as_log(), "step_norm": float(np.linalg.norm((projected - est.theta) / width)),
                                 "projected": float(np.any(projected != target)),
                                 "gradient_finite": float(np.isfinite(norm))})
            current = self.family.validate({**current, **dict(zip(names, projected.tolist(), strict=True))})
        return current


__all__: Sequence[str] = ["RewardAdversaryConfig", "RewardGapGradient", "RewardGradientAdversary",
                          "RewardGradientConfig", "SurrogateLearner", "Trajectories",
                          "reward_gap_gradient", "reward_param_grads"]
