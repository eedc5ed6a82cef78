"""robot.yaml against its MJCF: names exist, sizes match, limits fit, timestep agrees."""

from __future__ import annotations

import numpy as np
import pytest

from metarl_robot.envs.meta_env import MetaMujocoEnv
from metarl_robot.envs.robot_model import ObservationMap, load_model
from metarl_robot.spec.robot import load_robot
from metarl_robot.spec.schema import SpecError
from tests.conftest import ROBOTS, edit_yaml


@pytest.mark.parametrize("name", ROBOTS)
def test_shipped_robots_match_their_mjcf(name):
    spec = load_robot(name)
    model = load_model(spec)
    assert model.opt.timestep == pytest.approx(spec.sim_dt, rel=1e-12)
    obs_map = ObservationMap(spec, model)
    assert len(obs_map.measured) == spec.obs_dim and len(obs_map.privileged) == spec.privileged_dim


def test_half_cheetah_observation_matches_gymnasium_layout():
    # Same 17-vector as Gymnasium HalfCheetah-v5: qpos[1:] then qvel.
    env = MetaMujocoEnv("half_cheetah_vel")
    obs, _ = env.reset(seed=0)
    np.testing.assert_array_equal(obs, np.concatenate([env.data.qpos[1:], env.data.qvel]))


def test_ant_observation_fields_come_from_the_named_sources():
    env = MetaMujocoEnv("ant_dir")
    for _ in range(2):
        obs, _, _, _, info = env.step(np.zeros(8))
    s = env.robot.obs_slices
    np.testing.assert_array_equal(obs[s["torso_xy"]], env.data.qpos[:2])
    np.testing.assert_array_equal(obs[s["torso_quat"]], env.data.qpos[3:7])
    np.testing.assert_array_equal(obs[s["torso_angvel"]], env.data.qvel[3:6])
    np.testing.assert_array_equal(info["privileged"], env.data.sensordata)


def test_sensors_describe_the_returned_state_not_the_previous_substep(sim_copy):
    # A jointpos sensor equal to the hinge's qpos after every step shows the step1/step2 ordering is right.
    xml = sim_copy / "robots" / "cartpole" / "cartpole.xml"
    xml.write_text(xml.read_text().replace("</actuator>", "</actuator>\n  <sensor><jointpos name=\"hinge_enc\" "
                                           "joint=\"hinge\"/></sensor>"))
    edit_yaml(sim_copy / "robots" / "cartpole" / "robot.yaml", lambda d: d["observation"].append(
        {"name": "encoder", "size": 1, "units": "rad", "scale": 3.14, "source": {"sensor": "hinge_enc"}}))
    env = MetaMujocoEnv("cartpole_swingup")
    env.reset(seed=0)
    for u in (1.0, -1.0, 0.5):
        obs, *_ = env.step(np.array([u]))
        assert obs[env.robot.obs_slices["encoder"]][0] == obs[env.robot.obs_slices["pole_angle"]][0]


def _obs(i):
    return lambda d: d["observation"][i]


@pytest.mark.parametrize(
    ("change", "field", "fragment"),
    [
        (lambda d: d["control"].update(substeps=5), "control", "MJCF timestep 0.005 s must equal control.period"),
        (lambda d: d.update(joints=["slider", "hinge", "wheel"]), "joints[2]", "joint 'wheel' is not in cartpole.xml"),
        (lambda d: d.update(mjcf="missing.xml"), "mjcf", "MJCF file not found"),
        (lambda d: _obs(0)(d).update(size=2), "observation[0] (cart_pos).size", "declared 2 but the source joint_pos"),
        (lambda d: _obs(0)(d).update(source={"joint_pos": "slider", "index": [1]}),
         "observation[0] (cart_pos).source.index", "[1] out of range for a source of 1 values"),
        (lambda d: _obs(0)(d).update(source={"sensor": "imu"}), "observation[0] (cart_pos).source.sensor",
         "sensor 'imu' is not in cartpole.xml"),
        (lambda d: d["action"][0].update(high=2.0), "action[0] (motor)", "exceeds the MJCF ctrlrange [-1.0, 1.0]"),
    ],
)
def test_robot_yaml_that_disagrees_with_the_mjcf_names_the_field(sim_copy, change, field, fragment):
    edit_yaml(sim_copy / "robots" / "cartpole" / "robot.yaml", change)
    with pytest.raises(SpecError) as err:
        load_model(load_robot("cartpole"))
    assert err.value.field == field
    assert fragment in str(err.value)


def test_every_actuator_must_be_commanded(sim_copy):
    xml = sim_copy / "robots" / "cartpole" / "cartpole.xml"
    xml.write_text(xml.read_text().replace("</actuator>", "  <motor name=\"brake\" joint=\"hinge\"/>\n  </actuator>"))
    with pytest.raises(SpecError, match=r"every actuator of cartpole.xml must be commanded; missing \['brake'\]"):
        load_model(load_robot("cartpole"))


def test_mjcf_that_does_not_compile(sim_copy):
    (sim_copy / "robots" / "cartpole" / "cartpole.xml").write_text("<mujoco><worldbody><body></mujoco>")
    with pytest.raises(SpecError, match="MuJoCo could not compile"):
        load_model(load_robot("cartpole"))
