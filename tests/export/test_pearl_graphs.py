"""PEARL's factor and policy graphs: checked ONNX, pinned interfaces, torch/onnxruntime parity on random and
replay transitions, a parity check that does catch a graph that no longer matches the agent, and export of a
trained run's checkpoint."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from metarl_robot.export.onnx_graphs import OPSET, PARITY_TOLERANCE, ExportError, check_parity
from metarl_robot.export.pearl_graphs import (
    export_pearl_checked,
    export_pearl_checkpoint,
    measure_pearl_parity,
    random_pearl_inputs,
    replay_pearl_inputs,
)
from metarl_robot.runtime.context_policy import (
    FACTORS_FILE,
    POLICY_FILE,
    ContextPolicyAdapter,
    pearl_graph_interfaces,
)
from metarl_robot.train.runner import train
from tests.runtime.test_context_policy import CONFIG, FAMILY, REWARD, ROBOT, pearl_algo

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    algo, replay = pearl_algo(seed=1)
    graphs, parity = export_pearl_checked(algo, tmp_path_factory.mktemp("pearl"), replay=replay, seed=2,
                                          metadata={"run": "unit-test"})
    return algo, replay, graphs, parity


def test_graphs_are_checked_onnx_with_the_runtime_interface(checked):
    algo, _, graphs, _ = checked
    assert graphs.factors.name == FACTORS_FILE and graphs.policy.name == POLICY_FILE and graphs.opset == OPSET
    want = pearl_graph_interfaces(ROBOT.obs_dim, ROBOT.action_dim, algo.net_cfg.latent_dim)
    assert graphs.interfaces == want
    for name, path in (("factors", graphs.factors), ("policy", graphs.policy)):
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
        assert {p.key: p.value for p in proto.metadata_props} == {"graph": name, "run": "unit-test"}
        assert proto.opset_import[0].version == OPSET
        io = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*proto.graph.input, *proto.graph.output]}
        assert io == {**want[name]["inputs"], **want[name]["outputs"]}


def test_parity_on_random_and_replay_inputs_is_within_tolerance(checked):
    _, _, _, parity = checked
    assert set(parity) == {"random", "replay"}
    for kind, p in parity.items():
        assert set(p["max_abs_diff"]) == {"factor_mean", "factor_logvar", "action"}
        for name, excess in p["max_excess_over_ulp"].items():
            assert excess <= PARITY_TOLERANCE, (kind, name, p)
        assert p["max_abs_value"]["action"] > 0.0  # actions, not an all-zero output


def test_parity_check_catches_a_graph_that_differs_from_the_agent(checked):
    algo, replay, graphs, _ = checked
    rng = np.random.default_rng(3)
    inputs = {"random": random_pearl_inputs(algo.agent, ROBOT.obs_scale, rng),
              "replay": replay_pearl_inputs(algo.agent, replay, rng)}
    for part in ("obs_norm", "reward_norm", "delta_norm"):  # a normaliser left out of the export would look like this
        changed = copy.deepcopy(algo.agent)
        getattr(changed.inputs, part).std.mul_(1.01)
        parity = {k: measure_pearl_parity(changed, graphs, v) for k, v in inputs.items()}
        with pytest.raises(ExportError, match="factor_mean"):
            check_parity(parity)
    changed = copy.deepcopy(algo.agent)
    with torch.no_grad():
        changed.actor.net[0].weight.add_(1e-3)
    with pytest.raises(ExportError, match="action"):
        check_parity({k: measure_pearl_parity(changed, graphs, v) for k, v in inputs.items()})


TINY_RUN = {"name": "tiny", "loop.iterations": 1, "loop.random_episodes": 2, "loop.tasks_per_iteration": 2,
            "pearl.grad_steps": 3, "pearl.meta_batch": 2, "pearl.batch_size": 16, "pearl.context_batch": 8,
            "pearl.context_size_min": 2, "pearl_net.hidden": 16, "pearl_net.encoder_hidden": 16}


@pytest.mark.slow
def test_a_trained_runs_checkpoint_exports_and_runs_in_the_adapter(tmp_path):
    train(CONFIG, tmp_path, overrides=TINY_RUN, progress=False)
    checkpoint = tmp_path / "tiny" / "checkpoints" / "latest.pt"
    algo, graphs, parity = export_pearl_checkpoint(checkpoint, tmp_path / "graphs")
    assert set(parity) == {"random", "replay"}  # the run folder's replay.npz was used
    assert algo.normalizers_fitted
    metadata = {p.key: p.value for p in onnx.load(str(graphs.policy)).metadata_props}
    assert metadata == {"graph": "policy", "checkpoint": "latest.pt", "algo_kind": "pearl"}
    adapter = ContextPolicyAdapter.from_onnx(algo.robot, REWARD, graphs.factors, graphs.policy)
    obs = np.zeros((1, ROBOT.obs_dim))
    action, diagnostics = adapter.act(obs, FAMILY.nominal())
    np.testing.assert_allclose(action, algo.act(obs, np.zeros((1, algo.latent_dim)), deterministic=True), atol=1e-5)
    assert diagnostics["context_mean"].shape == (1, algo.latent_dim)

    # a checkpoint of another algorithm is refused by its algo_kind (here hand-edited: never written so)
    state = torch.load(checkpoint, weights_only=False)
    state["algo_kind"] = "context_mbrl"
    other = tmp_path / "other.pt"
    torch.save(state, other)
    with pytest.raises(ExportError, match="algo_kind is 'context_mbrl'; PEARL graphs export only 'pearl'"):
        export_pearl_checkpoint(other, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
