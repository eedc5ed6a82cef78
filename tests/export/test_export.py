"""Export of a tiny trained run: valid ONNX, torch/onnxruntime parity, a complete manifest, no overwrites."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

from metarl_robot.algos.buffer import EpisodeBuffer
from metarl_robot.export import bundle_writer
from metarl_robot.export.bundle_writer import export_run
from metarl_robot.export.onnx_graphs import (
    PARITY_TOLERANCE,
    ExportedGraphs,
    ExportError,
    check_parity,
    export_graphs,
    measure_parity,
    random_inputs,
    real_inputs,
)
from metarl_robot.models.context_dynamics import ContextDynamics
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.runtime.kinds.model_based import graph_interfaces
from metarl_robot.runtime.manifest import family_from_dict, sha256_file
from metarl_robot.spec.family import load_family
from metarl_robot.spec.robot import load_robot, robot_from_dict
from metarl_robot.spec.schema import to_plain
from metarl_robot.train.config import load_config
from metarl_robot.train.runner import load_checkpoint
from tests.conftest import MB_TINY as TINY
from tests.conftest import train_tiny_mb_run as train_tiny

pytestmark = pytest.mark.slow  # every test here needs the trained run (seconds)

MANIFEST_KEYS = ["schema_version", "name", "kind", "created", "software_version", "robot", "robot_interface_sha256",
                 "family", "observation", "action", "control_period", "adaptation", "planner", "graphs", "provenance",
                 "files"]


def load_model(run_dir: Path, checkpoint: str = "latest.pt") -> ContextDynamics:
    cfg = load_config(run_dir / "config.yaml")
    state = load_checkpoint(run_dir / "checkpoints" / checkpoint)
    robot = robot_from_dict(state["robot"])
    model = ContextDynamics(robot.obs_dim, robot.action_dim, robot.obs_periodic, cfg.model)
    model.load_state_dict(state["algo"]["model"])
    return model.eval()


def bundle_graphs(bundle_dir: Path) -> ExportedGraphs:
    return ExportedGraphs(*(bundle_dir / f"{g}.onnx" for g in GRAPHS), exporter="torchscript", opset=17, interfaces={})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def bundle_dir(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_run(run_dir, tmp_path_factory.mktemp("bundles") / "tiny_bundle")


@pytest.fixture(scope="module")
def manifest(bundle_dir: Path) -> dict:
    return yaml.safe_load((bundle_dir / "bundle.yaml").read_text())


GRAPHS = ("encoder", "dynamics", "rollout")
HORIZON = TINY["planner.horizon"]


def test_bundle_folder_holds_the_manifest_and_three_graphs(bundle_dir: Path):
    assert sorted(p.name for p in bundle_dir.iterdir()) == ["bundle.yaml", "dynamics.onnx", "encoder.onnx",
                                                             "rollout.onnx"]
    assert not list(bundle_dir.parent.glob(".tiny_bundle.*")), "staging folder left behind"


@pytest.mark.parametrize("graph", GRAPHS)
def test_graphs_pass_the_full_onnx_checker(bundle_dir: Path, manifest: dict, graph: str):
    model = onnx.load(str(bundle_dir / f"{graph}.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import}[""] >= 17
    spec = manifest["graphs"][graph]
    assert [i.name for i in model.graph.input] == list(spec["inputs"])
    assert [o.name for o in model.graph.output] == list(spec["outputs"])
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims == {**spec["inputs"], **spec["outputs"]}[value.name]


def test_parity_on_random_inputs_of_several_sizes(run_dir: Path, bundle_dir: Path):
    model = load_model(run_dir)
    robot = robot_from_dict(load_checkpoint(run_dir / "checkpoints" / "latest.pt")["robot"])
    rng = np.random.default_rng(7)
    for batch, rows in [(1, 1), (3, 5), (64, 97), (257, 1000)]:  # the traced sizes were 2 and 3
        inputs = random_inputs(model, robot.obs_scale, rng, HORIZON, batch=batch, rows=rows)
        parity = measure_parity(model, bundle_graphs(bundle_dir), inputs)
        assert sorted(parity["max_abs_diff"]) == ["context", "next_obs_logvar", "next_obs_mean", "rollout_next_obs"]
        for name, diff in parity["max_abs_diff"].items():
            assert diff <= PARITY_TOLERANCE, (batch, rows, name, diff)


def test_parity_on_real_buffer_inputs(run_dir: Path, bundle_dir: Path):
    model = load_model(run_dir)
    buffer = EpisodeBuffer.load(run_dir / "buffer.npz")
    inputs = real_inputs(model, buffer, np.random.default_rng(3), HORIZON, n=2048)
    enc = inputs[0]
    assert enc[3].min() == 0 and enc[3].max() == 1  # windows of every fill level, as the adapter sees them
    parity = measure_parity(model, bundle_graphs(bundle_dir), inputs)
    for name, diff in parity["max_abs_diff"].items():
        # Outputs are float32 in raw units: an unwrapped angle of 100+ rad cannot agree beyond its last bit.
        ulp = float(np.spacing(np.float32(parity["max_abs_value"][name])))
        assert diff <= PARITY_TOLERANCE + ulp, (name, diff, ulp)
        assert parity["max_excess_over_ulp"][name] <= PARITY_TOLERANCE


def test_runtime_graphs_match_torch_through_the_bundle_api(run_dir: Path, bundle_dir: Path):
    model, bundle = load_model(run_dir), load_bundle(bundle_dir)
    buffer = EpisodeBuffer.load(run_dir / "buffer.npz")
    enc, dyn, roll = real_inputs(model, buffer, np.random.default_rng(4), HORIZON, n=256)
    with torch.no_grad():
        z = model.encode(*map(torch.as_tensor, enc)).numpy()
        mean = model(*map(torch.as_tensor, dyn))[0].numpy()
    assert np.allclose(bundle.encode(*enc), z, rtol=0, atol=PARITY_TOLERANCE)
    assert np.allclose(bundle.step(*dyn), mean, rtol=1e-6, atol=PARITY_TOLERANCE)
    # The fused rollout is the chain of steps: free-running, float32 differences may compound, but slowly.
    fused, state, chained = bundle.rollout(*roll), roll[0], []
    for t in range(HORIZON):
        state = bundle.step(state, roll[1][:, :, t], roll[2])
        chained.append(state)
    assert fused.shape == (*roll[0].shape[:2], HORIZON, roll[0].shape[-1])
    assert np.allclose(fused, np.stack(chained, axis=2), rtol=1e-5, atol=1e-4)


def test_manifest_has_every_field_and_the_right_hashes(run_dir: Path, bundle_dir: Path, manifest: dict):
    assert list(manifest) == MANIFEST_KEYS
    assert manifest["schema_version"] == 2 and manifest["kind"] == "model_based"
    assert manifest["name"] == "tiny_bundle"
    assert manifest["files"] == {f"{g}.onnx": sha256_file(bundle_dir / f"{g}.onnx") for g in GRAPHS}
    robot = load_robot("cartpole")
    assert manifest["robot"] == robot.to_dict()
    assert manifest["robot_interface_sha256"] == robot.interface_hash
    assert robot_from_dict(manifest["robot"]).interface_hash == robot.interface_hash
    family = family_from_dict(manifest["family"], "test")
    assert family.spec == load_family("cartpole_swingup").spec
    assert manifest["observation"]["dim"] == robot.obs_dim
    assert [f["name"] for f in manifest["observation"]["fields"]] == [f.name for f in robot.measured_fields]
    assert manifest["action"]["names"] == ["motor"] and manifest["action"]["low"] == [-1.0]
    assert manifest["control_period"] == robot.ctrl_dt
    assert manifest["adaptation"] == {"context_window": 16, "context_dim": 8, "ensemble_size": 4,
                                      "rollout_horizon": HORIZON}
    cfg = load_config(run_dir / "config.yaml")
    assert manifest["planner"] == to_plain(cfg.planner)
    expected = graph_interfaces(robot.obs_dim, robot.action_dim, 16, 8, 4, HORIZON)
    for graph in GRAPHS:
        entry = manifest["graphs"][graph]
        assert entry["file"] == f"{graph}.onnx" and entry["opset"] >= 17
        assert {"inputs": entry["inputs"], "outputs": entry["outputs"]} == expected[graph]
    prov = manifest["provenance"]
    state = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert prov["config"] == to_plain(cfg)
    assert prov["git_commit"] == json.loads((run_dir / "run.json").read_text())["git_commit"]
    assert prov["seed"] == 0 and prov["checkpoint"]["iteration"] == state["iteration"] == 1
    assert prov["checkpoint"]["sha256"] == sha256_file(run_dir / "checkpoints" / "latest.pt")
    assert prov["metrics"] == pytest.approx(state["history"][-1], nan_ok=True)
    assert prov["exporter"]["name"] in ("torchscript", "dynamo")
    for kind in ("random", "real"):
        assert set(prov["parity"][kind]["max_abs_diff"]) == {"context", "next_obs_mean", "next_obs_logvar",
                                                                  "rollout_next_obs"}
        assert max(prov["parity"][kind]["max_excess_over_ulp"].values()) <= PARITY_TOLERANCE


def test_refuses_to_overwrite_a_bundle_unless_asked(run_dir: Path, bundle_dir: Path, tmp_path: Path):
    before = (bundle_dir / "bundle.yaml").read_text()
    with pytest.raises(FileExistsError, match="not empty"):
        export_run(run_dir, bundle_dir)
    assert (bundle_dir / "bundle.yaml").read_text() == before
    other = tmp_path / "not_a_bundle"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="does not look like a bundle"):
        export_run(run_dir, other, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    copy = tmp_path / "again"
    export_run(run_dir, copy, checkpoint=0)
    export_run(run_dir, copy, overwrite=True)  # replaces its own earlier bundle
    assert yaml.safe_load((copy / "bundle.yaml").read_text())["provenance"]["checkpoint"]["iteration"] == 1
    assert load_bundle(copy).name == "again"


def test_export_of_an_earlier_checkpoint_by_iteration(run_dir: Path, tmp_path: Path):
    out = export_run(run_dir, tmp_path / "b0", checkpoint=0, name="first")
    data = yaml.safe_load((out / "bundle.yaml").read_text())
    assert data["name"] == "first"
    assert data["provenance"]["checkpoint"] == {"file": "ckpt_0000.pt", "iteration": 0,
                                                "sha256": sha256_file(run_dir / "checkpoints" / "ckpt_0000.pt")}


def test_failed_parity_leaves_nothing_behind(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    strict = bundle_writer.check_parity
    monkeypatch.setattr(bundle_writer, "check_parity", lambda parity: strict(parity, tolerance=-1.0))
    with pytest.raises(ExportError, match="differ by more than"):
        export_run(run_dir, tmp_path / "never")
    assert list(tmp_path.iterdir()) == []


def test_missing_run_folder_or_checkpoint_is_named(run_dir: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        export_run(tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"ckpt_0042\.pt"):
        export_run(run_dir, tmp_path / "out", checkpoint=42)
    assert not (tmp_path / "out").exists()


def test_dynamo_exporter_fallback_also_matches_torch(run_dir: Path, tmp_path: Path):
    model = load_model(run_dir)
    graphs = export_graphs(model, tmp_path, HORIZON, exporter="dynamo")
    assert graphs.exporter == "dynamo" and graphs.opset >= 18
    robot = load_robot("cartpole")
    for path in (graphs.encoder, graphs.dynamics, graphs.rollout):
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    inputs = random_inputs(model, robot.obs_scale, np.random.default_rng(0), HORIZON, batch=5, rows=11)
    parity = measure_parity(model, graphs, inputs)
    assert max(parity["max_abs_diff"].values()) <= PARITY_TOLERANCE


def _parity(excess: float, ort_error: float, torch_error: float, value: float = 1.0) -> dict:
    return {"max_abs_diff": {"next_obs_mean": excess}, "max_excess_over_ulp": {"next_obs_mean": excess},
            "onnxruntime_float32_error": {"next_obs_mean": ort_error},
            "torch_float32_error": {"next_obs_mean": torch_error}, "max_abs_value": {"next_obs_mean": value}}


def test_parity_criterion_allows_float32_rounding_of_torchs_own_size_and_nothing_more():
    check_parity({"random": _parity(3e-6, 2e-6, 2e-6)})  # plain agreement within 1e-5
    # HalfCheetah-like: torch itself is 1.9e-5 from float64, onnxruntime 3.2e-5: the same kind of rounding.
    check_parity({"real": _parity(3.1e-5, 3.2e-5, 1.9e-5)})
    with pytest.raises(ExportError, match=r"real/next_obs_mean.*onnxruntime 0\.002, torch 1\.9e-05"):
        check_parity({"real": _parity(2e-3, 2e-3, 1.9e-5)})  # a real export fault is orders larger
    # A trained PEARL encoder's factor means on random inputs (seed 1 of the kl 0.01 config): values up to 236,
    # onnxruntime 7.3e-5 from float64 (2.4x torch's 3.1e-5) is 5 float32 spacings there — rounding, not a fault.
    check_parity({"random": _parity(5.3e-5, 7.3e-5, 3.1e-5, value=236.0)})
    with pytest.raises(ExportError, match="random/next_obs_mean"):
        check_parity({"random": _parity(2.4e-4, 2.4e-4, 3.1e-5, value=236.0)})  # 1e-6 relative: 16 spacings


def test_a_pearl_run_without_a_checkpoint_is_refused_before_anything_is_written(tmp_path: Path):
    import shutil

    from metarl_robot.export.bundle_writer import export_run
    run = tmp_path / "pearl_run"
    run.mkdir()
    shutil.copyfile("configs/pearl_cartpole_swingup.yaml", run / "config.yaml")
    # PEARL runs export (tests/runtime/test_context_policy_bundle.py); this one has no checkpoints
    with pytest.raises(FileNotFoundError, match=r"latest\.pt"):
        export_run(run, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()  # refused before anything was written
