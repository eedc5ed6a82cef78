"""Refusals every kind whose policy graph takes its weights as inputs shares (``meta_policy``, MB-MPO's, and
``awr_policy``, MACAW's): the parameter file's hash and listing, the features' width, no planner, and a graph that
is not the mean of the bundle's own parameters. Each kind's own checks are in its test_<kind>_bundle.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest
from onnx import helper

from metarl_robot.runtime.kinds.meta_policy import POLICY_FILE
from tests.conftest import edit_yaml
from tests.runtime.test_bundle import refused, resave_onnx

KINDS = {"meta_policy": ("meta_policy_bundle", "meta_params.npz"),
         "awr_policy": ("awr_policy_bundle", "awr_params.npz")}
"""Kind → (the session fixture of a bundle of it, its parameter file)."""


@pytest.fixture(params=[pytest.param(k, marks=pytest.mark.slow) for k in KINDS])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def copy(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A scratch copy of the kind's bundle to break."""
    return Path(shutil.copytree(request.getfixturevalue(KINDS[kind][0]), tmp_path / "bundle"))


def test_refuses_an_altered_params_file(kind: str, copy: Path):
    params = KINDS[kind][1]
    data = bytearray((copy / params).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / params).write_bytes(bytes(data))
    refused(copy, f"files.{params}", "sha256 mismatch", "modified or corrupted")


def test_refuses_a_params_file_that_is_not_listed(kind: str, copy: Path):
    shutil.copy(copy / KINDS[kind][1], copy / "other.npz")
    edit_yaml(copy / "bundle.yaml", lambda d: d[kind].__setitem__("params_file", "other.npz"))
    refused(copy, f"{kind}.params_file", "'other.npz' is not listed under files")


def test_refuses_a_feature_dim_the_robot_does_not_give(kind: str, copy: Path):
    edit_yaml(copy / "bundle.yaml", lambda d: d[kind].__setitem__("feature_dim", 4))
    refused(copy, f"{kind}.feature_dim", "4 differs from", "5")


def test_refuses_a_planner_section(copy: Path):
    edit_yaml(copy / "bundle.yaml", lambda d: d.__setitem__("planner", {"method": "mppi"}))
    refused(copy, "planner", "unknown key 'planner'")


def test_refuses_a_graph_that_is_not_this_policys_mean(kind: str, copy: Path):
    # the interface is intact, the arithmetic not: mean + 0.5
    def change(model: onnx.ModelProto) -> None:
        graph = model.graph
        for node in graph.node:
            node.output[:] = ["mean_before" if o == "mean" else o for o in node.output]
        graph.initializer.append(helper.make_tensor("half", onnx.TensorProto.FLOAT, [], [0.5]))
        graph.node.append(helper.make_node("Add", ["mean_before", "half"], ["mean"], name="appended_add"))

    resave_onnx(copy, POLICY_FILE, change)
    refused(copy, "graphs.policy", "is not this policy's mean", KINDS[kind][1])
