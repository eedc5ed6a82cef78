"""Trajectory sampling through a learned ensemble (TS-inf): each particle stays on one member.

The ensemble is reached through a step function ``(E, M, o), (E, M, a), (E, M, d) → (E, M, o)``:
an onnxruntime session on the robot, the torch model in training. A bundle also carries the same
step chained over the planner's horizon as one graph (``fused``: ``(E, M, o), (E, M, H, a),
(E, M, d) → (E, M, H, o)``); one call instead of H removes the per-call overhead that dominates
small models, so it is used whenever the horizon matches. Particle ``r`` of the flattened
``(B, N, P)`` batch rides member ``r mod E`` for the whole horizon, so the particles of one action
sequence see different members when ``P > 1`` and, with ``P = 1``, consecutive samples do.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
FusedFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""``(E, M, o), (E, M, H, a), (E, M, d) → (E, M, H, o)``: H chained steps in one call."""


class EnsembleRollout:
    """A :class:`~metarl_robot.runtime.planner.RolloutModel` over an ensemble step function.

    ``start`` is ``(obs (B, o), z (B, d))``: the current observation and each env's context.
    """

    def __init__(self, step: StepFn, ensemble_size: int, fused: tuple[FusedFn, int] | None = None) -> None:
        self.step = step
        """The ensemble's one-step mean prediction."""
        self.ensemble_size = ensemble_size
        self.fused = fused
        """``(rollout function, its horizon)``, used for action sequences of exactly that horizon."""

    def rollout(self, start: tuple[np.ndarray, np.ndarray], actions: np.ndarray, particles: int) -> np.ndarray:
        obs, z = start
        b, n, h, a = actions.shape
        e = self.ensemble_size
        rows = b * n * particles
        m = -(-rows // e)  # rows per member; the last few rows are padding when E does not divide them
        full, rest = divmod(rows, e)

        def to_members(x: np.ndarray) -> np.ndarray:  # (rows, ·) → (E, M, ·) float32 with row r on member r mod E
            out = np.empty((e, m, x.shape[-1]), dtype=np.float32)
            by_row = out.transpose(1, 0, 2)  # (M, E, ·) view: row r at [r // E, r mod E]
            # Written straight from x, converting on the way: no padded or transposed float64 copy first.
            by_row[:full] = x[:full * e].reshape(full, e, x.shape[-1])
            if rest:
                by_row[full, :rest] = x[full * e:]
                by_row[full, rest:] = x[0]  # padding: any real row will do, its predictions are dropped
            return out

        state = to_members(np.repeat(obs, n * particles, axis=0))
        ctx = to_members(np.repeat(z, n * particles, axis=0))
        # (B*N*P, H, a), particles adjacent; a view of the planner's contiguous samples when P = 1.
        act = (actions if particles == 1 else np.repeat(actions, particles, axis=1)).reshape(rows, h, a)
        if self.fused is not None and self.fused[1] == h:
            out = self.fused[0](state, to_members(act.reshape(rows, h * a)).reshape(e, m, h, a), ctx)
        else:
            out = np.empty((e, m, h, obs.shape[-1]), dtype=np.float32)
            for t in range(h):
                state = self.step(state, to_members(act[:, t]), ctx)
                out[:, :, t] = state
        # (E, M, H, o) → rows in the original (B, N, P) order, padding dropped: one float64 copy in that order.
        flat = np.empty((m, e, h, out.shape[-1]))
        np.copyto(flat, np.asarray(out).transpose(1, 0, 2, 3))
        return flat.reshape(m * e, h, -1)[:rows].reshape(b, n, particles, h, -1)
