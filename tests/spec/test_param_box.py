"""ParamBox: the unit-cube coordinates the adversary and identification search in."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from metarl_robot.paths import family_yaml_path
from metarl_robot.spec.family import ParamBox, load_family
from metarl_robot.spec.schema import SpecError
from tests.conftest import FAMILIES

NAMES = ["pole_mass_scale", "pole_length", "cart_friction", "motor_gain_scale", "target_x"]


@pytest.fixture(scope="module")
def cartpole():
    return load_family("cartpole_swingup")


def _family_with(tmp_path, change):
    """The cart-pole family with ``change(data)`` applied, loaded from a copy in ``tmp_path``."""
    data = yaml.safe_load(family_yaml_path("cartpole_swingup").read_text())
    change(data)
    path = tmp_path / "cartpole_swingup.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_family(path)


def test_unit_round_trip_over_every_box(cartpole):
    rng = np.random.default_rng(0)
    for box in ("train", "test", "bounds"):
        pb = ParamBox(cartpole, NAMES, box)
        u = rng.uniform(0, 1, (50, len(NAMES)))
        values = pb.to_values(u)
        np.testing.assert_allclose(pb.to_unit(values), u, rtol=0, atol=1e-12)
        split = "test" if box == "bounds" else box  # bounds = the hull, which is the test range for cart-pole
        for j, name in enumerate(NAMES):
            lo, hi = cartpole.param(name).range(split)
            assert lo - 1e-12 <= values[:, j].min() and values[:, j].max() <= hi + 1e-12, (box, name)
    # And from values: tasks drawn from the train split land inside the train unit cube.
    pb = ParamBox(cartpole, NAMES, "train")
    tasks = cartpole.sample(rng, "train", 200)
    values = np.array([[t[n] for n in NAMES] for t in tasks])
    u = pb.to_unit(values)
    assert u.min() >= 0 and u.max() <= 1
    np.testing.assert_allclose(pb.to_values(u), values, rtol=1e-12)


def test_log_uniform_axes_are_geometric_and_uniform_axes_linear(cartpole):
    pb = ParamBox(cartpole, ["pole_mass_scale", "pole_length"], "train")
    # pole_mass_scale in [0.5, 2] (log-uniform): the middle is the geometric mean 1.0, a quarter is 2^-0.5.
    mid = pb.to_values(np.array([0.5, 0.5]))
    assert mid[0] == pytest.approx(1.0) and mid[1] == pytest.approx(1.0)  # pole_length: (0.7 + 1.3) / 2
    quarter = pb.to_values(np.array([0.25, 0.25]))
    assert quarter[0] == pytest.approx(2**-0.5) and quarter[1] == pytest.approx(0.85)
    # Equal steps in unit coordinates are equal ratios on the log axis.
    steps = pb.to_values(np.stack([np.linspace(0, 1, 5)] * 2, axis=1))
    ratios = steps[1:, 0] / steps[:-1, 0]
    np.testing.assert_allclose(ratios, ratios[0])
    np.testing.assert_allclose(np.diff(steps[:, 1]), 0.15)
    assert pb.to_unit(np.array([1.0, 1.0])) == pytest.approx([0.5, 0.5])


def test_train_test_and_bounds_boxes_differ(cartpole):
    corners = np.array([[0.0, 0.0], [1.0, 1.0]])
    names = ["pole_mass_scale", "cart_friction"]
    train = ParamBox(cartpole, names, "train").to_values(corners)
    test = ParamBox(cartpole, names, "test").to_values(corners)
    bounds = ParamBox(cartpole, names, "bounds").to_values(corners)
    np.testing.assert_allclose(train, [[0.5, 0.0], [2.0, 0.5]])
    np.testing.assert_allclose(test, [[0.33, 0.0], [3.0, 1.0]])
    np.testing.assert_allclose(bounds, test)  # the hull of train and test
    assert ParamBox(cartpole, names).to_values(corners) == pytest.approx(bounds)  # default box: bounds
    # A train-box value is interior in the bounds box: the same task, other coordinates.
    u = ParamBox(cartpole, names, "bounds").to_unit(np.array([0.5, 0.5]))
    assert u[0] == pytest.approx(math.log(0.5 / 0.33) / math.log(3.0 / 0.33)) and u[1] == pytest.approx(0.5)


def test_values_are_clipped_to_the_box(cartpole):
    pb = ParamBox(cartpole, ["pole_length"], "train")
    assert pb.to_values(np.array([[-0.5], [1.7]]))[:, 0] == pytest.approx([0.7, 1.3])


def test_integer_axes_round_and_zero_width_axes_map_to_the_middle(tmp_path):
    def change(d):
        d["params"]["delay"] = {"kind": "dynamics", "effect": {"action_delay": True}, "sampling": "integer",
                                "nominal": 0, "train": [0, 2], "test": [0, 3]}
        d["params"]["target_x"]["train"] = [0.0, 0.0]

    family = _family_with(tmp_path, change)
    pb = ParamBox(family, ["delay", "target_x"], "train")
    values = pb.to_values(np.array([[0.0, 0.3], [0.2, 0.3], [0.3, 0.3], [0.74, 0.3], [0.76, 0.3], [1.0, 0.3]]))
    assert values[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]
    assert set(values[:, 1].tolist()) == {0.0}
    for v in values:  # every point is a valid task of the family
        family.validate({"delay": v[0], "target_x": v[1]})
    assert pb.to_unit(np.array([1.0, 0.0])) == pytest.approx([0.5, 0.5])


def test_bad_box_and_parameter_names(cartpole):
    with pytest.raises(SpecError, match="got 'val'; allowed: train, test, bounds") as err:
        ParamBox(cartpole, ["pole_length"], "val")
    assert err.value.field == "box"
    with pytest.raises(SpecError, match="unknown parameter") as err:
        ParamBox(cartpole, ["pole_lenght"], "train")
    assert err.value.field == "pole_lenght"


@pytest.mark.parametrize("name", FAMILIES)
def test_box_edges_are_valid_tasks(name):
    # exp(log(3.0)) is 3.0000000000000004: a search that reaches the edge of the box must still get a task
    # the family accepts, not one an ulp out of bounds.
    family = load_family(name)
    for box in ("train", "test", "bounds"):
        pb = ParamBox(family, family.names, box)
        for corner in (np.zeros(family.dim), np.ones(family.dim)):
            values = pb.to_values(corner)
            for value, p in zip(values, family.params, strict=True):
                lo, hi = p.bounds if box == "bounds" else p.range(box)
                assert lo <= value <= hi, (box, p.name, value)
            family.validate(dict(zip(family.names, values.tolist(), strict=True)))
