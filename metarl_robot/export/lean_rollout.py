"""The planner's rollout graph built node by node from the ensemble's weights, with everything that does not change
along the horizon done once per call.

Traced from torch, the rollout repeats the whole one-step model H times: the input normalisers (Sub, Div), the
angle features (Gather, Sin, Cos, Concat), the context and action columns of the first layer, baddbmm's bias as
a separate Add after a batched 3-D MatMul, the head's variance half (Slice and its shape arithmetic) and the
output normaliser. Here the arithmetic is rearranged, exactly, before any node is written:

- the feature and action normalisers are folded into the first layer, the output normaliser into the head's
  mean half (the variance half is not part of a rollout);
- the angle features are ``[s, sin s, cos s] @ W_u`` with zero rows where a component is not an angle, so a step
  needs no Gather;
- the context's and every action's share of the first layer (and its bias) are one MatMul each, before the
  loop: a step adds one precomputed ``(M, hidden)`` block;
- each member is its own chain of 2-D ``Gemm`` nodes with the bias in the Gemm, so onnxruntime prepacks every
  weight once and fuses the bias into the kernel.

A step of one member is then Sin, Cos, Concat, one Gemm per layer (each followed by SiLU as ``x * sigmoid(x)``,
which onnxruntime fuses) and one Add. Inputs and outputs are the runtime's (``obs (E, M, o)``, ``actions (E, M,
H, a)``, ``context (E, M, d)`` → ``next_obs (E, M, H, o)``), so a bundle's interface does not change. The folding
is done in float64 and rounded once to float32; parity with torch is checked by the exporter as for any graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from metarl_robot.models.context_dynamics import ContextDynamics
from metarl_robot.runtime.kinds.model_based import ROLLOUT_INPUTS, ROLLOUT_OUTPUTS


@dataclass(frozen=True)
class EnsembleWeights:
    """The mean path of a :class:`ContextDynamics` ensemble as float64 arrays (what the rollout needs)."""

    keep_idx: np.ndarray
    """Observation components used as they are."""
    angle_idx: np.ndarray
    """Observation components replaced by their sine and cosine."""
    feat_mean: np.ndarray
    """Feature normaliser (``[s[keep], sin s[angle], cos s[angle]]``)."""
    feat_std: np.ndarray
    act_mean: np.ndarray
    act_std: np.ndarray
    delta_mean: np.ndarray
    """Output normaliser: the ensemble predicts ``(next_obs - obs - delta_mean) / delta_std``."""
    delta_std: np.ndarray
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    """Hidden layers ``(weight (E, in, out), bias (E, out))``, SiLU after each; the first reads
    ``[features, action, context]``."""
    head: tuple[np.ndarray, np.ndarray]
    """The head's mean half ``(weight (E, hidden, o), bias (E, o))``."""

    @classmethod
    def from_model(cls, model: ContextDynamics) -> EnsembleWeights:
        def f64(t) -> np.ndarray:
            return t.detach().cpu().numpy().astype(np.float64)

        o = model.obs_dim
        return cls(keep_idx=model.keep_idx.cpu().numpy(), angle_idx=model.angle_idx.cpu().numpy(),
                   feat_mean=f64(model.feat_norm.mean), feat_std=f64(model.feat_norm.std),
                   act_mean=f64(model.act_norm.mean), act_std=f64(model.act_norm.std),
                   delta_mean=f64(model.delta_norm.mean), delta_std=f64(model.delta_norm.std),
                   layers=tuple((f64(layer.weight), f64(layer.bias)[:, 0]) for layer in model.hidden_layers),
                   head=(f64(model.head.weight)[:, :, :o], f64(model.head.bias)[:, 0, :o]))

    @property
    def ensemble_size(self) -> int:
        return self.layers[0][0].shape[0]

    @property
    def obs_dim(self) -> int:
        return len(self.keep_idx) + len(self.angle_idx)


@dataclass(frozen=True)
class FoldedWeights:
    """The rollout's arithmetic after folding (float64)."""

    state: np.ndarray
    """``(E, o or 3o, hidden)``: the first layer's rows for ``s`` (and ``sin s``, ``cos s`` when there are angles)."""
    action: np.ndarray
    """``(E, a, hidden)``: its rows for the raw action."""
    context: np.ndarray
    """``(E, d, hidden)``: its rows for the context."""
    bias: np.ndarray
    """``(E, hidden)``: its bias with both input normalisers' offsets."""
    hidden: tuple[tuple[np.ndarray, np.ndarray], ...]
    """The other hidden layers, unchanged."""
    head: tuple[np.ndarray, np.ndarray]
    """``(E, hidden, o), (E, o)``: the head's mean half giving the raw change of the observation."""


def fold_weights(w: EnsembleWeights) -> FoldedWeights:
    """The normalisers folded into the first layer and the head, the first layer split by what it reads (the
    arithmetic of the lean rollout, also what ``bench/planner_latency.py``'s hand-fused torch reference runs)."""
    weight, bias = w.layers[0]
    f, a, o = len(w.feat_mean), len(w.act_mean), w.obs_dim
    w_feat = weight[:, :f] / w.feat_std[None, :, None]
    w_act = weight[:, f:f + a] / w.act_std[None, :, None]
    bias = bias - np.einsum("i,eih->eh", w.feat_mean, w_feat) - np.einsum("i,eih->eh", w.act_mean, w_act)
    angles, keep = len(w.angle_idx), len(w.keep_idx)
    state = np.zeros((weight.shape[0], 3 * o if angles else o, weight.shape[2]))
    state[:, w.keep_idx] = w_feat[:, :keep]
    state[:, o + w.angle_idx] = w_feat[:, keep:keep + angles]
    state[:, 2 * o + w.angle_idx] = w_feat[:, keep + angles:]
    head_w, head_b = w.head
    return FoldedWeights(state=state, action=w_act, context=weight[:, f + a:], bias=bias, hidden=w.layers[1:],
                   head=(head_w * w.delta_std, head_b * w.delta_std + w.delta_mean))


class _GraphBuilder:
    """Nodes and float32 initializers of one graph, with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        value = np.asarray(value)
        dtype = np.int64 if value.dtype.kind in "iu" else np.float32
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: list[str], output: str | list[str], **attrs) -> str:
        outputs = [output] if isinstance(output, str) else output
        self.nodes.append(helper.make_node(op, inputs, outputs, **attrs))
        return outputs[0]

    def split(self, x: str, outputs: list[str], opset: int) -> None:
        """Equal parts along axis 0 (opset 18 names their number; earlier opsets infer it from the outputs)."""
        attrs = {"num_outputs": len(outputs)} if opset >= 18 else {}
        self.node("Split", [x], outputs, axis=0, **attrs)

    def silu(self, x: str) -> str:
        return self.node("Mul", [x, self.node("Sigmoid", [x], f"{x}_sigmoid")], f"{x}_silu")


def _heads_from_input(g: _GraphBuilder, name: str, w: EnsembleWeights, opset: int) -> list[tuple[str, str]]:
    """Each member's head ``(weight (hidden, o), bias (o,))`` from a last-layer input ``(E, hidden + 1, o)`` (the
    online model's, bias as the last row), the output normaliser folded in once per call."""
    e, o, hidden = w.ensemble_size, w.obs_dim, w.layers[-1][0].shape[2]
    scaled = g.node("Mul", [name, g.const("delta_std", w.delta_std)], "head_scaled")
    g.node("Split", [scaled, g.const("head_rows", np.array([hidden, 1]))], ["head_w", "head_b_raw"], axis=1)
    bias = g.node("Add", ["head_b_raw", g.const("delta_mean", w.delta_mean)], "head_b")
    weights, biases = [f"head_w_{m}_3d" for m in range(e)], [f"head_b_{m}_3d" for m in range(e)]
    g.split("head_w", weights, opset)
    g.split(bias, biases, opset)
    shape_w, shape_b = g.const("shape_head_w", np.array([hidden, o])), g.const("shape_head_b", np.array([o]))
    return [(g.node("Reshape", [weights[m], shape_w], f"head_w_{m}"), g.node("Reshape", [biases[m], shape_b],
                                                                            f"head_b_{m}")) for m in range(e)]


def rollout_graph(weights: EnsembleWeights, horizon: int, act_dim: int, context_dim: int, opset: int,
                  head_input: str | None = None) -> onnx.ModelProto:
    """The lean rollout over ``horizon`` steps (see the module) with the runtime's input and output names; shapes
    have a symbolic ``rows`` axis (the exporter pins the interface's shapes and runs the full checker).

    ``head_input``: the name of a last-layer input ``(E, hidden + 1, o)`` (an ``online_model`` bundle's, the
    normalised mean head with its bias as the last row) that replaces the weights' trained head."""
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    fold = fold_weights(weights)
    e, o, hidden = weights.ensemble_size, weights.obs_dim, fold.bias.shape[1]
    g = _GraphBuilder()
    heads = (_heads_from_input(g, head_input, weights, opset) if head_input is not None else
             [(g.const(f"w_head_{m}", fold.head[0][m]), g.const(f"b_head_{m}", fold.head[1][m])) for m in range(e)])
    obs, actions, context = ROLLOUT_INPUTS
    (next_obs,) = ROLLOUT_OUTPUTS
    # Once per call: the first layer's share of the context (with its bias) and of every action, laid out
    # member-major then step-major so that one Split hands each (member, step) its (M, hidden) block.
    z_part = g.node("Add", [g.node("MatMul", [context, g.const("w_context", fold.context)], "z_mm"),
                            g.const("b_first", fold.bias[:, None])], "z_part")
    steps_first = g.node("Transpose", [actions], "actions_by_step", perm=[0, 2, 1, 3])  # (E, H, M, a)
    a_part = g.node("MatMul", [steps_first, g.const("w_action", fold.action[:, None])], "a_mm")  # (E, H, M, h)
    first = g.node("Add", [a_part, g.node("Unsqueeze", [z_part, g.const("axis_1", np.array([1]))], "z_4d")], "first")
    first = g.node("Reshape", [first, g.const("shape_rows_hidden", np.array([-1, hidden]))], "first_rows")
    blocks = [[f"first_{m}_{t}" for t in range(horizon)] for m in range(e)]
    g.split(first, [b for member in blocks for b in member], opset)
    starts = [f"s_{m}_0" for m in range(e)]
    g.split(g.node("Reshape", [obs, g.const("shape_rows_obs", np.array([-1, o]))], "obs_rows"), starts, opset)

    states = []
    for m in range(e):
        w_state = g.const(f"w_state_{m}", fold.state[m])
        layers = [(g.const(f"w{i}_{m}", w[m]), g.const(f"b{i}_{m}", b[m])) for i, (w, b) in enumerate(fold.hidden, 1)]
        head = heads[m]
        s = starts[m]
        for t in range(horizon):
            u = s
            if len(weights.angle_idx):
                u = g.node("Concat", [s, g.node("Sin", [s], f"sin_{m}_{t}"), g.node("Cos", [s], f"cos_{m}_{t}")],
                           f"u_{m}_{t}", axis=1)
            x = g.silu(g.node("Gemm", [u, w_state, blocks[m][t]], f"x0_{m}_{t}"))
            for i, (w, b) in enumerate(layers, 1):
                x = g.silu(g.node("Gemm", [x, w, b], f"x{i}_{m}_{t}"))
            s = g.node("Add", [s, g.node("Gemm", [x, *head], f"delta_{m}_{t}")], f"s_{m}_{t + 1}")
            states.append(s)
    # (member, step)-major rows back to the runtime's (E, M, H, o).
    stacked = g.node("Concat", states, "states", axis=0)
    stacked = g.node("Reshape", [stacked, g.const("shape_member_step", np.array([e, horizon, -1, o]))], "states_4d")
    g.node("Transpose", [stacked], next_obs, perm=[0, 2, 1, 3])

    f32 = TensorProto.FLOAT
    graph = helper.make_graph(g.nodes, "rollout", [
        helper.make_tensor_value_info(obs, f32, [e, "rows", o]),
        helper.make_tensor_value_info(actions, f32, [e, "rows", horizon, act_dim]),
        helper.make_tensor_value_info(context, f32, [e, "rows", context_dim]),
        *([helper.make_tensor_value_info(head_input, f32, [e, weights.layers[-1][0].shape[2] + 1, o])]
          if head_input is not None else []),
    ], [helper.make_tensor_value_info(next_obs, f32, [e, "rows", horizon, o])], g.initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="metarl_robot")


__all__ = ["EnsembleWeights", "rollout_graph"]
