"""The manifest every bundle kind shares, its checks, and the interface of a loaded bundle. No torch, no MuJoCo.

A bundle is a folder holding ``bundle.yaml`` (the manifest, schema: docs/bundle_format.md) and the graphs of
its ``kind``. Every kind shares the manifest's common part and its checks, which run in the order of the error
reference in the docs (steps 1-7, 9-11 here; step 8, the kind's own section, and step 12, its smoke run, are
the kind's): the folder and bundle.yaml, the schema version, the kind (checked against the registry by
:func:`metarl_robot.runtime.bundle.load_bundle`), keys and types, files and hashes, the robot, the family, the
layouts, the declared graph interfaces, finite weights and sessions whose actual interface is the declared one.

:class:`LoadedBundle` is what every kind is: each kind (``metarl_robot/runtime/kinds/``) subclasses it,
declares what the rest of the stack asks of a kind (:attr:`LoadedBundle.has_dynamics_model`,
:attr:`LoadedBundle.belief_diagnostics`, ...), loads itself with :meth:`LoadedBundle.load` and makes its
adapter with :meth:`LoadedBundle.make_adapter`. Nothing outside the registry branches on a kind's name.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import numpy as np

from metarl_robot.runtime.adapter import Adapter
from metarl_robot.runtime.onnx_graph import (
    Dim,
    ExternalDataError,
    OnnxGraph,
    fmt_shape,
    make_session,
    session_interface_mismatch,
    shape_matches,
    weights_problem,
)
from metarl_robot.spec.family import FAMILY_SCHEMA_VERSION, FamilySpec, TaskFamily
from metarl_robot.spec.rewards import check_reward_inputs
from metarl_robot.spec.robot import RobotSpec, robot_from_dict
from metarl_robot.spec.schema import SpecError, build, check_schema_version, parse_yaml

BUNDLE_SCHEMA_VERSION = 2
"""The bundle.yaml schema this runtime reads; bump on any incompatible change (2: the fused rollout graph)."""
MANIFEST_FILE = "bundle.yaml"
ADAPTED_OR_NOT: dict[str, dict[str, bool]] = {"adapted": {"adapt": True}, "unadapted": {"adapt": False}}
"""The adaptation modes of a kind with one switch (``adapt``)."""
NO_DYNAMICS_MODEL = "not applicable: the bundle has no dynamics model to predict with"
"""What diagnostics, metrics and reports say in place of a prediction error for a kind without a dynamics model."""


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


# ---- the loaded bundle: what every kind is ----------------------------------------------------------------
class LoadedBundle(ABC):
    """A loaded, validated bundle of some kind: where it is, what it is for, its identity, and what the node,
    the replay, the evaluation and the demo may ask of its kind. A kind subclasses this and is registered in
    :mod:`metarl_robot.runtime.kinds`."""

    kind: ClassVar[str]
    """The manifest's ``kind`` this class loads (its registry key)."""
    manifest_class: ClassVar[type[ManifestCommon]]
    """The manifest schema of the kind (the common keys plus its own sections)."""
    has_dynamics_model: ClassVar[bool] = False
    """True: the bundle predicts the next observation (:meth:`step`, :attr:`ensemble_size`), its adapter reports
    ``prediction_error``, the replay grades its predictions and the safety layer may arm the prediction-error
    fallback."""
    plans: ClassVar[bool] = False
    """True: the adapter samples action sequences with a seeded planner, so planner overrides apply and the seed
    (and the planner noise of earlier episodes) changes its commands; False: it does not plan (planner overrides are
    refused) and acts deterministically unless it :attr:`samples_actions`."""
    samples_actions: ClassVar[bool] = False
    """True (a kind that does not plan): the adapter draws its actions from a distribution with a generator seeded by
    :meth:`make_adapter`'s ``seed``, so, as a planner's noise, the seed and the draws of earlier episodes in the same
    process change its commands. A kind that :attr:`plans` samples anyway; use :meth:`draws_noise` for either."""
    belief_diagnostics: ClassVar[tuple[str, ...]] = ()
    """The adapter diagnostics that say what it believes about the task (the node publishes them on
    ``~/context``); the first is the context the adapter acts with. Empty: it infers nothing."""
    meta_test_episodes: ClassVar[tuple[int, ...]] = ()
    """Non-empty: ``metarl eval`` grades the bundle by the meta-test (the return after each of these numbers of
    exploration episodes on a task, the belief kept across them; for a kind that :attr:`meta_test_resets`, after
    these numbers of adaptation steps, each taken on ``episodes_per_step`` episodes, so the episodes graded are these
    times that count: MB-MPO's 0, K, 2K); empty: one episode per task, adapted vs unadapted."""
    meta_test_resets: ClassVar[bool] = False
    """For kinds with :attr:`meta_test_episodes`: True, the meta-test passes each episode start to the adapter's
    ``reset`` (it adapts there and keeps what it learned until ``forget``: MB-MPO's inner step); False, episode starts
    are hidden from it so its belief carries over (PEARL)."""
    adapter_settings: ClassVar[tuple[str, ...]] = ()
    """For kinds that do not plan: the settings :meth:`make_adapter`'s ``planner_overrides`` takes all the same
    (a deployment's choice, e.g. ``meta_policy``'s ``episodes_per_step``; ``metarl eval --set`` passes them to the
    controller). Empty: any override is refused."""
    adaptation_modes: ClassVar[dict[str, dict[str, bool]]] = {}
    """For kinds graded adapted vs unadapted: mode → the :meth:`make_adapter` switches of it, ``adapted`` (as on
    the robot) first, ``unadapted`` (no adaptation at all) last; ``metarl eval`` runs every mode."""
    acts_by: ClassVar[str] = ""
    """How the bundle acts, for people ("plans through its dynamics model"), after the bundle's name."""

    @classmethod
    def draws_noise(cls) -> bool:
        """Whether the adapter's commands depend on its seed and on its random draws so far (it :attr:`plans` or
        :attr:`samples_actions`): a replay reproduces them only with the logged seed, from the episode's first draw."""
        return cls.plans or cls.samples_actions

    @classmethod
    def adapter_switches(cls, adapt: bool) -> dict[str, bool]:
        """The :meth:`make_adapter` switches of adaptation on (every kind of adaptation the bundle has, as on the
        robot) or off (none at all): the ``adapted`` / ``unadapted`` mode where the kind declares modes, else
        ``adapt``. The node's ``adapt`` parameter means this."""
        return dict(cls.adaptation_modes.get("adapted" if adapt else "unadapted", {"adapt": adapt}))

    def __init__(self, path: Path, manifest: dict[str, Any], robot: RobotSpec, family: TaskFamily,
                 graphs: dict[str, OnnxGraph]) -> None:
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
        self.graphs = graphs
        """The kind's validated graphs by name, as numpy callables."""

    @classmethod
    def load(cls: type[LoadedKind], path: Path, data: dict[str, Any], threads: int) -> LoadedKind:
        """Steps 3-12 on a manifest of this kind (read by :func:`read_manifest`): the common checks, the kind's
        own sections (:meth:`check_sections`), its graphs declared and opened (``threads`` intra-op threads per
        session), its smoke run (:meth:`smoke_test`). Raises :class:`BundleError` at the first failure."""
        where = str(path)
        m, robot, family = check_common(path, data, cls.manifest_class)
        needed, parsed = cls.check_sections(m, robot, where)
        check_declared_graphs(m, needed, where)
        graphs = open_graphs(path, m, needed, threads)
        cls.smoke_test(m, robot, graphs, parsed, where)
        return cls(path, data, robot, family, graphs, **parsed)

    @classmethod
    @abstractmethod
    def check_sections(cls, m: Any, robot: RobotSpec, where: str
                       ) -> tuple[dict[str, dict[str, dict[str, list[Dim]]]], dict[str, Any]]:
        """Step 8: the kind's own manifest sections of ``m`` (its :attr:`manifest_class`), refused with a
        :class:`BundleError` naming the field. Returns the graphs the kind needs (name → interface, inputs in the
        order its callables take them) and what it parsed (keyword arguments of the constructor)."""

    @classmethod
    @abstractmethod
    def smoke_test(cls, m: Any, robot: RobotSpec, graphs: dict[str, OnnxGraph], parsed: dict[str, Any], where: str
                   ) -> None:
        """Step 12: a test run of the opened graphs on neutral inputs (``parsed``: what :meth:`check_sections`
        returned); :class:`BundleError` if a shape, a value or the graphs' consistency is not what the runtime
        needs."""

    @abstractmethod
    def make_adapter(self, batch: int = 1, adapt: bool = True, planner_overrides: dict | None = None,
                     seed: int = 0) -> Adapter:
        """The kind's adapter over this bundle's graphs for ``batch`` envs, deterministic given ``seed``.
        ``adapt=False``: the unadapted controller (for comparisons). ``planner_overrides`` replaces planner
        settings (checked, unknown keys refused) where the kind :attr:`plans`; a kind that does not plan refuses
        any but its :attr:`adapter_settings` (an override silently ignored would be a setting the operator believes
        is in force)."""

    def empty_context(self, adapter: Any) -> np.ndarray:
        """``(d,)`` what ``adapter`` (fresh, of this bundle) acts with before any transition: the context an
        unadapted adapter keeps. ``(0,)`` for a kind that infers no context."""
        return np.zeros(0)

    def step(self, obs: np.ndarray, act: np.ndarray, context: np.ndarray, state: Any = None) -> np.ndarray:
        """``(E, M, o), (E, M, a), (E, M, d)`` → next-observation mean ``(E, M, o)``, raw robot units (kinds that
        :attr:`has_dynamics_model`; ``context`` as :meth:`empty_context`'s width); ``state``: what
        :meth:`model_state` returned (None: the meta-trained model)."""
        raise TypeError(f"a {self.kind} bundle has no dynamics model to step")

    def model_state(self, adapter: Any) -> Any:
        """What ``adapter`` (of this bundle, batch 1) predicts with beyond its context, now — e.g. an online model's
        fitted last layer — for :meth:`step` (None: nothing: the meta-trained model)."""
        del adapter
        return None

    @property
    def name(self) -> str:
        return self.manifest["name"]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, robot={self.robot.name!r}, family={self.family.name!r}, "
                f"path={str(self.path)!r})")


def refuse_planner_overrides(bundle: LoadedBundle, planner_overrides: dict | None) -> None:
    """For kinds that do not plan: there is nothing to override, and an override silently ignored would be a
    setting the operator believes is in force."""
    if planner_overrides:
        raise SpecError("planner_overrides", "", f"a {bundle.kind} bundle does not plan ({bundle.acts_by}), so "
                        f"there is nothing to override; got {sorted(planner_overrides)}")


# ---- the checks every kind shares -------------------------------------------------------------------------
def rethrow(where: str, prefix: str, exc: SpecError) -> BundleError:
    """A SpecError from a nested check as a BundleError, its field prefixed with the manifest key it came from."""
    field = f"{prefix}.{exc.field}" if prefix and exc.field else (prefix or exc.field)
    return BundleError(where, field, exc.problem)


def read_manifest(path: Path) -> tuple[Path, dict[str, Any]]:
    """Steps 1-2: the folder and bundle.yaml as a mapping of a schema version this runtime reads (the kind is
    checked against the registry by :func:`metarl_robot.runtime.bundle.load_bundle`)."""
    if path.name == MANIFEST_FILE and path.is_file():
        path = path.parent
    where = str(path)
    if not path.is_dir():
        raise BundleError(where, "", "bundle folder not found")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(where, MANIFEST_FILE, "missing: a bundle folder must hold bundle.yaml")
    try:
        data = parse_yaml(manifest_path.read_text(), str(manifest_path))
    except UnicodeDecodeError as exc:
        raise BundleError(where, MANIFEST_FILE, f"not valid YAML: {exc}") from exc
    except SpecError as exc:
        raise BundleError(where, MANIFEST_FILE, exc.problem) from None
    if not isinstance(data, dict):
        raise BundleError(where, MANIFEST_FILE, f"expected a mapping at top level, got {type(data).__name__}")
    try:
        check_schema_version(data, where, BUNDLE_SCHEMA_VERSION, "bundle")
    except SpecError as exc:
        raise rethrow(where, "", exc) from None
    return path, data


Manifest = TypeVar("Manifest", bound=ManifestCommon)
LoadedKind = TypeVar("LoadedKind", bound=LoadedBundle)
"""The kind :meth:`LoadedBundle.load` is called on (``typing.Self``, which Humble's Python 3.10 lacks)."""


def check_common(path: Path, data: dict[str, Any], manifest_cls: type[Manifest]
                 ) -> tuple[Manifest, RobotSpec, TaskFamily]:
    """Steps 3-7, the same for every kind: keys and types, files and hashes, robot, family, layouts."""
    where = str(path)
    try:
        m = build(manifest_cls, data, where)
    except SpecError as exc:
        raise rethrow(where, "", exc) from None

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
        raise rethrow(where, "robot", exc) from None
    if robot.interface_hash != m.robot_interface_sha256:
        raise BundleError(where, "robot_interface_sha256", f"the robot copy hashes to {robot.interface_hash}, the "
                          f"manifest says {m.robot_interface_sha256}: the robot spec was edited after export")

    # the task family (reward, parameter ranges)
    try:
        family = family_from_dict(m.family, where)
    except SpecError as exc:
        raise rethrow(where, "family", exc) from None
    if family.spec.robot != robot.name:
        raise BundleError(where, "family.robot", f"{family.spec.robot!r} differs from the bundle's robot "
                          f"{robot.name!r}")
    try:
        check_reward_inputs(family.spec.reward, robot, family.reward_names, where)
    except SpecError as exc:
        raise rethrow(where, "family", exc) from None

    # the human-readable copies must agree with the robot spec
    for key, expected in (("observation", observation_layout(robot)), ("action", action_layout(robot))):
        if diff := _first_difference(data[key], expected, key):
            raise BundleError(where, diff[0], f"{diff[1]!r} disagrees with the robot spec, which gives {diff[2]!r}")
    if not math.isclose(m.control_period, robot.ctrl_dt, rel_tol=0, abs_tol=1e-12):
        raise BundleError(where, "control_period", f"{m.control_period} differs from the robot's control.period "
                          f"{robot.ctrl_dt}")
    return m, robot, family


def check_declared_graphs(m: ManifestCommon, needed: dict[str, dict[str, dict[str, list[Dim]]]], where: str) -> None:
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
                if not shape_matches(declared[io_name], shape):
                    raise BundleError(where, f"{field}.{io_name}", f"shape {fmt_shape(declared[io_name])} differs "
                                      f"from what the robot spec and adaptation sizes need: {fmt_shape(shape)}")


def open_graphs(path: Path, m: ManifestCommon, needed: dict[str, dict[str, dict[str, list[Dim]]]], threads: int
                 ) -> dict[str, OnnxGraph]:
    """Steps 10-11: finite weights, then one session per graph whose actual interface is the declared one.

    Each callable takes its inputs in the order of ``needed`` (the runtime's order)."""
    where = str(path)
    for gname, entry in m.graphs.items():
        if (problem := weights_problem(path / entry.file)) is not None:
            raise BundleError(where, f"graphs.{gname}.file", problem)
    graphs = {}
    for gname, entry in m.graphs.items():
        try:
            session = make_session(path / entry.file, threads, sha256=m.files[entry.file])
        except ExternalDataError as exc:
            raise BundleError(where, f"graphs.{gname}.file", str(exc)) from None
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise BundleError(where, f"graphs.{gname}.file", f"onnxruntime cannot load {entry.file}: {exc}") from None
        check_session_io(session, entry, where, f"graphs.{gname}")
        io = needed[gname]
        graphs[gname] = OnnxGraph(session, tuple(io["inputs"]), tuple(io["outputs"]), io["inputs"], f"{where}: {gname}")
    return graphs


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


def check_session_io(session: Any, entry: GraphEntry, where: str, field: str) -> None:
    """The graph's actual inputs and outputs must match the manifest: names, float32, rank, fixed/dynamic dims."""
    mismatch = session_interface_mismatch(session, entry.inputs, entry.outputs)
    if mismatch is not None:
        at, problem = mismatch
        raise BundleError(where, f"{field}.{at}", f"{entry.file} has {problem} (as the manifest declares)")



__all__ = ["ADAPTED_OR_NOT", "BUNDLE_SCHEMA_VERSION", "MANIFEST_FILE", "NO_DYNAMICS_MODEL", "ActionLayout",
           "BundleError", "GraphEntry", "LoadedBundle", "ManifestCommon", "ObservationLayout", "action_layout",
           "check_common", "check_declared_graphs", "family_from_dict", "observation_layout", "open_graphs",
           "read_manifest", "refuse_planner_overrides", "rethrow", "sha256_file"]
