"""Torch → ONNX for a :class:`ContextDynamics`: the encoder, the ensemble, and the ensemble chained over
the planner's horizon (one call per planning iteration on the robot), as float32 graphs. The encoder and the
ensemble are exported from torch; the chained rollout is built from the weights (:mod:`.lean_rollout`).

The graphs take and return raw robot units: the normalisers are buffers of the model and are
baked in as constants. Input/output names and shapes are the runtime's
(:func:`metarl_robot.runtime.bundle.graph_interfaces`); parity against torch is measured through
onnxruntime sessions built exactly as the runtime builds them.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
from torch import nn

from metarl_robot.algos.buffer import EpisodeBuffer
from metarl_robot.export.lean_rollout import EnsembleWeights, rollout_graph
from metarl_robot.models.context_dynamics import ContextDynamics
from metarl_robot.runtime.kinds.model_based import (
    DYNAMICS_INPUTS,
    DYNAMICS_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    ROLLOUT_INPUTS,
    ROLLOUT_OUTPUTS,
    graph_interfaces,
)
from metarl_robot.runtime.onnx_graph import make_session

ENCODER_FILE = "encoder.onnx"
DYNAMICS_FILE = "dynamics.onnx"
ROLLOUT_FILE = "rollout.onnx"
OPSET = 17
"""Opset of the TorchScript exporter (onnxruntime >= 1.14 runs it)."""
DYNAMO_OPSET = 18
"""Opset of the torch.export-based exporter (its lowest supported)."""
PARITY_TOLERANCE = 1e-5
"""Largest allowed difference between torch and onnxruntime outputs beyond one float32 ULP of the value."""
PARITY_ULPS_AT_SCALE = 8
"""Float32 spacings at an output's largest magnitude that onnxruntime's own distance from the float64 result may
reach (relative ~1e-6): float32 rounding of a deep layer on large outputs, where a real export fault (a wrong
normaliser or weight) is relative 1e-3 and more."""
PARITY_CRITERION = ("per output: max |torch - onnxruntime| - ulp32(|torch|) <= tolerance, or, where float32 itself "
                    "cannot reach that, max |onnxruntime - torch64| <= 2 max |torch - torch64| + tolerance or "
                    f"<= {PARITY_ULPS_AT_SCALE} ulp32(max |torch|) + tolerance")

Exporter = Literal["auto", "torchscript", "dynamo"]


class ExportError(RuntimeError):
    """Export failed: a graph did not convert, did not check, or does not match torch."""


class EncoderGraph(nn.Module):
    """``model.encode`` with the runtime's input names."""

    def __init__(self, model: ContextDynamics) -> None:
        super().__init__()
        self.model = model

    def forward(self, context_obs: torch.Tensor, context_action: torch.Tensor, context_next_obs: torch.Tensor,
                context_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode(context_obs, context_action, context_next_obs, context_mask)


class DynamicsGraph(nn.Module):
    """``model.forward`` (ensemble next-observation mean and log-variance, raw units)."""

    def __init__(self, model: ContextDynamics) -> None:
        super().__init__()
        self.model = model

    def forward(self, obs: torch.Tensor, action: torch.Tensor, context: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(obs, action, context)


@dataclass
class ExportedGraphs:
    """What :func:`export_graphs` wrote."""

    encoder: Path
    dynamics: Path
    rollout: Path
    exporter: str
    """``torchscript`` or ``dynamo``."""
    opset: int
    interfaces: dict
    """:func:`graph_interfaces` for this model: the manifest's ``graphs`` inputs/outputs."""


def interfaces_of(model: ContextDynamics, horizon: int) -> dict:
    """The runtime interface (names and shapes) of a model's graphs, the rollout over ``horizon`` steps."""
    c = model.cfg
    return graph_interfaces(model.obs_dim, model.act_dim, c.context_window, c.context_dim, c.ensemble_size, horizon)


def _example_inputs(model: ContextDynamics, horizon: int
                    ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    c = model.cfg
    b, k, o, a, e, m = 2, c.context_window, model.obs_dim, model.act_dim, c.ensemble_size, 3
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(b, k)
    mask[0, : k // 2] = 0.0
    enc = (torch.randn(b, k, o, generator=g), torch.randn(b, k, a, generator=g), torch.randn(b, k, o, generator=g),
           mask)
    dyn = (torch.randn(e, m, o, generator=g), torch.randn(e, m, a, generator=g),
           torch.randn(e, m, c.context_dim, generator=g))
    roll = (dyn[0], torch.randn(e, m, horizon, a, generator=g), dyn[2])
    return enc, dyn, roll


def _dynamic_axes(interface: dict) -> dict[str, tuple[int, str]]:
    """Input/output name → (index, name) of its one dynamic axis, from a runtime interface (inputs of fixed shape,
    such as an online model's last layer, have none and are left out)."""
    out = {}
    for side in ("inputs", "outputs"):
        for name, shape in interface[side].items():
            dynamic = [i for i, s in enumerate(shape) if isinstance(s, str)]
            if len(dynamic) > 1:
                raise ExportError(f"{name}: at most one dynamic axis per tensor, got shape {shape}")
            if dynamic:
                out[name] = (dynamic[0], shape[dynamic[0]])
    return out


def _export_one(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, interface: dict,
                exporter: str) -> None:
    inputs, outputs = list(interface["inputs"]), list(interface["outputs"])
    dynamic = _dynamic_axes(interface)
    if exporter == "torchscript":
        axes = {name: {axis: label} for name, (axis, label) in dynamic.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated, not gone
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # Python branches on constant index sizes
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET, input_names=inputs,
                              output_names=outputs, dynamic_axes=axes, do_constant_folding=True)
    else:
        dims = {label: torch.export.Dim(label, min=1) for _, label in dynamic.values()}
        shapes = {name: {dynamic[name][0]: dims[dynamic[name][1]]} if name in dynamic else None for name in inputs}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # axis renaming notes; shapes are pinned afterwards
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(module, args, dynamo=True, opset_version=DYNAMO_OPSET, input_names=inputs,
                                        output_names=outputs, dynamic_shapes=shapes, optimize=True, verbose=False)
        program.save(str(path), external_data=False)


def _pin_io_shapes(proto: onnx.ModelProto, interface: dict) -> None:
    """Write the interface's exact shapes on the graph's inputs and outputs.

    The exporters name some fixed output sizes symbolically (a ``chunk`` becomes a Slice whose size
    they do not resolve); the runtime checks fixed sizes, so they are written down here. The
    full-check shape inference that follows verifies they agree with the graph.
    """
    shapes = {**interface["inputs"], **interface["outputs"]}
    for value in [*proto.graph.input, *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        want = shapes[value.name]
        if len(dims) != len(want):
            raise ExportError(f"exported {value.name!r} has rank {len(dims)}, the runtime needs shape {want}")
        for dim, size in zip(dims, want, strict=True):
            if isinstance(size, str):
                dim.dim_param = size
            else:
                dim.dim_value = size


def export_graphs(model: ContextDynamics, out_dir: Path, horizon: int, exporter: Exporter = "auto",
                  metadata: dict[str, str] | None = None) -> ExportedGraphs:
    """Write ``encoder.onnx``, ``dynamics.onnx`` and ``rollout.onnx`` (``horizon`` steps) into ``out_dir``; check them.

    ``exporter="auto"`` uses the TorchScript exporter (``dynamo=False``) and falls back to the
    torch.export-based one if this torch no longer has it. ``metadata`` goes into each model's
    ``metadata_props``.
    """
    model = model.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    enc_args, dyn_args, _ = _example_inputs(model, horizon)
    interfaces = interfaces_of(model, horizon)
    paths = {"encoder": out_dir / ENCODER_FILE, "dynamics": out_dir / DYNAMICS_FILE, "rollout": out_dir / ROLLOUT_FILE}
    jobs = {"encoder": (EncoderGraph(model).eval(), enc_args), "dynamics": (DynamicsGraph(model).eval(), dyn_args)}
    which, opset = export_modules(jobs, {k: paths[k] for k in jobs}, interfaces, exporter, "context dynamics",
                                  metadata)
    # The rollout is not traced: it is built from the weights with the per-step glue hoisted (lean_rollout).
    lean = rollout_graph(EnsembleWeights.from_model(model), horizon, model.act_dim, model.cfg.context_dim, opset)
    onnx.save(lean, str(paths["rollout"]))
    finish_graph(paths["rollout"], "rollout", interfaces["rollout"], "context dynamics", metadata)
    return ExportedGraphs(paths["encoder"], paths["dynamics"], paths["rollout"], which, opset, interfaces)


def export_modules(jobs: dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]], paths: dict[str, Path],
                   interfaces: dict[str, dict], exporter: Exporter, model: str, metadata: dict[str, str] | None
                   ) -> tuple[str, int]:
    """Export every ``(module, example args)`` of ``jobs`` to its path with the runtime interface; ``auto`` tries
    the TorchScript exporter, then the torch.export-based one (all graphs with the same exporter); then
    :func:`finish_graph` each. Returns the exporter used and its opset."""
    order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    errors = []
    for which in order:
        try:
            with torch.no_grad():
                for name, (module, args) in jobs.items():
                    _export_one(module, args, paths[name], interfaces[name], which)
            break
        except Exception as exc:  # the exporters raise many types; report them all if every one fails
            errors.append(f"{which}: {type(exc).__name__}: {exc}")
    else:
        raise ExportError("ONNX export failed with every exporter tried:\n" + "\n".join(errors))
    for name, path in paths.items():
        finish_graph(path, name, interfaces[name], model, metadata)
    return which, OPSET if which == "torchscript" else DYNAMO_OPSET


def finish_graph(path: Path, name: str, interface: dict, model: str, metadata: dict | None = None) -> None:
    """Pin an exported graph's input/output shapes, record what it is (``metadata``), check it with
    ``onnx.checker`` (full check) and save it back; :class:`ExportError` if the checker refuses it."""
    proto = onnx.load(str(path))
    _pin_io_shapes(proto, interface)
    proto.doc_string = f"metarl_robot {model}: {name} graph"
    for key, value in {"graph": name, **(metadata or {})}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError
        raise ExportError(f"{path}: onnx.checker rejected the exported {name} graph: {exc}") from exc
    onnx.save(proto, str(path))


# ---- parity -------------------------------------------------------------------------------------------------
Inputs = tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...], tuple[np.ndarray, ...]]
"""Encoder, dynamics and rollout inputs, in the runtime's order."""


def _rollout_inputs(dyn: tuple[np.ndarray, ...], horizon: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """The dynamics inputs' start states and contexts with action sequences drawn as the planner draws them."""
    obs, action, ctx = dyn
    e, m, a = action.shape
    actions = np.clip(action[:, :, None] + np.cumsum(rng.normal(0, 0.3, (e, m, horizon, a)), axis=2), -1, 1)
    return obs, np.ascontiguousarray(actions, dtype=np.float32), ctx


def random_inputs(model: ContextDynamics, obs_scale: np.ndarray, rng: np.random.Generator, horizon: int,
                  batch: int = 64, rows: int = 97) -> Inputs:
    """Random encoder, dynamics and rollout inputs at the robot's scale; masks of every fill level incl. empty."""
    c = model.cfg
    k, o, a, e, d = c.context_window, model.obs_dim, model.act_dim, c.ensemble_size, c.context_dim
    scale = np.asarray(obs_scale, dtype=np.float64)

    def f32(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32)

    ctx_obs = rng.standard_normal((batch, k, o)) * scale
    ctx_next = ctx_obs + 0.1 * rng.standard_normal((batch, k, o)) * scale
    sizes = np.arange(batch) % (k + 1)
    mask = (np.arange(k)[None] >= (k - sizes)[:, None]).astype(np.float32)
    enc = (f32(ctx_obs), f32(rng.uniform(-1, 1, (batch, k, a))), f32(ctx_next), mask)
    dyn = (f32(rng.standard_normal((e, rows, o)) * scale), f32(rng.uniform(-1, 1, (e, rows, a))),
           f32(rng.standard_normal((e, rows, d))))
    return enc, dyn, _rollout_inputs(dyn, horizon, rng)


def real_inputs(model: ContextDynamics, buffer: EpisodeBuffer, rng: np.random.Generator, horizon: int,
                n: int = 256) -> Inputs:
    """Context windows and states sampled from a run's buffer; the dynamics context is the model's own encoding.

    Rollouts start from the sampled states with the sampled action continued as a random walk.
    """
    c = model.cfg
    e = c.ensemble_size
    n = max(e, n - n % e)
    batch = buffer.sample(rng, n, c.context_window)

    def f32(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32)

    enc = (f32(batch.ctx_obs), f32(batch.ctx_act), f32(batch.ctx_next_obs), f32(batch.ctx_mask))
    with torch.no_grad():
        z = model.encode(*(torch.as_tensor(x) for x in enc)).numpy()
    m = n // e
    dyn = (f32(batch.obs.reshape(e, m, -1)), f32(batch.act.reshape(e, m, -1)), f32(z.reshape(e, m, -1)))
    return enc, dyn, _rollout_inputs(dyn, horizon, rng)


def measure_parity(model: ContextDynamics, graphs: ExportedGraphs, inputs: Inputs) -> dict[str, dict[str, float]]:
    """Torch vs onnxruntime on the same inputs, per output (``context``, ``next_obs_mean``, ``next_obs_logvar``,
    ``rollout_next_obs``).

    Returns ``max_abs_diff`` (the raw maximum of ``|torch - ort|``), ``max_abs_value`` (largest
    ``|torch|``) and ``max_excess_over_ulp``: the maximum of ``|torch - ort| - ulp(torch)``, where
    ``ulp`` is the float32 spacing at the value. The outputs are float32 in raw robot units, so a
    large value (an unwrapped angle of 150 rad has a spacing of 1.5e-5) cannot agree better than
    its last bit; the parity criterion allows that one ULP. ``torch_float32_error`` and
    ``onnxruntime_float32_error`` are each implementation's largest distance from torch in float64
    on the same inputs: where torch's own float32 rounding exceeds the tolerance, the export passes
    if onnxruntime's is at most twice torch's (+ tolerance), see :func:`check_parity`. The sessions are built
    with the runtime's settings (one thread, full graph optimisation).

    The rollout is compared step by step, teacher-forced: torch's step ``t`` starts from the
    rollout graph's own state ``t - 1``, so the figure is the per-step error (float32 differences
    compound over a free-running horizon in any two implementations, which says nothing about the
    export).
    """
    model = model.eval()
    enc_inputs, dyn_inputs, roll_inputs = inputs
    enc_sess, dyn_sess, roll_sess = (make_session(p) for p in (graphs.encoder, graphs.dynamics, graphs.rollout))
    (z_o,) = enc_sess.run(list(ENCODER_OUTPUTS), dict(zip(ENCODER_INPUTS, enc_inputs, strict=True)))
    mean_o, logvar_o = dyn_sess.run(list(DYNAMICS_OUTPUTS), dict(zip(DYNAMICS_INPUTS, dyn_inputs, strict=True)))
    (roll_o,) = roll_sess.run(list(ROLLOUT_OUTPUTS), dict(zip(ROLLOUT_INPUTS, roll_inputs, strict=True)))
    ort = {"context": z_o, "next_obs_mean": mean_o, "next_obs_logvar": logvar_o, "rollout_next_obs": roll_o}
    ref32 = _torch_outputs(model, inputs, roll_o, torch.float32)
    ref64 = _torch_outputs(copy.deepcopy(model).double(), inputs, roll_o, torch.float64)
    return parity_report(ort, ref32, ref64)


def parity_report(ort: dict[str, np.ndarray], ref32: dict[str, np.ndarray], ref64: dict[str, np.ndarray]
                  ) -> dict[str, dict[str, float]]:
    """Per output: onnxruntime vs torch float32 (absolute and beyond one float32 ulp), and each one's distance
    from the float64 torch reference (the report :func:`check_parity` judges)."""
    out: dict[str, dict[str, float]] = {key: {} for key in ("max_abs_diff", "max_excess_over_ulp", "max_abs_value",
                                                            "torch_float32_error", "onnxruntime_float32_error")}
    for name, got in ort.items():
        ref, exact = ref32[name], ref64[name]
        if ref.shape != got.shape:
            raise ExportError(f"parity: {name} has shape {got.shape} in onnxruntime, {ref.shape} in torch")
        diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
        ulp = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
        out["max_abs_diff"][name] = float(diff.max())
        out["max_excess_over_ulp"][name] = float(max(0.0, (diff - ulp).max()))
        out["max_abs_value"][name] = float(np.abs(ref).max())
        out["torch_float32_error"][name] = float(np.abs(ref - exact).max())
        out["onnxruntime_float32_error"][name] = float(np.abs(got - exact).max())
    return out


def _torch_outputs(model: ContextDynamics, inputs: Inputs, roll_o: np.ndarray, dtype: torch.dtype
                   ) -> dict[str, np.ndarray]:
    """The four parity outputs computed by torch at ``dtype`` (float64: the reference for float32 rounding)."""
    enc_inputs, dyn_inputs, (obs0, actions, ctx) = inputs

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(x).to(dtype)

    with torch.no_grad():
        mean, logvar = model(*map(t, dyn_inputs))
        starts = torch.cat([t(obs0)[:, :, None], t(roll_o[:, :, :-1])], dim=2)
        roll = torch.stack([model(starts[:, :, i], t(actions)[:, :, i], t(ctx))[0] for i in range(actions.shape[2])],
                           dim=2)
        return {"context": model.encode(*map(t, enc_inputs)).numpy(), "next_obs_mean": mean.numpy(),
                "next_obs_logvar": logvar.numpy(), "rollout_next_obs": roll.numpy()}


def check_parity(parity: dict[str, dict[str, dict[str, float]]], tolerance: float = PARITY_TOLERANCE) -> None:
    """Raise :class:`ExportError` naming each input set and output that fails :data:`PARITY_CRITERION`.

    ``parity``: input-set name (``random``, ``real``) → :func:`measure_parity` result. The second
    clause exists because two float32 implementations of a wide layer on large outputs (HalfCheetah's
    joint velocities reach 40 rad/s, where one ULP is 4e-6) cannot agree to 1e-5 when torch itself is
    further than that from the float64 result. onnxruntime's rounding must then be of the same size as
    torch's: at most twice it (two GEMM kernels summing in different orders; the maximum over thousands
    of values fluctuates), or within :data:`PARITY_ULPS_AT_SCALE` float32 spacings of the output's largest
    magnitude (a trained PEARL encoder's factor means reach ~240 on random inputs, where one spacing is 1.5e-5:
    onnxruntime was 7.3e-5 from float64, 2.4x torch's 3.1e-5, relative 3e-7), while a real export fault (a wrong
    normaliser or weight) is orders larger.
    """
    def passes(p: dict, name: str) -> bool:
        ort_error = p["onnxruntime_float32_error"][name]
        at_scale = PARITY_ULPS_AT_SCALE * float(np.spacing(np.float32(p["max_abs_value"][name])))
        return (p["max_excess_over_ulp"][name] <= tolerance
                or ort_error <= 2 * p["torch_float32_error"][name] + tolerance or ort_error <= at_scale + tolerance)

    bad = [f"{kind}/{name}: max abs diff {p['max_abs_diff'][name]:.3g} ({p['max_excess_over_ulp'][name]:.3g} "
           f"beyond one float32 ULP; from float64: onnxruntime {p['onnxruntime_float32_error'][name]:.3g}, torch "
           f"{p['torch_float32_error'][name]:.3g})"
           for kind, p in parity.items() for name in p["max_excess_over_ulp"] if not passes(p, name)]
    if bad:
        raise ExportError(f"torch vs onnxruntime differ by more than {tolerance:g}: {', '.join(bad)}")
