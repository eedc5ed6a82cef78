"""bench/planner_latency.py on the shipped bundle: the script runs its pytorch-mppi peer from a fresh clone, on
weights rebuilt from the bundle and checked against onnxruntime; wrong weights are refused (no timing asserts)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BUNDLE = "policies/cartpole_mb"
ROOT = Path(__file__).resolve().parents[2]


def bench_module() -> ModuleType:
    """The script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("planner_latency", ROOT / "bench" / "planner_latency.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.slow
def test_planner_latency_runs_the_peer_at_every_sample_count():
    # Only shipped files: no training run exists in a fresh clone, and the peer must run anyway.
    result = subprocess.run([sys.executable, "bench/planner_latency.py", "--bundle", BUNDLE, "--steps", "12"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    doc = json.loads(result.stdout)
    assert set(doc["results"]) == {"ours_adapter", "ours_planner_1iter_stepped", "ort_floor_stepped"}
    assert set(doc["by_samples"]) == {"128", "256", "1024"} and doc["samples"] == [128, 256, 1024]
    assert doc["peer"]["ran"] and not any("skipped" in note for note in doc["notes"])
    parity = doc["peer"]["parity"]
    assert parity["next_obs_mean_max_abs_diff_over_obs_scale"] <= 1e-5
    assert parity["next_obs_logvar_max_abs_diff"] <= 1e-5
    rows = [*doc["results"].values()]
    for n, by_n in doc["by_samples"].items():
        assert set(by_n) == {"ours_planner_1iter", "pytorch_mppi", "ort_floor", "ours_planner_1iter_lean",
                             "ort_floor_lean", "torch_rollout_fused"}
        rows += by_n.values()
        ratios = doc["ratios"]["by_samples"][n]
        assert all(math.isfinite(ratios[f"ours_planner_1iter_over_pytorch_mppi_{p}"]) for p in ("p50", "p99"))
        assert math.isfinite(ratios["lean_over_bundle_rollout_p50"])
        assert math.isfinite(ratios["lean_rollout_over_torch_fused_p50"])
        assert isinstance(doc["target"]["met"][n], bool) and isinstance(doc["target_torch_reference"]["met"][n], bool)
    assert doc["peer"]["torch_reference_parity"]["max_abs_diff_over_obs_scale"] <= 1e-4
    for row in rows:  # 12 calls, 10 of warm-up
        assert row["n"] == 2 and all(math.isfinite(row[k]) and row[k] > 0 for k in ("p50_ms", "p99_ms"))


def test_peer_weights_from_the_bundle_match_onnxruntime_and_wrong_ones_are_refused():
    import torch

    from metarl_robot.runtime.bundle import load_bundle

    bench = bench_module()
    bundle = load_bundle(BUNDLE)
    z = bundle.make_adapter(batch=1).context()
    model = bench.bundle_peer_model(bundle)
    assert model.encoder is None  # not in dynamics.onnx; the peer plans with a fixed context
    parity = bench.peer_parity(model, bundle, z)
    assert parity["next_obs_mean_max_abs_diff_over_obs_scale"] <= 1e-5

    # One weight off: refused.
    with torch.no_grad():
        model.hidden_layers[1].weight[2, 5, 7] += 0.5
    with pytest.raises(bench.PeerWeightsError, match="not the same model"):
        bench.peer_parity(model, bundle, z)

    # The anonymous biases put on the wrong layers (same shapes, so only the numbers can tell): refused.
    model = bench.bundle_peer_model(bundle)
    with torch.no_grad():
        b1, b2 = model.hidden_layers[1].bias.clone(), model.hidden_layers[2].bias.clone()
        model.hidden_layers[1].bias.copy_(b2)
        model.hidden_layers[2].bias.copy_(b1)
    with pytest.raises(bench.PeerWeightsError, match="not the same model"):
        bench.peer_parity(model, bundle, z)


def test_the_hand_fused_torch_rollout_is_the_lean_graphs_arithmetic_and_other_weights_are_refused():
    import onnxruntime as ort
    import torch

    from metarl_robot.export.lean_rollout import EnsembleWeights, rollout_graph
    from metarl_robot.runtime.bundle import load_bundle

    bench = bench_module()
    bundle = load_bundle(BUNDLE)
    z = bundle.make_adapter(batch=1).context()
    model = bench.bundle_peer_model(bundle)
    weights = EnsembleWeights.from_model(model)
    session = ort.InferenceSession(rollout_graph(weights, bundle.rollout_horizon, bundle.robot.action_dim,
                                                 z.shape[-1], 17).SerializeToString())

    def lean(obs, actions, context):
        return session.run(None, {"obs": obs, "actions": actions, "context": context})[0]

    reference = bench.torch_fused_rollout(weights, bundle.rollout_horizon)
    parity = bench.rollout_parity(reference, lean, bundle, z)
    assert parity["max_abs_diff_over_obs_scale"] <= 1e-4 and parity["steps"] == bundle.rollout_horizon
    # The same arithmetic with one first-layer weight changed: refused, so the reference cannot time another model.
    with torch.no_grad():
        model.hidden_layers[0].weight[1, 2, 3] += 0.5
    other = bench.torch_fused_rollout(EnsembleWeights.from_model(model), bundle.rollout_horizon)
    with pytest.raises(bench.PeerWeightsError, match="not the same arithmetic"):
        bench.rollout_parity(other, lean, bundle, z)


def test_a_changed_dynamics_graph_is_refused_before_its_weights_are_read(tmp_path):
    import shutil

    from metarl_robot.runtime.manifest import read_manifest

    bench = bench_module()
    _, manifest = read_manifest(ROOT / BUNDLE)
    copy = tmp_path / "dynamics.onnx"
    shutil.copyfile(ROOT / BUNDLE / "dynamics.onnx", copy)
    assert set(bench.onnx_state_dict(copy, manifest["files"]["dynamics.onnx"])) >= {"head.weight", "head.bias"}
    with copy.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(bench.PeerWeightsError, match="sha256"):
        bench.onnx_state_dict(copy, manifest["files"]["dynamics.onnx"])


@pytest.mark.slow
def test_an_explicit_run_folder_without_the_checkpoint_is_refused():
    result = subprocess.run([sys.executable, "bench/planner_latency.py", "--bundle", BUNDLE, "--steps", "12",
                             "--run", "/nonexistent"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 1 and result.stdout == ""
    assert "refusing to run pytorch-mppi" in result.stderr and "/nonexistent" in result.stderr


@pytest.mark.parametrize("family", ["cartpole_swingup", "half_cheetah_vel"])
def test_peer_costs_are_the_negative_of_our_rewards(family):
    # pytorch-mppi plans with a torch copy of the reward: it must be the same function, or the comparison is not.
    import numpy as np
    import torch

    from metarl_robot.spec.family import load_family
    from metarl_robot.spec.rewards import get_reward
    from metarl_robot.spec.robot import load_robot

    bench = bench_module()
    fam = load_family(family)
    robot = load_robot(fam.spec.robot)
    param = fam.reward_names[0]
    rng = np.random.default_rng(0)
    obs, next_obs = (rng.normal(size=(64, robot.obs_dim)) * robot.obs_scale for _ in range(2))
    action = rng.uniform(robot.action_low, robot.action_high, (64, robot.action_dim))
    value = 0.7
    ours, _ = get_reward(fam.spec.reward)(robot, obs, action, next_obs, {param: np.full(64, value)})
    theirs = bench.torch_cost(robot, fam.spec.reward, {param: value})(torch.as_tensor(next_obs),
                                                                        torch.as_tensor(action)).numpy()
    np.testing.assert_allclose(theirs, -ours, rtol=1e-9, atol=1e-12)
