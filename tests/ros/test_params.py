"""The node's parameters: the table, the shipped YAML, the docs and every refusal (no ROS graph needed)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml
from metarl_robot_ros.control_loop import LoopThresholds
from metarl_robot_ros.params import (
    DEFAULT_LOG_DIR,
    PARAMETERS,
    PARAMETERS_BY_NAME,
    SAFETY_PREFIX,
    THRESHOLD_PREFIX,
    ParameterError,
    parse_parameters,
)

from metarl_robot.paths import REPO_ROOT
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.runtime.safety import SafetyConfig
from tests.conftest import bundle_path_of_kind, kind_params
from tests.ros.conftest import BUNDLE, PKG_SRC

ADAPT_YAML = PKG_SRC / "config" / "adapt.yaml"
DOC = REPO_ROOT / "docs" / "ros2_node.md"


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(BUNDLE)


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def shipped_yaml() -> dict:
    return flatten(yaml.safe_load(ADAPT_YAML.read_text())["/**"]["ros__parameters"])


def test_safety_parameters_are_exactly_the_safety_config_fields():
    names = {p.name[len(SAFETY_PREFIX):] for p in PARAMETERS if p.name.startswith(SAFETY_PREFIX)}
    assert names == {f.name for f in dataclasses.fields(SafetyConfig)}


def test_threshold_parameters_are_exactly_the_loop_thresholds_fields():
    config = parse_parameters({"bundle": "b"})
    assert config.loop_thresholds == LoopThresholds() and config.link == "zmq"
    fields = {"periodicity.mean_error": "rate_error", "periodicity.standard_deviation": "jitter",
              "execution_time.mean": "compute"}  # ros2_control's names → what they grade
    names = {f"{THRESHOLD_PREFIX}{key}.{level}": f"{field}_{level}" for key, field in fields.items()
             for level in ("warn", "error")}
    assert names.keys() == {p.name for p in PARAMETERS if p.name.startswith(THRESHOLD_PREFIX)}
    assert sorted(names.values()) == sorted(f.name for f in dataclasses.fields(LoopThresholds))
    values = {name: 0.01 * (i + 1) for i, name in enumerate(names)}  # each its own value, warn < error
    thresholds = parse_parameters({"bundle": "b", **values}).loop_thresholds
    assert {names[name]: value for name, value in values.items()} == dataclasses.asdict(thresholds)


def test_shipped_yaml_holds_every_parameter_with_its_default():
    values = shipped_yaml()
    assert set(values) == set(PARAMETERS_BY_NAME)
    for name, value in values.items():
        assert value == PARAMETERS_BY_NAME[name].default, name
    assert values["log_dir"] == DEFAULT_LOG_DIR


def test_shipped_yaml_plus_a_bundle_is_a_valid_configuration(bundle):
    values = {**shipped_yaml(), "bundle": str(BUNDLE)}
    config = parse_parameters(values).with_bundle(bundle)
    assert config.control_rate_hz == pytest.approx(1 / bundle.robot.ctrl_dt)
    assert config.task == {"target_x": 0.0}  # the family's nominal reward parameters
    assert config.safety == dataclasses.replace(SafetyConfig(), prediction_error_threshold=None)
    assert config.endpoints.handshake == "tcp://127.0.0.1:47102"


def test_docs_table_lists_every_parameter_with_type_and_default():
    text = DOC.read_text()
    rows = {m.group(1): m.group(2, 3) for m in re.finditer(r"^\| `([a-z_.<>]+)` \| (\w+) \| `([^`]*)` \|", text, re.M)}
    for p in PARAMETERS:
        assert p.name in rows, f"docs/ros2_node.md has no row for {p.name}"
        kind, default = rows[p.name]
        assert kind == p.type, p.name
        if isinstance(p.default, bool):
            shown = "true" if p.default else "false"
        else:
            shown = f'"{p.default}"' if isinstance(p.default, str) else str(p.default)
        assert default == shown, p.name


@pytest.mark.parametrize(("values", "name", "fragment"), [
    ({}, "bundle", "is required"),
    ({"bundle": "b", "stale_after_periods": 3.0}, "stale_after_periods", "unknown parameter; known: bundle"),
    ({"bundle": "b", "safety.stale_after_period": 3.0}, "safety.stale_after_period", "unknown parameter"),
    ({"bundle": "b", "safety.stale_after_periods": 1.0}, "safety.stale_after_periods", "[1.5, 50]"),
    ({"bundle": "b", "safety.max_lost_frames": 2.5}, "safety.max_lost_frames", "must be an integer"),
    ({"bundle": "b", "safety.prediction_error_threshold": -1.0}, "safety.prediction_error_threshold", "> 0"),
    ({"bundle": "b", "adapt": "yes"}, "adapt", "must be a bool (true or false), got 'yes'"),
    ({"bundle": "b", "port_base": 70000}, "port_base", "[1, 65533]"),
    ({"bundle": "b", "endpoints": "tcp://a:1"}, "endpoints", "three comma-separated addresses"),
    ({"bundle": "b", "endpoints": "tcp://*:1,tcp://*:2,tcp://*:*"}, "endpoints", "give ports, not '*'"),
    ({"bundle": "b", "curve_keys": "/no/such/folder"}, "curve_keys", "not found"),
    ({"bundle": "b", "handshake_timeout_s": 0.0}, "handshake_timeout_s", "(0, 60]"),
    ({"bundle": "b", "seed": -1}, "seed", "[0, 2^31 - 1]"),
    ({"bundle": "b", "episode_steps": -5}, "episode_steps", "0 (until deactivated)"),
    ({"bundle": "b", "diagnostics_rate_hz": 100.0}, "diagnostics_rate_hz", "[0.1, 50]"),
    ({"bundle": "b", "control_rate_hz": float("nan")}, "control_rate_hz", "finite"),
    ({"bundle": "b", "task.target_x": "left"}, "task.target_x", "must be a number"),
    ({"bundle": "b", "link": "ros2"}, "link", "must be zmq or ros2_control, got 'ros2'"),
    ({"bundle": "b", "diagnostics.threshold.periodicity.mean_error.warn": 0.0},
     "diagnostics.threshold.periodicity.mean_error.warn", "must be in [0.001, 10]"),
    ({"bundle": "b", "diagnostics.threshold.execution_time.mean.error": 0.5},
     "diagnostics.threshold.execution_time.mean.error", "must be >= diagnostics.threshold.execution_time.mean.warn "
                                                        "(0.6), got 0.5"),
])
def test_bad_parameters_are_refused_naming_the_parameter_and_what_is_allowed(values, name, fragment):
    with pytest.raises(ParameterError) as info:
        parse_parameters(values)
    assert info.value.field == name
    assert fragment in str(info.value)
    assert str(info.value).startswith(f"parameters: {name}: ")


def test_integers_are_accepted_for_doubles_and_zero_threshold_means_unchecked():
    config = parse_parameters({"bundle": "b", "safety.stale_after_periods": 4, "safety.prediction_error_threshold": 0,
                               "endpoints": "state=ipc:///tmp/s,command=ipc:///tmp/c,handshake=ipc:///tmp/h"})
    assert config.safety.stale_after_periods == 4.0 and isinstance(config.safety.stale_after_periods, float)
    assert config.safety.prediction_error_threshold is None
    assert config.endpoints.state == "ipc:///tmp/s"
    assert parse_parameters({"bundle": "b", "log_dir": ""}).log_dir is None
    assert parse_parameters({"bundle": "b", "use_sim_time": False, "qos_overrides./x.depth": 3}).bundle.name == "b"


def test_bundle_dependent_parameters_are_checked_against_the_bundle(bundle):
    base = {"bundle": str(BUNDLE)}
    with pytest.raises(ParameterError, match=r"task.pole_mass_scale: is not a reward parameter of the bundle's "
                                             r"family 'cartpole_swingup'; allowed: task.target_x"):
        parse_parameters({**base, "task.pole_mass_scale": 1.0}).with_bundle(bundle)
    with pytest.raises(ParameterError, match=r"task.target_x: .*allowed range"):
        parse_parameters({**base, "task.target_x": 50.0}).with_bundle(bundle)
    with pytest.raises(ParameterError, match=r"control_rate_hz: must be 0 \(use the bundle's\) or the bundle's rate "
                                             r"25 Hz"):
        parse_parameters({**base, "control_rate_hz": 50.0}).with_bundle(bundle)
    config = parse_parameters({**base, "control_rate_hz": 25.0, "task.target_x": -0.5}).with_bundle(bundle)
    assert config.task == {"target_x": -0.5} and config.control_period_s == pytest.approx(0.04)


def test_a_context_policy_bundle_takes_no_prediction_error_threshold(bundle, pearl_bundle):
    pearl = load_bundle(pearl_bundle)
    config = parse_parameters({"bundle": str(pearl_bundle), "task.target_x": 0.3}).with_bundle(pearl)
    assert config.task == {"target_x": 0.3} and config.safety.prediction_error_threshold is None
    # A threshold no prediction error ever reaches would be a guard that silently does nothing.
    with pytest.raises(ParameterError, match=r"safety.prediction_error_threshold: must be 0 for a context_policy "
                                             r"bundle \('pearl_tiny'\): it has no dynamics model .* got 0.5"):
        parse_parameters({"bundle": str(pearl_bundle), "safety.prediction_error_threshold": 0.5}).with_bundle(pearl)
    threshold = parse_parameters({"bundle": str(BUNDLE), "safety.prediction_error_threshold": 0.5})
    assert threshold.with_bundle(bundle).safety.prediction_error_threshold == 0.5


@pytest.mark.parametrize("kind", kind_params())
def test_every_bundle_kind_is_accepted_with_a_threshold_iff_it_has_a_dynamics_model(kind, request):
    path = bundle_path_of_kind(request, kind)
    bundle = load_bundle(path)
    config = parse_parameters({"bundle": str(path)}).with_bundle(bundle)
    assert set(config.task) == set(bundle.family.reward_names)
    guarded = parse_parameters({"bundle": str(path), "safety.prediction_error_threshold": 0.5})
    if bundle.has_dynamics_model:
        assert guarded.with_bundle(bundle).safety.prediction_error_threshold == 0.5
    else:
        with pytest.raises(ParameterError, match="prediction_error_threshold: must be 0"):
            guarded.with_bundle(bundle)
