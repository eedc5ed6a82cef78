"""Which actuator latency the robot has, told from its own transitions: a robot-side estimate of how many control
periods pass between a command being sent and the motors applying it.

No task family models latency in the motor driver or the bus (docs/out_of_family.md: ``delay=K``), yet one period
of it makes the next state depend on the command sent one period earlier, which no model of (observation, command)
can fit. :class:`CommandLatency` keeps one hypothesis per delay ``d`` in ``0..max_delay``: under hypothesis ``d``
the transition observed after sending ``a_t`` was driven by ``a_{t-d}``. The adapter fits one model per hypothesis
to the same transitions (each its own online last layer) and scores each by its *prequential* error — the squared
error of its prediction of a transition before it is updated on it — averaged in log space with exponential
forgetting (a transition every hypothesis mispredicts, as at an impact or a rail stop, moves all of them alike
instead of drowning the others). The hypothesis with the lowest running error is the delay the robot is planned
for (with a margin against flapping): its model predicts, and the planner rolls out the commands already on their
way before the ones it plans.

numpy only (robot side). The commands "on their way" after a reset are the robot's safe command, as a robot whose
driver starts from its safe command applies (the twin's ``delay`` effect does).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LatencyConfig:
    """How the adapter tells the robot's actuator latency (:class:`CommandLatency`)."""

    max_delay: int = 2
    """Largest latency considered, in control periods (0..max_delay: max_delay + 1 models are fitted)."""
    memory: float = 0.98
    """Forgetting factor of each hypothesis' running mean log squared error per transition (~1 / (1 - memory) = 50
    periods: 2 s at 25 Hz)."""
    margin: float = 0.3
    """Another delay is chosen only when its running (geometric mean) error is below (1 - margin) x the chosen
    one's."""
    min_transitions: int = 25
    """Transitions since the last forget before a delay other than 0 may be chosen (1 s at 25 Hz)."""

    def validate(self) -> None:
        """Raises ValueError naming the field and its allowed values."""
        if not (isinstance(self.max_delay, int) and 0 <= self.max_delay <= 10):
            raise ValueError(f"latency.max_delay: a whole number of control periods in [0, 10], got {self.max_delay}")
        if not 0.0 < self.memory < 1.0:
            raise ValueError(f"latency.memory: in (0, 1), got {self.memory}")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"latency.margin: in [0, 1), got {self.margin}")
        if not (isinstance(self.min_transitions, int) and self.min_transitions >= 0):
            raise ValueError(f"latency.min_transitions: a whole number >= 0, got {self.min_transitions}")


class CommandLatency:
    """Per env: the commands on their way to the motors and the running error of each latency hypothesis."""

    def __init__(self, config: LatencyConfig, batch: int, safe_action: np.ndarray) -> None:
        config.validate()
        self.config, self.batch = config, batch
        self.hypotheses = config.max_delay + 1
        """Number of latency hypotheses (delays 0..max_delay)."""
        self.safe_action = np.asarray(safe_action, dtype=np.float64)
        self.sent = np.zeros((batch, config.max_delay, self.safe_action.size))
        """``(B, max_delay, a)`` the last commands sent, newest last (the safe command after a reset)."""
        self.error = np.zeros((batch, self.hypotheses))
        """``(B, D + 1)`` running mean of the log squared prediction error of each hypothesis (0 until scored)."""
        self.seen = np.zeros(batch, dtype=np.int64)
        """``(B,)`` transitions scored since the last forget."""
        self.delay = np.zeros(batch, dtype=np.int64)
        """``(B,)`` the latency the robot is planned for, in control periods."""
        self.forget()

    def reset(self, which: np.ndarray | None = None) -> None:
        """A new episode: the pipeline holds the safe command again; the estimate is kept."""
        self.sent[self._mask(which)] = self.safe_action

    def forget(self, which: np.ndarray | None = None) -> None:
        """A new episode and the estimate back to no latency."""
        which = self._mask(which)
        self.reset(which)
        self.error[which] = 0.0
        self.seen[which] = 0
        self.delay[which] = 0

    def candidates(self, action: np.ndarray) -> np.ndarray:
        """``(B, D + 1, a)``: the command that drove the transition after ``action`` (B, a) was sent, under each
        hypothesis: ``action`` itself (no latency), then the commands sent 1, 2, ... periods before it."""
        action = np.asarray(action, dtype=np.float64).reshape(self.batch, 1, -1)
        return np.concatenate([action, self.sent[:, ::-1]], axis=1)

    def applied(self, action: np.ndarray) -> np.ndarray:
        """``(B, a)``: the command that drives the transition after ``action`` was sent, under the chosen delay."""
        return self.candidates(action)[np.arange(self.batch), self.delay]

    def pending(self) -> list[np.ndarray]:
        """Per env, ``(delay, a)``: the commands already sent that the motors will still apply, oldest first,
        before the next one sent (empty without latency)."""
        return [self.sent[b, self.sent.shape[1] - d:] for b, d in enumerate(self.delay)]

    def score(self, squared_error: np.ndarray) -> None:
        """Add each hypothesis' prequential squared error ``(B, D + 1)`` of one transition and choose the delay."""
        cfg = self.config
        squared_error = np.asarray(squared_error, dtype=np.float64)
        finite = np.isfinite(squared_error).all(axis=1)
        log_error = np.log(np.maximum(np.where(np.isfinite(squared_error), squared_error, 1.0), 1e-12))
        first = (self.seen == 0)[:, None]
        blended = cfg.memory * self.error + (1.0 - cfg.memory) * log_error
        self.error = np.where(finite[:, None], np.where(first, log_error, blended), self.error)
        self.seen += finite
        best = self.error.argmin(axis=1)
        rows = np.arange(self.batch)
        better = self.error[rows, best] < self.error[rows, self.delay] + np.log1p(-cfg.margin)
        ready = self.seen >= cfg.min_transitions
        self.delay = np.where(ready & better, best, np.where(ready, self.delay, 0))

    def push(self, action: np.ndarray) -> None:
        """``action`` (B, a) was sent: it is now the newest command on its way."""
        if self.sent.shape[1]:
            self.sent = np.concatenate([self.sent[:, 1:], np.asarray(action, dtype=np.float64)[:, None]], axis=1)

    def state(self) -> dict[str, np.ndarray]:
        """What is carried across episodes (the estimate; the pipeline restarts from the safe command)."""
        return {"latency_error": self.error.copy(), "latency_seen": self.seen.copy(),
                "latency_delay": self.delay.copy()}

    def restore(self, state: Mapping[str, np.ndarray]) -> None:
        """From :meth:`state` (shapes and values checked by the caller)."""
        self.error[:] = state["latency_error"]
        self.seen[:] = state["latency_seen"]
        self.delay[:] = state["latency_delay"]

    def _mask(self, which: np.ndarray | None) -> np.ndarray:
        return np.ones(self.batch, dtype=bool) if which is None else np.asarray(which, dtype=bool)


__all__ = ["CommandLatency", "LatencyConfig"]
