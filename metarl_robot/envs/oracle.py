"""The oracle: a :class:`RolloutModel` that predicts with MuJoCo itself, for the true task.

Used to grade adaptive controllers: the same planner, planning through the exact physics of the
task (``mujoco.rollout``, multithreaded), gives the return a perfect model would reach. Its gap to
the adapted controller is the sub-optimality that adaptation leaves.
"""

from __future__ import annotations

import mujoco
import numpy as np
from mujoco import rollout as mj_rollout

from metarl_robot.envs.meta_env import MetaMujocoEnv

STATE = mujoco.mjtState.mjSTATE_FULLPHYSICS


class MujocoOracle:
    """Rolls action sequences out in copies of the envs' own models (one env per batch row).

    ``start`` is the list of envs to plan for; each contributes its current physics state, its
    task's model and its pending delayed commands. Observations are read like the env reads them;
    sensor-sourced fields come from the step's sensor pass (one substep behind, see
    docs/robot_spec.md), which is exact for the joint-sourced fields every shipped robot uses.
    An env's out-of-family physics effects (damping, friction, integrator: in its model; extra delay: in its
    queue) are therefore in the predictions; its observation effects are not (it reads the true state).
    """

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        """Threads of mujoco.rollout's pool."""
        self._datas: dict[int, list[mujoco.MjData]] = {}

    def _thread_datas(self, env: MetaMujocoEnv) -> list[mujoco.MjData]:
        key = id(env.model)
        if key not in self._datas:
            self._datas[key] = [mujoco.MjData(env.model) for _ in range(self.threads)]
        return self._datas[key]

    def rollout(self, start: list[MetaMujocoEnv], actions: np.ndarray, particles: int) -> np.ndarray:
        b, n, h, _ = actions.shape
        envs = start
        env0 = envs[0]
        m = env0.model
        substeps = env0.robot.control.substeps
        out = np.empty((b, n, particles, h, env0.robot.obs_dim))
        for i, env in enumerate(envs):
            state = np.empty(mujoco.mj_stateSize(env.model, STATE))
            mujoco.mj_getState(env.model, env.data, state, STATE)
            # Commands still in the env's delay queue reach the motors first.
            pending = np.array(list(env._queue)).reshape(-1, env.robot.action_dim)
            seq = np.concatenate([np.broadcast_to(pending, (n, *pending.shape)), actions[i]], axis=1)[:, :h]
            ctrl = np.zeros((n, h, m.nu))
            ctrl[..., env._ctrl_ids] = seq
            ctrl = np.repeat(ctrl, substeps, axis=1)  # zero-order hold over the substeps
            states, sensors = mj_rollout.rollout(env.model, self._thread_datas(env), state[None], ctrl)
            at_control = slice(substeps - 1, None, substeps)
            qpos = states[:, at_control, 1:1 + m.nq]
            qvel = states[:, at_control, 1 + m.nq:1 + m.nq + m.nv]
            full = np.concatenate([qpos, qvel, sensors[:, at_control]], axis=-1)
            out[i] = full[..., env._obs_map.measured][:, None]  # one deterministic particle, repeated
        return out
