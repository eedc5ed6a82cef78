"""The robot-side bundle loader: every refusal, the happy path through an adapter, determinism, no torch."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import numpy_helper

from metarl_robot.paths import REPO_ROOT
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.runtime.kinds.model_based import ModelBasedBundle
from metarl_robot.runtime.manifest import BundleError, sha256_file
from metarl_robot.spec.schema import SpecError
from tests.boundary import FORBIDDEN, assert_robot_side, forbidden_after
from tests.conftest import edit_yaml, train_single_threaded

CONFIG = REPO_ROOT / "configs" / "mb_cartpole_swingup.yaml"
# Sizes pinned here, so the shipped config can be retuned without touching these tests.
TINY = {"loop.iterations": 2, "training.grad_steps": 30, "name": "tiny", "planner.samples": 16, "planner.horizon": 5,
        "model.context_window": 16, "model.context_dim": 8, "model.ensemble_size": 4}
DIAGNOSTICS = {"context", "context_size", "predicted_next_obs", "prediction_error", "plan_return"}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle exported from a tiny trained run (the training side is imported only here)."""
    from metarl_robot.export.bundle_writer import export_run

    run = train_single_threaded(CONFIG, tmp_path_factory.mktemp("runs"), TINY)
    return export_run(run, tmp_path_factory.mktemp("bundles") / "cartpole_tiny")


@pytest.fixture
def copy(bundle_dir: Path, tmp_path: Path) -> Path:
    """A scratch copy of the bundle to break."""
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


def refused(path: Path, field: str, *words: str) -> BundleError:
    """Assert that loading ``path`` is refused naming the bundle, ``field`` and each of ``words``."""
    with pytest.raises(BundleError) as info:
        load_bundle(path)
    err = info.value
    message = str(err)
    assert str(path) in message, message
    assert err.field == field, message
    for word in words:
        assert word in message, message
    assert isinstance(err, SpecError) and isinstance(err, ValueError)
    return err


def resave_onnx(bundle: Path, name: str, change) -> None:
    """Modify an ONNX file with the onnx package and fix its sha256 so only the later checks can object."""
    model = onnx.load(str(bundle / name))
    change(model)
    onnx.save(model, str(bundle / name))
    edit_yaml(bundle / "bundle.yaml", lambda d: d["files"].__setitem__(name, sha256_file(bundle / name)))


def rewrite_npz(bundle: Path, name: str, change) -> None:
    """Let ``change(arrays)`` edit the arrays (a dict) of the bundle's ``.npz`` file ``name``, save it and fix its
    sha256, so only the kind's own checks can object."""
    with np.load(bundle / name) as data:
        arrays = {k: data[k] for k in data.files}
    change(arrays)
    np.savez(bundle / name, **arrays)
    edit_yaml(bundle / "bundle.yaml", lambda d: d["files"].__setitem__(name, sha256_file(bundle / name)))


def obs_batch(rng: np.random.Generator, b: int) -> np.ndarray:
    """Made-up cart-pole observations: position, angle, velocities at plausible magnitudes."""
    return rng.normal(0, 1, (b, 4)) * np.array([0.5, 3.0, 1.0, 3.0])


def run_adapter(bundle: ModelBasedBundle, b: int, seed: int, steps: int = 6) -> tuple[list[np.ndarray], list[dict]]:
    adapter = bundle.make_adapter(batch=b, seed=seed, planner_overrides={"samples": 24, "horizon": 6})
    adapter.reset()
    rng = np.random.default_rng(100 + b)
    obs = obs_batch(rng, b)
    actions, diags = [], []
    for _ in range(steps):
        action, diag = adapter.act(obs, {"target_x": np.linspace(-0.3, 0.3, b)})
        next_obs = obs + 0.05 * rng.standard_normal(obs.shape)
        adapter.observe(obs, action, next_obs)
        actions.append(action.copy())
        diags.append(diag)
        obs = next_obs
    return actions, diags


# ---- boundary ---------------------------------------------------------------------------------------------
def test_importing_the_loader_pulls_in_no_torch_mujoco_or_gymnasium():
    assert_robot_side(["metarl_robot.runtime.bundle"], forbidden=[*FORBIDDEN, "onnx"])


@pytest.mark.slow
def test_loading_and_acting_pulls_in_no_torch_mujoco_or_gymnasium(bundle_dir: Path):
    code = ("import numpy as np; from metarl_robot.runtime.bundle import load_bundle; "
            f"b = load_bundle({str(bundle_dir)!r}); a = b.make_adapter(); "
            "a.act(np.zeros((1, 4)), {'target_x': 0.0})")
    pulled = forbidden_after(code)
    assert not pulled, f"loading a bundle pulled in: {pulled}"


# ---- happy path -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_loads_with_everything_the_node_needs(bundle_dir: Path):
    bundle = load_bundle(bundle_dir)
    assert load_bundle(bundle_dir / "bundle.yaml", threads=2).sha256 == bundle.sha256 == sha256_file(
        bundle_dir / "bundle.yaml")
    assert bundle.robot.name == "cartpole" and bundle.family.name == "cartpole_swingup"
    assert bundle.manifest["kind"] == "model_based" and bundle.name == "cartpole_tiny"
    assert (bundle.context_window, bundle.context_dim, bundle.ensemble_size) == (16, 8, 4)
    assert bundle.planner.horizon == 5 and bundle.planner.samples == 16  # the run's planner settings
    z = bundle.encode(np.zeros((3, 16, 4)), np.zeros((3, 16, 1)), np.zeros((3, 16, 4)), np.zeros((3, 16)))
    assert z.shape == (3, 8) and z.dtype == np.float32
    nxt = bundle.step(np.zeros((4, 7, 4)), np.zeros((4, 7, 1)), np.zeros((4, 7, 8)))
    assert nxt.shape == (4, 7, 4) and np.all(np.isfinite(nxt))
    with pytest.raises(ValueError, match="'obs': expected shape \\[4, rows, 4\\]"):
        bundle.step(np.zeros((3, 7, 4)), np.zeros((3, 7, 1)), np.zeros((3, 7, 8)))


@pytest.mark.slow
@pytest.mark.parametrize("b", [1, 3])
def test_adapter_acts_within_the_robot_limits(bundle_dir: Path, b: int):
    bundle = load_bundle(bundle_dir)
    robot = bundle.robot
    actions, diags = run_adapter(bundle, b, seed=0)
    prev = np.tile(robot.safe_action, (b, 1))
    for action, diag in zip(actions, diags, strict=True):
        assert action.shape == (b, robot.action_dim)
        assert np.all(action >= robot.action_low) and np.all(action <= robot.action_high)
        assert np.all(np.abs(action - prev) <= robot.action_max_rate * robot.ctrl_dt + 1e-9)
        prev = action
        assert set(diag) == DIAGNOSTICS
        assert diag["context"].shape == (b, 8) and diag["predicted_next_obs"].shape == (b, 4)
        assert np.all(np.isfinite(diag["predicted_next_obs"]))
    assert np.all(np.isnan(diags[0]["prediction_error"])) and np.all(np.isfinite(diags[-1]["prediction_error"]))
    assert list(diags[-1]["context_size"]) == [5] * b


@pytest.mark.slow
def test_same_seed_same_actions_different_seed_different_actions(bundle_dir: Path):
    first, _ = run_adapter(load_bundle(bundle_dir), 3, seed=5)
    again, _ = run_adapter(load_bundle(bundle_dir), 3, seed=5)
    other, _ = run_adapter(load_bundle(bundle_dir), 3, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(first, other, strict=True))


@pytest.mark.slow
def test_planner_overrides_are_checked(bundle_dir: Path):
    bundle = load_bundle(bundle_dir)
    assert bundle.make_adapter(planner_overrides={"method": "cem", "horizon": 3}).planner.cfg.method == "cem"
    with pytest.raises(SpecError, match="unknown key 'horizn'"):
        bundle.make_adapter(planner_overrides={"horizn": 3})
    with pytest.raises(SpecError, match="samples"):
        bundle.make_adapter(planner_overrides={"samples": 1})


@pytest.mark.slow
def test_unlisted_non_onnx_files_are_ignored(copy: Path):
    (copy / "README.md").write_text("notes")
    assert load_bundle(copy).name == "cartpole_tiny"


# ---- refusals: files --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_refuses_a_folder_without_bundle_yaml(copy: Path):
    (copy / "bundle.yaml").unlink()
    refused(copy, "bundle.yaml", "missing")


@pytest.mark.slow
def test_refuses_a_graph_whose_weights_live_in_an_unhashed_sidecar(copy: Path, monkeypatch: pytest.MonkeyPatch):
    # The graph file itself is listed with its right sha256; its weights moved to encoder.onnx.data, which no
    # hash covers. Run from the bundle folder too: from bytes, onnxruntime would look there.
    model = onnx.load(str(copy / "encoder.onnx"))
    onnx.save_model(model, str(copy / "encoder.onnx"), save_as_external_data=True, location="encoder.onnx.data",
                    size_threshold=0)
    assert (copy / "encoder.onnx.data").is_file()
    digest = sha256_file(copy / "encoder.onnx")
    edit_yaml(copy / "bundle.yaml", lambda d: d["files"].__setitem__("encoder.onnx", digest))
    monkeypatch.chdir(copy)
    refused(copy, "graphs.encoder.file", "external data file", "re-export")


@pytest.mark.slow
def test_refuses_a_manifest_with_a_key_written_twice(copy: Path):
    text = (copy / "bundle.yaml").read_text()
    (copy / "bundle.yaml").write_text(text + "schema_version: 1\n")  # a second schema_version at the end
    refused(copy, "bundle.yaml", "duplicate key 'schema_version'", "write each key once")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["encoder.onnx", "dynamics.onnx", "rollout.onnx"])
def test_refuses_a_missing_listed_file(copy: Path, name: str):
    (copy / name).unlink()
    refused(copy, f"files.{name}", "missing")


@pytest.mark.slow
def test_refuses_an_unlisted_onnx_file(copy: Path):
    shutil.copy(copy / "dynamics.onnx", copy / "dynamics_old.onnx")
    refused(copy, "files.dynamics_old.onnx", "not listed")


@pytest.mark.slow
def test_refuses_a_flipped_byte(copy: Path):
    data = bytearray((copy / "dynamics.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "dynamics.onnx").write_bytes(bytes(data))
    refused(copy, "files.dynamics.onnx", "sha256 mismatch")


# ---- refusals: manifest -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("version", [1, 3, 0, "2"])
def test_refuses_an_unknown_schema_version(copy: Path, version):
    edit_yaml(copy / "bundle.yaml", lambda d: d.__setitem__("schema_version", version))
    refused(copy, "schema_version", "not supported", "reads 2")


@pytest.mark.slow
def test_refuses_a_missing_schema_version(copy: Path):
    edit_yaml(copy / "bundle.yaml", lambda d: d.pop("schema_version"))
    refused(copy, "schema_version", "missing")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["context_inference", "model-based", None])
def test_refuses_an_unknown_kind(copy: Path, kind):
    edit_yaml(copy / "bundle.yaml", lambda d: d.__setitem__("kind", kind))
    refused(copy, "kind", "unknown bundle kind", "model_based")


@pytest.mark.slow
def test_refuses_an_unknown_manifest_key(copy: Path):
    edit_yaml(copy / "bundle.yaml", lambda d: d.__setitem__("extra", 1))
    refused(copy, "extra", "unknown key")


@pytest.mark.slow
def test_refuses_an_edited_robot_copy(copy: Path):
    edit_yaml(copy / "bundle.yaml", lambda d: d["robot"]["action"][0].__setitem__("high", 2.0))
    refused(copy, "robot_interface_sha256", "robot spec was edited")


@pytest.mark.slow
def test_refuses_a_robot_copy_that_does_not_parse(copy: Path):
    edit_yaml(copy / "bundle.yaml", lambda d: d["robot"]["safe_command"].__setitem__("motor", 5.0))
    refused(copy, "robot.safe_command.motor", "outside the action range")


@pytest.mark.slow
def test_refuses_a_broken_family(copy: Path):
    edit_yaml(copy / "bundle.yaml", lambda d: d["family"].__setitem__("reward", "ant_goal"))
    refused(copy, "family.reward", "torso_xy")


@pytest.mark.slow
def test_refuses_a_layout_that_disagrees_with_the_robot(copy: Path):
    edit_yaml(copy / "bundle.yaml", lambda d: d["observation"]["fields"][1].__setitem__("scale", 1.0))
    refused(copy, "observation.fields[1].scale", "disagrees with the robot spec", "3.14")


@pytest.mark.slow
def test_refuses_invalid_planner_defaults(copy: Path):
    edit_yaml(copy / "bundle.yaml", lambda d: d["planner"].__setitem__("method", "random"))
    refused(copy, "planner.method", "'mppi'")


@pytest.mark.slow
def test_refuses_adaptation_sizes_the_graphs_were_not_exported_with(copy: Path):
    edit_yaml(copy / "bundle.yaml", lambda d: d["adaptation"].__setitem__("context_window", 8))
    refused(copy, "graphs.encoder.inputs.context_obs", "[batch, 16, 4]", "[batch, 8, 4]")


# ---- refusals: graphs -------------------------------------------------------------------------------------
def _rename_input(model: onnx.ModelProto, old: str, new: str) -> None:
    for value in model.graph.input:
        if value.name == old:
            value.name = new
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


@pytest.mark.slow
def test_refuses_a_renamed_onnx_input(copy: Path):
    resave_onnx(copy, "encoder.onnx", lambda m: _rename_input(m, "context_mask", "mask"))
    refused(copy, "graphs.encoder.inputs", "'mask'", "context_mask")


@pytest.mark.slow
def test_refuses_a_fixed_dimension_where_the_runtime_needs_a_dynamic_one(copy: Path):
    def fix_rows(model: onnx.ModelProto) -> None:
        for value in [*model.graph.input, *model.graph.output]:
            value.type.tensor_type.shape.dim[1].dim_value = 7

    resave_onnx(copy, "dynamics.onnx", fix_rows)
    refused(copy, "graphs.dynamics.inputs.obs", "fixed to 7", "dynamic")


@pytest.mark.slow
def test_refuses_a_wrong_fixed_dimension(copy: Path):
    def widen(model: onnx.ModelProto) -> None:
        model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 9  # context is 8 wide

    resave_onnx(copy, "encoder.onnx", widen)
    refused(copy, "graphs.encoder.outputs.context", "dimension 1 is 9, expected 8")


@pytest.mark.slow
def test_refuses_a_non_float32_input(copy: Path):
    def double_input(model: onnx.ModelProto) -> None:  # a valid graph: the double input is cast to float first
        _rename_input(model, "context_obs", "context_obs_f32")
        model.graph.node.insert(0, onnx.helper.make_node("Cast", ["context_obs"], ["context_obs_f32"],
                                                         to=onnx.TensorProto.FLOAT))
        model.graph.input[0].name = "context_obs"
        model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE

    resave_onnx(copy, "encoder.onnx", double_input)
    refused(copy, "graphs.encoder.inputs.context_obs", "tensor(double)", "expected tensor(float)")


@pytest.mark.slow
def test_refuses_a_graph_onnxruntime_cannot_load(copy: Path):
    def mistyped(model: onnx.ModelProto) -> None:  # a double input feeding float ops
        model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.DOUBLE

    resave_onnx(copy, "encoder.onnx", mistyped)
    refused(copy, "graphs.encoder.file", "onnxruntime cannot load encoder.onnx")


@pytest.mark.slow
def test_refuses_a_nan_weight_that_the_hashes_do_not_catch(copy: Path):
    def poison(model: onnx.ModelProto) -> None:
        init = next(i for i in model.graph.initializer if i.name.endswith("hidden_layers.1.weight"))
        values = numpy_helper.to_array(init).copy()
        values.flat[3] = np.nan
        init.CopyFrom(numpy_helper.from_array(values, init.name))

    resave_onnx(copy, "dynamics.onnx", poison)
    err = refused(copy, "graphs.dynamics.file", "hidden_layers.1.weight", "non-finite")
    assert "1 non-finite" in str(err)


@pytest.mark.slow
def test_refuses_a_rollout_graph_that_is_not_the_chained_dynamics(copy: Path):
    def perturb(model: onnx.ModelProto) -> None:  # finite, valid, but another model
        init = next(i for i in model.graph.initializer if i.name == "w1_0")  # member 0's second layer (lean_rollout)
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))

    resave_onnx(copy, "rollout.onnx", perturb)
    refused(copy, "graphs.rollout", "not the same model")


@pytest.mark.slow
def test_fused_rollout_plans_what_the_stepped_dynamics_plan(bundle_dir: Path):
    bundle = load_bundle(bundle_dir)
    overrides = {"samples": 24, "horizon": bundle.rollout_horizon}
    fused, stepped = (bundle.make_adapter(batch=2, seed=3, planner_overrides=overrides) for _ in range(2))
    assert fused.planner.model.fused is not None
    stepped.planner.model.fused = None
    obs = obs_batch(np.random.default_rng(0), 2)
    for _ in range(4):
        a_fused, d_fused = fused.act(obs, {"target_x": 0.0})
        a_stepped, d_stepped = stepped.act(obs, {"target_x": 0.0})
        np.testing.assert_allclose(a_fused, a_stepped, atol=1e-3)
        np.testing.assert_allclose(d_fused["plan_return"], d_stepped["plan_return"], rtol=1e-4)
        for adapter, action in ((fused, a_fused), (stepped, a_stepped)):
            adapter.observe(obs, action, obs + 0.01)
        obs = obs + 0.01


@pytest.mark.slow
def test_refuses_a_file_that_is_not_onnx(copy: Path):
    (copy / "encoder.onnx").write_bytes(b"not a protobuf at all")
    digest = sha256_file(copy / "encoder.onnx")
    edit_yaml(copy / "bundle.yaml", lambda d: d["files"].__setitem__("encoder.onnx", digest))
    refused(copy, "graphs.encoder.file", "not a valid ONNX model")


@pytest.mark.slow
def test_a_manifest_rewritten_by_another_yaml_writer_still_loads(copy: Path):
    # A manifest dumped by another YAML writer (no comment header, other key order) still loads.
    data = yaml.safe_load((copy / "bundle.yaml").read_text())
    (copy / "bundle.yaml").write_text(yaml.safe_dump(data, sort_keys=True))
    assert load_bundle(copy).robot.name == "cartpole"
