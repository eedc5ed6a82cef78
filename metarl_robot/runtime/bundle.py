"""Load and fully validate an exported policy bundle (``bundle.yaml`` + ONNX graphs). No torch, no MuJoCo.

A bundle is a folder holding ``bundle.yaml`` (the manifest, schema: docs/bundle_format.md) and the graphs
of its ``kind``:

- ``model_based`` (:class:`Bundle`), planned through with MPC:

  - ``encoder.onnx``: context transitions (B, K, ·) → context (B, d)
  - ``dynamics.onnx``: (E, M, ·) observation, action, context → next-observation mean and log-variance
  - ``rollout.onnx``: (E, M, ·) start observation, H actions, context → the H chained mean predictions:
    the planner's whole horizon in one onnxruntime call instead of H

- ``context_policy`` (:class:`ContextPolicyBundle`, made by PEARL), a policy conditioned on a task belief:

  - ``pearl_factors.onnx``: one transition (B, ·) → a Gaussian factor of the belief over z (B, d)
  - ``pearl_policy.onnx``: observation (B, o), z (B, d) → action (B, a), inside the action box

Both kinds share the manifest's common part and its checks (files and hashes, robot, family, layouts,
declared graph interfaces, finite weights, sessions); the adaptation section, the graphs and the smoke
run differ by kind.

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
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import onnxruntime as ort
import yaml

from metarl_robot.runtime.adapter import ModelBasedAdapter
from metarl_robot.runtime.planner import PlannerConfig
from metarl_robot.spec.family import FAMILY_SCHEMA_VERSION, FamilySpec, TaskFamily
from metarl_robot.spec.rewards import check_reward_inputs, get_reward
from metarl_robot.spec.robot import RobotSpec, robot_from_dict
from metarl_robot.spec.schema import SpecError, build, check_schema_version, to_plain

if TYPE_CHECKING:
    from metarl_robot.runtime.context_policy import ContextPolicyAdapter

BUNDLE_SCHEMA_VERSION = 2
"""The bundle.yaml schema this runtime reads; bump on any incompatible change (2: the fused rollout graph)."""
MANIFEST_FILE = "bundle.yaml"
MODEL_BASED = "model_based"
CONTEXT_POLICY = "context_policy"
KINDS = (MODEL_BASED, CONTEXT_POLICY)
"""Bundle kinds this runtime can run."""
CONTEXT_POLICY_ALGORITHMS = ("pearl",)
"""Algorithms whose context-policy graphs this runtime runs (the factor/policy interface below)."""

ENCODER_INPUTS = ("context_obs", "context_action", "context_next_obs", "context_mask")
ENCODER_OUTPUTS = ("context",)
DYNAMICS_INPUTS = ("obs", "action", "context")
DYNAMICS_OUTPUTS = ("next_obs_mean", "next_obs_logvar")
ROLLOUT_INPUTS = ("obs", "actions", "context")
ROLLOUT_OUTPUTS = ("next_obs",)
FACTORS_INPUTS = ("obs", "action", "reward", "next_obs")
FACTORS_OUTPUTS = ("factor_mean", "factor_logvar")
POLICY_INPUTS = ("obs", "z")
POLICY_OUTPUTS = ("action",)
BATCH_AXIS = "batch"
"""Name of the one dynamic axis of every context-policy graph input and output."""
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
class ContextPolicyAdaptation:
    """How a context-policy bundle adapts: the algorithm whose graphs it holds and the size of its belief."""

    algorithm: str
    """Algorithm that produced the graphs (one of :data:`CONTEXT_POLICY_ALGORITHMS`)."""
    latent_dim: int
    """d: size of the latent task variable z."""


@dataclass(frozen=True)
class ManifestCommon:
    """The keys every bundle kind's ``bundle.yaml`` has (see docs/bundle_format.md)."""

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
    graphs: dict[str, GraphEntry]
    provenance: dict[str, Any]
    files: dict[str, str]


@dataclass(frozen=True)
class BundleManifest(ManifestCommon):
    """A ``model_based`` bundle.yaml: the common keys, the model's sizes and the planner defaults."""

    adaptation: AdaptationSpec
    planner: dict[str, Any]


@dataclass(frozen=True)
class ContextPolicyManifest(ManifestCommon):
    """A ``context_policy`` bundle.yaml: the common keys and the belief's size. No planner: the policy graph acts."""

    adaptation: ContextPolicyAdaptation


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


def pearl_graph_interfaces(obs_dim: int, act_dim: int, latent_dim: int) -> dict[str, dict[str, dict[str, list]]]:
    """Inputs and outputs of a context-policy bundle's two graphs (``"batch"`` is the dynamic axis)."""
    b = BATCH_AXIS
    return {
        "factors": {"inputs": {"obs": [b, obs_dim], "action": [b, act_dim], "reward": [b], "next_obs": [b, obs_dim]},
                    "outputs": {"factor_mean": [b, latent_dim], "factor_logvar": [b, latent_dim]}},
        "policy": {"inputs": {"obs": [b, obs_dim], "z": [b, latent_dim]}, "outputs": {"action": [b, act_dim]}},
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


class LoadedBundle:
    """What every loaded bundle kind exposes: where it is, what it is for, and its identity."""

    kind: str = ""
    """The manifest's ``kind`` (:data:`MODEL_BASED` or :data:`CONTEXT_POLICY`)."""

    def __init__(self, path: Path, manifest: dict[str, Any], robot: RobotSpec, family: TaskFamily) -> None:
        self.path = path
        """The bundle folder."""
        self.manifest = manifest
        """``bundle.yaml`` as plain data."""
        self.robot = robot
        """The robot spec the bundle was trained for (its own copy, not sim/)."""
        self.family = family
        """The task family it was trained on (reward name, parameter ranges)."""
        self.sha256 = sha256_file(path / MANIFEST_FILE)
        """sha256 of bundle.yaml: identifies the whole bundle (the manifest pins every other file's hash)."""

    @property
    def name(self) -> str:
        return self.manifest["name"]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, robot={self.robot.name!r}, family={self.family.name!r}, "
                f"path={str(self.path)!r})")


class Bundle(LoadedBundle):
    """A loaded, validated ``model_based`` bundle: robot, family, planner defaults and the three graphs."""

    kind = MODEL_BASED

    def __init__(self, path: Path, manifest: dict[str, Any], robot: RobotSpec, family: TaskFamily,
                 planner: PlannerConfig, encoder: OnnxGraph, dynamics: OnnxGraph, rollout: OnnxGraph) -> None:
        super().__init__(path, manifest, robot, family)
        self.planner = planner
        """Planner defaults (the training run's MPC settings)."""
        self._encoder, self._dynamics, self._rollout = encoder, dynamics, rollout
        adaptation = manifest["adaptation"]
        self.context_window: int = adaptation["context_window"]
        self.context_dim: int = adaptation["context_dim"]
        self.ensemble_size: int = adaptation["ensemble_size"]
        self.rollout_horizon: int = adaptation["rollout_horizon"]

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


class ContextPolicyBundle(LoadedBundle):
    """A loaded, validated ``context_policy`` bundle (PEARL): robot, family and the factor and policy graphs."""

    kind = CONTEXT_POLICY

    def __init__(self, path: Path, manifest: dict[str, Any], robot: RobotSpec, family: TaskFamily,
                 factors: OnnxGraph, policy: OnnxGraph) -> None:
        super().__init__(path, manifest, robot, family)
        self._factors, self._policy = factors, policy
        adaptation = manifest["adaptation"]
        self.algorithm: str = adaptation["algorithm"]
        """Algorithm that produced the graphs (``pearl``)."""
        self.latent_dim: int = adaptation["latent_dim"]
        """d: size of the latent task variable z."""

    def transition_factors(self, obs: np.ndarray, action: np.ndarray, reward: np.ndarray, next_obs: np.ndarray
                           ) -> list[np.ndarray]:
        """``(B, o), (B, a), (B,), (B, o)`` → ``[factor_mean (B, d), factor_logvar (B, d)]`` float32."""
        return self._factors(obs, action, reward, next_obs)

    def policy(self, obs: np.ndarray, z: np.ndarray) -> list[np.ndarray]:
        """``(B, o), (B, d)`` → ``[action (B, a)]`` float32, inside the robot's action box."""
        return self._policy(obs, z)

    def make_adapter(self, batch: int = 1, adapt: bool = True, planner_overrides: dict | None = None,
                     seed: int = 0) -> ContextPolicyAdapter:
        """A :class:`~metarl_robot.runtime.context_policy.ContextPolicyAdapter` over this bundle's graphs.

        ``adapt=False`` keeps z at the prior mean (the unadapted policy, for comparisons). The policy acts
        deterministically (``box(tanh(mean))`` at the posterior mean), so ``seed`` changes nothing; it is
        accepted for the signature every bundle kind shares. ``planner_overrides`` must be empty: this kind
        does not plan, and an override silently ignored would be a setting the operator believes is in force.
        """
        if planner_overrides:
            raise SpecError("planner_overrides", "", f"a {CONTEXT_POLICY} bundle does not plan (its policy graph "
                            f"acts), so there is nothing to override; got {sorted(planner_overrides)}")
        # context_policy imports this module (OnnxGraph, the graph interfaces): import it when first needed
        from metarl_robot.runtime.context_policy import ContextPolicyAdapter

        return ContextPolicyAdapter(self.robot, get_reward(self.family.spec.reward), self.transition_factors,
                                    self.policy, self.latent_dim, batch=batch, adapt=adapt)


# ---- loading and validation -------------------------------------------------------------------------------
def load_bundle(path: str | Path, threads: int = 1) -> Bundle | ContextPolicyBundle:
    """Load a bundle folder (or its bundle.yaml), refusing with :class:`BundleError` anything it cannot validate.

    Returns a :class:`Bundle` for ``kind: model_based`` and a :class:`ContextPolicyBundle` for
    ``kind: context_policy``. ``threads``: onnxruntime intra-op threads per session (inter-op 1, sequential).
    """
    path, data = _read_manifest(Path(path))
    if data["kind"] == CONTEXT_POLICY:
        return _load_context_policy(path, data, threads)
    return _load_model_based(path, data, threads)


def _rethrow(where: str, prefix: str, exc: SpecError) -> BundleError:
    """A SpecError from a nested check as a BundleError, its field prefixed with the manifest key it came from."""
    field = f"{prefix}.{exc.field}" if prefix and exc.field else (prefix or exc.field)
    return BundleError(where, field, exc.problem)


def _read_manifest(path: Path) -> tuple[Path, dict[str, Any]]:
    """Step 1-2: the folder, bundle.yaml as a mapping, a schema version and a kind this runtime reads."""
    if path.name == MANIFEST_FILE and path.is_file():
        path = path.parent
    where = str(path)
    if not path.is_dir():
        raise BundleError(where, "", "bundle folder not found")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(where, MANIFEST_FILE, "missing: a bundle folder must hold bundle.yaml")
    try:
        data = yaml.safe_load(manifest_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise BundleError(where, MANIFEST_FILE, f"not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleError(where, MANIFEST_FILE, f"expected a mapping at top level, got {type(data).__name__}")
    try:
        check_schema_version(data, where, BUNDLE_SCHEMA_VERSION, "bundle")
    except SpecError as exc:
        raise _rethrow(where, "", exc) from None
    if data.get("kind") not in KINDS:
        raise BundleError(where, "kind", f"unknown bundle kind {data.get('kind')!r}; this runtime runs: "
                          f"{', '.join(KINDS)}")
    return path, data


Manifest = TypeVar("Manifest", bound=ManifestCommon)


def _check_common(path: Path, data: dict[str, Any], manifest_cls: type[Manifest]
                  ) -> tuple[Manifest, RobotSpec, TaskFamily]:
    """Steps 3-7, the same for every kind: keys and types, files and hashes, robot, family, layouts."""
    where = str(path)
    try:
        m = build(manifest_cls, data, where)
    except SpecError as exc:
        raise _rethrow(where, "", exc) from None

    # files: listed ones present and unaltered, no unlisted graphs
    for fname, digest in m.files.items():
        if not fname or fname in (".", "..") or "/" in fname or "\\" in fname or fname == MANIFEST_FILE:
            raise BundleError(where, f"files.{fname}", "must be a plain file name inside the bundle folder (not "
                              "bundle.yaml)")
        file_path = path / fname
        if not file_path.is_file():
            raise BundleError(where, f"files.{fname}", "listed in the manifest but missing from the bundle folder")
        actual = sha256_file(file_path)
        if actual != digest.lower():
            raise BundleError(where, f"files.{fname}", f"sha256 mismatch: the manifest says {digest}, the file has "
                              f"{actual} (the file was modified or corrupted)")
    for extra in sorted(p.name for p in path.glob("*.onnx")):
        if extra not in m.files:
            raise BundleError(where, f"files.{extra}", "an ONNX file in the bundle folder is not listed in the "
                              "manifest; remove it or re-export the bundle")

    # the robot the bundle was trained for
    try:
        robot = robot_from_dict(m.robot, where)
    except SpecError as exc:
        raise _rethrow(where, "robot", exc) from None
    if robot.interface_hash != m.robot_interface_sha256:
        raise BundleError(where, "robot_interface_sha256", f"the robot copy hashes to {robot.interface_hash}, the "
                          f"manifest says {m.robot_interface_sha256}: the robot spec was edited after export")

    # the task family (reward, parameter ranges)
    try:
        family = family_from_dict(m.family, where)
    except SpecError as exc:
        raise _rethrow(where, "family", exc) from None
    if family.spec.robot != robot.name:
        raise BundleError(where, "family.robot", f"{family.spec.robot!r} differs from the bundle's robot "
                          f"{robot.name!r}")
    try:
        check_reward_inputs(family.spec.reward, robot, family.reward_names, where)
    except SpecError as exc:
        raise _rethrow(where, "family", exc) from None

    # the human-readable copies must agree with the robot spec
    for key, expected in (("observation", observation_layout(robot)), ("action", action_layout(robot))):
        if diff := _first_difference(data[key], expected, key):
            raise BundleError(where, diff[0], f"{diff[1]!r} disagrees with the robot spec, which gives {diff[2]!r}")
    if not math.isclose(m.control_period, robot.ctrl_dt, rel_tol=0, abs_tol=1e-12):
        raise BundleError(where, "control_period", f"{m.control_period} differs from the robot's control.period "
                          f"{robot.ctrl_dt}")
    return m, robot, family


def _check_declared_graphs(m: ManifestCommon, needed: dict[str, dict[str, dict[str, list[Dim]]]], where: str) -> None:
    """Step 9: the manifest declares exactly the graphs the kind needs, with the interfaces the runtime feeds."""
    if sorted(m.graphs) != sorted(needed):
        raise BundleError(where, "graphs", f"expected exactly the graphs {sorted(needed)}, got {sorted(m.graphs)}")
    for gname, entry in m.graphs.items():
        if entry.file not in m.files:
            raise BundleError(where, f"graphs.{gname}.file", f"{entry.file!r} is not listed under files (its sha256 "
                              "is unknown)")
        for side in ("inputs", "outputs"):
            declared, want = getattr(entry, side), needed[gname][side]
            field = f"graphs.{gname}.{side}"
            if sorted(declared) != sorted(want):
                raise BundleError(where, field, f"names {sorted(declared)} differ from what the runtime needs: "
                                  f"{sorted(want)}")
            for io_name, shape in want.items():
                if not _shape_matches(declared[io_name], shape):
                    raise BundleError(where, f"{field}.{io_name}", f"shape {_fmt_shape(declared[io_name])} differs "
                                      f"from what the robot spec and adaptation sizes need: {_fmt_shape(shape)}")


def _open_graphs(path: Path, m: ManifestCommon, needed: dict[str, dict[str, dict[str, list[Dim]]]], threads: int
                 ) -> dict[str, OnnxGraph]:
    """Steps 10-11: finite weights, then one session per graph whose actual interface is the declared one.

    Each callable takes its inputs in the order of ``needed`` (the runtime's order)."""
    where = str(path)
    for gname, entry in m.graphs.items():
        _check_weights(path / entry.file, where, f"graphs.{gname}")
    graphs = {}
    for gname, entry in m.graphs.items():
        try:
            session = make_session(path / entry.file, threads)
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise BundleError(where, f"graphs.{gname}.file", f"onnxruntime cannot load {entry.file}: {exc}") from None
        _check_session_io(session, entry, where, f"graphs.{gname}")
        io = needed[gname]
        graphs[gname] = OnnxGraph(session, tuple(io["inputs"]), tuple(io["outputs"]), io["inputs"], f"{where}: {gname}")
    return graphs


def _load_model_based(path: Path, data: dict[str, Any], threads: int) -> Bundle:
    where = str(path)
    m, robot, family = _check_common(path, data, BundleManifest)

    # 8. adaptation sizes and planner defaults
    ad = m.adaptation
    for key in ("context_window", "context_dim", "ensemble_size", "rollout_horizon"):
        if getattr(ad, key) < 1:
            raise BundleError(where, f"adaptation.{key}", f"must be >= 1, got {getattr(ad, key)}")
    try:
        planner = build(PlannerConfig, m.planner, where, "planner")
        planner.validate()
    except SpecError as exc:
        raise _rethrow(where, "", exc) from None
    except ValueError as exc:
        raise BundleError(where, "planner", str(exc)) from None

    needed = graph_interfaces(robot.obs_dim, robot.action_dim, ad.context_window, ad.context_dim, ad.ensemble_size,
                              ad.rollout_horizon)
    _check_declared_graphs(m, needed, where)
    graphs = _open_graphs(path, m, needed, threads)
    # 12. a smoke run on neutral inputs: the right shapes come back, finite, and the fused rollout is the chain
    _smoke_test(graphs["encoder"], graphs["dynamics"], graphs["rollout"], robot, ad, where)
    return Bundle(path, data, robot, family, planner, graphs["encoder"], graphs["dynamics"], graphs["rollout"])


def _load_context_policy(path: Path, data: dict[str, Any], threads: int) -> ContextPolicyBundle:
    where = str(path)
    m, robot, family = _check_common(path, data, ContextPolicyManifest)

    # 8. the belief's algorithm and size (there is no planner section: the policy graph acts)
    ad = m.adaptation
    if ad.algorithm not in CONTEXT_POLICY_ALGORITHMS:
        raise BundleError(where, "adaptation.algorithm", f"got {ad.algorithm!r}; this runtime runs context-policy "
                          f"graphs of: {', '.join(CONTEXT_POLICY_ALGORITHMS)}")
    if ad.latent_dim < 1:
        raise BundleError(where, "adaptation.latent_dim", f"must be >= 1, got {ad.latent_dim}")

    needed = pearl_graph_interfaces(robot.obs_dim, robot.action_dim, ad.latent_dim)
    _check_declared_graphs(m, needed, where)
    graphs = _open_graphs(path, m, needed, threads)
    # 12. a smoke run: positive finite factor variances, finite actions inside the robot's action box
    _smoke_test_context_policy(graphs["factors"], graphs["policy"], robot, ad.latent_dim, where)
    return ContextPolicyBundle(path, data, robot, family, graphs["factors"], graphs["policy"])


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
                return at, f"rank {len(arg.shape)} (shape {arg.shape}), expected {_fmt_shape(shape)}"
            for i, (got, want) in enumerate(zip(arg.shape, shape, strict=True)):
                dynamic = not isinstance(got, int)
                if isinstance(want, str) and not dynamic:
                    return at, f"dimension {i} is fixed to {got}, expected dynamic ({want!r}); shape {arg.shape}"
                if isinstance(want, int) and got != want:
                    return at, f"dimension {i} is {got!r}, expected {want}; shape {arg.shape}, expected " \
                               f"{_fmt_shape(shape)}"
    return None


def _check_session_io(session: ort.InferenceSession, entry: GraphEntry, where: str, field: str) -> None:
    """The graph's actual inputs and outputs must match the manifest: names, float32, rank, fixed/dynamic dims."""
    mismatch = session_interface_mismatch(session, entry.inputs, entry.outputs)
    if mismatch is not None:
        at, problem = mismatch
        raise BundleError(where, f"{field}.{at}", f"{entry.file} has {problem} (as the manifest declares)")


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


def _smoke_test_context_policy(factors: OnnxGraph, policy: OnnxGraph, robot: RobotSpec, latent_dim: int,
                               where: str) -> None:
    """Neutral transitions (zeros, and one at the robot's observation scale with the safe command) must give
    finite factors with positive variance; the policy at the prior mean and at those factors' z must give
    finite actions inside the action box (the box the safety layer would otherwise have to clip to)."""
    o, a, d = robot.obs_dim, robot.action_dim, latent_dim
    obs = np.stack([np.zeros(o), robot.obs_scale]).astype(np.float32)
    action = np.broadcast_to(robot.safe_action, (2, a))
    try:
        mean, logvar = factors(obs, action, np.zeros(2), obs[::-1])
        z = np.concatenate([np.zeros((2, d), np.float32), np.nan_to_num(mean)])  # the prior mean, and a factor's
        (act,) = policy(np.concatenate([obs, obs]), z)
    except Exception as exc:  # onnxruntime runtime failures
        raise BundleError(where, "graphs", f"a test run of the graphs failed: {exc}") from None
    for label, arr, shape in (("factors output factor_mean", mean, (2, d)),
                              ("factors output factor_logvar", logvar, (2, d)),
                              ("policy output action", act, (4, a))):
        if arr.shape != shape:
            raise BundleError(where, "graphs", f"{label}: a test run returned shape {arr.shape}, expected {shape}")
        if not np.all(np.isfinite(arr)):
            raise BundleError(where, "graphs", f"{label}: a test run on neutral inputs returned non-finite values")
    if not np.all(np.isfinite(np.exp(-logvar.astype(np.float64)))):
        raise BundleError(where, "graphs.factors", f"factor_logvar: a test run returned {float(logvar.min()):.3g}, "
                          "whose precision exp(-log_var) overflows; a belief factor needs a finite precision")
    outside = (act < robot.action_low) | (act > robot.action_high)
    if outside.any():
        raise BundleError(where, "graphs.policy", f"action: a test run returned {act[outside.any(axis=1)][0].tolist()}"
                          f", outside the robot's action box [{robot.action_low.tolist()}, "
                          f"{robot.action_high.tolist()}]: the policy graph does not end in the robot's box")


__all__ = ["BUNDLE_SCHEMA_VERSION", "CONTEXT_POLICY", "KINDS", "MODEL_BASED", "Bundle", "BundleError",
           "ContextPolicyBundle", "LoadedBundle", "action_layout", "family_from_dict", "graph_interfaces",
           "load_bundle", "make_session", "observation_layout", "pearl_graph_interfaces", "session_options",
           "sha256_file"]
