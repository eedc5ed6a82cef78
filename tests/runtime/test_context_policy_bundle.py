"""context_policy bundles (PEARL): exported from a tiny trained run, loaded by the robot-side loader, acting like
the ContextPolicyAdapter built straight from the same graphs, and every refusal specific to the kind."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from metarl_robot.envs.meta_env import MetaMujocoEnv
from metarl_robot.paths import REPO_ROOT
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.runtime.context_policy import FACTORS_FILE, POLICY_FILE, ContextPolicyAdapter
from metarl_robot.runtime.kinds.context_policy import ContextPolicyBundle
from metarl_robot.runtime.manifest import sha256_file
from metarl_robot.spec.schema import SpecError
from tests.boundary import forbidden_after
from tests.conftest import PEARL_LATENT_DIM, edit_yaml
from tests.conftest import train_tiny_pearl_run as train_tiny_pearl_run  # re-exported: other tests import it from here
from tests.runtime.test_bundle import refused, resave_onnx

LATENT_DIM = PEARL_LATENT_DIM


@pytest.fixture(scope="module")
def bundle_dir(pearl_bundle: Path) -> Path:
    """The session's tiny PEARL bundle (tests/conftest.py)."""
    return pearl_bundle


@pytest.fixture
def copy(bundle_dir: Path, tmp_path: Path) -> Path:
    """A scratch copy of the bundle to break."""
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


def append_op(output: str, op: str, operand: float | None = None):
    """An ONNX edit: graph output ``output`` becomes ``op(output, operand)`` (or a unary ``op(output)``)."""

    def change(model: onnx.ModelProto) -> None:
        graph = model.graph
        raw = f"{output}_before_{op.lower()}"
        for node in graph.node:
            node.output[:] = [raw if o == output else o for o in node.output]
        inputs = [raw]
        if operand is not None:
            graph.initializer.append(helper.make_tensor(f"{raw}_operand", onnx.TensorProto.FLOAT, [], [operand]))
            inputs.append(f"{raw}_operand")
        graph.node.append(helper.make_node(op, inputs, [output], name=f"appended_{op.lower()}"))

    return change


# ---- the happy path ----------------------------------------------------------------------------------------
def test_export_writes_a_context_policy_bundle_that_loads(bundle_dir: Path, pearl_run: Path):
    bundle = load_bundle(bundle_dir)
    assert isinstance(bundle, ContextPolicyBundle) and bundle.kind == ContextPolicyBundle.kind == "context_policy"
    assert (bundle.name, bundle.robot.name, bundle.family.name) == ("pearl_tiny", "cartpole", "cartpole_swingup")
    assert bundle.sha256 == sha256_file(bundle_dir / "bundle.yaml")
    m = bundle.manifest
    assert m["adaptation"] == {"algorithm": "pearl", "latent_dim": LATENT_DIM} and bundle.latent_dim == LATENT_DIM
    assert "planner" not in m  # nothing plans: the policy graph acts
    assert set(m["graphs"]) == {"factors", "policy"}
    assert m["files"] == {FACTORS_FILE: sha256_file(bundle_dir / FACTORS_FILE),
                          POLICY_FILE: sha256_file(bundle_dir / POLICY_FILE)}
    provenance = m["provenance"]
    assert provenance["checkpoint"]["file"] == "ckpt_0000.pt" and provenance["config"]["algo"] == "pearl"
    assert provenance["exporter"]["name"] == "torchscript"
    assert set(provenance["parity"]) >= {"tolerance", "criterion", "random", "replay", "replay_samples"}
    assert provenance["parity"]["replay_samples"] >= 512
    assert provenance["run_dir"] == str(pearl_run.resolve())


def test_bundle_adapter_acts_inside_the_box_exactly_as_the_adapter_over_the_same_graphs(bundle_dir: Path):
    bundle = load_bundle(bundle_dir)
    adapter = bundle.make_adapter(batch=1)
    direct = ContextPolicyAdapter.from_onnx(bundle.robot, adapter.reward, bundle_dir / FACTORS_FILE,
                                            bundle_dir / POLICY_FILE)
    env = MetaMujocoEnv(bundle.family.name)
    obs, _ = env.reset(seed=0, options={"task": "test"})
    params = {k: np.array([v]) for k, v in env.reward_params.items()}
    for _ in range(12):
        action, diag = adapter.act(obs[None], params)
        action_direct, diag_direct = direct.act(obs[None], params)
        np.testing.assert_array_equal(action, action_direct)
        np.testing.assert_array_equal(diag["context_mean"], diag_direct["context_mean"])
        assert np.all(action >= bundle.robot.action_low) and np.all(action <= bundle.robot.action_high)
        next_obs, _, _, _, info = env.step(action[0])
        assert not info["action_clipped"]
        adapter.observe(obs[None], info["sent_action"][None], next_obs[None])
        direct.observe(obs[None], info["sent_action"][None], next_obs[None])
        obs = next_obs
    assert diag["context_size"][0] == 11
    assert not np.allclose(diag["context_var"], 1.0)  # the belief did move away from the prior


def test_adapt_false_keeps_the_prior(bundle_dir: Path):
    bundle = load_bundle(bundle_dir)
    frozen, adapting = bundle.make_adapter(batch=2, adapt=False), bundle.make_adapter(batch=2)
    rng = np.random.default_rng(0)
    params = {"target_x": np.zeros(2)}
    obs = rng.normal(0, 1, (2, 4))
    for _ in range(5):
        _, diag = frozen.act(obs, params)
        adapting.act(obs, params)
        next_obs = obs + rng.normal(0, 0.1, (2, 4))
        action = rng.uniform(bundle.robot.action_low, bundle.robot.action_high, (2, 1))
        frozen.observe(obs, action, next_obs)
        adapting.observe(obs, action, next_obs)
        obs = next_obs
    _, diag = frozen.act(obs, params)
    _, diag_adapting = adapting.act(obs, params)
    np.testing.assert_array_equal(diag["context_mean"], 0.0)
    np.testing.assert_array_equal(diag["context_var"], 1.0)
    np.testing.assert_array_equal(diag["context_size"], [0, 0])
    assert np.all(diag_adapting["context_size"] == 5) and not np.allclose(diag_adapting["context_var"], 1.0)


def test_planner_overrides_are_refused(bundle_dir: Path):
    bundle = load_bundle(bundle_dir)
    with pytest.raises(SpecError, match=r"planner_overrides: a context_policy bundle does not plan.*\['samples'\]"):
        bundle.make_adapter(planner_overrides={"samples": 16})
    bundle.make_adapter(planner_overrides={})  # nothing to override: fine


def test_loading_and_acting_pulls_in_no_torch_mujoco_or_gymnasium(bundle_dir: Path):
    code = ("import numpy as np; from metarl_robot.runtime.bundle import load_bundle; "
            f"b = load_bundle({str(bundle_dir)!r}); a = b.make_adapter(); "
            "a.act(np.zeros((1, 4)), {'target_x': 0.0}); a.observe(np.zeros((1, 4)), np.zeros((1, 1)), "
            "np.zeros((1, 4))); a.act(np.zeros((1, 4)), {'target_x': 0.0})")
    assert forbidden_after(code) == []


# ---- refusals ----------------------------------------------------------------------------------------------
def test_refuses_an_altered_graph_file(copy: Path):
    data = bytearray((copy / POLICY_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / POLICY_FILE).write_bytes(bytes(data))
    refused(copy, f"files.{POLICY_FILE}", "sha256 mismatch", "modified or corrupted")


def test_refuses_a_latent_dim_the_graphs_were_not_exported_with(copy: Path):
    edit_yaml(copy / "bundle.yaml", lambda d: d["adaptation"].__setitem__("latent_dim", LATENT_DIM + 1))
    refused(copy, "graphs.factors.outputs.factor_mean", f"[batch, {LATENT_DIM}]", f"[batch, {LATENT_DIM + 1}]")


def test_refuses_a_latent_dim_declared_consistently_but_not_the_graphs(copy: Path):
    def change(d: dict) -> None:
        d["adaptation"]["latent_dim"] = LATENT_DIM + 1
        d["graphs"]["factors"]["outputs"] = {k: ["batch", LATENT_DIM + 1] for k in ("factor_mean", "factor_logvar")}
        d["graphs"]["policy"]["inputs"]["z"] = ["batch", LATENT_DIM + 1]

    edit_yaml(copy / "bundle.yaml", change)
    refused(copy, "graphs.factors.outputs.factor_mean", FACTORS_FILE, f"dimension 1 is {LATENT_DIM}")


def test_refuses_a_missing_graph_file(copy: Path):
    (copy / FACTORS_FILE).unlink()
    refused(copy, f"files.{FACTORS_FILE}", "missing from the bundle folder")


def test_refuses_a_graph_missing_from_the_manifest(copy: Path):
    edit_yaml(copy / "bundle.yaml", lambda d: d["graphs"].pop("policy"))
    refused(copy, "graphs", "['factors', 'policy']", "got ['factors']")


def test_refuses_an_unknown_adaptation_key(copy: Path):
    edit_yaml(copy / "bundle.yaml", lambda d: d["adaptation"].__setitem__("context_window", 8))
    refused(copy, "adaptation.context_window", "unknown key", "algorithm", "latent_dim")


def test_refuses_a_planner_section(copy: Path):
    edit_yaml(copy / "bundle.yaml", lambda d: d.__setitem__("planner", {"method": "mppi"}))
    refused(copy, "planner", "unknown key 'planner'")


def test_refuses_an_unknown_algorithm(copy: Path):
    edit_yaml(copy / "bundle.yaml", lambda d: d["adaptation"].__setitem__("algorithm", "rl2"))
    refused(copy, "adaptation.algorithm", "'rl2'", "pearl")


@pytest.mark.parametrize("kind", ["context_inference", "pearl", None])
def test_refuses_a_bad_kind(copy: Path, kind):
    edit_yaml(copy / "bundle.yaml", lambda d: d.__setitem__("kind", kind))
    refused(copy, "kind", f"unknown bundle kind {kind!r}", "model_based, context_policy")


def test_refuses_a_context_policy_manifest_relabelled_model_based(copy: Path):
    edit_yaml(copy / "bundle.yaml", lambda d: d.__setitem__("kind", "model_based"))
    refused(copy, "adaptation.algorithm", "unknown key")


def test_refuses_a_policy_that_acts_outside_the_box(copy: Path):
    # the box is [-1, 1] and the graph's own action lies inside it: + 2 is outside whatever the weights
    resave_onnx(copy, POLICY_FILE, append_op("action", "Add", 2.0))
    refused(copy, "graphs.policy", "outside the robot's action box")


def test_refuses_factors_whose_precision_overflows(copy: Path):
    # log-variance - 1000: precision exp(1000 + ...) is not a float64
    resave_onnx(copy, FACTORS_FILE, append_op("factor_logvar", "Add", -1000.0))
    refused(copy, "graphs.factors", "precision exp(-log_var) overflows")


# ---- export refusals and the CLI -----------------------------------------------------------------------------
def test_export_refuses_the_dynamo_exporter_for_pearl_and_leaves_nothing(pearl_run: Path, tmp_path: Path):
    from metarl_robot.export.bundle_writer import export_run

    with pytest.raises(ValueError, match="exporter: PEARL graphs are exported with the TorchScript exporter only"):
        export_run(pearl_run, tmp_path / "b", exporter="dynamo")
    assert list(tmp_path.iterdir()) == []


def test_export_needs_the_runs_replay(pearl_run: Path, tmp_path: Path):
    from metarl_robot.export.bundle_writer import export_run

    run = Path(shutil.copytree(pearl_run, tmp_path / "run"))
    (run / "replay.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"replay\.npz not found"):
        export_run(run, tmp_path / "out" / "b")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.slow
@pytest.mark.integration
def test_metarl_export_cli_on_a_pearl_run(pearl_run: Path, tmp_path: Path):
    out = tmp_path / "cli_bundle"
    proc = subprocess.run([sys.executable, "-m", "metarl_robot.cli", "export", str(pearl_run), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "context_policy bundle" in proc.stdout
    assert isinstance(load_bundle(out), ContextPolicyBundle)
