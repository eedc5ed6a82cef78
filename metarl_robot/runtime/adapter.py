"""Adapters: what the robot runs every control period. numpy + the model callables, no torch/MuJoCo.

Every adapter has the same interface (``reset``, ``observe``, ``act``), batched over ``B`` robots
or envs (the ROS node uses ``B = 1``), and reports what it believes in its diagnostics so the node
can publish it and the replay can grade it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from metarl_robot.runtime.context import ContextWindow
from metarl_robot.runtime.ensemble_rollout import EnsembleRollout, FusedFn, StepFn
from metarl_robot.runtime.planner import Planner, PlannerConfig, RolloutModel
from metarl_robot.spec.rewards import RewardFunction
from metarl_robot.spec.robot import RobotSpec

EncodeFn = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""``(B, K, o), (B, K, a), (B, K, o), (B, K) mask → (B, d)`` context."""


class Adapter(Protocol):
    """The online-adaptation interface shared by model-based and context-inference controllers."""

    observes_sent_commands: bool
    """Which command :meth:`observe` takes where the robot reports what its motors applied: True, the command sent
    in answer to ``obs`` (the adapter models the latency between sending and applying itself); False, the command
    the motors applied during the transition (the robot's report, so a latency the adapter cannot model does not
    corrupt its context). Without latency the two are the same."""

    def reset(self, which: np.ndarray | None = None) -> None:
        """Forget the task (of the envs in the bool mask ``which``, default all): a new episode starts."""

    def observe(self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray) -> None:
        """Record the transition that just happened (``action``: see :attr:`observes_sent_commands`)."""

    def forget(self, which: np.ndarray | None = None) -> None:
        """:meth:`reset`, and forget what persists across episodes (an online model's fit to this robot): the
        operator's reset (the node's ``~/reset_adaptation``)."""

    def carried_state(self) -> dict[str, np.ndarray]:
        """What persists across episodes, as named arrays (empty: nothing; the adapter starts from its prior).
        The node logs it when an episode starts; :meth:`restore` puts it back (the replay)."""

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        """Take back a :meth:`carried_state` (shapes and values checked; ``ValueError`` names the array)."""

    def act(self, obs: np.ndarray, task_params: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """``(B, o)`` observations → ``(B, a)`` commands and diagnostics (each ``(B, ·)``)."""


class CarriesNothing:
    """For adapters that keep nothing across episodes: an empty carried state, and only an empty one restored."""

    def carried_state(self) -> dict[str, np.ndarray]:
        return {}

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} carries nothing across episodes; got state arrays "
                             f"{sorted(state)} (from an adapter of another kind?)")


class ModelBasedAdapter(CarriesNothing):
    """Infer the context from the last K transitions, plan through the context-conditioned ensemble.

    Diagnostics: ``context`` (B, d); ``context_size`` (B,); ``predicted_next_obs`` (B, o) for the
    returned action; ``prediction_error`` (B,): RMS error, in robot.yaml scale units, of the previous
    step's prediction against what was then observed (NaN before the first); ``plan_return`` (B,).
    """

    observes_sent_commands = False
    """It models no actuator latency: it observes the command the motors applied."""

    def __init__(self, robot: RobotSpec, reward: RewardFunction, encode: EncodeFn, step: StepFn,
                 ensemble_size: int, window: int, planner: PlannerConfig, batch: int = 1, adapt: bool = True,
                 fused: tuple[FusedFn, int] | None = None, rollout: RolloutModel | None = None) -> None:
        self.robot, self.reward, self.encode_fn, self.step_fn = robot, reward, encode, step
        self.ensemble_size, self.batch = ensemble_size, batch
        self.adapt = adapt
        """False: always plan with the empty-context (unadapted) model, for comparisons."""
        self.window = ContextWindow(batch, window, robot.obs_dim, robot.action_dim)
        self.planner = Planner(planner, robot, reward, rollout or EnsembleRollout(step, ensemble_size, fused), batch)
        self.last_action = np.tile(robot.safe_action, (batch, 1))
        self._prediction = np.full((batch, robot.obs_dim), np.nan)
        self._error = np.full(batch, np.nan)

    def reset(self, which: np.ndarray | None = None) -> None:
        which = np.ones(self.batch, dtype=bool) if which is None else np.asarray(which, dtype=bool)
        self.window.reset(which)
        self.planner.reset(which)
        self.last_action[which] = self.robot.safe_action
        self._prediction[which] = np.nan
        self._error[which] = np.nan

    def forget(self, which: np.ndarray | None = None) -> None:
        """Nothing persists across episodes here: the same as :meth:`reset`."""
        self.reset(which)

    def observe(self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray) -> None:
        err = (self._prediction - next_obs) / self.robot.obs_scale
        self._error = np.sqrt(np.mean(err**2, axis=-1))
        self.window.add(obs, action, next_obs)
        self.last_action = np.asarray(action, dtype=np.float64).copy()

    def context(self) -> np.ndarray:
        w = self.window
        mask = w.mask() if self.adapt else np.zeros_like(w.mask())
        return self.encode_fn(w.obs, w.act, w.next_obs, mask)

    def empty_context(self) -> np.ndarray:
        """``(B, d)`` the context of an empty window: what the unadapted model is conditioned on."""
        w = self.window
        return self.encode_fn(w.obs, w.act, w.next_obs, np.zeros_like(w.mask()))

    def unadapted_prediction(self, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
        """Ensemble-mean next observation ``(B, o)`` of the meta-trained model without any adaptation."""
        return self.predict(obs, action, self.empty_context())

    def predict(self, obs: np.ndarray, action: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Ensemble-mean next observation ``(B, o)`` for one action per env."""
        e = self.ensemble_size
        tile = lambda x: np.ascontiguousarray(np.broadcast_to(x, (e, *x.shape)), dtype=np.float32)  # noqa: E731
        return self.step_fn(tile(obs), tile(action), tile(z)).mean(axis=0).astype(np.float64)

    def plan_start(self, obs: np.ndarray, z: np.ndarray) -> Any:
        """What the planner's rollout model starts from: the observation and the context."""
        return obs, z

    def pending_commands(self) -> list[np.ndarray] | None:
        """Per env, the commands already sent that the motors will apply before the next one (None: no actuator
        latency is modelled; see :meth:`Planner.plan`)."""
        return None

    def next_applied(self, action: np.ndarray) -> np.ndarray:
        """``(B, a)``: the command that will drive the next transition once ``action`` is sent (itself here)."""
        return action

    def act(self, obs: np.ndarray, task_params: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        obs = np.asarray(obs, dtype=np.float64)
        z = self.context()
        params = {k: np.broadcast_to(np.asarray(v, dtype=np.float64), (self.batch,)) for k, v in task_params.items()}
        result = self.planner.plan(obs, self.plan_start(obs, z), params, self.last_action, self.pending_commands())
        self._prediction = self.predict(obs, self.next_applied(result.action), z)
        diagnostics = {
            "context": z, "context_size": self.window.size.copy() if self.adapt else np.zeros(self.batch, int),
            "predicted_next_obs": self._prediction.copy(), "prediction_error": self._error.copy(),
            "plan_return": result.expected_return,
        }
        return result.action, diagnostics
