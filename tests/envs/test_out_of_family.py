"""Out-of-family effects: each changes the motion (or the observation) as stated, and only as stated.

Every comparison drives the env open loop with one fixed, rate-limited command sequence from the same
reset, so any difference is the effect's.
"""

from __future__ import annotations

import math

import mujoco
import numpy as np
import pytest
import yaml

from metarl_robot.envs.meta_env import MetaMujocoEnv
from metarl_robot.envs.oracle import MujocoOracle
from metarl_robot.envs.out_of_family import INTEGRATORS, OutOfFamily
from metarl_robot.envs.rollout import make_vector_env
from metarl_robot.paths import sim_dir
from metarl_robot.runtime.planner import limit_sequences
from metarl_robot.spec.schema import SpecError
from tests.envs.test_dynamics import _cart_friction, _cartpole_spec, _pole_mass, assert_models_equal

FAMILY = "cartpole_swingup"
STEPS = 60
HINGE_DOF = 1  # cart-pole dofs: slider 0, hinge 1
POLE_INERTIA = 0.1 * 1.0**2 / 3  # kg m^2: the nominal pole (0.1 kg, 1 m uniform rod) about its hinge


def _commands(seed: int = 0, steps: int = STEPS) -> np.ndarray:
    env = MetaMujocoEnv(FAMILY)
    r = env.robot
    raw = np.random.default_rng(seed).uniform(r.action_low, r.action_high, (1, 1, steps, r.action_dim))
    return limit_sequences(raw, r.safe_action, r.action_low, r.action_high, r.action_max_rate * r.ctrl_dt)[0, 0]


COMMANDS = _commands()


def _run(effects: OutOfFamily | None, commands: np.ndarray = COMMANDS, seed: int = 0, env: MetaMujocoEnv | None = None,
         reset_options: dict | None = None) -> dict[str, np.ndarray]:
    """One episode stretch: observed and true observations, rewards, sent and applied commands."""
    env = env or MetaMujocoEnv(FAMILY, effects=effects)
    obs, info = env.reset(seed=seed, options=reset_options)
    out = {"obs": [obs], "true": [info.get("true_obs", obs)], "reward": [], "sent": [], "applied": []}
    for command in commands:
        obs, reward, _, _, info = env.step(command)
        out["obs"].append(obs)
        out["true"].append(info.get("true_obs", obs))
        out["reward"].append(reward)
        out["sent"].append(info["sent_action"])
        out["applied"].append(info["applied_action"])
    return {k: np.array(v) for k, v in out.items()}


PLAIN = _run(None)


# ---- off means off -----------------------------------------------------------------------------
@pytest.mark.parametrize("effects", [None, OutOfFamily()])
def test_no_effects_is_the_plain_env_bit_for_bit(effects):
    env = MetaMujocoEnv(FAMILY, effects=effects)
    assert env.effects is None
    _, info = env.reset(seed=0)
    assert set(info) == {"task", "privileged"}
    run = _run(effects, env=env)
    for key in PLAIN:
        assert np.array_equal(run[key], PLAIN[key]), key
    assert not OutOfFamily() and OutOfFamily().label == "none"


# ---- delay -------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3])
def test_delay_shifts_the_motion_by_exactly_k_periods(k):
    delayed = _run(OutOfFamily(delay_periods=k))
    safe = MetaMujocoEnv(FAMILY).robot.safe_action
    # The motors get the safe command for k periods, then each command k periods late ...
    assert np.array_equal(delayed["applied"][:k], np.tile(safe, (k, 1)))
    assert np.array_equal(delayed["applied"][k:], delayed["sent"][:-k])
    # ... so the motion is exactly the plain env's motion under the k-period shifted command sequence.
    shifted = _run(None, np.concatenate([np.tile(safe, (k, 1)), COMMANDS[:-k]]))
    assert np.array_equal(delayed["obs"], shifted["obs"])
    assert not np.array_equal(delayed["obs"], PLAIN["obs"])
    # The reward is charged for the command sent, as with a family delay.
    assert np.array_equal(delayed["sent"], PLAIN["sent"])


def test_delay_adds_to_a_family_delay_and_survives_set_task_and_reset(tmp_path):
    spec = yaml.safe_load((sim_dir() / "tasks" / f"{FAMILY}.yaml").read_text())
    spec["name"], spec["env_id"] = "cartpole_latency", "metarl/CartpoleLatencyTest-v0"
    spec["params"]["latency"] = {"kind": "dynamics", "effect": {"action_delay": True}, "sampling": "integer",
                                 "nominal": 1, "train": [0, 2], "test": [0, 3]}
    path = tmp_path / "cartpole_latency.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = MetaMujocoEnv(str(path), effects=OutOfFamily(delay_periods=2))
    env.reset(seed=0)
    assert len(env._queue) == 3
    env.set_task({"latency": 0})
    assert len(env._queue) == 2
    env.reset(seed=0, options={"task": {"latency": 3}})
    assert len(env._queue) == 5


# ---- damping and friction ----------------------------------------------------------------------
def _free_swing(effects: OutOfFamily | None, seconds: float = 6.0) -> tuple[np.ndarray, float]:
    """The pole released 0.6 rad from hanging, motor at its safe command: pole energy (J) per period, and dt."""
    env = MetaMujocoEnv(FAMILY, effects=effects)
    env.reset(seed=0)
    d = env.data
    d.qpos[:] = [0.0, math.pi - 0.6]
    d.qvel[:] = 0.0
    mujoco.mj_forward(env.model, d)
    energy = []
    for _ in range(round(seconds / env.robot.ctrl_dt)):
        env.step(env.robot.safe_action)
        angle, angvel = d.qpos[1], d.qvel[1]
        energy.append(0.5 * POLE_INERTIA * angvel**2 + 0.1 * 9.81 * 0.5 * (1 + math.cos(angle)))
    return np.array(energy), env.robot.ctrl_dt


def _decay_time(energy: np.ndarray, dt: float) -> float:
    """Seconds until the pole's energy (its running maximum from then on) falls below 1/e of the start."""
    envelope = np.maximum.accumulate(energy[::-1])[::-1]
    below = np.flatnonzero(envelope < energy[:5].max() / math.e)
    return float(below[0] * dt) if below.size else math.inf


def test_damping_on_a_joint_the_family_does_not_touch_makes_its_motion_decay():
    nominal, dt = _free_swing(None)
    damped, _ = _free_swing(OutOfFamily(joint_damping={"hinge": 0.05}))
    t_nominal, t_damped = _decay_time(nominal, dt), _decay_time(damped, dt)
    # Viscous damping b on the hinge alone: the pole's energy decays as exp(-b t / I), I / b = 0.65 s for
    # b = 0.051 N m s/rad (measured 0.52 s: the moving cart takes some energy too). Nominally the pole loses
    # energy only through the cart's rail friction: 40 % in 6 s, never 1/e.
    assert t_nominal == math.inf and nominal[-25:].max() > 0.5 * nominal[0]
    assert 0.3 < t_damped < 0.8, t_damped
    assert damped[-25:].max() < 1e-3 * damped[0]
    env = MetaMujocoEnv(FAMILY, effects=OutOfFamily(joint_damping={"hinge": 0.05}))
    plain = MetaMujocoEnv(FAMILY)
    assert env.model.dof_damping[HINGE_DOF] == plain.model.dof_damping[HINGE_DOF] + 0.05  # added to the MJCF's
    assert np.array_equal(np.delete(env.model.dof_damping, HINGE_DOF), np.delete(plain.model.dof_damping, HINGE_DOF))
    assert np.array_equal(env.model.dof_frictionloss, plain.model.dof_frictionloss)


def test_friction_on_a_joint_stops_its_motion():
    nominal, dt = _free_swing(None)
    rubbed, _ = _free_swing(OutOfFamily(joint_friction={"hinge": 0.01}))
    # Dry friction loses a fixed energy per radian swept (measured: 1/e after 3.0 s, 14 % left after 6 s); the
    # nominal pole keeps 60 % and never reaches 1/e.
    assert _decay_time(rubbed, dt) < 4.0 and rubbed[-25:].max() < 0.25 * rubbed[0]
    assert _decay_time(nominal, dt) == math.inf and nominal[-25:].max() > 0.5 * nominal[0]
    plain = MetaMujocoEnv(FAMILY)
    env = MetaMujocoEnv(FAMILY, effects=OutOfFamily(joint_friction={"hinge": 0.01}))
    assert env.model.dof_frictionloss[HINGE_DOF] == plain.model.dof_frictionloss[HINGE_DOF] + 0.01
    assert np.array_equal(env.model.dof_damping, plain.model.dof_damping)


def test_physics_effects_equal_the_robot_compiled_with_them_on_top_of_a_task():
    """Damping, friction and integrator on a test task: the live model equals MuJoCo's compile of the MJCF with
    the task's values and the effects written in (every numeric field)."""
    effects = OutOfFamily(joint_damping={"hinge": 0.05, "slider": 0.3}, joint_friction={"hinge": 0.01},
                          integrator="RK4")
    env = MetaMujocoEnv(FAMILY, effects=effects)
    env.set_task({"pole_mass_scale": 2.0, "cart_friction": 0.7})
    spec = _cartpole_spec()
    _pole_mass(spec, 2.0)
    _cart_friction(spec, 0.7)
    for joint, added in (("hinge", 0.05), ("slider", 0.3)):
        damping = np.array(spec.joint(joint).damping)  # [linear, polynomial terms]: the effect adds to the linear
        damping[0] += added
        spec.joint(joint).damping = damping
    spec.joint("hinge").frictionloss += 0.01
    spec.option.integrator = mujoco.mjtIntegrator.mjINT_RK4
    assert_models_equal(env.model, spec.compile())


def test_physics_effects_survive_set_task_and_reset():
    effects = OutOfFamily(joint_damping={"hinge": 0.05}, joint_friction={"hinge": 0.01}, integrator="RK4")
    env = MetaMujocoEnv(FAMILY, effects=effects)
    plain = MetaMujocoEnv(FAMILY)
    task = env.family.sample(np.random.default_rng(0), "test", 1)[0]
    for apply in (lambda e: e.set_task(task), lambda e: e.reset(seed=1, options={"task": "test"}),
                  lambda e: e.set_task(e.family.nominal())):
        apply(env)
        apply(plain)
        assert env.model.dof_damping[HINGE_DOF] == plain.model.dof_damping[HINGE_DOF] + 0.05
        assert env.model.dof_frictionloss[HINGE_DOF] == plain.model.dof_frictionloss[HINGE_DOF] + 0.01
        assert env.model.dof_frictionloss[0] == plain.model.dof_frictionloss[0]  # the family's cart_friction
        assert env.model.opt.integrator == mujoco.mjtIntegrator.mjINT_RK4


def test_a_joint_the_family_changes_is_refused_naming_the_parameter():
    with pytest.raises(SpecError, match=r"joint_friction.slider: .*'cart_friction'.* does not touch"):
        MetaMujocoEnv(FAMILY, effects=OutOfFamily(joint_friction={"slider": 0.1}))
    with pytest.raises(SpecError, match=r"joint_damping.bthigh: .*'damping_scale'"):
        MetaMujocoEnv("half_cheetah_vel", effects=OutOfFamily(joint_damping={"bthigh": 0.1}))
    MetaMujocoEnv(FAMILY, effects=OutOfFamily(joint_damping={"slider": 0.1}))  # slider damping: not a parameter


# ---- integrator --------------------------------------------------------------------------------
def _open_loop_gap(family: str, effects: OutOfFamily, steps: int = STEPS) -> np.ndarray:
    """Largest difference per observed value between the env with ``effects`` and the plain env, same commands."""
    env, plain = MetaMujocoEnv(family, effects=effects), MetaMujocoEnv(family)
    rng = np.random.default_rng(0)
    a, b = env.reset(seed=0)[0], plain.reset(seed=0)[0]
    gap = np.abs(a - b)
    for _ in range(steps):
        command = rng.uniform(env.robot.action_low, env.robot.action_high)
        a, b = env.step(command)[0], plain.step(command)[0]
        gap = np.maximum(gap, np.abs(a - b))
    return gap


@pytest.mark.parametrize("family, integrator, bound", [
    (FAMILY, "RK4", 0.01), (FAMILY, "implicit", 0.01),
    ("half_cheetah_vel", "RK4", math.inf),  # contacts under random commands: small differences grow
])
def test_integrator_is_the_one_asked_for_and_changes_the_trajectory(family, integrator, bound):
    env = MetaMujocoEnv(family, effects=OutOfFamily(integrator=integrator))
    assert env.model.opt.integrator == INTEGRATORS[integrator]
    assert env._split_step == (integrator != "RK4")  # RK4 cannot be split into mj_step1/mj_step2
    gap = _open_loop_gap(family, OutOfFamily(integrator=integrator))
    # Another integrator rounds the same physics differently: a small, real difference (cart-pole, 2.4 s:
    # RK4 up to 3.5e-3, implicit up to 1.5e-4 in a value).
    assert 1e-6 < gap.max() < bound and np.isfinite(gap).all(), gap


def test_euler_is_the_cartpoles_own_integrator_in_effect():
    """MuJoCo's Euler integrates joint damping implicitly, and the cart-pole has no other velocity-dependent
    force, so on it Euler steps exactly as its MJCF's implicitfast (docs/out_of_family.md says so)."""
    assert MetaMujocoEnv(FAMILY).model.opt.integrator == mujoco.mjtIntegrator.mjINT_IMPLICITFAST
    assert _open_loop_gap(FAMILY, OutOfFamily(integrator="Euler")).max() == 0.0


# ---- observation effects -----------------------------------------------------------------------
def test_noise_has_the_set_std_and_leaves_the_physics_alone():
    effects = OutOfFamily(obs_noise=0.02)
    commands = _commands(1, 400)
    noisy, plain = _run(effects, commands), _run(None, commands)
    assert np.array_equal(noisy["true"], plain["obs"])  # the motion is the plain env's, bit for bit
    assert np.array_equal(noisy["reward"], plain["reward"])  # the reward grades the true motion
    scale = MetaMujocoEnv(FAMILY).robot.obs_scale
    error = (noisy["obs"] - noisy["true"]) / scale
    std = error.std(axis=0)
    assert np.allclose(std, 0.02, rtol=0.1), std  # 401 samples per field: a 10 % band is > 2.8 standard errors
    assert np.all(np.abs(error.mean(axis=0)) < 3 * 0.02 / math.sqrt(len(error)))
    assert np.array_equal(_run(effects, commands)["obs"], noisy["obs"])  # same seed, same noise
    assert not np.array_equal(_run(effects, commands, seed=1)["obs"] - _run(None, commands, seed=1)["obs"],
                              noisy["obs"] - plain["obs"])


@pytest.mark.parametrize("family, key, field, index", [
    (FAMILY, "pole_angle", "pole_angle", None),
    ("half_cheetah_vel", "joint_pos[2]", "joint_pos", 2),
])
def test_bias_shifts_exactly_the_named_field(family, key, field, index):
    env = MetaMujocoEnv(family, effects=OutOfFamily(sensor_bias={key: 0.05}))
    plain = MetaMujocoEnv(family)
    sl = env.robot.obs_slices[field]
    offset = np.zeros(env.robot.obs_dim)
    offset[sl if index is None else sl.start + index] = 0.05
    rng = np.random.default_rng(0)
    obs, info = env.reset(seed=0)
    plain_obs, _ = plain.reset(seed=0)
    for _ in range(20):
        assert np.array_equal(info["true_obs"], plain_obs)
        assert np.array_equal(obs, plain_obs + offset)
        assert np.count_nonzero(obs != plain_obs) == 1
        command = rng.uniform(-0.3, 0.3, env.robot.action_dim)
        obs, reward, _, _, info = env.step(command)
        plain_obs, plain_reward, *_ = plain.step(command)
        assert reward == plain_reward


# ---- the oracle plans through the physics effects ----------------------------------------------
def test_oracle_predicts_the_env_with_physics_effects():
    effects = OutOfFamily(delay_periods=2, joint_damping={"hinge": 0.05}, joint_friction={"hinge": 0.01},
                          integrator="RK4", obs_noise=0.01)
    env = MetaMujocoEnv(FAMILY, effects=effects)
    env.reset(seed=0)
    for command in COMMANDS[:5]:  # commands in the delay queue must reach the oracle too
        env.step(command)
    actions = COMMANDS[5:13][None, None]
    pred = MujocoOracle(threads=1).rollout([env], actions, particles=1)
    for t in range(actions.shape[2]):
        _, _, _, _, info = env.step(actions[0, 0, t])
        np.testing.assert_allclose(pred[0, 0, 0, t], info["true_obs"], rtol=0, atol=1e-9)


# ---- vector envs -------------------------------------------------------------------------------
def test_vector_envs_carry_the_effects():
    effects = OutOfFamily(delay_periods=1, sensor_bias={"cart_pos": 0.1})
    envs = make_vector_env(FAMILY, 2, "sync", effects=effects)
    try:
        assert envs.get_attr("effects") == (effects, effects)
        obs, info = envs.reset(seed=0)
        assert np.array_equal(obs[:, 0], info["true_obs"][:, 0] + 0.1)
    finally:
        envs.close()
    plain = make_vector_env(FAMILY, 1, "sync")
    try:
        assert plain.get_attr("effects") == (None,)
    finally:
        plain.close()


# ---- parsing and validation --------------------------------------------------------------------
def test_cli_strings_yaml_and_labels_agree(tmp_path):
    items = ["delay=2", "damping=hinge:0.05", "friction=hinge:0.01", "obs_noise=0.02", "integrator=RK4",
             "bias=pole_angle:0.05"]
    effects = OutOfFamily.parse(items)
    assert effects == OutOfFamily(delay_periods=2, joint_damping={"hinge": 0.05}, joint_friction={"hinge": 0.01},
                                  obs_noise=0.02, integrator="RK4", sensor_bias={"pole_angle": 0.05})
    assert OutOfFamily.parse(effects.to_args()) == effects and effects.label == " ".join(items)
    (tmp_path / "effects.yaml").write_text(yaml.safe_dump(effects.as_dict()))
    assert OutOfFamily.load(tmp_path / "effects.yaml") == effects
    # --effect items go on top of a file: scalars replace, named entries add
    on_top = OutOfFamily.from_cli(["delay=1", "damping=slider:0.2"], tmp_path / "effects.yaml")
    assert on_top.delay_periods == 1 and on_top.joint_damping == {"hinge": 0.05, "slider": 0.2}
    assert OutOfFamily.from_cli([], None) is None
    grid = effects.grid()
    assert list(grid) == ["delay", "damping", "friction", "obs_noise", "integrator", "bias", "all"]
    assert grid["damping"] == OutOfFamily(joint_damping={"hinge": 0.05}) and grid["all"] == effects
    assert effects.oracle_record()["plans_through"] == ["delay_periods", "joint_damping", "joint_friction",
                                                        "integrator"]
    assert set(effects.oracle_record()["not_given"]) == {"obs_noise", "sensor_bias"}


@pytest.mark.parametrize("items, match", [
    (["jitter=3"], r"KIND one of delay, damping, friction, obs_noise, integrator, bias"),
    (["delay"], r"KIND=VALUE"),
    (["delay=-1"], r"delay_periods: .*whole number .* >= 0"),
    (["delay=1.5"], r"delay_periods: .*whole number"),
    (["damping=0.1"], r"joint_damping: damping needs NAME:VALUE"),
    (["damping=hinge:-0.1"], r"joint_damping.hinge: .*must be >= 0"),
    (["friction=hinge:abc"], r"joint_friction.hinge: expected a number"),
    (["obs_noise=-0.01"], r"obs_noise: a standard deviation >= 0"),
    (["obs_noise=nan"], r"obs_noise: must be finite"),
    (["integrator=Verlet"], r"integrator: expected one of 'Euler', 'RK4', 'implicit', 'implicitfast'"),
    (["bias=pole_angle:inf"], r"sensor_bias.pole_angle: must be finite"),
])
def test_bad_effect_strings_name_the_field_and_what_is_allowed(items, match):
    with pytest.raises(SpecError, match=match) as err:
        OutOfFamily.parse(items)
    assert err.value.where == f"--effect {items[0]!r}"


@pytest.mark.parametrize("effects, match", [
    (OutOfFamily(joint_damping={"elbow": 0.1}), r"joint_damping.elbow: joint 'elbow' .* joints: slider, hinge"),
    (OutOfFamily(joint_friction={"pole": 0.1}), r"joint_friction.pole: .* joints: slider, hinge"),
    (OutOfFamily(sensor_bias={"pole_tip": 0.1}),
     r"sensor_bias.pole_tip: .* fields: cart_pos, pole_angle, cart_vel, pole_angvel"),
    (OutOfFamily(sensor_bias={"cart_pos[1]": 0.1}), r"sensor_bias.cart_pos\[1\]: .* 1 element"),
])
def test_names_are_checked_against_the_robot(effects, match):
    with pytest.raises(SpecError, match=match):
        MetaMujocoEnv(FAMILY, effects=effects)


def test_yaml_errors_name_the_file_and_the_field(tmp_path):
    path = tmp_path / "effects.yaml"
    path.write_text("delay: 2\n")
    with pytest.raises(SpecError, match=rf"{path}: delay: unknown key 'delay'; allowed keys here: delay_periods"):
        OutOfFamily.load(path)
    path.write_text("obs_noise: -1\n")
    with pytest.raises(SpecError, match=rf"{path}: obs_noise: a standard deviation >= 0"):
        OutOfFamily.load(path)
    path.write_text("joint_damping: {hinge: fast}\n")
    with pytest.raises(SpecError, match=rf"{path}: joint_damping.hinge: expected a number"):
        OutOfFamily.load(path)


def test_every_effect_is_documented_with_its_cli_kind_and_field():
    from metarl_robot.envs.out_of_family import CLI_KINDS
    from metarl_robot.paths import REPO_ROOT

    rows = [line for line in (REPO_ROOT / "docs" / "out_of_family.md").read_text().splitlines()
            if line.startswith("| `")]
    for kind, name in CLI_KINDS.items():
        assert any(row.startswith(f"| `{kind}=") and f"`{name}:" in row for row in rows), (kind, name)


def test_effects_are_values():
    a = OutOfFamily(joint_damping={"slider": 0.1, "hinge": 0.05})
    b = OutOfFamily(joint_damping={"hinge": 0.05, "slider": 0.1})
    assert a == b and hash(a) == hash(b) and len({a, b, OutOfFamily()}) == 2
    with pytest.raises(AttributeError):
        a.obs_noise = 0.1  # frozen
