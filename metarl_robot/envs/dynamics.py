"""Dynamics effects: how a task family's dynamics parameters change a compiled MuJoCo model.

Every application starts again from the nominal model, so a task's physics never depends on the
tasks applied before it. Scale effects multiply and absolute effects set; an element that an
absolute effect (or a rod length) changes may be changed by no other parameter, so the result does
not depend on parameter order. An absolute effect's nominal must equal the MJCF's value, so the
nominal task is exactly the MJCF robot.
The effect vocabulary (documented for users in docs/task_families.md):

=====================  =====================================  =============================================
effect                 targets                                changes
=====================  =====================================  =============================================
body_mass_scale        body names or ``all``                  mass and inertia × value (density scaling)
geom_friction_scale    geom names or ``all``                  sliding, torsional, rolling friction × value
joint_damping_scale    joint names or ``all``                 viscous damping of the joints' dofs × value
joint_damping          joint names or ``all``                 viscous damping := value
joint_frictionloss     joint names or ``all``                 dry friction := value
actuator_gain_scale    actuator names or ``all``              force per unit command × value
rod_length             ``{body: B, geom: G}``                 length of a uniform rod := value (metres)
action_delay           ``true``                               commands reach the motors value steps late
=====================  =====================================  =============================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mujoco
import numpy as np

from metarl_robot.envs.robot_model import joint_dof_slice
from metarl_robot.spec.family import Param, Task, TaskFamily
from metarl_robot.spec.schema import SpecError

NOMINAL_FIELDS = (
    "body_mass", "body_inertia", "body_ipos", "geom_friction", "geom_size", "geom_pos", "geom_rbound",
    "dof_damping", "dof_frictionloss", "actuator_gainprm", "actuator_biasprm",
)
"""Model fields an effect may change; restored from the nominal model before every application."""

Effect = Callable[[mujoco.MjModel, float], None]

_OBJECTS = {
    "body": (mujoco.mjtObj.mjOBJ_BODY, "nbody"),
    "geom": (mujoco.mjtObj.mjOBJ_GEOM, "ngeom"),
    "joint": (mujoco.mjtObj.mjOBJ_JOINT, "njnt"),
    "actuator": (mujoco.mjtObj.mjOBJ_ACTUATOR, "nu"),
}


class _Binder:
    """Resolves effect targets against one model, with errors that name the family field."""

    def __init__(self, model: mujoco.MjModel, where: str, param: Param) -> None:
        self.model, self.where, self.param = model, where, param
        self.at = f"params.{param.name}.effect"

    def fail(self, problem: str) -> SpecError:
        return SpecError(self.where, self.at, problem)

    def ids(self, kind: str, targets: Any) -> np.ndarray:
        objtype, count_attr = _OBJECTS[kind]
        count = getattr(self.model, count_attr)
        if targets == "all":
            # The world body (id 0) has no mass to scale.
            return np.arange(1 if kind == "body" else 0, count)
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list) or not targets:
            raise self.fail(f"targets must be 'all' or a list of {kind} names, got {targets!r}")
        ids = []
        for name in targets:
            i = mujoco.mj_name2id(self.model, objtype, str(name))
            if i < 0:
                known = [k for j in range(count) if (k := mujoco.mj_id2name(self.model, objtype, j))]
                raise self.fail(f"{kind} {name!r} is not in the robot's MJCF; {kind} names there: {known}")
            ids.append(i)
        return np.array(ids)

    def dofs(self, targets: Any) -> np.ndarray:
        dofs = []
        for j in self.ids("joint", targets):
            sl = joint_dof_slice(self.model, int(j))
            dofs.extend(range(sl.start, sl.stop))
        return np.array(dofs, dtype=int)


def _scale(field: str, ids: np.ndarray) -> Effect:
    def apply(model: mujoco.MjModel, value: float) -> None:
        getattr(model, field)[ids] *= value  # whole rows: all friction coefficients of a geom
    return apply


def _set(field: str, ids: np.ndarray) -> Effect:
    def apply(model: mujoco.MjModel, value: float) -> None:
        getattr(model, field)[ids] = value
    return apply


def _body_mass_scale(b: _Binder, targets: Any) -> Effect:
    ids = b.ids("body", targets)

    def apply(model: mujoco.MjModel, value: float) -> None:
        model.body_mass[ids] *= value
        model.body_inertia[ids] *= value
    return apply


def _actuator_gain_scale(b: _Binder, targets: Any) -> Effect:
    ids = b.ids("actuator", targets)

    def apply(model: mujoco.MjModel, value: float) -> None:
        # gainprm[0] is the force per unit command; for affine-bias (position/velocity) actuators the
        # stiffness and damping in biasprm[1:3] scale with it, so a stronger servo stays the same servo.
        model.actuator_gainprm[ids, 0] *= value
        model.actuator_biasprm[ids, 1:3] *= value
    return apply


def _rod_length(b: _Binder, targets: Any) -> Effect:
    if not isinstance(targets, dict) or set(targets) != {"body", "geom"}:
        raise b.fail(f"rod_length needs {{body: <name>, geom: <name>}}, got {targets!r}")
    (body,) = b.ids("body", [targets["body"]])
    (geom,) = b.ids("geom", [targets["geom"]])
    model = b.model
    if model.geom_bodyid[geom] != body:
        raise b.fail(f"geom {targets['geom']!r} does not belong to body {targets['body']!r}")
    if int(model.geom_type[geom]) not in (int(mujoco.mjtGeom.mjGEOM_CAPSULE), int(mujoco.mjtGeom.mjGEOM_CYLINDER)):
        raise b.fail(f"geom {targets['geom']!r} must be a capsule or cylinder (a rod)")
    half = float(model.geom_size[geom, 1])
    length0 = 2 * half
    # The rod must start at the body origin (MJCF fromto="0 0 0 ..."): then its centre, its centre
    # of mass and its length all scale by the same ratio.
    if not np.isclose(np.linalg.norm(model.geom_pos[geom]), half, rtol=1e-6):
        raise b.fail(f"geom {targets['geom']!r} must start at the body origin (fromto=\"0 0 0 ...\")")
    axial = int(np.argmin(model.body_inertia[body]))
    transverse = [i for i in range(3) if i != axial]

    def apply(model: mujoco.MjModel, value: float) -> None:
        ratio = value / length0
        model.geom_size[geom, 1] *= ratio
        model.geom_pos[geom] *= ratio
        model.geom_rbound[geom] = model.geom_size[geom, 1] + model.geom_size[geom, 0]
        model.body_ipos[body] *= ratio
        # Uniform rod: transverse inertia m L^2 / 12 grows with L^2; the axial one does not change.
        model.body_inertia[body, transverse] *= ratio**2
    return apply


EFFECTS: dict[str, Callable[[_Binder, Any], Effect | None]] = {
    "body_mass_scale": _body_mass_scale,
    "geom_friction_scale": lambda b, t: _scale("geom_friction", b.ids("geom", t)),
    "joint_damping_scale": lambda b, t: _scale("dof_damping", b.dofs(t)),
    "joint_damping": lambda b, t: _set("dof_damping", b.dofs(t)),
    "joint_frictionloss": lambda b, t: _set("dof_frictionloss", b.dofs(t)),
    "actuator_gain_scale": _actuator_gain_scale,
    "rod_length": _rod_length,
    "action_delay": lambda b, t: None,  # handled by the env's command queue, not the model
}
"""Effect name → binder. A binder validates targets against the model and returns the effect."""

_ABSOLUTE = {"joint_damping": "dof_damping", "joint_frictionloss": "dof_frictionloss"}
"""Effects that set a field rather than scale it: their nominal must be the MJCF's own value."""
_DOF_FIELD = {**_ABSOLUTE, "joint_damping_scale": "dof_damping"}


def _touched(binder: _Binder, effect_name: str, targets: Any) -> list[tuple[str, int]]:
    """The (field, element) pairs an effect changes, for the effects that may conflict."""
    if effect_name in _DOF_FIELD:
        return [(_DOF_FIELD[effect_name], int(d)) for d in binder.dofs(targets)]
    if effect_name == "rod_length" and isinstance(targets, dict) and "body" in targets:
        return [("rod_length", int(i)) for i in binder.ids("body", [targets["body"]])]
    return []


def _check_nominal(binder: _Binder, effect_name: str, targets: Any) -> None:
    """An absolute effect's nominal must equal the MJCF, or the 'nominal' task would not be the MJCF robot."""
    model, nominal = binder.model, binder.param.nominal
    if effect_name in _ABSOLUTE:
        values = getattr(model, _ABSOLUTE[effect_name])[binder.dofs(targets)]
        if not np.allclose(values, nominal, rtol=1e-12, atol=0):
            raise SpecError(binder.where, f"params.{binder.param.name}.nominal", f"{nominal} differs from the "
                            f"MJCF value(s) {values.tolist()}; make them equal so the nominal task is the MJCF robot")
    elif effect_name == "rod_length":
        length = 2 * float(model.geom_size[binder.ids("geom", [targets["geom"]])[0], 1])
        if not np.isclose(length, nominal, rtol=1e-9):
            raise SpecError(binder.where, f"params.{binder.param.name}.nominal", f"{nominal} differs from the "
                            f"rod's MJCF length {length:.6g} m; make them equal so the nominal task is the MJCF robot")


class DynamicsApplier:
    """Applies a family's dynamics parameters to one live model."""

    def __init__(self, model: mujoco.MjModel, family: TaskFamily) -> None:
        self.model = model
        """The model that is changed in place."""
        self._nominal = {name: getattr(model, name).copy() for name in NOMINAL_FIELDS}
        self._scratch = mujoco.MjData(model)  # mj_setConst needs an MjData; never the env's own
        self.effects: list[tuple[str, Effect]] = []
        """``(param name, effect)`` for every parameter that changes the model."""
        self.delay_param: str | None = None
        """Name of the action-delay parameter, if the family has one."""
        # (field, element) -> (param, exclusive): an element set by an absolute effect (or a rod length)
        # may be touched by no other parameter, so the result never depends on parameter order.
        owners: dict[tuple[str, int], tuple[str, bool]] = {}
        for param in family.params:
            if param.kind != "dynamics":
                continue
            ((effect_name, targets),) = param.effect.items()
            binder = _Binder(model, family.where, param)
            if effect_name not in EFFECTS:
                raise binder.fail(f"unknown effect {effect_name!r}; effects: {sorted(EFFECTS)}")
            if effect_name == "action_delay":
                if targets is not True:
                    raise binder.fail(f"write action_delay: true, got {targets!r}")
                if param.sampling != "integer" or param.bounds[0] < 0:
                    raise binder.fail("action_delay needs sampling: integer and a range >= 0 (control steps)")
                if self.delay_param is not None:
                    raise binder.fail(f"only one action_delay parameter allowed; {self.delay_param!r} is one")
                self.delay_param = param.name
                continue
            effect = EFFECTS[effect_name](binder, targets)
            assert effect is not None
            exclusive = effect_name in _ABSOLUTE or effect_name == "rod_length"
            for key in _touched(binder, effect_name, targets):
                if key in owners and (exclusive or owners[key][1]):
                    field, index = key
                    raise binder.fail(f"{effect_name} changes {field}[{index}], which {owners[key][0]!r} also "
                                      "changes; an absolute effect or a rod length must be the only one on its "
                                      "element (the result would depend on parameter order)")
                owners[key] = (param.name, exclusive)
            _check_nominal(binder, effect_name, targets)
            self.effects.append((param.name, effect))
        self.owners: dict[tuple[str, int], tuple[str, bool]] = owners
        """``(model field, element) -> (param name, exclusive)`` for the dof and rod elements the family's parameters
        change (out-of-family effects refuse these elements)."""

    def apply(self, task: Task) -> None:
        """Set the model to the nominal model changed by ``task`` (a validated task of the family)."""
        for name, value in self._nominal.items():
            getattr(self.model, name)[...] = value
        for name, effect in self.effects:
            effect(self.model, task[name])
        # Recompute what the compiler derives from masses and inertias (invweight0, subtree masses),
        # so the model equals one compiled with these values.
        mujoco.mj_setConst(self.model, self._scratch)
