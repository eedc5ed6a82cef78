"""ONNX graphs as numpy callables on the robot: session settings, interface checks, weight checks. No torch.

Every bundle kind opens its graphs through this module, and so do the loose graphs of
:meth:`~metarl_robot.runtime.context_policy.ContextPolicyAdapter.from_onnx` and the exporter's parity check,
so all of them run with the same onnxruntime settings and are checked the same way.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

Dim = int | str
"""A graph dimension: a fixed size, or a symbolic (dynamic) name."""
ONNX_FLOAT = "tensor(float)"
"""Every graph input and output is float32."""
BATCH_AXIS = "batch"
"""Name of the dynamic batch axis of graphs whose only dynamic axis is the batch."""

Interface = dict[str, dict[str, list[Dim]]]
"""``{"inputs": {name: shape}, "outputs": {name: shape}}`` of one graph."""


def session_options(threads: int = 1) -> ort.SessionOptions:
    """The onnxruntime settings of every bundle session: explicit threads, sequential, full graph optimisation."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only: the bundle checks report problems themselves
    return opts


class ExternalDataError(ValueError):
    """A graph keeps weights in a sidecar file (ONNX external data), which no manifest hash covers."""


def make_session(path: Path, threads: int = 1, sha256: str | None = None) -> ort.InferenceSession:
    """A CPU onnxruntime session with :func:`session_options` (the exporter's parity check uses the same).

    The graph is read once and the session built from those bytes (checked against ``sha256`` when given, so
    what runs is what was hashed), and onnxruntime is pointed at an empty folder for external data: a graph
    whose weights live in a sidecar file is refused (:class:`ExternalDataError`) instead of loading weights
    nothing has checked (from bytes, onnxruntime would look for them in the working directory)."""
    data = Path(path).read_bytes()
    if sha256 is not None and (actual := hashlib.sha256(data).hexdigest()) != sha256.lower():
        raise ValueError(f"{path}: sha256 {actual} differs from {sha256} (the file changed after its check)")
    opts = session_options(threads)
    with tempfile.TemporaryDirectory(prefix="metarl-no-external-data-") as empty:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", empty)
        try:
            return ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own Fail type
            if "external data" in str(exc).lower():
                raise ExternalDataError(f"{Path(path).name} keeps its weights in an external data file (a sidecar "
                                        "no bundle hash covers); bundles hold self-contained graphs: re-export with "
                                        "metarl export") from None
            raise


class OnnxGraph:
    """A validated graph as a numpy callable: float32 inputs by position, the requested outputs back."""

    def __init__(self, session: ort.InferenceSession, inputs: tuple[str, ...], outputs: tuple[str, ...],
                 shapes: Mapping[str, list[Dim]], label: str) -> None:
        self.session, self.inputs, self.outputs, self.label = session, inputs, outputs, label
        self._shapes = {n: shapes[n] for n in inputs}

    def __call__(self, *arrays: np.ndarray) -> list[np.ndarray]:
        feed = {}
        for name, x in zip(self.inputs, arrays, strict=True):
            x = np.ascontiguousarray(x, dtype=np.float32)
            shape = self._shapes[name]
            if x.ndim != len(shape) or any(isinstance(s, int) and s != n for s, n in zip(shape, x.shape, strict=True)):
                raise ValueError(f"{self.label} input {name!r}: expected shape {fmt_shape(shape)}, got {x.shape}")
            feed[name] = x
        return self.session.run(list(self.outputs), feed)


def fmt_shape(shape: list[Dim] | tuple) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def shape_matches(declared: list[Dim], wanted: list[Dim]) -> bool:
    """Same rank; fixed dims equal; dynamic dims declared with a symbolic name (any)."""
    if len(declared) != len(wanted):
        return False
    return all(isinstance(d, str) if isinstance(w, str) else (isinstance(d, int) and d == w)
               for d, w in zip(declared, wanted, strict=True))


def session_interface_mismatch(session: ort.InferenceSession, inputs: Mapping[str, list[Dim]],
                               outputs: Mapping[str, list[Dim]]) -> tuple[str, str] | None:
    """The first way a session's actual inputs/outputs differ from the wanted interface, as ``(where, what)``
    (``where``: ``inputs``, ``outputs`` or ``inputs.<name>`` ...), or ``None`` when names, float32 element
    type, rank and every fixed size match and the dimensions wanted symbolic (``batch``) are dynamic."""
    for side, args, wanted in (("inputs", session.get_inputs(), inputs), ("outputs", session.get_outputs(), outputs)):
        actual = {a.name: a for a in args}
        if sorted(actual) != sorted(wanted):
            return side, f"{side} {sorted(actual)}, expected {sorted(wanted)}"
        for name, shape in wanted.items():
            arg, at = actual[name], f"{side}.{name}"
            if arg.type != ONNX_FLOAT:
                return at, f"element type {arg.type}, expected {ONNX_FLOAT} (float32)"
            if len(arg.shape) != len(shape):
                return at, f"rank {len(arg.shape)} (shape {arg.shape}), expected {fmt_shape(shape)}"
            for i, (got, want) in enumerate(zip(arg.shape, shape, strict=True)):
                dynamic = not isinstance(got, int)
                if isinstance(want, str) and not dynamic:
                    return at, f"dimension {i} is fixed to {got}, expected dynamic ({want!r}); shape {arg.shape}"
                if isinstance(want, int) and got != want:
                    return at, f"dimension {i} is {got!r}, expected {want}; shape {arg.shape}, expected " \
                               f"{fmt_shape(shape)}"
    return None


def bound_run(session: ort.InferenceSession, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]
              ) -> Callable[[], None] | None:
    """A call of ``session`` that reads ``inputs`` and writes ``outputs`` (float32 buffers the caller owns, by name),
    bound once with onnxruntime's IOBinding: no feed dict, no input checks or copies, no output allocation per call
    (cheaper than ``session.run`` on the same arrays). The caller fills the input buffers before each call.

    The inputs are bound as OrtValues over the buffers' own memory (onnxruntime's documented behaviour on the CPU,
    and checked here: a build that copied would leave the graph reading stale inputs, so it gets None instead)."""
    binding = session.io_binding()
    for name, x in inputs.items():
        value = ort.OrtValue.ortvalue_from_numpy(x)
        if value.data_ptr() != x.ctypes.data:
            return None
        binding.bind_ortvalue_input(name, value)
    for name, y in outputs.items():
        binding.bind_output(name, "cpu", 0, np.float32, list(y.shape), y.ctypes.data)
    return partial(session.run_with_iobinding, binding)


def weights_problem(file: Path) -> str | None:
    """Why a graph file's weights cannot be trusted (not a valid ONNX model; a NaN or infinite value in an
    initializer or Constant node, subgraphs included), or ``None`` when they are all finite."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(file))
    except Exception as exc:  # protobuf DecodeError and friends
        return f"{file.name} is not a valid ONNX model: {exc}"

    def tensors(graph: Any):
        for init in graph.initializer:
            yield f"initializer {init.name!r}", init
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield f"constant {node.name or node.output[0]!r}", attr.t
                elif attr.type == onnx.AttributeProto.GRAPH:
                    yield from tensors(attr.g)

    for label, tensor in tensors(model.graph):
        values = numpy_helper.to_array(tensor)
        if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values)):
            bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
            return f"{file.name}: {label} holds {bad} non-finite value(s) (NaN or Inf): the exported weights are broken"
    return None


__all__ = ["BATCH_AXIS", "ONNX_FLOAT", "Dim", "ExternalDataError", "Interface", "OnnxGraph", "bound_run", "fmt_shape",
           "make_session", "session_interface_mismatch", "session_options", "shape_matches", "weights_problem"]
