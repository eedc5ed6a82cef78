"""The lean rollout graph is the torch model chained over the horizon, with no per-step glue."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from metarl_robot.export.lean_rollout import EnsembleWeights, rollout_graph
from metarl_robot.models.context_dynamics import ContextDynamics, ContextDynamicsConfig
from metarl_robot.runtime.onnx_graph import session_options

E, A, D, H = 3, 2, 4, 7


def trained_looking_model(periodic: list[bool]) -> ContextDynamics:
    """Random weights and normalisers fitted to data far from zero mean and unit scale, so a folding error shows."""
    torch.manual_seed(0)
    cfg = ContextDynamicsConfig(ensemble_size=E, hidden=32, layers=2, context_dim=D, context_window=4)
    model = ContextDynamics(len(periodic), A, np.array(periodic), cfg).eval()
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((500, len(periodic))) * 3 + 1
    act = rng.uniform(-1, 1, (500, A)) * 0.5 + 0.2
    model.fit_normalizers(obs, act, obs + 0.1 * rng.standard_normal(obs.shape) + 0.3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def chained_torch(model: ContextDynamics, obs, actions, context) -> np.ndarray:
    """The reference: the model's own forward, float64, chained over the horizon."""
    model.double()
    with torch.no_grad():
        s, states = torch.as_tensor(obs).double(), []
        for t in range(actions.shape[2]):
            s = model(s, torch.as_tensor(actions[:, :, t]).double(), torch.as_tensor(context).double())[0]
            states.append(s)
    model.float()
    return torch.stack(states, 2).numpy()


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("periodic", [[False, True, False, False], [False] * 5, [True, True, False]],
                         ids=["one_angle", "no_angle", "two_angles"])
def test_lean_rollout_matches_the_chained_model(periodic: list[bool], opset: int):
    model = trained_looking_model(periodic)
    proto = rollout_graph(EnsembleWeights.from_model(model), H, A, D, opset)
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), sess_options=session_options(1),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for rows in (1, 5):
        obs = (rng.standard_normal((E, rows, len(periodic))) * 2).astype(np.float32)
        actions = rng.uniform(-1, 1, (E, rows, H, A)).astype(np.float32)
        context = rng.standard_normal((E, rows, D)).astype(np.float32)
        (got,) = session.run(None, {"obs": obs, "actions": actions, "context": context})
        want = chained_torch(model, obs, actions, context)
        assert got.shape == (E, rows, H, len(periodic))
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_lean_rollout_has_no_per_step_glue():
    proto = rollout_graph(EnsembleWeights.from_model(trained_looking_model([False, True, False, False])), H, A, D,
                          17)
    ops = [n.op_type for n in proto.graph.node]
    for glue in ("Gather", "Slice", "Sub", "Div", "Shape", "Squeeze"):
        assert glue not in ops
    # Per member and step: Sin, Cos, Concat, 3 Gemm (2 hidden + head) with a SiLU (Sigmoid, Mul) after each
    # hidden one, and the residual Add; the rest is the once-per-call prologue and epilogue.
    assert ops.count("Gemm") == E * H * 3
    assert len(ops) <= E * H * 11 + 15


def test_horizon_must_be_positive():
    with pytest.raises(ValueError, match="horizon must be >= 1"):
        rollout_graph(EnsembleWeights.from_model(trained_looking_model([False, True])), 0, A, D, 17)


@pytest.mark.parametrize("opset", [17, 18])
def test_lean_rollout_with_a_last_layer_input_matches_the_online_model(opset: int):
    from metarl_robot.algos.online_mbrl import head_per_row
    from metarl_robot.models.online_dynamics import OnlineContextDynamics, OnlineHeadConfig

    base = trained_looking_model([False, True, False, False])
    model = OnlineContextDynamics(4, A, np.array([False, True, False, False]), base.cfg, OnlineHeadConfig()).eval()
    model.load_state_dict(base.state_dict(), strict=False)
    proto = rollout_graph(EnsembleWeights.from_model(model), H, A, D, opset, head_input="head")
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["obs", "actions", "context", "head"]
    session = ort.InferenceSession(proto.SerializeToString(), sess_options=session_options(1),
                                   providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    rows = 3
    obs = (rng.standard_normal((E, rows, 4)) * 2).astype(np.float32)
    actions = rng.uniform(-1, 1, (E, rows, H, A)).astype(np.float32)
    context = rng.standard_normal((E, rows, D)).astype(np.float32)
    head = (model.prior_head().detach().numpy() + 0.3 * rng.standard_normal((E, 33, 4))).astype(np.float32)
    (got,) = session.run(None, {"obs": obs, "actions": actions, "context": context, "head": head})
    model.double()
    with torch.no_grad():
        s, states, per_row = (torch.as_tensor(obs).double(), [],
                              head_per_row(torch.as_tensor(head).double(), rows))
        for t in range(H):
            s = model.forward_with_head(s, torch.as_tensor(actions[:, :, t]).double(),
                                        torch.as_tensor(context).double(), per_row)[0]
            states.append(s)
    want = torch.stack(states, 2).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
