"""Robot-side PEARL: a context-inference policy run from two ONNX graphs (numpy + onnxruntime only).

The belief over the latent task ``z`` is the product of the prior ``N(0, I)`` with one Gaussian
factor per observed transition, so the robot keeps two running sums per env instead of a context
window: ``sum(precision)`` and ``sum(precision * mean)``. Each step costs one factor-graph call
(``observe``) and one policy-graph call (``act``), whatever the number of steps observed. The math is
exactly :class:`metarl_robot.algos.pearl.PEARLController`'s online belief (``z_mode="mean"``,
deterministic actions), which the tests check step by step on a cart-pole episode.

Graphs (written by :mod:`metarl_robot.export.pearl_graphs`, raw robot units in and out, normalisers baked in):

- factors: ``obs (B, o), action (B, a), reward (B,), next_obs (B, o)`` → ``factor_mean (B, d), factor_logvar (B, d)``
  (the log of each factor's variance: the robot sums precisions ``exp(-factor_logvar)``)
- policy: ``obs (B, o), z (B, d)`` → ``action (B, a)``, ``box(tanh(mean))``: strictly inside the action box
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from metarl_robot.runtime.adapter import CarriesNothing
from metarl_robot.runtime.onnx_graph import BATCH_AXIS, OnnxGraph, make_session, session_interface_mismatch
from metarl_robot.spec.rewards import RewardFunction
from metarl_robot.spec.robot import RobotSpec

FACTORS_INPUTS = ("obs", "action", "reward", "next_obs")
FACTORS_OUTPUTS = ("factor_mean", "factor_logvar")
POLICY_INPUTS = ("obs", "z")
POLICY_OUTPUTS = ("action",)
FACTORS_FILE = "pearl_factors.onnx"
POLICY_FILE = "pearl_policy.onnx"

FactorsFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], list[np.ndarray]]
"""``(B, o), (B, a), (B,), (B, o)`` → ``[factor_mean (B, d), factor_logvar (B, d)]``."""
PolicyFn = Callable[[np.ndarray, np.ndarray], list[np.ndarray]]
"""``(B, o), (B, d)`` → ``[action (B, a)]``."""


def pearl_graph_interfaces(obs_dim: int, act_dim: int, latent_dim: int) -> dict[str, dict[str, dict[str, list]]]:
    """Inputs and outputs of the factor and policy graphs (``"batch"`` is the dynamic axis): what a
    ``context_policy`` bundle declares and what :meth:`ContextPolicyAdapter.from_onnx` checks loose graphs against."""
    b = BATCH_AXIS
    return {
        "factors": {"inputs": {"obs": [b, obs_dim], "action": [b, act_dim], "reward": [b], "next_obs": [b, obs_dim]},
                    "outputs": {"factor_mean": [b, latent_dim], "factor_logvar": [b, latent_dim]}},
        "policy": {"inputs": {"obs": [b, obs_dim], "z": [b, latent_dim]}, "outputs": {"action": [b, act_dim]}},
    }


class ContextPolicyError(ValueError):
    """A context-policy graph cannot be used: unreadable, or not the interface this robot needs."""


def load_graph(path: str | Path, label: str, interface: dict[str, dict[str, list]], threads: int = 1) -> OnnxGraph:
    """One graph as a validated numpy callable; :class:`ContextPolicyError` if it is unreadable or its
    input/output names and fixed sizes are not ``interface``'s."""
    path = Path(path)
    if not path.is_file():
        raise ContextPolicyError(f"{label} graph not found: {path}")
    try:
        session = make_session(path, threads)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/InvalidProtobuf types
        raise ContextPolicyError(f"{path}: not a loadable ONNX {label} graph ({type(exc).__name__}: {exc})") from exc
    mismatch = session_interface_mismatch(session, interface["inputs"], interface["outputs"])
    if mismatch is not None:
        at, problem = mismatch
        raise ContextPolicyError(f"{path}: {label} graph {at}: {problem} (as this robot needs)")
    return OnnxGraph(session, tuple(interface["inputs"]), tuple(interface["outputs"]),
                     {**interface["inputs"], **interface["outputs"]}, f"{label} graph {path.name}")


def latent_dim_of(policy_path: str | Path) -> int:
    """The size of ``z`` a policy graph takes (its ``z`` input's second axis)."""
    path = Path(policy_path)
    try:
        inputs = {a.name: a.shape for a in make_session(path).get_inputs()}
    except Exception as exc:
        raise ContextPolicyError(f"{path}: not a loadable ONNX policy graph ({type(exc).__name__}: {exc})") from exc
    shape = inputs.get("z")
    if shape is None or len(shape) != 2 or not isinstance(shape[1], int) or shape[1] < 1:
        raise ContextPolicyError(f"{path}: policy graph needs an input 'z' of shape [batch, d], has inputs {inputs}")
    return int(shape[1])


class ContextPolicyAdapter(CarriesNothing):
    """PEARL's online adaptation behind the :class:`~metarl_robot.runtime.adapter.Adapter` interface.

    - ``reset(which)``: the belief of those envs goes back to the prior ``N(0, I)``.
    - ``observe(obs, action, next_obs, reward=None)``: one factor per env from the transition, added to
      the running sums. The context's reward column must be the reward the policy was trained to infer
      from, so by default it is computed on the robot with ``reward`` (the family's
      :class:`RewardFunction`) and the task parameters last given to :meth:`act` — exactly what the
      env returned in simulation; pass ``reward=`` ``(B,)`` to supply it yourself (e.g. from a replay).
    - ``act(obs, task_params)``: ``z`` = posterior mean, deterministic action ``box(tanh(mean))``.

    Posterior per env and latent dimension: ``var = 1 / (1 + sum(exp(-factor_logvar)))``, ``mean = var *
    sum(factor_mean * exp(-factor_logvar))``. Non-finite numbers in any input, or out of a graph, raise
    ``ValueError`` (nothing is skipped silently; the safety layer decides what to do).

    Diagnostics of :meth:`act`: ``context_mean`` (B, d), ``context_var`` (B, d), ``context_size`` (B,):
    transitions observed since the env's last reset.

    ``adapt=False``: :meth:`observe` still checks its inputs but never updates the belief, so ``z`` stays the
    prior mean and ``context_size`` 0 (the unadapted policy, for comparisons).
    """

    observes_sent_commands = False
    """It models no actuator latency: it observes the command the motors applied."""

    def __init__(self, robot: RobotSpec, reward: RewardFunction, factors: FactorsFn, policy: PolicyFn,
                 latent_dim: int, batch: int = 1, adapt: bool = True) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        self.robot, self.reward, self.factors_fn, self.policy_fn = robot, reward, factors, policy
        self.latent_dim, self.batch = latent_dim, batch
        self.adapt = adapt
        """False: the belief never updates (z stays the prior mean)."""
        self.precision_sum = np.zeros((batch, latent_dim))
        """Per env: sum over observed transitions of the factors' precisions ``exp(-factor_logvar)`` (float64)."""
        self.weighted_mean_sum = np.zeros((batch, latent_dim))
        """Per env: sum over observed transitions of ``factor_mean * precision`` (float64)."""
        self.steps_observed = np.zeros(batch, dtype=np.int64)
        """Per env: transitions added since its last reset."""
        self._params: dict[str, np.ndarray] | None = None

    @classmethod
    def from_onnx(cls, robot: RobotSpec, reward: RewardFunction, factors_path: str | Path, policy_path: str | Path,
                  batch: int = 1, threads: int = 1, adapt: bool = True) -> ContextPolicyAdapter:
        """Load and validate the two graphs against ``robot``'s sizes (``d`` read from the policy graph)."""
        d = latent_dim_of(policy_path)
        interfaces = pearl_graph_interfaces(robot.obs_dim, robot.action_dim, d)
        factors = load_graph(factors_path, "factors", interfaces["factors"], threads)
        policy = load_graph(policy_path, "policy", interfaces["policy"], threads)
        return cls(robot, reward, factors, policy, d, batch, adapt)

    # ---- belief -------------------------------------------------------------------------------------
    def posterior(self) -> tuple[np.ndarray, np.ndarray]:
        """The current belief: mean and variance ``(B, d)`` (float32, the graphs' precision)."""
        var = 1.0 / (1.0 + self.precision_sum)
        return (var * self.weighted_mean_sum).astype(np.float32), var.astype(np.float32)

    def reset(self, which: np.ndarray | None = None) -> None:
        which = np.ones(self.batch, dtype=bool) if which is None else np.asarray(which, dtype=bool)
        if which.shape != (self.batch,):
            raise ValueError(f"which must be a bool mask of shape ({self.batch},), got {which.shape}")
        self.precision_sum[which] = 0.0
        self.weighted_mean_sum[which] = 0.0
        self.steps_observed[which] = 0

    def forget(self, which: np.ndarray | None = None) -> None:
        """The belief persists only within an episode (and :meth:`reset` clears it): the same as :meth:`reset`."""
        self.reset(which)

    def _rows(self, name: str, x: Any, width: int | None) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        want = (self.batch,) if width is None else (self.batch, width)
        if x.shape != want:
            raise ValueError(f"{name}: expected shape {want}, got {x.shape}")
        if not np.isfinite(x).all():
            bad = sorted({int(i) for i in np.argwhere(~np.isfinite(x))[:, 0]})
            raise ValueError(f"{name} contains NaN or Inf (env rows {bad}): refusing to adapt or act on it")
        return x

    def observe(self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray,
                reward: np.ndarray | None = None) -> None:
        o, a = self.robot.obs_dim, self.robot.action_dim
        obs, action, next_obs = self._rows("obs", obs, o), self._rows("action", action, a), \
            self._rows("next_obs", next_obs, o)
        if not self.adapt:
            return
        if reward is None:
            if self._params is None:
                raise ValueError("observe() needs the task's reward parameters: call act(obs, task_params) first, "
                                 "or pass reward=")
            reward = self.reward(self.robot, obs, action, next_obs, self._params)[0]
        reward = self._rows("reward", np.broadcast_to(np.asarray(reward, dtype=np.float64), (self.batch,)), None)
        mean, logvar = self.factors_fn(obs, action, reward, next_obs)
        precision = np.exp(-logvar.astype(np.float64))
        if not (np.isfinite(mean).all() and np.isfinite(precision).all()):
            raise ValueError("the factors graph returned a non-finite mean or log-variance (or one whose precision "
                             "overflows); the belief was left unchanged")
        self.precision_sum += precision
        self.weighted_mean_sum += precision * mean.astype(np.float64)
        self.steps_observed += 1

    def act(self, obs: np.ndarray, task_params: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        obs = self._rows("obs", obs, self.robot.obs_dim)
        missing = [p for p in self.reward.params if p not in task_params]
        if missing:
            raise ValueError(f"task_params lacks reward parameter(s) {missing}; the reward needs "
                             f"{list(self.reward.params)}, got {sorted(task_params)}")
        self._params = {k: self._rows(f"task_params[{k!r}]",
                                      np.broadcast_to(np.asarray(v, dtype=np.float64), (self.batch,)), None)
                        for k, v in task_params.items()}
        mean, var = self.posterior()
        (action,) = self.policy_fn(obs.astype(np.float32), mean)
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (self.batch, self.robot.action_dim) or not np.isfinite(action).all():
            raise ValueError(f"the policy graph returned {action.shape} actions with non-finite values or the wrong "
                             f"shape (expected ({self.batch}, {self.robot.action_dim}), finite)")
        diagnostics = {"context_mean": mean, "context_var": var, "context_size": self.steps_observed.copy()}
        return action, diagnostics


__all__ = ["BATCH_AXIS", "FACTORS_FILE", "FACTORS_INPUTS", "FACTORS_OUTPUTS", "POLICY_FILE", "POLICY_INPUTS",
           "POLICY_OUTPUTS", "ContextPolicyAdapter", "ContextPolicyError", "latent_dim_of", "load_graph",
           "pearl_graph_interfaces"]
