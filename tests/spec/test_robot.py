from __future__ import annotations

import itertools

import numpy as np
import pytest

from metarl_robot.spec.robot import load_robot
from metarl_robot.spec.schema import SpecError
from tests.conftest import ROBOTS, edit_yaml


@pytest.mark.parametrize("name", ROBOTS)
def test_shipped_robots_load(name):
    spec = load_robot(name)
    assert spec.name == name
    assert spec.obs_dim == sum(f.size for f in spec.observation if not f.privileged)
    assert len(spec.safe_action) == spec.action_dim
    assert np.all(spec.action_low <= spec.safe_action) and np.all(spec.safe_action <= spec.action_high)
    # Slices tile the measured observation vector exactly.
    stops = sorted((s.start, s.stop) for s in spec.obs_slices.values())
    assert stops[0][0] == 0 and stops[-1][1] == spec.obs_dim
    assert all(a[1] == b[0] for a, b in itertools.pairwise(stops))


def test_layout_of_cartpole():
    spec = load_robot("cartpole")
    assert list(spec.obs_slices) == ["cart_pos", "pole_angle", "cart_vel", "pole_angvel"]
    assert spec.ctrl_dt == 0.04 and spec.sim_dt == 0.005
    assert spec.obs_scale.tolist() == [1.0, 3.14, 2.0, 10.0]


def test_privileged_fields_are_kept_out_of_the_measured_vector():
    spec = load_robot("ant")
    assert "foot_contact" not in spec.obs_slices
    assert spec.privileged_slices == {"foot_contact": slice(0, 4)}
    assert spec.obs_dim == 29 and spec.privileged_dim == 4


def test_interface_hash_ignores_formatting_but_not_content(sim_copy):
    path = sim_copy / "robots" / "cartpole" / "robot.yaml"
    before = load_robot("cartpole").interface_hash
    path.write_text("# a new comment\n" + path.read_text())
    assert load_robot("cartpole").interface_hash == before
    edit_yaml(path, lambda d: d["observation"][0].update(scale=2.0))
    assert load_robot("cartpole").interface_hash != before


def test_sensor_noise_is_a_calibration_outside_the_interface_hash(sim_copy):
    # A robot calibrated after a bundle was exported still talks to it: noise_std is not part of the contract.
    path = sim_copy / "robots" / "cartpole" / "robot.yaml"
    before = load_robot("cartpole")
    assert all(f.noise_std is None for f in before.observation)
    edit_yaml(path, lambda d: d["observation"][1].update(noise_std=0.002))
    after = load_robot("cartpole")
    assert after.observation[1].noise_std == 0.002 and after.interface_hash == before.interface_hash


def test_round_trip_through_dict():
    from metarl_robot.spec.robot import robot_from_dict

    spec = load_robot("half_cheetah")
    copy = robot_from_dict(spec.to_dict())
    assert copy.interface_hash == spec.interface_hash


def _obs(i):
    return lambda d: d["observation"][i]


@pytest.mark.parametrize(
    ("change", "field_fragment", "message_fragment"),
    [
        (lambda d: d.update(schema_version=9), "schema_version", "robot.yaml schema version 9 is not supported"),
        (lambda d: d.pop("control"), "control", "missing required key"),
        (lambda d: d.update(colour="red"), "colour", "unknown key 'colour'"),
        (lambda d: d["control"].update(period=0.0), "control.period", "must be > 0"),
        (lambda d: d["control"].update(substeps=0), "control.substeps", "must be >= 1"),
        (lambda d: d.update(joints=["slider", "slider"]), "joints", "duplicate name 'slider'"),
        (lambda d: _obs(0)(d).update(scale=-1.0), "observation[0] (cart_pos).scale", "must be > 0"),
        (lambda d: _obs(0)(d).update(size=0), "observation[0] (cart_pos).size", "must be >= 1"),
        (lambda d: _obs(0)(d).update(noise_std=-0.1), "observation[0] (cart_pos).noise_std",
         "a sensor noise standard deviation in m: a finite number >= 0, got -0.1"),
        (lambda d: _obs(1)(d).update(name="cart_pos"), "observation", "duplicate field name 'cart_pos'"),
        (lambda d: _obs(0)(d).update(source={"joint_pos": "slider", "sensor": "x"}),
         "observation[0] (cart_pos).source", "exactly one of joint_pos, joint_vel, sensor"),
        (lambda d: _obs(0)(d).update(source={"joint_pos": "rail"}),
         "observation[0] (cart_pos).source.joint_pos", "joint 'rail' is not in 'joints'"),
        (lambda d: d["action"][0].update(low=1.0), "action[0] (motor).low", "must be < high"),
        (lambda d: d["action"][0].update(max_rate=0.0), "action[0] (motor).max_rate", "must be > 0"),
        (lambda d: d["action"][0].update(actuator="other"), "action[0] (motor).actuator", "must match actuators[0]"),
        (lambda d: d.update(safe_command={"motor": 3.0}), "safe_command.motor", "outside the action range"),
        (lambda d: d.update(safe_command={"wheel": 0.0}), "safe_command", "missing ['motor'], unknown ['wheel']"),
        (lambda d: d["observation"].__setitem__(slice(None), [dict(_obs(0)(d), privileged=True)]), "observation",
         "at least one non-privileged field"),
    ],
)
def test_bad_robot_yaml_names_the_field(sim_copy, change, field_fragment, message_fragment):
    edit_yaml(sim_copy / "robots" / "cartpole" / "robot.yaml", change)
    with pytest.raises(SpecError) as err:
        load_robot("cartpole")
    assert field_fragment in err.value.field
    assert message_fragment in str(err.value)
    assert "robot.yaml" in str(err.value)


def test_unknown_robot_lists_the_known_ones():
    with pytest.raises(FileNotFoundError, match=r"unknown robot 'rover'.*\['ant', 'cartpole', 'half_cheetah'\]"):
        load_robot("rover")


def test_robot_name_must_equal_its_folder(sim_copy):
    edit_yaml(sim_copy / "robots" / "cartpole" / "robot.yaml", lambda d: d.update(name="cart"))
    with pytest.raises(SpecError, match="'cart' must equal the robot's folder name 'cartpole'"):
        load_robot("cartpole")
