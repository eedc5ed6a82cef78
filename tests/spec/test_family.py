from __future__ import annotations

import math

import numpy as np
import pytest

from metarl_robot.spec.family import load_family
from metarl_robot.spec.schema import SpecError
from tests.conftest import FAMILIES, edit_yaml


@pytest.fixture(scope="module")
def cartpole():
    return load_family("cartpole_swingup")


@pytest.fixture(scope="module")
def cheetah():
    return load_family("half_cheetah_vel")


def test_power_ranges_resolve_exactly(cheetah):
    mass = cheetah.param("mass_scale")
    assert mass.train == (1.5**-3, 1.5**3)
    assert mass.test == (1.5**-3.5, 1.5**3.5)
    assert cheetah.param("damping_scale").train == (1.3**-3, 1.3**3)
    assert mass.bounds == mass.test


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_has_an_out_of_distribution_test_range(name):
    family = load_family(name)
    wider = [p.name for p in family.params if p.test[0] < p.train[0] or p.test[1] > p.train[1]]
    assert wider, f"{name}: no parameter's test range reaches beyond its train range"
    assert any(family.is_ood(t) for t in family.grid(2, "test"))
    assert not any(family.is_ood(t) for t in family.sample(np.random.default_rng(0), "train", 50))


def test_sampling_is_seeded_and_within_range(cartpole):
    a = cartpole.sample(np.random.default_rng(3), "train", 200)
    b = cartpole.sample(np.random.default_rng(3), "train", 200)
    assert a == b
    for p in cartpole.params:
        values = np.array([t[p.name] for t in a])
        assert values.min() >= p.train[0] and values.max() <= p.train[1]


def test_log_uniform_is_uniform_in_log_space(cartpole):
    # pole_mass_scale ~ exp(U(ln 0.5, ln 2)): its log is symmetric about 0, so half the draws are < 1.
    values = np.array([t["pole_mass_scale"] for t in cartpole.sample(np.random.default_rng(0), "train", 4000)])
    assert abs(np.mean(values < 1.0) - 0.5) < 0.03
    # A uniform draw on [0.5, 2] would put only a third below 1.
    assert abs(np.mean(np.log(values))) < 0.03


def test_grid_spacing_and_size(cartpole):
    grid = cartpole.grid(3, "test", ["pole_mass_scale", "pole_length"])
    assert len(grid) == 9
    masses = sorted({t["pole_mass_scale"] for t in grid})
    assert masses == pytest.approx([0.33, math.sqrt(0.33 * 3.0), 3.0])  # geometric for log_uniform
    lengths = sorted({t["pole_length"] for t in grid})
    assert lengths == pytest.approx([0.5, 1.05, 1.6])  # linear for uniform
    assert all(t["cart_friction"] == 0.1 and t["target_x"] == 0.0 for t in grid)  # others nominal
    assert len(cartpole.grid(2, "train")) == 2**cartpole.dim
    assert cartpole.grid(1, "train", ["pole_length"])[0]["pole_length"] == pytest.approx(1.0)


def test_vector_round_trip_and_partial_tasks(cartpole):
    task = cartpole.sample(np.random.default_rng(1), "test", 1)[0]
    vec = cartpole.to_vector(task)
    assert vec.shape == (cartpole.dim,) and vec.dtype == np.float64
    assert cartpole.from_vector(vec) == task
    partial = cartpole.validate({"pole_length": 1.2})
    assert partial == {**cartpole.nominal(), "pole_length": 1.2}


@pytest.mark.parametrize(
    ("task", "fragment"),
    [
        ({"pole_lenght": 1.0}, "unknown parameter; parameters of cartpole_swingup: ['pole_mass_scale', 'pole_length'"),
        ({"pole_length": 5.0}, "pole_length: 5 is out of bounds; allowed range [0.5, 1.6] m (train [0.7, 1.3]"),
        ({"pole_length": float("nan")}, "pole_length: must be finite, got nan; allowed range [0.5, 1.6]"),
        ({"pole_length": float("inf")}, "must be finite"),
        ({"pole_length": "long"}, "pole_length: expected a number, got 'long'"),
        ({"pole_length": None}, "expected a number, got None"),
        ({"cart_friction": -0.1}, "cart_friction: -0.1 is out of bounds; allowed range [0, 1] N"),
    ],
)
def test_bad_tasks_name_the_parameter_and_its_range(cartpole, task, fragment):
    with pytest.raises(SpecError) as err:
        cartpole.validate(task)
    assert fragment in str(err.value)


def test_bad_vectors_and_splits(cartpole):
    with pytest.raises(SpecError, match=r"expected shape \(5,\)"):
        cartpole.from_vector([1.0, 2.0])
    with pytest.raises(SpecError, match="got 'val'; allowed: train, test"):
        cartpole.sample(np.random.default_rng(0), "val")
    with pytest.raises(SpecError, match="k must be >= 1"):
        cartpole.grid(0)
    with pytest.raises(SpecError, match="unknown parameter"):
        cartpole.grid(2, "test", ["nope"])


def _add_delay_param(d):
    d["params"]["delay"] = {"kind": "dynamics", "effect": {"action_delay": True}, "sampling": "integer",
                            "nominal": 0, "train": [0, 2], "test": [0, 3]}


def test_integer_parameters(sim_copy):
    edit_yaml(sim_copy / "tasks" / "cartpole_swingup.yaml", _add_delay_param)
    family = load_family("cartpole_swingup")
    draws = {t["delay"] for t in family.sample(np.random.default_rng(0), "train", 200)}
    assert draws == {0.0, 1.0, 2.0}
    assert sorted({t["delay"] for t in family.grid(10, "test", ["delay"])}) == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(SpecError, match=r"delay: must be an integer, got 1\.5"):
        family.validate({"delay": 1.5})


def _param(name):
    return lambda d: d["params"][name]


@pytest.mark.parametrize(
    ("change", "field", "fragment"),
    [
        (lambda d: d.update(schema_version=0), "schema_version", "task family schema version 0 is not supported"),
        (lambda d: d.update(name="other"), "name", "must equal the file name stem 'cartpole_swingup'"),
        (lambda d: d.update(episode_steps=0), "episode_steps", "must be >= 1"),
        (lambda d: d.update(params={}), "params", "at least one parameter"),
        (lambda d: _param("pole_length")(d).update(train=[1.3, 0.7]), "params.pole_length.train", "must be <="),
        (lambda d: _param("pole_length")(d).update(train=[0.7]), "params.pole_length.train", "expected [low, high]"),
        (lambda d: _param("pole_mass_scale")(d).update(train=[0.0, 2.0]), "params.pole_mass_scale.train",
         "log_uniform needs low > 0"),
        (lambda d: _param("pole_length")(d).update(train={"base": 1.5, "exponent": [-1, 1]}),
         "params.pole_length.train", "needs sampling: log_uniform"),
        (lambda d: _param("pole_length")(d).update(nominal=3.0), "params.pole_length.nominal", "outside"),
        (lambda d: _param("pole_length")(d).pop("effect"), "params.pole_length.effect", "needs an effect"),
        (lambda d: _param("target_x")(d).update(effect={"body_mass_scale": "all"}), "params.target_x.effect",
         "has no effect on the model"),
        (lambda d: _param("pole_length")(d).update(sampling="gaussian"), "params.pole_length.sampling",
         "allowed: 'uniform', 'log_uniform', 'integer'"),
        (lambda d: _param("pole_length")(d).update(kind="visual"), "params.pole_length.kind", "allowed"),
    ],
)
def test_bad_family_yaml_names_the_field(sim_copy, change, field, fragment):
    edit_yaml(sim_copy / "tasks" / "cartpole_swingup.yaml", change)
    with pytest.raises(SpecError) as err:
        load_family("cartpole_swingup")
    assert err.value.field == field
    assert fragment in str(err.value)


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(FileNotFoundError, match="unknown task family 'walker'; families: "):
        load_family("walker")


@pytest.mark.parametrize(
    ("change", "field", "fragment"),
    [
        (lambda d: d.update(env_id="CartpoleSwingup"), "env_id", "must look like 'metarl/<Name>-v<N>'"),
        (lambda d: d["initial_state"].update(qpos_noise=-0.1), "initial_state.qpos_noise", "must be >= 0"),
    ],
)
def test_bad_env_id_and_noise(sim_copy, change, field, fragment):
    edit_yaml(sim_copy / "tasks" / "cartpole_swingup.yaml", change)
    with pytest.raises(SpecError) as err:
        load_family("cartpole_swingup")
    assert err.value.field == field and fragment in str(err.value)


def test_a_local_folder_does_not_shadow_a_family_or_robot_name(tmp_path, monkeypatch):
    from metarl_robot.spec.robot import load_robot

    (tmp_path / "cartpole").mkdir()
    (tmp_path / "cartpole" / "robot.yaml").write_text("not: a robot\n")
    monkeypatch.chdir(tmp_path)
    assert load_robot("cartpole").name == "cartpole"
    assert load_family("cartpole_swingup").name == "cartpole_swingup"
