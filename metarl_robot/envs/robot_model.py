"""Bind a :class:`RobotSpec` to its compiled MJCF: validation and the observation gather map."""

from __future__ import annotations

from dataclasses import dataclass

import mujoco
import numpy as np

from metarl_robot.spec.robot import ObsField, RobotSpec
from metarl_robot.spec.schema import SpecError

# qpos / qvel sizes by joint type; keyed by int because MuJoCo's enum does not hash like the int
# stored in model.jnt_type (``jnt_type[j] in (mjJNT_FREE,)`` is False even for a free joint).
_QPOS_SIZE = {int(mujoco.mjtJoint.mjJNT_FREE): 7, int(mujoco.mjtJoint.mjJNT_BALL): 4}
_QVEL_SIZE = {int(mujoco.mjtJoint.mjJNT_FREE): 6, int(mujoco.mjtJoint.mjJNT_BALL): 3}


def joint_qpos_slice(model: mujoco.MjModel, jid: int) -> slice:
    """The joint's entries in ``qpos`` (7 for free, 4 for ball, else 1)."""
    adr = int(model.jnt_qposadr[jid])
    return slice(adr, adr + _QPOS_SIZE.get(int(model.jnt_type[jid]), 1))


def joint_dof_slice(model: mujoco.MjModel, jid: int) -> slice:
    """The joint's entries in ``qvel`` / dof arrays (6 for free, 3 for ball, else 1)."""
    adr = int(model.jnt_dofadr[jid])
    return slice(adr, adr + _QVEL_SIZE.get(int(model.jnt_type[jid]), 1))


def joint_quaternion_slices(model: mujoco.MjModel) -> list[slice]:
    """The ``qpos`` slices holding a unit quaternion (free and ball joints)."""
    out = []
    for j in range(model.njnt):
        jtype = int(model.jnt_type[j])
        if jtype in _QPOS_SIZE:
            start = int(model.jnt_qposadr[j]) + (3 if jtype == int(mujoco.mjtJoint.mjJNT_FREE) else 0)
            out.append(slice(start, start + 4))
    return out


def _where(spec: RobotSpec) -> str:
    return str(spec.source_path) if spec.source_path else f"robot {spec.name!r}"


def _names(model: mujoco.MjModel, objtype: mujoco.mjtObj, count: int) -> list[str]:
    return [mujoco.mj_id2name(model, objtype, i) or "" for i in range(count)]


def load_model(spec: RobotSpec) -> mujoco.MjModel:
    """Compile the robot's MJCF and check robot.yaml against it; raises :class:`SpecError` naming the field."""
    where = _where(spec)
    path = spec.mjcf_path
    if not path.is_file():
        raise SpecError(where, "mjcf", f"MJCF file not found: {path}")
    try:
        model = mujoco.MjModel.from_xml_path(str(path))
    except ValueError as exc:
        raise SpecError(where, "mjcf", f"MuJoCo could not compile {path}: {exc}") from exc
    validate_against_model(spec, model)
    return model


def validate_against_model(spec: RobotSpec, model: mujoco.MjModel) -> None:
    """Names exist, sizes match, limits fit the MJCF, and the timestep agrees with the control period."""
    where = _where(spec)
    mjcf = spec.mjcf
    if abs(model.opt.timestep - spec.sim_dt) > 1e-9 * spec.sim_dt:
        raise SpecError(where, "control", f"MJCF timestep {model.opt.timestep} s must equal control.period / "
                        f"control.substeps = {spec.control.period} / {spec.control.substeps} = {spec.sim_dt} s")
    joints = _names(model, mujoco.mjtObj.mjOBJ_JOINT, model.njnt)
    for i, name in enumerate(spec.joints):
        if name not in joints:
            raise SpecError(where, f"joints[{i}]", f"joint {name!r} is not in {mjcf}; its joints: {joints}")
    actuators = _names(model, mujoco.mjtObj.mjOBJ_ACTUATOR, model.nu)
    for i, name in enumerate(spec.actuators):
        if name not in actuators:
            raise SpecError(where, f"actuators[{i}]", f"actuator {name!r} is not in {mjcf}; its actuators: {actuators}")
    uncommanded = [a or f"<unnamed #{i}>" for i, a in enumerate(actuators) if a not in spec.actuators]
    if uncommanded:
        raise SpecError(where, "actuators", f"every actuator of {mjcf} must be commanded; missing {uncommanded}")
    for i, a in enumerate(spec.action):
        aid = model.actuator(a.actuator).id
        if model.actuator_ctrllimited[aid]:
            lo, hi = model.actuator_ctrlrange[aid]
            if a.low < lo or a.high > hi:
                raise SpecError(where, f"action[{i}] ({a.name})", f"[{a.low}, {a.high}] exceeds the MJCF ctrlrange "
                                f"[{lo}, {hi}] of actuator {a.actuator!r}")
    ObservationMap(spec, model)  # validates every field's source and size


def _source_indices(spec: RobotSpec, model: mujoco.MjModel, f: ObsField, at: str) -> np.ndarray:
    """Indices of one field into the state vector ``concat(qpos, qvel, sensordata)``."""
    where = _where(spec)
    src = f.source
    kind = src.kind
    pieces = []
    for name in src.names:
        if kind == "sensor":
            sid = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SENSOR, name)
            if sid < 0:
                sensors = _names(model, mujoco.mjtObj.mjOBJ_SENSOR, model.nsensor)
                raise SpecError(where, f"{at}.source.sensor", f"sensor {name!r} is not in {spec.mjcf}; "
                                f"its sensors: {sensors}")
            adr, dim = model.sensor_adr[sid], model.sensor_dim[sid]
            pieces.append(model.nq + model.nv + np.arange(adr, adr + dim))
        else:
            jid = model.joint(name).id
            if kind == "joint_pos":
                sl = joint_qpos_slice(model, jid)
                pieces.append(np.arange(sl.start, sl.stop))
            else:
                sl = joint_dof_slice(model, jid)
                pieces.append(model.nq + np.arange(sl.start, sl.stop))
    idx = np.concatenate(pieces)
    if src.index is not None:
        bad = [i for i in src.index if not 0 <= i < len(idx)]
        if bad:
            raise SpecError(where, f"{at}.source.index", f"{bad} out of range for a source of {len(idx)} values")
        idx = idx[src.index]
    if len(idx) != f.size:
        raise SpecError(where, f"{at}.size", f"declared {f.size} but the source {kind}={src.names}"
                        f"{' index=' + str(src.index) if src.index is not None else ''} gives {len(idx)} values")
    return idx


@dataclass
class ObservationMap:
    """Gathers the measured and privileged observation vectors from ``MjData`` in one indexing op each."""

    measured: np.ndarray
    """Indices into concat(qpos, qvel, sensordata) of the measured observation, in robot.yaml order."""
    privileged: np.ndarray
    """Same, for the privileged fields."""

    def __init__(self, spec: RobotSpec, model: mujoco.MjModel) -> None:
        per_field = {
            f.name: _source_indices(spec, model, f, f"observation[{i}] ({f.name})")
            for i, f in enumerate(spec.observation)
        }
        self.measured = np.concatenate([per_field[f.name] for f in spec.measured_fields])
        privileged = [per_field[f.name] for f in spec.privileged_fields]
        self.privileged = np.concatenate(privileged) if privileged else np.zeros(0, dtype=np.int64)

    def gather(self, data: mujoco.MjData) -> tuple[np.ndarray, np.ndarray]:
        state = np.concatenate((data.qpos, data.qvel, data.sensordata))
        return state[self.measured], state[self.privileged]
