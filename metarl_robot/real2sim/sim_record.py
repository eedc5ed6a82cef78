"""Record an episode log from a direct MuJoCo rollout of a bundle, as the ROS 2 node would have logged it.

Why: the shadow replay, its tests and the demo need real episode logs with a known task and without a
ROS install or a network link. This drives the bundle's adapter on the family's MuJoCo env in lockstep
(one frame per control period, no safety layer; optionally sensor noise, lost frames and periods
the robot ran its safe command, for tests of what reads logs) and writes every step through
:class:`~metarl_robot.logs.writer.EpisodeLogWriter` with the node's conventions: the adapter
observes ``(previous obs, applied action, obs)`` before it acts, the STATE frame of step ``k`` reports
the command of step ``k - 1`` as applied, and the true task goes into the metadata.

Not robot-side code: it imports MuJoCo through :mod:`metarl_robot.envs`.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from metarl_robot.envs.out_of_family import OutOfFamily
from metarl_robot.logs.writer import EpisodeLogWriter
from metarl_robot.runtime.adapter import Adapter
from metarl_robot.runtime.manifest import LoadedBundle

ROBOT_EPOCH_NS = 1_000_000_000
"""Robot-clock stamp of the first frame (the robot's clock is independent of the controller's)."""
RECEIVE_DELAY_NS = 1_000_000
"""Simulated transport delay: a frame arrives 1 ms after its robot stamp (controller clock)."""
COMPUTE_NS = 2_000_000
"""Simulated decision time: the command goes out 2 ms after its frame arrived."""


def record_sim_episode(bundle: LoadedBundle, task: Mapping[str, Any], path: str | Path, steps: int, seed: int = 0,
                       adapt: bool = True, obs_noise: float = 0.0, lost_steps: Collection[int] = (),
                       safe_steps: Collection[int] = (), carried: Mapping[str, np.ndarray] | None = None,
                       effects: OutOfFamily | None = None, adapter: Adapter | None = None, episode: int = 1) -> Path:
    """Run ``bundle``'s adapter on its family's MuJoCo env with ``task`` for ``steps`` control steps; log it.

    ``task``: parameters of the bundle's task family (validated by the env; missing ones are refused).
    ``seed`` seeds both the env's initial state, the planner and the sensor noise (recorded as the node
    records its ``seed`` parameter, so ``metarl replay`` uses it). Stops early, logging what happened, if
    the physics diverges. Returns ``path``.

    Faults a real link and robot show, for tests of what reads the log (all off by default):
    ``obs_noise``: standard deviation of Gaussian sensor noise, in robot.yaml ``scale`` units, added to
    every observation the adapter sees and the log records (the physics is untouched).
    ``lost_steps``: steps whose STATE frame never reached the node: nothing is logged, the adapter
    neither observes nor acts, and the robot runs the previous command on (the next frame's
    ``state_seq`` jumps and its ``applied_command_seq`` names that older command).
    ``safe_steps``: steps whose command the robot replaced by its safe command (the next frame's
    ``applied_command_seq`` is 0, as the twin's watchdog reports it).
    ``carried``: what the adapter carried from earlier episodes (:meth:`~metarl_robot.runtime.adapter.Adapter.
    carried_state`, e.g. an online model's fit), restored before the first step and logged as the node logs it.
    ``effects``: out-of-family effects of the simulated robot (docs/out_of_family.md), recorded in the log's
    metadata; the robot does not know them (a motor-side ``delay`` is not in ``applied_command_seq``).
    ``adapter``: drive this adapter of ``bundle`` (batch 1) instead of a fresh one, as the node drives its one adapter
    through every episode: it is reset at the start (what persists across episodes is kept, and logged), so a caller
    that passes the same adapter to consecutive episodes gets the node's cross-episode adaptation; ``carried`` and
    ``adapt`` are then the adapter's business (``carried`` is refused). ``episode``: the episode number the log records
    (the node counts its episodes from 1).
    """
    from metarl_robot.envs.registry import make_env

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not (np.isfinite(obs_noise) and obs_noise >= 0):
        raise ValueError(f"obs_noise must be a finite number >= 0 (scale units), got {obs_noise!r}")
    for name, chosen in (("lost_steps", lost_steps), ("safe_steps", safe_steps)):
        outside = sorted(k for k in chosen if not (isinstance(k, int) and 0 <= k < steps))
        if outside:
            raise ValueError(f"{name} must be step indices in [0, {steps}), got {outside}")
    if adapter is not None and carried is not None:
        raise ValueError("carried: give it or an adapter to drive, not both (a driven adapter carries its own state)")
    if 0 in lost_steps:
        raise ValueError("lost_steps: step 0 cannot be lost (the log would start without a command to hold)")
    lost, safe = frozenset(lost_steps), frozenset(safe_steps)
    path = Path(path)
    robot = bundle.robot
    env = make_env(bundle.family, **({"effects": effects} if effects else {}))
    noise_rng = np.random.default_rng([seed, 7])
    noise_scale = obs_noise * np.asarray(robot.obs_scale, dtype=np.float64)
    try:
        true_obs, info = env.reset(seed=seed, options={"task": dict(task)})
        task_params = env.unwrapped.reward_params
        if adapter is None:
            adapter = bundle.make_adapter(batch=1, seed=seed, **bundle.adapter_switches(adapt))
            adapter.restore(carried or {})
        else:
            adapter.reset()  # a new episode, as the node's activation does
        period_ns = round(robot.ctrl_dt * 1e9)
        t0 = time.monotonic_ns()
        prev_obs: np.ndarray | None = None
        applied: np.ndarray | None = None
        command = sent = np.asarray(robot.safe_action, dtype=np.float64)
        applied_seq = 0  # the command the robot ran during the period before this frame (0: the safe one)
        extra = {"source": "metarl_robot.real2sim.sim_record", "adapt": adapt, "seed": seed, "episode": episode,
                 "obs_noise": obs_noise, "lost_steps": sorted(lost), "safe_steps": sorted(safe),
                 "out_of_family": None if effects is None else effects.record()}
        with EpisodeLogWriter(path, robot, bundle=bundle, task=info["task"], extra_metadata=extra,
                              adapter_state=adapter.carried_state()) as log:
            for k in range(steps):
                obs = true_obs + noise_scale * noise_rng.standard_normal(true_obs.shape) if obs_noise else true_obs
                seq = k + 1
                if k in lost:
                    prev_obs = None  # the node never saw this frame: no transition to learn from across it
                else:
                    if prev_obs is not None:
                        fed = sent if adapter.observes_sent_commands else applied
                        adapter.observe(prev_obs[None], fed[None], obs[None])
                    action, diagnostics = adapter.act(obs[None], task_params)
                    command = np.asarray(action, dtype=np.float64)[0]
                    stamp = ROBOT_EPOCH_NS + k * period_ns
                    received = t0 + k * period_ns + RECEIVE_DELAY_NS
                    log.write_step(obs=obs, state_seq=seq, robot_stamp_ns=stamp, receive_time_ns=received,
                                   applied_command_seq=applied_seq, command=command, command_seq=seq,
                                   command_answers_seq=seq, command_expires_ns=stamp + 3 * period_ns,
                                   command_source="adapter", safety_state="OK", task_params=task_params,
                                   adapter_action=action, adaptation=diagnostics, time_ns=received + COMPUTE_NS)
                    applied_seq = seq
                    prev_obs = obs
                if k in safe:
                    command, applied_seq = np.asarray(robot.safe_action, dtype=np.float64), 0
                sent = command
                next_obs, _, diverged, _, step_info = env.step(command)
                applied, true_obs = np.asarray(step_info["applied_action"], dtype=np.float64), next_obs
                if diverged:
                    break
    finally:
        env.close()
    return path


__all__ = ["record_sim_episode"]
