"""Model-based adaptation that also fits the robot's own data: the context encoder *and* an online last layer.

:class:`OnlineModelAdapter` is the :class:`~metarl_robot.runtime.adapter.ModelBasedAdapter` (context from the
last K transitions, MPC through the ensemble) whose members' last layers are, in addition, the posterior of a
Bayesian linear regression on every transition the robot has observed since the posterior was last forgotten
(:class:`~metarl_robot.runtime.last_layer.LastLayerPosterior`). The context adapts within the span of the
training tasks; the last layer keeps fitting where the robot lies outside them. numpy + the model callables
(onnxruntime on the robot, torch in training), no torch or MuJoCo here.

- ``reset(which)``: a new episode: the context window and the planner's warm start are reset; the last layer is
  **kept** (what was learned about this robot persists across episodes).
- ``forget(which)``: the last layer goes back to the meta-trained prior (the node's reset service).
- ``observe``: also one rank-one update of the last layer with the transition's features under the context the
  step was planned with; an update the posterior refuses (non-finite, not positive definite, diverging) leaves
  the last good posterior in place and is reported in the diagnostics (``update_refused``; the reason in
  ``posterior.last_failure``).
- **Actuator latency** (:mod:`~metarl_robot.runtime.latency`): the last layer is fitted once per latency
  hypothesis (0..``max_delay`` periods between sending a command and the motors applying it), each to the same
  transitions with the command that drove them under that hypothesis; the hypothesis whose last layer predicts
  best (prequential error) is the one planned with: its last layer, and the commands still on their way rolled
  out before the planned ones. Without latency the chosen hypothesis is 0 and the adapter plans as it would
  without the others.

``posterior`` holds the ``B x (max_delay + 1)`` last layers, env ``b``'s hypothesis ``d`` at row
``b * (max_delay + 1) + d``.

Diagnostics of :meth:`act`, beyond the model-based ones: ``online_updates`` (B,) transitions the last layer
rests on; ``update_refused`` (B,) 1.0 where the latest update was refused (the node raises the safety layer's
``MODEL_UPDATE_REFUSED`` event); ``online_shift`` (B,) RMS distance of the last layer from the prior;
``command_delay`` (B,) the actuator latency planned for, in control periods.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from metarl_robot.runtime.adapter import EncodeFn, ModelBasedAdapter
from metarl_robot.runtime.ensemble_rollout import EnsembleRollout
from metarl_robot.runtime.last_layer import LastLayerConfig, LastLayerPosterior
from metarl_robot.runtime.latency import CommandLatency, LatencyConfig
from metarl_robot.runtime.planner import PlannerConfig
from metarl_robot.spec.rewards import RewardFunction
from metarl_robot.spec.robot import RobotSpec

HeadStepFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""``(E, M, o), (E, M, a), (E, M, d), head (E, F, o)`` → next-observation mean ``(E, M, o)``."""
HeadRolloutFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""``(E, M, o), (E, M, H, a), (E, M, d), head (E, F, o)`` → ``(E, M, H, o)``."""
FeaturesFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
"""``(E, M, o) obs, (E, M, a) action, (E, M, o) next_obs, (E, M, d) context`` → features ``(E, M, F)`` and the
normalised change of the observation ``(E, M, o)`` (the regression target)."""


class HeadedEnsembleRollout:
    """A :class:`~metarl_robot.runtime.planner.RolloutModel` whose members predict with each env's own last layer.

    ``start`` is ``(obs (B, o), z (B, d), heads (B, E, F, o))``. The graphs take one last layer per member, so the
    envs are rolled out one after the other (one call per env; the robot runs one)."""

    def __init__(self, step: HeadStepFn, ensemble_size: int, fused: tuple[HeadRolloutFn, int] | None = None) -> None:
        self.step, self.ensemble_size, self.fused = step, ensemble_size, fused

    def for_env(self, head: np.ndarray) -> EnsembleRollout:
        """The plain ensemble rollout with ``head`` ``(E, F, o)`` bound into its step (and fused) function."""
        head = np.ascontiguousarray(head, dtype=np.float32)
        fused = None if self.fused is None else (lambda s, a, c: self.fused[0](s, a, c, head), self.fused[1])
        return EnsembleRollout(lambda s, a, c: self.step(s, a, c, head), self.ensemble_size, fused)

    def rollout(self, start: tuple[np.ndarray, np.ndarray, np.ndarray], actions: np.ndarray, particles: int
                ) -> np.ndarray:
        obs, z, heads = start
        return np.concatenate([self.for_env(heads[b]).rollout((obs[b:b + 1], z[b:b + 1]), actions[b:b + 1],
                                                              particles) for b in range(obs.shape[0])])


class OnlineModelAdapter(ModelBasedAdapter):
    """The model-based adapter with an online last layer (see the module docstring)."""

    def __init__(self, robot: RobotSpec, reward: RewardFunction, encode: EncodeFn, step: HeadStepFn,
                 features: FeaturesFn, prior_head: np.ndarray, last_layer: LastLayerConfig, ensemble_size: int,
                 window: int, planner: PlannerConfig, batch: int = 1, adapt: bool = True, online: bool = True,
                 fused: tuple[HeadRolloutFn, int] | None = None, latency: LatencyConfig | None = None) -> None:
        self.head_step, self.features_fn = step, features
        self.latency = CommandLatency(latency or LatencyConfig(), batch, robot.safe_action)
        """The actuator latency the robot is planned for, and the commands on their way."""
        self.posterior = LastLayerPosterior(prior_head, last_layer, batch * self.latency.hypotheses)
        """Each env's last layer under each latency hypothesis (kept across episodes until :meth:`forget`)."""
        self.online = online
        """False: the last layer stays the prior and no latency is modelled (context adaptation only)."""
        super().__init__(robot, reward, encode, self._prior_step, ensemble_size, window, planner, batch=batch,
                         adapt=adapt, rollout=HeadedEnsembleRollout(step, ensemble_size, fused))
        self._planned_with = np.zeros((batch, 0))
        self._refused = np.zeros(batch)

    @property
    def observes_sent_commands(self) -> bool:
        """With the online layer it tells the latency itself, so it observes the command sent."""
        return self.online

    def _prior_step(self, obs: np.ndarray, act: np.ndarray, context: np.ndarray) -> np.ndarray:
        """The meta-trained model (the prior last layer): what the base class would plan with."""
        return self.head_step(obs, act, context, self.posterior.prior.astype(np.float32))

    def _per_env(self, rows: np.ndarray) -> np.ndarray:
        """``(B x (D + 1), ...)`` per-hypothesis rows → ``(B, ...)`` the chosen hypothesis' row of each env."""
        return rows.reshape(self.batch, self.latency.hypotheses, *rows.shape[1:])[np.arange(self.batch),
                                                                                   self.latency.delay]

    @property
    def weights(self) -> np.ndarray:
        """``(B, E, F, o)`` each env's last layer under the latency it is planned for."""
        return self._per_env(self.posterior.weights)

    @property
    def updates(self) -> np.ndarray:
        """``(B,)`` transitions each env's last layer rests on."""
        return self._per_env(self.posterior.updates)

    def reset(self, which: np.ndarray | None = None) -> None:
        super().reset(which)
        self.latency.reset(which)

    def forget(self, which: np.ndarray | None = None) -> None:
        """A new episode and the last layer of the envs in ``which`` (default all) back to the meta-trained prior,
        the latency estimate back to none."""
        which = np.ones(self.batch, bool) if which is None else np.asarray(which, bool)
        self.reset(which)
        self.posterior.reset(np.repeat(which, self.latency.hypotheses))
        self.latency.forget(which)
        self._refused[which] = 0.0

    def carried_state(self) -> dict[str, np.ndarray]:
        """What each env carries into the next episode (unless forgotten): every hypothesis' last layer (posterior
        mean, covariance, transitions it rests on) and the latency estimate; empty while every env is at the
        prior."""
        p = self.posterior
        if not p.updates.any():
            return {}
        return {"last_layer_weights": p.weights.copy(), "last_layer_covariance": p.covariance.copy(),
                "last_layer_updates": p.updates.copy(), **self.latency.state()}

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        p, lat = self.posterior, self.latency
        if not state:
            p.reset()
            lat.forget()
            return
        want = {"last_layer_weights": p.weights.shape, "last_layer_covariance": p.covariance.shape,
                "last_layer_updates": p.updates.shape, **{k: v.shape for k, v in lat.state().items()}}
        if sorted(state) != sorted(want):
            raise ValueError(f"adapter state: expected the arrays {sorted(want)}, got {sorted(state)}")
        for key, shape in want.items():
            value = np.asarray(state[key])
            if value.shape != shape or not np.isfinite(value).all():
                raise ValueError(f"adapter state {key}: expected finite values of shape {shape}, got {value.shape}")
        delay = np.asarray(state["latency_delay"])
        if not ((delay >= 0) & (delay < lat.hypotheses)).all():
            raise ValueError(f"adapter state latency_delay: expected delays in [0, {lat.hypotheses - 1}], got {delay}")
        p.weights[:] = state["last_layer_weights"]
        p.covariance[:] = state["last_layer_covariance"]
        p.updates[:] = state["last_layer_updates"]
        lat.restore(state)

    def observe(self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray) -> None:
        planned_with = self._planned_with if self._planned_with.shape[1] else self.context()
        if not self.online:
            super().observe(obs, action, next_obs)
            return
        # The context window takes the transition with the command that drove it under the chosen latency; the
        # rate limit stays on the command sent.
        super().observe(obs, self.latency.applied(action), next_obs)
        self.last_action = np.asarray(action, dtype=np.float64).copy()
        h, e = self.latency.hypotheses, self.ensemble_size
        rows = lambda x: np.repeat(np.asarray(x, dtype=np.float64), h, axis=0)  # noqa: E731
        tile = lambda x: np.ascontiguousarray(np.broadcast_to(x, (e, *np.shape(x))), dtype=np.float32)  # noqa: E731
        driven_by = self.latency.candidates(action).reshape(self.batch * h, -1)
        phi, target = self.features_fn(tile(rows(obs)), tile(driven_by), tile(rows(next_obs)),
                                       tile(rows(planned_with)))
        phi, target = np.swapaxes(phi, 0, 1).astype(np.float64), target[0].astype(np.float64)  # (B·H, E, F), (B·H, o)
        # Prequential: each hypothesis is scored on the transition before it is fitted to it.
        predicted = np.einsum("nef,nefo->no", phi, self.posterior.weights) / e
        self.latency.score(np.mean((predicted - target) ** 2, axis=-1).reshape(self.batch, h))
        accepted = self.posterior.update(phi, target)
        self.latency.push(action)
        self._refused = (~self._per_env(accepted)).astype(np.float64)

    def pending_commands(self) -> list[np.ndarray] | None:
        return self.latency.pending() if self.online else None

    def next_applied(self, action: np.ndarray) -> np.ndarray:
        return self.latency.applied(action) if self.online else action

    def predict(self, obs: np.ndarray, action: np.ndarray, z: np.ndarray, heads: np.ndarray | None = None
                ) -> np.ndarray:
        """Ensemble-mean next observation ``(B, o)`` with each env's last layer ``heads`` (B, E, F, o) (default: its
        current posterior under the latency it is planned for)."""
        heads = self.weights if heads is None else heads
        e = self.ensemble_size
        out = np.empty((self.batch, self.robot.obs_dim))
        for b in range(self.batch):
            tile = lambda x: np.ascontiguousarray(np.broadcast_to(x[b:b + 1], (e, 1, x.shape[-1])),  # noqa: E731,B023
                                                  dtype=np.float32)
            out[b] = self.head_step(tile(obs), tile(action), tile(z), heads[b].astype(np.float32)).mean(axis=0)[0]
        return out

    def unadapted_prediction(self, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
        """The meta-trained model: the empty window's context and the prior last layer."""
        prior = np.broadcast_to(self.posterior.prior, (self.batch, *self.posterior.prior.shape))
        return self.predict(obs, action, self.empty_context(), prior)

    def plan_start(self, obs: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self._planned_with = z
        return obs, z, self.weights

    def act(self, obs: np.ndarray, task_params: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        action, diagnostics = super().act(obs, task_params)
        shift = np.sqrt(np.mean((self.weights - self.posterior.prior) ** 2, axis=(1, 2, 3)))
        diagnostics.update(online_updates=self.updates.copy(), update_refused=self._refused.copy(),
                           online_shift=shift, command_delay=self.latency.delay.astype(np.float64))
        return action, diagnostics


__all__ = ["FeaturesFn", "HeadRolloutFn", "HeadStepFn", "HeadedEnsembleRollout", "OnlineModelAdapter"]
