"""MACAW's adaptation on the robot: advantage-weighted regression steps of a value function and a Gaussian policy on a
task's last K episodes, in numpy (no torch).

Why here: MACAW (Mitchell et al. 2021; :mod:`metarl_robot.algos.macaw`) meta-trains on a fixed dataset so that a few
regression steps on K <= 5 trajectories of a new task adapt the policy. Those steps are supervised regressions on a
few hundred rows of two small MLPs: hand-written backprop in numpy takes them in milliseconds, so the robot adapts
itself with what it already carries (onnxruntime and numpy) and the adapted weights act at once; nothing has to go
back to a training machine. The tests check every number against the trainer's torch step
(:meth:`~metarl_robot.models.macaw.MACAWNetworks.adapt`) to round-off.

The step (:func:`awr_adapt`, ``steps`` times each, value first, every parameter tensor with its meta-learned rate):

* value: ``phi' = phi - alpha_v * grad mean (V_phi(s) - R)^2`` with ``R`` the discounted return-to-go in the episode
  divided by the training data's return scale, plus (``bootstrap``) the discounted value of the episode's last next
  observation (a constant of the step);
* policy: ``theta' = theta - alpha_pi * grad [-mean w log pi(a | s) + lambda mean (A_head(h(s), a) - A)^2]`` with
  ``A = R - V_phi'(s)``, ``w = min(exp(A' / T), clip)`` (``A'`` standardised) and ``A_head`` the advantage head on the
  policy's last hidden layer ``h``: the paper's enriched update.

On the robot (:class:`AWRPolicyAdapter`) the policy acts with its mean; at every episode start the episode just ended
joins the env's last ``adapt_episodes`` episodes and the step, from the meta-parameters, adapts to them all (MACAW
adapts from the meta-parameters on the task's data; it does not chain steps). The window of episodes and the adapted
weights persist across episodes: they are the adapter's carried state (logged, replayed exactly). Episodes can also
come from elsewhere (:meth:`AWRPolicyAdapter.adapt_on`: logs of the task recorded by another controller, the paper's
meta-test).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from metarl_robot.runtime.meta_policy import (
    InnerStepConfig,
    MeanFn,
    MetaPolicyAdapter,
    pack_episodes,
    unpack_episodes,
    with_runtime_settings,
)
from metarl_robot.runtime.policy_gradient import (
    PolicyParams,
    backprop,
    discounted_returns,
    forward_layers,
    from_env_action,
    policy_features,
    policy_mean,
)
from metarl_robot.spec.rewards import RewardFunction
from metarl_robot.spec.robot import RobotSpec
from metarl_robot.spec.schema import SpecError

Layers = list[tuple[np.ndarray, np.ndarray]]
"""An MLP's ``(W, b)`` per layer: tanh hidden layers, a linear output."""

AWR_SETTINGS: tuple[str, ...] = ("adapt_episodes",)
"""The step settings a deployment may choose (``make_adapter``'s ``planner_overrides``, ``metarl eval --set``): how
many of the task's last episodes the step adapts on (1 to 5, the paper's K)."""

MAX_ADAPT_EPISODES = 5
"""The most episodes one adaptation reads (MACAW's setting: K <= 5 trajectories of the new task)."""


class AWREpisode(NamedTuple):
    """One ended episode as the step reads it."""

    obs: np.ndarray
    """(T, o) the observation of each transition."""
    sample: np.ndarray
    """(T, a) the action the policy chose there, normalised units (clipped to [-1, 1] for the regression: the robot
    ran the box's edge)."""
    reward: np.ndarray
    """(T,) the family's reward of each transition."""
    next_obs: np.ndarray
    """(T, o) the observation after each transition (the last one's value bootstraps the cut return)."""

    @classmethod
    def logged(cls, data: Any, episode: int) -> AWREpisode:
        """Episode ``episode`` of an offline dataset (:class:`~metarl_robot.replay.dataset.OfflineDataset`, another
        controller's logs), its commands mapped back to normalised units (float64; rewards as logged, NaN where
        unknown)."""
        rows = data.episode_slice(episode)
        as64 = lambda x: np.asarray(x[rows], dtype=np.float64)  # noqa: E731
        return cls(as64(data.observations), from_env_action(data.robot, data.actions[rows]), as64(data.rewards),
                   as64(data.next_observations))


@dataclass(frozen=True)
class AWRStepConfig:
    """The adaptation step as meta-training took it (the bundle records it; only :data:`AWR_SETTINGS` may change)."""

    steps: int = 1
    """Value steps, then policy steps (the run's ``macaw.test_inner_steps``)."""
    discount: float = 0.99
    """Discount of the returns-to-go."""
    bootstrap: bool = True
    """Add the discounted value of each episode's last next observation to its returns (episodes are cut, not
    terminated)."""
    return_scale: float = 1.0
    """Returns are divided by this (the training data's return std): the value function's units."""
    temperature: float = 1.0
    """AWR temperature T."""
    weight_clip: float = 20.0
    """Largest AWR weight."""
    normalize_advantages: bool = True
    """Standardise the advantages before ``exp(A / T)``."""
    adapt_episodes: int = 5
    """K: the step adapts on the env's last K episodes (1 to :data:`MAX_ADAPT_EPISODES`)."""
    min_transitions: int = 10
    """An episode with fewer transitions is not adapted on."""

    def validate(self) -> None:
        """``SpecError`` on ``AWRStepConfig.<field>`` for the first invalid value."""
        checks = [("steps", self.steps >= 1, ">= 1"), ("discount", 0 <= self.discount < 1, "in [0, 1)"),
                  ("return_scale", np.isfinite(self.return_scale) and self.return_scale > 0, "a finite number > 0"),
                  ("temperature", np.isfinite(self.temperature) and self.temperature > 0, "a finite number > 0"),
                  ("weight_clip", np.isfinite(self.weight_clip) and self.weight_clip > 0, "a finite number > 0"),
                  ("adapt_episodes", isinstance(self.adapt_episodes, int | np.integer)
                   and not isinstance(self.adapt_episodes, bool) and 1 <= self.adapt_episodes <= MAX_ADAPT_EPISODES,
                   f"an integer in [1, {MAX_ADAPT_EPISODES}] (MACAW adapts from at most 5 trajectories)"),
                  ("min_transitions", self.min_transitions >= 2, ">= 2")]
        for name, ok, allowed in checks:
            if not ok:
                raise SpecError("AWRStepConfig", name, f"must be {allowed}, got {getattr(self, name)!r}")

    def with_settings(self, settings: Mapping[str, Any] | None, refusal: str) -> AWRStepConfig:
        """This step with the :data:`AWR_SETTINGS` in ``settings`` changed, validated; ``SpecError`` on
        ``planner_overrides`` saying ``refusal`` for any other key."""
        return with_runtime_settings(self, settings, AWR_SETTINGS, refusal, "episodes one adaptation reads")


@dataclass(frozen=True)
class AWRNetworks:
    """MACAW's meta-parameters and learned step sizes, numpy float64, in the trainer's order."""

    value: list[np.ndarray]
    """``[W0, b0, ..., W_out (H, 1), b_out (1,)]``."""
    policy: PolicyParams
    """``[W0, b0, ..., W_out, b_out, log_std]``: the robot's policy layout (the log std fixed, not adapted)."""
    head: list[np.ndarray]
    """The advantage head ``[W0 (H + a, Hh), b0, W1 (Hh, 1), b1]`` (empty: no head)."""
    value_rates: np.ndarray
    """One inner learning rate per value tensor."""
    policy_rates: np.ndarray
    """One per policy tensor (without the log std), then one per head tensor."""
    advantage_weight: float
    """lambda: the head's weight in the inner policy loss."""

    def check(self) -> None:
        """``ValueError`` naming what is inconsistent (counts, shapes, non-finite or non-positive rates)."""
        counts = {"value": len(self.value), "policy (without log_std)": len(self.policy) - 1,
                  "head": len(self.head)}
        for name, count in counts.items():
            if count % 2 or (count == 0 and name != "head"):
                raise ValueError(f"{name}: expected (W, b) pairs, got {count} arrays")
        if len(self.value_rates) != len(self.value) or len(self.policy_rates) != len(self.policy) - 1 + len(
                self.head):
            raise ValueError(f"rates: {len(self.value_rates)} value and {len(self.policy_rates)} policy rates for "
                             f"{len(self.value)} value and {len(self.policy) - 1} + {len(self.head)} policy and head "
                             "tensors")
        rates = np.concatenate([self.value_rates, self.policy_rates])
        if not (np.isfinite(rates).all() and (rates > 0).all()):
            raise ValueError("rates: every inner learning rate must be finite and > 0")
        if not (np.isfinite(self.advantage_weight) and self.advantage_weight >= 0):
            raise ValueError(f"advantage_weight: must be finite and >= 0, got {self.advantage_weight}")


def _layers(params: Sequence[np.ndarray]) -> Layers:
    return list(zip(params[::2], params[1::2], strict=True))


@dataclass(frozen=True)
class AWRBatch:
    """A task's adaptation data as the step reads it (numpy twin of :class:`~metarl_robot.models.macaw.Batch`)."""

    feats: np.ndarray
    """(N, F) policy features."""
    actions: np.ndarray
    """(N, a) normalised actions in [-1, 1]."""
    returns: np.ndarray
    """(N,) discounted returns-to-go in the value function's units."""
    tail_discount: np.ndarray
    """(N,) discount ** (steps to the episode's last next observation)."""
    tail_feats: np.ndarray
    """(E, F) features of each episode's last next observation."""
    tail_of: np.ndarray
    """(N,) the episode of each row (its row of ``tail_feats``)."""

    @classmethod
    def of(cls, robot: RobotSpec, episodes: Sequence[AWREpisode], step: AWRStepConfig) -> AWRBatch:
        """The rows of ``episodes`` (each cut, not terminated: its tail is bootstrapped when ``step.bootstrap``)."""
        if not episodes:
            raise ValueError("no episodes to adapt on")
        feats, actions, returns, tail_discount, tail_feats = [], [], [], [], []
        lengths = [len(e.reward) for e in episodes]
        for e in episodes:
            t = len(e.reward)
            feats.append(policy_features(robot, e.obs))
            actions.append(np.clip(e.sample, -1.0, 1.0))
            returns.append(discounted_returns(np.asarray(e.reward, dtype=np.float64)[None], step.discount)[0])
            tail_discount.append(step.discount ** np.arange(t, 0, -1, dtype=np.float64))
            tail_feats.append(policy_features(robot, e.next_obs[-1]))
        return cls(np.concatenate(feats), np.concatenate(actions), np.concatenate(returns) / step.return_scale,
                   np.concatenate(tail_discount), np.stack(tail_feats), np.repeat(np.arange(len(episodes)), lengths))


def awr_weights(advantages: np.ndarray, step: AWRStepConfig) -> np.ndarray:
    """``min(exp(A' / T), clip)`` (``A'`` standardised with the population std + 1e-8), as the trainer's."""
    adv = advantages
    if step.normalize_advantages:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    return np.exp(np.minimum(adv / step.temperature, np.log(step.weight_clip)))


def _values(value: list[np.ndarray], feats: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    acts, out = forward_layers(_layers(value), feats)
    return acts, out[:, 0]


def awr_adapt(nets: AWRNetworks, batch: AWRBatch, step: AWRStepConfig) -> PolicyParams:
    """MACAW's inner loop (module docstring) from the meta-parameters on ``batch``: the adapted policy in the robot's
    layout (the log std unchanged)."""
    n = len(batch.returns)
    value = list(nets.value)

    def targets(value: list[np.ndarray]) -> np.ndarray:  # returns, plus each episode's discounted tail value
        if not step.bootstrap:
            return batch.returns
        return batch.returns + batch.tail_discount * _values(value, batch.tail_feats)[1][batch.tail_of]

    for _ in range(step.steps):
        acts, v = _values(value, batch.feats)
        grads, _ = backprop(_layers(value), acts, (2.0 / n * (v - targets(value)))[:, None])
        value = [p - rate * g for p, g, rate in zip(value, grads, nets.value_rates, strict=True)]
    advantages = targets(value) - _values(value, batch.feats)[1]
    weights = awr_weights(advantages, step)
    policy, head, log_std = list(nets.policy[:-1]), list(nets.head), nets.policy[-1]
    inv_var = np.exp(-2.0 * log_std)
    for _ in range(step.steps):
        acts, mean = forward_layers(_layers(policy), batch.feats)
        # -mean_i w_i log N(a_i; m_i, s): d / d m_i = -w_i (a_i - m_i) / s^2 / n
        delta = -(weights / n)[:, None] * (batch.actions - mean) * inv_var
        hidden_grad, head_grads = None, []
        if head:
            head_acts, predicted = forward_layers(_layers(head), np.concatenate([acts[-1], batch.actions], axis=1))
            head_delta = nets.advantage_weight * 2.0 / n * (predicted[:, 0] - advantages)[:, None]
            head_grads, input_grad = backprop(_layers(head), head_acts, head_delta)
            hidden_grad = input_grad[:, :acts[-1].shape[1]]
        policy_grads, _ = backprop(_layers(policy), acts, delta, hidden_grad)
        both = [p - rate * g for p, g, rate in zip([*policy, *head], [*policy_grads, *head_grads], nets.policy_rates,
                                                  strict=True)]
        policy, head = both[:len(policy)], both[len(policy):]
    return [*policy, np.array(log_std, dtype=np.float64)]


class AWRPolicyAdapter(MetaPolicyAdapter):
    """MACAW's policy and its numpy adaptation behind the :class:`~metarl_robot.runtime.adapter.Adapter` interface
    (module docstring). ``B`` envs, each with its own window of at most ``step.adapt_episodes`` episodes and the
    weights adapted to them. Acts with the policy's mean (``deterministic``, the default); diagnostics as
    :class:`~metarl_robot.runtime.meta_policy.MetaPolicyAdapter`'s (``inner_steps``: adaptations so far).

    ``adapt=False``: the meta-policy throughout, for comparisons."""

    def __init__(self, robot: RobotSpec, reward: RewardFunction, nets: AWRNetworks, step: AWRStepConfig,
                 batch: int = 1, seed: int = 0, adapt: bool = True, deterministic: bool = True,
                 mean_fn: MeanFn = policy_mean) -> None:
        nets.check()
        step.validate()
        super().__init__(robot, reward, nets.policy, InnerStepConfig(min_transitions=step.min_transitions),
                         batch=batch, seed=seed, adapt=adapt, deterministic=deterministic, mean_fn=mean_fn)
        self.nets, self.step = nets, step
        self.window: list[list[AWREpisode]] = [[] for _ in range(batch)]
        """Per env: the last (at most ``step.adapt_episodes``) episodes, oldest first: what the weights adapted to."""

    @staticmethod
    def _empty_record() -> dict[str, list]:
        return {"obs": [], "sample": [], "reward": [], "next_obs": []}

    def observe(self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray) -> None:
        super().observe(obs, action, next_obs)
        rows = self._rows("next_obs", next_obs, self.robot.obs_dim)
        for b in range(self.batch):
            self._episode[b]["next_obs"].append(rows[b])

    def _episode_ended(self, b: int, record: dict[str, np.ndarray]) -> None:
        self.adapt_on(b, [AWREpisode(**record)])

    def adapt_on(self, b: int, episodes: Sequence[AWREpisode]) -> None:
        """Env ``b``'s window takes ``episodes`` (its last ``adapt_episodes`` kept) and its weights adapt to the
        window from the meta-parameters: its own ended episodes (at :meth:`reset`), or a task's logged episodes of
        another controller (the paper's meta-test; ``sample`` then the logged command in normalised units)."""
        for e in episodes:
            if len(e.reward) < self.step.min_transitions:
                raise ValueError(f"an episode of {len(e.reward)} transitions: adaptation needs at least "
                                 f"min_transitions {self.step.min_transitions}")
        self.window[b] = [*self.window[b], *episodes][-self.step.adapt_episodes:]
        self.params[b] = awr_adapt(self.nets, AWRBatch.of(self.robot, self.window[b], self.step), self.step)
        self.inner_steps[b] += 1

    def adapts_by(self) -> str:
        return (f"advantage-weighted regression from the meta-parameters on the last {self.step.adapt_episodes} "
                "episodes, at each episode start")

    def forget(self, which: np.ndarray | None = None) -> None:
        super().forget(which)
        for b in self._which(which):
            self.window[b] = []

    def _window_widths(self) -> dict[str, tuple[int, ...]]:
        return {**self._pending_widths(), "next_obs": (self.robot.obs_dim,)}

    def carried_state(self) -> dict[str, np.ndarray]:
        """:class:`~metarl_robot.runtime.meta_policy.MetaPolicyAdapter`'s (the adapted weights, ``inner_steps``,
        ``episodes_started``) and the windows: ``window_obs``, ``window_sample``, ``window_reward``,
        ``window_next_obs`` (B, P, ...) and ``window_lengths`` (B, adapt_episodes)."""
        return super().carried_state() | pack_episodes(self.window, self.step.adapt_episodes, "window",
                                                       self._window_widths())

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        """Take back a :meth:`carried_state` (checked, ``ValueError`` naming the array; nothing changes then); an
        empty one is the meta-parameters with empty windows."""
        if not state:
            super().restore(state)
            self.window = [[] for _ in range(self.batch)]
            return
        keys = [f"window_{name}" for name in (*self._window_widths(), "lengths")]
        if missing := [k for k in keys if k not in state]:
            raise ValueError(f"carried state: expected the window arrays {keys}, missing {missing}")
        window = unpack_episodes(state, "window", self.batch, self.step.adapt_episodes, self.step.min_transitions,
                                 self._window_widths(), AWREpisode, f"(adapt_episodes {self.step.adapt_episodes})")
        super().restore({k: v for k, v in state.items() if k not in keys})
        self.window = window


__all__ = ["AWR_SETTINGS", "MAX_ADAPT_EPISODES", "AWRBatch", "AWREpisode", "AWRNetworks", "AWRPolicyAdapter",
           "AWRStepConfig", "awr_adapt", "awr_weights"]
