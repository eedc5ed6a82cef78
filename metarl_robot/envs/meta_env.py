"""The gymnasium env behind every task family: one MuJoCo robot, one task at a time."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from operator import itemgetter
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np

from metarl_robot.envs.dynamics import DynamicsApplier
from metarl_robot.envs.out_of_family import NOISE_STREAM, BoundEffects, OutOfFamily
from metarl_robot.envs.robot_model import (
    ObservationMap,
    joint_qpos_slice,
    joint_quaternion_slices,
    load_model,
)
from metarl_robot.spec.family import SPLITS, Task, TaskFamily, load_family
from metarl_robot.spec.rewards import check_reward_inputs, get_reward
from metarl_robot.spec.robot import RobotSpec, load_robot
from metarl_robot.spec.schema import SpecError

_RESET_WARNINGS = [int(w) for w in (mujoco.mjtWarning.mjWARN_BADQPOS, mujoco.mjtWarning.mjWARN_BADQVEL,
                                    mujoco.mjtWarning.mjWARN_BADQACC)]
"""MuJoCo warnings after which it has reset the state to qpos0 on its own."""
_reset_warning_counts = itemgetter(*_RESET_WARNINGS)
"""The counts of :data:`_RESET_WARNINGS` out of the list of every warning's count."""


class MetaMujocoEnv(gym.Env):
    """A MuJoCo robot from ``robot.yaml`` whose dynamics and reward follow a task of a family.

    - ``set_task(params)`` changes the physics (from the nominal model) or the reward at once;
      parameters left out take their nominal value. ``get_task()`` returns the full task.
    - ``reset(options={"task": params | "train" | "test"})`` sets a task, or draws one from the
      split with the env's own seeded RNG, before resetting the state.
    - Observations hold only measured fields (``robot.measured_fields``); privileged fields are in
      ``info["privileged"]``. ``info`` also carries the task and the reward components.
    - Episodes end by truncation after ``family.episode_steps`` control steps, or by termination if
      the physics diverges (MuJoCo's automatic reset on a bad qpos, qvel or qacc, or a non-finite
      observation), with ``info["physics_diverged"]``.
    - Commands are limited as the robot's safety layer will limit them: clipped to the action box
      (``info["action_clipped"]``), then each change per control period is capped at
      ``max_rate * ctrl_dt`` from the last sent command (``info["action_rate_limited"]``; the last
      sent command is the safe command after a reset). The reward's control cost and the delay
      queue see the sent command. NaN/Inf actions raise.
    - ``effects``: out-of-family effects for evaluation (docs/out_of_family.md), kept through every
      ``set_task`` and ``reset``. With observation effects (noise, bias) the returned observation is what
      the controller sees, ``info["true_obs"]`` the true one, and the reward grades the true motion. Off
      (``None`` or empty), the env is the plain env bit for bit.
    """

    metadata = {"render_modes": []}  # noqa: RUF012  (gymnasium's class-level convention)

    def __init__(self, family: str | TaskFamily = "cartpole_swingup", task: Mapping[str, Any] | None = None,
                 effects: OutOfFamily | None = None) -> None:
        self.family: TaskFamily = family if isinstance(family, TaskFamily) else load_family(family)
        """The task family (parameter box and reward)."""
        self.robot: RobotSpec = load_robot(self.family.spec.robot)
        """The robot's sim/real interface."""
        check_reward_inputs(self.family.spec.reward, self.robot, self.family.reward_names, self.family.where)
        self.reward_fn = get_reward(self.family.spec.reward)
        """Numpy reward shared with the runtime planner."""
        self._reward_names = tuple(self.family.reward_names)
        self.model = load_model(self.robot)
        self.data = mujoco.MjData(self.model)
        self._obs_map = ObservationMap(self.robot, self.model)
        self._dynamics = DynamicsApplier(self.model, self.family)
        self.effects: OutOfFamily | None = effects or None
        """Out-of-family effects (evaluation only); ``None`` when off."""
        # Binding sets the integrator, so it comes before the stepping scheme is chosen.
        self._effects = None if self.effects is None else BoundEffects(
            self.effects, self.robot, self.model, self._dynamics.owners, self.family.where)
        self._obs_rng: np.random.Generator | None = None  # observation noise: a stream of its own
        self._ctrl_ids = np.array([self.model.actuator(a).id for a in self.robot.actuators])
        self._action_shape = (self.robot.action_dim,)
        self._substeps = self.robot.control.substeps
        self._episode_steps = self.family.spec.episode_steps
        self._action_low, self._action_high = self.robot.action_low, self.robot.action_high
        self._max_step = self.robot.action_max_rate * self.robot.ctrl_dt  # largest change per control period
        self._last_sent = self.robot.safe_action.copy()
        self._warnings = self.data.warning  # a live view of MuJoCo's warning counters
        self._qpos_init = self._initial_qpos()
        self._quaternions = joint_quaternion_slices(self.model)
        # RK4 cannot be split into mj_step1/mj_step2 (see _physics_step).
        self._split_step = self.model.opt.integrator != mujoco.mjtIntegrator.mjINT_RK4

        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (self.robot.obs_dim,), np.float64)
        self.action_space = gym.spaces.Box(
            self.robot.action_low.astype(np.float32), self.robot.action_high.astype(np.float32), dtype=np.float32
        )
        self._task: Task = self.family.nominal()
        self._delay = 0
        self._queue: deque[np.ndarray] = deque()
        self._steps = 0
        self._last_obs = np.zeros(self.robot.obs_dim)
        self.set_task(self.family.nominal() if task is None else task)
        mujoco.mj_forward(self.model, self.data)

    # ---- tasks ---------------------------------------------------------------------------------
    def set_task(self, task: Mapping[str, Any]) -> None:
        """Validate ``task`` and apply it now (mid-episode too). Raises SpecError on a bad parameter."""
        task = self.family.validate(task)
        self._dynamics.apply(task)
        if self._effects is not None:
            self._effects.apply_physics(self.model)  # after the restore from nominal, on top of the task
        self._task = task
        self._reward_params = {name: task[name] for name in self._reward_names}  # what step() passes the reward
        if self._dynamics.delay_param is not None or self._effects is not None:
            family_delay = 0 if self._dynamics.delay_param is None else int(task[self._dynamics.delay_param])
            self._set_delay(family_delay + (0 if self._effects is None else self._effects.delay_periods))
        # Refresh positions/velocities-derived quantities under the new model for the next step.
        mujoco.mj_forward(self.model, self.data)

    def get_task(self) -> Task:
        return dict(self._task)

    @property
    def task(self) -> Task:
        """The current task; assignable (``vector_env.set_attr("task", [...])`` sets one per sub-env)."""
        return self.get_task()

    @task.setter
    def task(self, value: Mapping[str, Any]) -> None:
        self.set_task(value)

    def sample_task(self, split: str = "train") -> Task:
        """A task drawn from ``split`` with the env's own RNG (seeded by ``reset(seed=...)``)."""
        return self.family.sample(self.np_random, split, 1)[0]

    @property
    def reward_params(self) -> dict[str, float]:
        return {name: self._task[name] for name in self._reward_names}

    # ---- gymnasium API -------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        options = options or {}
        unknown = set(options) - {"task"}
        if unknown:
            raise ValueError(f"unknown reset option(s) {sorted(unknown)}; allowed: 'task'")
        if "task" in options:
            choice = options["task"]
            if isinstance(choice, str):
                if choice not in SPLITS:
                    raise SpecError(self.family.name, "reset options.task", f"got {choice!r}; give a task "
                                    f"mapping or a split name: {', '.join(SPLITS)}")
                choice = self.sample_task(choice)
            self.set_task(choice)
        m, d = self.model, self.data
        mujoco.mj_resetData(m, d)
        init = self.family.spec.initial_state
        d.qpos[:] = self._qpos_init + self.np_random.uniform(-init.qpos_noise, init.qpos_noise, m.nq)
        d.qvel[:] = init.qvel_noise * self.np_random.standard_normal(m.nv)
        for quat in self._quaternions:  # noise must not leave a quaternion unnormalised
            d.qpos[quat] /= np.linalg.norm(d.qpos[quat])
        mujoco.mj_forward(m, d)
        self._set_delay(self._delay, refill=True)
        self._last_sent = self.robot.safe_action.copy()
        self._steps = 0
        obs, privileged = self._obs_map.gather(d)
        self._last_obs = obs
        info = {"task": self.get_task(), "privileged": privileged}
        if self._effects is not None:
            if seed is not None or self._obs_rng is None:
                # Seeded from the env's seed but never drawing from its stream: noise leaves the physics alone.
                seq = self.np_random.bit_generator.seed_seq
                self._obs_rng = np.random.default_rng(np.random.SeedSequence(
                    seq.entropy, spawn_key=(*seq.spawn_key, NOISE_STREAM)))
            obs = self._observe(obs, info)
        return obs, info

    def step(self, action):
        command = np.asarray(action, dtype=np.float64)
        if command.shape != self._action_shape:
            raise ValueError(f"action must have shape ({self.robot.action_dim},) for fields "
                             f"{[a.name for a in self.robot.action]}, got {command.shape}")
        if np.count_nonzero(np.isfinite(command)) != command.size:
            raise ValueError(f"action contains NaN or Inf: {command}")
        clipped = np.minimum(np.maximum(command, self._action_low), self._action_high)
        sent = np.minimum(np.maximum(clipped, self._last_sent - self._max_step), self._last_sent + self._max_step)
        self._last_sent = sent
        self._queue.append(sent)
        applied = self._queue.popleft()
        self.data.ctrl[self._ctrl_ids] = applied

        # MuJoCo resets the state by itself on a bad position, velocity or acceleration; count those
        # warnings so such a teleport ends the episode instead of passing as physics.
        # (Summed as Python ints: the list of counts is cheaper than numpy's fancy index and reduction.)
        # The count alone misses a second reset in one episode (mj_resetData zeroes the counters before counting the
        # new warning, so 1 stays 1): a reset also sends the clock back, where a step advances it by substeps
        # whole timesteps.
        resets_before = sum(_reset_warning_counts(self._warnings.number.tolist()))
        time_before = self.data.time
        self._physics_step()
        obs, privileged = self._obs_map.gather(self.data)
        diverged = (sum(_reset_warning_counts(self._warnings.number.tolist())) > resets_before
                    or self.data.time < time_before + (self._substeps - 0.5) * self.model.opt.timestep
                    or bool(np.count_nonzero(np.isfinite(obs)) != obs.size))
        reward, components = self.reward_fn(self.robot, self._last_obs, sent, obs, self._reward_params)
        self._last_obs = obs
        self._steps += 1
        # The flags compare the (finite) commands as lists: for a few numbers cheaper than numpy, and a Python bool,
        # which a vector env merges into a bool array (a numpy bool would make an object array).
        clipped_values = clipped.tolist()
        info = {
            "task": dict(self._task),
            "reward_components": {k: float(v) for k, v in components.items()},
            "privileged": privileged,
            "action_clipped": command.tolist() != clipped_values,
            "action_rate_limited": sent.tolist() != clipped_values,
            "sent_action": sent,
            "applied_action": applied,
            "physics_diverged": diverged,
        }
        truncated = self._steps >= self._episode_steps
        if self._effects is not None:
            obs = self._observe(obs, info)
        return obs, float(reward), diverged, truncated, info

    def _observe(self, obs: np.ndarray, info: dict[str, Any]) -> np.ndarray:
        """What the controller sees under the effects; the truth stays in ``info["true_obs"]``."""
        info["true_obs"] = obs
        return self._effects.observe(obs, self._obs_rng) if self._effects.observes else obs.copy()

    # ---- internals -----------------------------------------------------------------------------
    def _physics_step(self) -> None:
        m, d, n = self.model, self.data, self._substeps
        if self._split_step:
            # dm_control's scheme: finish the pending step (step2), take n-1 full steps, then run
            # step1 so position/velocity sensors describe the state we return, at no extra cost.
            mujoco.mj_step2(m, d)
            if n > 1:
                mujoco.mj_step(m, d, nstep=n - 1)
            mujoco.mj_step1(m, d)
        else:
            mujoco.mj_step(m, d, nstep=n)
            mujoco.mj_forward(m, d)

    def _set_delay(self, delay: int, refill: bool = False) -> None:
        # Commands reach the motors `delay` control steps late; the queue starts full of safe commands.
        safe = self.robot.safe_action
        if refill:
            self._queue = deque(safe.copy() for _ in range(delay))
        else:
            while len(self._queue) < delay:
                self._queue.appendleft(self._queue[0].copy() if self._queue else safe.copy())
            while len(self._queue) > delay:
                self._queue.popleft()
        self._delay = delay

    def _initial_qpos(self) -> np.ndarray:
        qpos = self.model.qpos0.copy()
        for name, value in self.family.spec.initial_state.qpos.items():
            jid = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_JOINT, name)
            at = f"initial_state.qpos.{name}"
            if jid < 0:
                joints = [mujoco.mj_id2name(self.model, mujoco.mjtObj.mjOBJ_JOINT, j) for j in range(self.model.njnt)]
                raise SpecError(self.family.where, at, f"joint {name!r} is not in robot {self.robot.name!r}'s MJCF; "
                                f"joints: {joints}")
            values = np.atleast_1d(np.asarray(value, dtype=np.float64))
            sl = joint_qpos_slice(self.model, jid)
            if len(values) != sl.stop - sl.start:
                raise SpecError(self.family.where, at, f"joint {name!r} has {sl.stop - sl.start} qpos values, "
                                f"got {len(values)}")
            qpos[sl] = values
        return qpos
