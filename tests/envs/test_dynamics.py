"""Dynamics effects change the model exactly: the live model equals MuJoCo's own compile of the change."""

from __future__ import annotations

import mujoco
import numpy as np
import pytest

from metarl_robot.envs.meta_env import MetaMujocoEnv
from metarl_robot.spec.schema import SpecError
from tests.conftest import FAMILIES, edit_yaml


def _numeric_arrays(model: mujoco.MjModel) -> dict[str, np.ndarray]:
    out = {}
    for name in dir(model):
        if name.startswith("_"):
            continue
        value = getattr(model, name)
        if isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
            out[name] = value
    return out


def assert_models_equal(live: mujoco.MjModel, reference: mujoco.MjModel) -> None:
    a, b = _numeric_arrays(live), _numeric_arrays(reference)
    assert len(a) > 300  # every numeric field of MjModel, not a hand-picked few
    differing = [k for k in a if a[k].shape != b[k].shape or not np.allclose(a[k], b[k], rtol=1e-10, atol=1e-12)]
    assert not differing, f"fields differ from the compiled reference: {differing}"


def _cartpole_spec() -> mujoco.MjSpec:
    return mujoco.MjSpec.from_file("sim/robots/cartpole/cartpole.xml")


def _pole_mass(spec, s):
    spec.body("pole").mass *= s
    spec.body("pole").inertia = spec.body("pole").inertia * s


def _pole_length(spec, length):
    spec.geom("pole").fromto = np.array([0, 0, 0, 0, 0, length])
    spec.body("pole").ipos = np.array([0, 0, length / 2])
    spec.body("pole").inertia = spec.body("pole").inertia * np.array([length**2, length**2, 1.0])


def _cart_friction(spec, f):
    spec.joint("slider").frictionloss = f


def _motor_gain(spec, s):
    spec.actuator("motor").gear = spec.actuator("motor").gear * s  # same generalised force as gain x s


@pytest.mark.parametrize(
    ("param", "value", "edit"),
    [
        ("pole_mass_scale", 2.7, _pole_mass),
        ("pole_length", 1.55, _pole_length),
        ("pole_length", 0.5, _pole_length),
        ("cart_friction", 0.9, _cart_friction),
    ],
)
def test_cartpole_effects_equal_a_recompiled_model(param, value, edit):
    env = MetaMujocoEnv("cartpole_swingup")
    env.set_task({param: value})
    spec = _cartpole_spec()
    edit(spec, value)
    assert_models_equal(env.model, spec.compile())


def test_all_cartpole_effects_together_commute_into_one_compiled_model():
    env = MetaMujocoEnv("cartpole_swingup")
    env.set_task({"pole_mass_scale": 0.4, "pole_length": 1.3, "cart_friction": 0.2})
    spec = _cartpole_spec()
    _pole_length(spec, 1.3)
    _pole_mass(spec, 0.4)
    _cart_friction(spec, 0.2)
    assert_models_equal(env.model, spec.compile())


def test_actuator_gain_scale_gives_the_same_motion_as_a_stronger_gear():
    # gain x s and gear x s are different fields but the same generalised force: compare trajectories.
    env = MetaMujocoEnv("cartpole_swingup", task={"motor_gain_scale": 1.5})
    spec = _cartpole_spec()
    _motor_gain(spec, 1.5)
    model = spec.compile()
    data = mujoco.MjData(model)
    env.reset(seed=0)
    data.qpos[:], data.qvel[:] = env.data.qpos, env.data.qvel
    for u in np.linspace(-1, 1, 30):
        env.step(np.array([u]))
        data.ctrl[:] = u
        mujoco.mj_step(model, data, nstep=env.robot.control.substeps)
    np.testing.assert_allclose(env.data.qpos, data.qpos, rtol=0, atol=1e-12)


def test_half_cheetah_scales_equal_a_recompiled_model():
    env = MetaMujocoEnv("half_cheetah_vel")
    env.set_task({"friction_scale": 2.5, "damping_scale": 0.6, "mass_scale": 1.7})
    spec = mujoco.MjSpec.from_file("sim/robots/half_cheetah/half_cheetah.xml")
    for geom in spec.geoms:
        geom.friction = geom.friction * 2.5
        geom.density *= 1.7  # inertia from geoms: density x s scales every mass and inertia by s
    for joint in spec.joints:
        joint.damping *= 0.6
    assert_models_equal(env.model, spec.compile())


@pytest.mark.parametrize("name", FAMILIES)
def test_going_back_to_nominal_restores_every_field(name):
    env = MetaMujocoEnv(name)
    fresh = mujoco.MjModel.from_xml_path(str(env.robot.mjcf_path))
    for task in env.family.sample(np.random.default_rng(0), "test", 3):
        env.set_task(task)
    env.set_task(env.family.nominal())
    assert_models_equal(env.model, fresh)


@pytest.mark.parametrize("name", FAMILIES)
def test_set_task_mid_episode_acts_at_once_and_depends_only_on_the_new_task(name):
    rng = np.random.default_rng(0)
    a, b = MetaMujocoEnv(name).family.sample(rng, "test", 2)
    actions = rng.uniform(-1, 1, (20, MetaMujocoEnv(name).robot.action_dim))
    switched = MetaMujocoEnv(name, task=a)
    switched.reset(seed=1)
    for u in actions[:10]:
        switched.step(u)
    switched.set_task(b)
    direct = MetaMujocoEnv(name, task=b)
    direct.reset(seed=1)
    state_size = mujoco.mj_stateSize(direct.model, mujoco.mjtState.mjSTATE_INTEGRATION)
    state = np.zeros(state_size)
    mujoco.mj_getState(switched.model, switched.data, state, mujoco.mjtState.mjSTATE_INTEGRATION)
    mujoco.mj_setState(direct.model, direct.data, state, mujoco.mjtState.mjSTATE_INTEGRATION)
    mujoco.mj_forward(direct.model, direct.data)
    direct._last_obs = switched._last_obs
    for u in actions[10:]:
        obs_s, r_s, *_ = switched.step(u)
        obs_d, r_d, *_ = direct.step(u)
        assert np.array_equal(obs_s, obs_d) and r_s == r_d


def _with_delay(d):
    d["params"]["delay"] = {"kind": "dynamics", "effect": {"action_delay": True}, "sampling": "integer",
                            "nominal": 0, "train": [0, 2], "test": [0, 3], "units": "control steps"}


def test_action_delay_holds_commands_back_by_whole_control_steps(sim_copy):
    edit_yaml(sim_copy / "tasks" / "cartpole_swingup.yaml", _with_delay)
    env = MetaMujocoEnv("cartpole_swingup", task={"delay": 2})
    env.reset(seed=0)
    commands = [np.array([u]) for u in (0.1, 0.2, 0.3, 0.4)]
    applied = [env.step(c)[4]["applied_action"] for c in commands]
    np.testing.assert_array_equal(applied[0], env.robot.safe_action)  # the queue starts with safe commands
    np.testing.assert_array_equal(applied[1], env.robot.safe_action)
    np.testing.assert_array_equal(applied[2], commands[0])
    np.testing.assert_array_equal(applied[3], commands[1])
    env.set_task({"delay": 0})  # shrinking the delay drops the oldest pending commands
    np.testing.assert_array_equal(env.step(np.array([0.9]))[4]["applied_action"], [0.9])
    env.reset(seed=0, options={"task": {"delay": 1}})
    np.testing.assert_array_equal(env.step(np.array([0.5]))[4]["applied_action"], env.robot.safe_action)


@pytest.mark.parametrize(
    ("effect", "param", "fragment"),
    [
        ({"body_mass_scale": ["pole", "tail"]}, "pole_length",
         "body 'tail' is not in the robot's MJCF; body names there: ['world', 'cart'"),
        ({"geom_friction_scale": []}, "pole_length", "targets must be 'all' or a list of geom names"),
        ({"warp_drive": "all"}, "pole_length",
         "unknown effect 'warp_drive'; effects: ['action_delay', 'actuator_gain_scale'"),
        ({"rod_length": {"body": "cart", "geom": "pole"}}, "pole_length", "geom 'pole' does not belong to body 'cart'"),
        ({"rod_length": {"body": "cart", "geom": "cart"}}, "pole_length", "must be a capsule or cylinder"),
        ({"rod_length": "pole"}, "pole_length", "rod_length needs {body: <name>, geom: <name>}"),
        ({"action_delay": True}, "pole_length", "action_delay needs sampling: integer"),
        ({"action_delay": "yes"}, "pole_length", "write action_delay: true"),
    ],
)
def test_bad_effects_name_the_parameter(sim_copy, effect, param, fragment):
    edit_yaml(sim_copy / "tasks" / "cartpole_swingup.yaml", lambda d: d["params"]["pole_length"].update(effect=effect))
    with pytest.raises(SpecError) as err:
        MetaMujocoEnv("cartpole_swingup")
    assert err.value.field == f"params.{param}.effect"
    assert fragment in str(err.value)


def test_two_absolute_effects_on_one_element_are_refused(sim_copy):
    edit_yaml(sim_copy / "tasks" / "cartpole_swingup.yaml", lambda d: d["params"].update(rail_friction={
        "kind": "dynamics", "effect": {"joint_frictionloss": ["slider"]}, "nominal": 0.1, "train": [0, 1],
        "test": [0, 1]}))
    with pytest.raises(SpecError) as err:  # reported on the later parameter, naming the earlier one
        MetaMujocoEnv("cartpole_swingup")
    assert err.value.field == "params.rail_friction.effect"
    assert "joint_frictionloss changes dof_frictionloss[0], which 'cart_friction' also changes" in str(err.value)


def test_an_absolute_and_a_scale_effect_on_one_element_are_refused(sim_copy):
    # joint_damping := 1 then x2 gives 2, the other order 1: refused instead of order-dependent.
    def change(d):
        d["params"]["hinge_damping"] = {"kind": "dynamics", "effect": {"joint_damping": ["hinge"]},
                                        "nominal": 0.001, "train": [0.0, 0.01], "test": [0.0, 0.02]}
        d["params"]["all_damping"] = {"kind": "dynamics", "effect": {"joint_damping_scale": "all"},
                                      "nominal": 1.0, "train": [0.5, 2.0], "test": [0.5, 2.0]}
    edit_yaml(sim_copy / "tasks" / "cartpole_swingup.yaml", change)
    with pytest.raises(SpecError, match=r"joint_damping_scale changes dof_damping\[1\], which 'hinge_damping'"):
        MetaMujocoEnv("cartpole_swingup")


@pytest.mark.parametrize(
    ("param", "nominal", "fragment"),
    [("cart_friction", 0.2, "0.2 differs from the MJCF value(s) [0.1]"),
     ("pole_length", 0.9, "0.9 differs from the rod's MJCF length 1 m")],
)
def test_absolute_nominals_must_equal_the_mjcf(sim_copy, param, nominal, fragment):
    edit_yaml(sim_copy / "tasks" / "cartpole_swingup.yaml", lambda d: d["params"][param].update(nominal=nominal))
    with pytest.raises(SpecError) as err:
        MetaMujocoEnv("cartpole_swingup")
    assert err.value.field == f"params.{param}.nominal" and fragment in str(err.value)
