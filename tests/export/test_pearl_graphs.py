"""PEARL's factor and policy graphs: checked ONNX, pinned interfaces, torch/onnxruntime parity on random and
replay transitions, and a parity check that does catch a graph that no longer matches the agent."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from metarl_robot.export.onnx_graphs import OPSET, PARITY_TOLERANCE, ExportError, check_parity
from metarl_robot.export.pearl_graphs import (
    export_pearl_checked,
    measure_pearl_parity,
    random_pearl_inputs,
    replay_pearl_inputs,
)
from metarl_robot.runtime.context_policy import FACTORS_FILE, POLICY_FILE, pearl_graph_interfaces
from tests.runtime.test_context_policy import ROBOT, pearl_algo

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
        assert set(p["max_abs_diff"]) == {"factor_mean", "factor_var", "action"}
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
