"""Load and fully validate an exported policy bundle (``bundle.yaml`` + ONNX graphs). No torch, no MuJoCo.

A bundle is a folder::

    bundle.yaml     the manifest (schema: docs/bundle_format.md)
    encoder.onnx    context transitions (B, K, ·) → context (B, d)
    dynamics.onnx   (E, M, ·) observation, action, context → next-observation mean and log-variance
    rollout.onnx    (E, M, ·) start observation, H actions, context → the H chained mean predictions:
                    the planner's whole horizon in one onnxruntime call instead of H

:func:`load_bundle` refuses, with a :class:`BundleError` naming the bundle, the field or file and
what was expected, anything it cannot fully validate: missing, unlisted or altered files, an
unknown schema version or kind, a robot spec that does not parse or whose interface hash differs,
layouts that disagree with the robot spec, graphs whose inputs and outputs are not what the
runtime feeds them, and non-finite weights. The checks run in the order of the error reference
in the docs, so a bundle with several problems reports the first one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import yaml

from metarl_robot.runtime.adapter import ModelBasedAdapter
from metarl_robot.runtime.planner import PlannerConfig
from metarl_robot.spec.family import FAMILY_SCHEMA_VERSION, FamilySpec, TaskFamily
from metarl_robot.spec.rewards import check_reward_inputs, get_reward
from metarl_robot.spec.robot import RobotSpec, robot_from_dict
from metarl_robot.spec.schema import SpecError, build, check_schema_version, to_plain

BUNDLE_SCHEMA_VERSION = 2
"""The bundle.yaml schema this runtime reads; bump on any incompatible change (2: the fused rollout graph)."""
MANIFEST_FILE = "bundle.yaml"
KINDS = ("model_based",)
"""Bundle kinds this runtime can run."""

ENCODER_INPUTS = ("context_obs", "context_action", "context_next_obs", "context_mask")
ENCODER_OUTPUTS = ("context",)
DYNAMICS_INPUTS = ("obs", "action", "context")
DYNAMICS_OUTPUTS = ("next_obs_mean", "next_obs_logvar")
ROLLOUT_INPUTS = ("obs", "actions", "context")
ROLLOUT_OUTPUTS = ("next_obs",)
ONNX_FLOAT = "tensor(float)"
"""Every graph input and output is float32."""

Dim = int | str
"""A graph dimension in the manifest: a fixed size, or a symbolic (dynamic) name."""


class BundleError(SpecError):
    """A bundle was refused. ``where`` is the bundle folder, ``field`` the manifest key or file at fault."""


# ---- the manifest schema (checked by spec.schema.build: unknown keys and wrong types are refused) --------
@dataclass(frozen=True)
class GraphEntry:
    """One ONNX graph of the bundle and its interface."""

    file: str
    """File name inside the bundle folder."""
    opset: int
    """Default-domain ONNX opset the graph was exported with (informational)."""
    inputs: dict[str, list[Dim]]
    """Input name → shape; symbolic dimensions are strings (e.g. ``batch``)."""
    outputs: dict[str, list[Dim]]
    """Output name → shape."""


@dataclass(frozen=True)
class ObsFieldLayout:
    """Where a measured observation field sits in the runtime's observation vector."""

    name: str
    size: int
    start: int
    stop: int
    units: str
    scale: float
    periodic: bool


@dataclass(frozen=True)
class ObservationLayout:
    """Human-readable copy of the measured observation layout (privileged fields excluded)."""

    dim: int
    fields: list[ObsFieldLayout]


@dataclass(frozen=True)
class ActionLayout:
    """Human-readable copy of the action layout, in command order."""

    dim: int
    names: list[str]
    units: list[str]
    low: list[float]
    high: list[float]
    max_rate: list[float]
    safe_command: list[float]


@dataclass(frozen=True)
class AdaptationSpec:
    """Sizes the graphs were exported with."""

    context_window: int
    """K: transitions the encoder sees."""
    context_dim: int
    """d: size of the context vector."""
    ensemble_size: int
    """E: ensemble members in the dynamics graph."""
    rollout_horizon: int
    """H of the fused rollout graph (the planner's horizon at export; other horizons step the dynamics graph)."""


@dataclass(frozen=True)
class BundleManifest:
    """``bundle.yaml`` as written (see docs/bundle_format.md)."""

    schema_version: int
    name: str
    kind: str
    created: str
    software_version: str
    robot: dict[str, Any]
    robot_interface_sha256: str
    family: dict[str, Any]
    observation: ObservationLayout
    action: ActionLayout
    control_period: float
    adaptation: AdaptationSpec
    planner: dict[str, Any]
    graphs: dict[str, GraphEntry]
    provenance: dict[str, Any]
    files: dict[str, str]


# ---- what a bundle for a given robot must contain (shared with the exporter) ---------------------------
def observation_layout(robot: RobotSpec) -> dict[str, Any]:
    """The ``observation`` section derived from a robot spec."""
    fields = [{"name": f.name, "size": f.size, "start": robot.obs_slices[f.name].start,
               "stop": robot.obs_slices[f.name].stop, "units": f.units, "scale": float(f.scale),
               "periodic": bool(f.periodic)} for f in robot.measured_fields]
    return {"dim": robot.obs_dim, "fields": fields}


def action_layout(robot: RobotSpec) -> dict[str, Any]:
    """The ``action`` section derived from a robot spec."""
    return {"dim": robot.action_dim, "names": [a.name for a in robot.action], "units": [a.units for a in robot.action],
            "low": [float(a.low) for a in robot.action], "high": [float(a.high) for a in robot.action],
            "max_rate": [float(a.max_rate) for a in robot.action],
            "safe_command": [float(robot.safe_command[a.name]) for a in robot.action]}


def graph_interfaces(obs_dim: int, act_dim: int, context_window: int, context_dim: int, ensemble_size: int,
                     rollout_horizon: int) -> dict[str, dict[str, dict[str, list[Dim]]]]:
    """Inputs and outputs the runtime feeds and reads, by graph: ``{graph: {inputs: ..., outputs: ...}}``.

    ``batch`` (encoder) and ``rows`` (dynamics, rollout) are dynamic; everything else is fixed.
    """
    o, a, k, d, e, h = obs_dim, act_dim, context_window, context_dim, ensemble_size, rollout_horizon
    return {
        "encoder": {
            "inputs": {"context_obs": ["batch", k, o], "context_action": ["batch", k, a],
                       "context_next_obs": ["batch", k, o], "context_mask": ["batch", k]},
            "outputs": {"context": ["batch", d]},
        },
        "dynamics": {
            "inputs": {"obs": [e, "rows", o], "action": [e, "rows", a], "context": [e, "rows", d]},
            "outputs": {"next_obs_mean": [e, "rows", o], "next_obs_logvar": [e, "rows", o]},
        },
        "rollout": {
            "inputs": {"obs": [e, "rows", o], "actions": [e, "rows", h, a], "context": [e, "rows", d]},
            "outputs": {"next_obs": [e, "rows", h, o]},
        },
    }


def family_from_dict(data: Mapping[str, Any], where: str = "<family>") -> TaskFamily:
    """Rebuild a :class:`TaskFamily` from its FamilySpec as plain data (``to_plain(family.spec)``)."""
    if not isinstance(data, Mapping):
        raise SpecError(where, "", f"expected a task family mapping, got {data!r}")
    check_schema_version(data, where, FAMILY_SCHEMA_VERSION, "task family")
    return TaskFamily(build(FamilySpec, dict(data), where), where)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def make_session(path: Path, threads: int = 1) -> ort.InferenceSession:
    """A CPU onnxruntime session with :func:`session_options` (the exporter's parity check uses the same)."""
    return ort.InferenceSession(str(path), sess_options=session_options(threads), providers=["CPUExecutionProvider"])


# ---- the loaded bundle ------------------------------------------------------------------------------------
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
                raise ValueError(f"{self.label} input {name!r}: expected shape {_fmt_shape(shape)}, got {x.shape}")
            feed[name] = x
        return self.session.run(list(self.outputs), feed)


class Bundle:
    """A loaded, validated bundle: the robot it is for, its family, planner defaults and the two graphs."""

    def __init__(self, path: Path, manifest: dict[str, Any], robot: RobotSpec, family: TaskFamily,
                 planner: PlannerConfig, encoder: OnnxGraph, dynamics: OnnxGraph, rollout: OnnxGraph) -> None:
        self.path = path
        """The bundle folder."""
        self.manifest = manifest
        """``bundle.yaml`` as plain data."""
        self.robot = robot
        """The robot spec the bundle was trained for (its own copy, not sim/)."""
        self.family = family
        """The task family it was trained on (reward name, parameter ranges)."""
        self.planner = planner
        """Planner defaults (the training run's MPC settings)."""
        self._encoder, self._dynamics, self._rollout = encoder, dynamics, rollout
        adaptation = manifest["adaptation"]
        self.context_window: int = adaptation["context_window"]
        self.context_dim: int = adaptation["context_dim"]
        self.ensemble_size: int = adaptation["ensemble_size"]
        self.rollout_horizon: int = adaptation["rollout_horizon"]
        self.sha256 = sha256_file(path / MANIFEST_FILE)
        """sha256 of bundle.yaml: identifies the whole bundle (the manifest pins every other file's hash)."""

    @property
    def name(self) -> str:
        return self.manifest["name"]

    def encode(self, ctx_obs: np.ndarray, ctx_act: np.ndarray, ctx_next_obs: np.ndarray, ctx_mask: np.ndarray
               ) -> np.ndarray:
        """``(B, K, o), (B, K, a), (B, K, o), (B, K)`` → context ``(B, d)`` float32."""
        return self._encoder(ctx_obs, ctx_act, ctx_next_obs, ctx_mask)[0]

    def step(self, obs: np.ndarray, act: np.ndarray, context: np.ndarray) -> np.ndarray:
        """``(E, M, o), (E, M, a), (E, M, d)`` → next-observation mean ``(E, M, o)`` float32, raw robot units."""
        return self._dynamics(obs, act, context)[0]

    def rollout(self, obs: np.ndarray, actions: np.ndarray, context: np.ndarray) -> np.ndarray:
        """``(E, M, o), (E, M, H, a), (E, M, d)`` → ``(E, M, H, o)``: :meth:`step` chained over the fused horizon."""
        return self._rollout(obs, actions, context)[0]

    def make_adapter(self, batch: int = 1, adapt: bool = True, planner_overrides: dict | None = None,
                     seed: int = 0) -> ModelBasedAdapter:
        """A model-based adapter over this bundle's graphs, deterministic given ``seed``.

        ``planner_overrides`` replaces planner settings (checked like the manifest's, unknown keys refused);
        ``seed`` seeds the planner's sampling noise unless the overrides set ``seed`` themselves.
        """
        data = {**to_plain(self.planner), "seed": seed, **(planner_overrides or {})}
        cfg = build(PlannerConfig, data, "planner_overrides")
        try:
            cfg.validate()
        except ValueError as exc:
            raise SpecError("planner_overrides", "", str(exc)) from exc
        reward = get_reward(self.family.spec.reward)
        return ModelBasedAdapter(self.robot, reward, self.encode, self.step, self.ensemble_size, self.context_window,
                                 cfg, batch=batch, adapt=adapt, fused=(self.rollout, self.rollout_horizon))

    def __repr__(self) -> str:
        return f"Bundle({self.name!r}, robot={self.robot.name!r}, family={self.family.name!r}, path={str(self.path)!r})"


# ---- loading and validation -------------------------------------------------------------------------------
def load_bundle(path: str | Path, threads: int = 1) -> Bundle:
    """Load a bundle folder (or its bundle.yaml), refusing with :class:`BundleError` anything it cannot validate.

    ``threads``: onnxruntime intra-op threads per session (inter-op 1, sequential execution).
    """
    path = Path(path)
    if path.name == MANIFEST_FILE and path.is_file():
        path = path.parent
    where = str(path)

    def fail(field: str, problem: str) -> BundleError:
        return BundleError(where, field, problem)

    def rethrow(prefix: str, exc: SpecError) -> BundleError:
        field = f"{prefix}.{exc.field}" if prefix and exc.field else (prefix or exc.field)
        return BundleError(where, field, exc.problem)

    # 1. the manifest
    if not path.is_dir():
        raise fail("", "bundle folder not found")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise fail(MANIFEST_FILE, "missing: a bundle folder must hold bundle.yaml")
    try:
        data = yaml.safe_load(manifest_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise fail(MANIFEST_FILE, f"not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise fail(MANIFEST_FILE, f"expected a mapping at top level, got {type(data).__name__}")
    try:
        check_schema_version(data, where, BUNDLE_SCHEMA_VERSION, "bundle")
    except SpecError as exc:
        raise rethrow("", exc) from None
    if data.get("kind") not in KINDS:
        raise fail("kind", f"unknown bundle kind {data.get('kind')!r}; this runtime runs: {', '.join(KINDS)}")
    try:
        m = build(BundleManifest, data, where)
    except SpecError as exc:
        raise rethrow("", exc) from None

    # 2. files: listed ones present and unaltered, no unlisted graphs
    for fname, digest in m.files.items():
        if not fname or fname in (".", "..") or "/" in fname or "\\" in fname or fname == MANIFEST_FILE:
            raise fail(f"files.{fname}", "must be a plain file name inside the bundle folder (not bundle.yaml)")
        file_path = path / fname
        if not file_path.is_file():
            raise fail(f"files.{fname}", "listed in the manifest but missing from the bundle folder")
        actual = sha256_file(file_path)
        if actual != digest.lower():
            raise fail(f"files.{fname}", f"sha256 mismatch: the manifest says {digest}, the file has {actual} "
                       "(the file was modified or corrupted)")
    for extra in sorted(p.name for p in path.glob("*.onnx")):
        if extra not in m.files:
            raise fail(f"files.{extra}", "an ONNX file in the bundle folder is not listed in the manifest; "
                       "remove it or re-export the bundle")

    # 3. the robot the bundle was trained for
    try:
        robot = robot_from_dict(m.robot, where)
    except SpecError as exc:
        raise rethrow("robot", exc) from None
    if robot.interface_hash != m.robot_interface_sha256:
        raise fail("robot_interface_sha256", f"the robot copy hashes to {robot.interface_hash}, the manifest says "
                   f"{m.robot_interface_sha256}: the robot spec was edited after export")

    # 4. the task family (reward, parameter ranges)
    try:
        family = family_from_dict(m.family, where)
    except SpecError as exc:
        raise rethrow("family", exc) from None
    if family.spec.robot != robot.name:
        raise fail("family.robot", f"{family.spec.robot!r} differs from the bundle's robot {robot.name!r}")
    try:
        check_reward_inputs(family.spec.reward, robot, family.reward_names, where)
    except SpecError as exc:
        raise rethrow("family", exc) from None

    # 5. the human-readable copies must agree with the robot spec
    for key, expected in (("observation", observation_layout(robot)), ("action", action_layout(robot))):
        if diff := _first_difference(data[key], expected, key):
            raise fail(diff[0], f"{diff[1]!r} disagrees with the robot spec, which gives {diff[2]!r}")
    if not math.isclose(m.control_period, robot.ctrl_dt, rel_tol=0, abs_tol=1e-12):
        raise fail("control_period", f"{m.control_period} differs from the robot's control.period {robot.ctrl_dt}")

    # 6. adaptation sizes and planner defaults
    ad = m.adaptation
    for key in ("context_window", "context_dim", "ensemble_size", "rollout_horizon"):
        if getattr(ad, key) < 1:
            raise fail(f"adaptation.{key}", f"must be >= 1, got {getattr(ad, key)}")
    try:
        planner = build(PlannerConfig, m.planner, where, "planner")
        planner.validate()
    except SpecError as exc:
        raise rethrow("", exc) from None
    except ValueError as exc:
        raise fail("planner", str(exc)) from None

    # 7. declared graph interfaces must be what the runtime feeds
    needed = graph_interfaces(robot.obs_dim, robot.action_dim, ad.context_window, ad.context_dim, ad.ensemble_size,
                              ad.rollout_horizon)
    if sorted(m.graphs) != sorted(needed):
        raise fail("graphs", f"expected exactly the graphs {sorted(needed)}, got {sorted(m.graphs)}")
    for gname, entry in m.graphs.items():
        if entry.file not in m.files:
            raise fail(f"graphs.{gname}.file", f"{entry.file!r} is not listed under files (its sha256 is unknown)")
        for side in ("inputs", "outputs"):
            declared, want = getattr(entry, side), needed[gname][side]
            field = f"graphs.{gname}.{side}"
            if sorted(declared) != sorted(want):
                raise fail(field, f"names {sorted(declared)} differ from what the runtime needs: {sorted(want)}")
            for io_name, shape in want.items():
                if not _shape_matches(declared[io_name], shape):
                    raise fail(f"{field}.{io_name}", f"shape {_fmt_shape(declared[io_name])} differs from what "
                               f"the robot spec and adaptation sizes need: {_fmt_shape(shape)}")

    # 8. weights: every initializer and constant finite (lazy onnx import: only here)
    for gname, entry in m.graphs.items():
        _check_weights(path / entry.file, where, f"graphs.{gname}")

    # 9. sessions, and their actual interfaces
    sessions = {}
    for gname, entry in m.graphs.items():
        try:
            sessions[gname] = make_session(path / entry.file, threads)
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise fail(f"graphs.{gname}.file", f"onnxruntime cannot load {entry.file}: {exc}") from None
        _check_session_io(sessions[gname], entry, where, f"graphs.{gname}")
    encoder = OnnxGraph(sessions["encoder"], ENCODER_INPUTS, ENCODER_OUTPUTS, needed["encoder"]["inputs"],
                        f"{where}: encoder")
    dynamics = OnnxGraph(sessions["dynamics"], DYNAMICS_INPUTS, DYNAMICS_OUTPUTS, needed["dynamics"]["inputs"],
                         f"{where}: dynamics")
    rollout = OnnxGraph(sessions["rollout"], ROLLOUT_INPUTS, ROLLOUT_OUTPUTS, needed["rollout"]["inputs"],
                        f"{where}: rollout")

    # 10. a smoke run on neutral inputs: the right shapes come back, finite, and the fused rollout is the chain
    _smoke_test(encoder, dynamics, rollout, robot, ad, where)
    return Bundle(path, data, robot, family, planner, encoder, dynamics, rollout)


def _fmt_shape(shape: list[Dim] | tuple) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _shape_matches(declared: list[Dim], wanted: list[Dim]) -> bool:
    """Same rank; fixed dims equal; dynamic dims declared with a symbolic name (any)."""
    if len(declared) != len(wanted):
        return False
    return all(isinstance(d, str) if isinstance(w, str) else (isinstance(d, int) and d == w)
               for d, w in zip(declared, wanted, strict=True))


def _first_difference(got: Any, want: Any, field: str) -> tuple[str, Any, Any] | None:
    """The first dotted path where two plain structures differ, with both values (numbers compared as floats)."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or sorted(got) != sorted(want):
            return field, got, want
        for k in want:
            if diff := _first_difference(got[k], want[k], f"{field}.{k}"):
                return diff
        return None
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return field, got, want
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            if diff := _first_difference(g, w, f"{field}[{i}]"):
                return diff
        return None
    if isinstance(want, bool) or isinstance(got, bool):
        return None if got is want else (field, got, want)
    if isinstance(want, int | float) and isinstance(got, int | float):
        return None if float(got) == float(want) else (field, got, want)
    return None if got == want else (field, got, want)


def _check_weights(file: Path, where: str, field: str) -> None:
    """Refuse a graph with a NaN or infinite value in any initializer or Constant node."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(file))
    except Exception as exc:  # protobuf DecodeError and friends
        raise BundleError(where, f"{field}.file", f"{file.name} is not a valid ONNX model: {exc}") from None

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
            raise BundleError(where, f"{field}.file", f"{file.name}: {label} holds {bad} non-finite value(s) "
                              "(NaN or Inf): the exported weights are broken")


def _check_session_io(session: ort.InferenceSession, entry: GraphEntry, where: str, field: str) -> None:
    """The graph's actual inputs and outputs must match the manifest: names, float32, rank, fixed/dynamic dims."""
    for side, args in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        declared = getattr(entry, side)
        actual = {a.name: a for a in args}
        if sorted(actual) != sorted(declared):
            raise BundleError(where, f"{field}.{side}", f"{entry.file} has {side} {sorted(actual)}, the manifest "
                              f"declares {sorted(declared)}")
        for name, shape in declared.items():
            arg = actual[name]
            at = f"{field}.{side}.{name}"
            if arg.type != ONNX_FLOAT:
                raise BundleError(where, at, f"{entry.file}: element type {arg.type}, expected {ONNX_FLOAT} (float32)")
            if len(arg.shape) != len(shape):
                raise BundleError(where, at, f"{entry.file}: rank {len(arg.shape)} (shape {arg.shape}), expected "
                                  f"{_fmt_shape(shape)}")
            for i, (got, want) in enumerate(zip(arg.shape, shape, strict=True)):
                dynamic = not isinstance(got, int)
                if isinstance(want, str) and not dynamic:
                    raise BundleError(where, at, f"{entry.file}: dimension {i} is fixed to {got}, expected dynamic "
                                      f"({want!r}); shape {arg.shape}")
                if isinstance(want, int) and got != want:
                    raise BundleError(where, at, f"{entry.file}: dimension {i} is {got!r}, expected {want}; "
                                      f"shape {arg.shape}, expected {_fmt_shape(shape)}")


ROLLOUT_CHAIN_TOLERANCE = 1e-4
"""Largest allowed |fused rollout - chained dynamics steps|, relative to the observation scale, at load time.
Both are onnxruntime float32; only kernel fusion order differs, so a real mismatch (a rollout graph from
another model) is orders of magnitude larger."""


def _smoke_test(encoder: OnnxGraph, dynamics: OnnxGraph, rollout: OnnxGraph, robot: RobotSpec, ad: AdaptationSpec,
                where: str) -> None:
    b, k, o, a = 2, ad.context_window, robot.obs_dim, robot.action_dim
    e, m, d, h = ad.ensemble_size, 3, ad.context_dim, ad.rollout_horizon
    mask = np.zeros((b, k), np.float32)
    mask[1, -1] = 1.0
    # A short ramp from the safe command: every step of the rollout sees a different action.
    actions = np.broadcast_to(robot.safe_action + 0.1 * np.linspace(-1, 1, h)[:, None] * (robot.action_high
                              - robot.action_low) / 2, (e, m, h, a))
    try:
        (z,) = encoder(np.zeros((b, k, o)), np.zeros((b, k, a)), np.zeros((b, k, o)), mask)
        ctx = np.broadcast_to(z[:1], (e, m, d))
        mean, logvar = dynamics(np.zeros((e, m, o)), actions[:, :, 0], ctx)
        (fused,) = rollout(np.zeros((e, m, o)), actions, ctx)
        chained, state = [], np.zeros((e, m, o), np.float32)
        for t in range(h):
            state = dynamics(state, actions[:, :, t], ctx)[0]
            chained.append(state)
    except Exception as exc:  # onnxruntime runtime failures
        raise BundleError(where, "graphs", f"a test run of the graphs failed: {exc}") from None
    for label, arr, shape in (("encoder output context", z, (b, d)), ("dynamics output next_obs_mean", mean, (e, m, o)),
                              ("dynamics output next_obs_logvar", logvar, (e, m, o)),
                              ("rollout output next_obs", fused, (e, m, h, o))):
        if arr.shape != shape:
            raise BundleError(where, "graphs", f"{label}: a test run returned shape {arr.shape}, expected {shape}")
        if not np.all(np.isfinite(arr)):
            raise BundleError(where, "graphs", f"{label}: a test run on zero inputs returned non-finite values")
    gap = float(np.max(np.abs(fused - np.stack(chained, axis=2)) / robot.obs_scale))
    if not gap <= ROLLOUT_CHAIN_TOLERANCE:
        raise BundleError(where, "graphs.rollout", f"the fused rollout differs from the chained dynamics graph by "
                          f"{gap:.3g} (in observation-scale units, allowed {ROLLOUT_CHAIN_TOLERANCE:g}): the two "
                          "graphs are not the same model")


__all__ = ["BUNDLE_SCHEMA_VERSION", "Bundle", "BundleError", "action_layout", "family_from_dict", "graph_interfaces",
           "load_bundle", "make_session", "observation_layout", "session_options", "sha256_file"]
