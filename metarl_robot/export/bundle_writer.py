"""Turn a training run folder into a policy bundle: its ONNX graphs and a ``bundle.yaml`` manifest.

The run's algorithm picks the bundle kind and the export step (its ``bundle_kind`` and ``exporter``,
:mod:`metarl_robot.algos.registry`): a ``context_mbrl`` run becomes a ``model_based`` bundle (encoder,
dynamics and rollout graphs, :func:`export_model_based`), a ``pearl`` run a ``context_policy`` bundle
(factor and policy graphs, :func:`export_context_policy`). :func:`export_run` rebuilds the model
from a checkpoint, exports it, measures torch-vs-onnxruntime parity on random and on real (buffer)
inputs, writes the manifest and finally loads the result with the robot-side loader
(:func:`metarl_robot.runtime.bundle.load_bundle`), so a bundle that the runtime would refuse is
never written. The folder is assembled next to its destination and
moved into place only when every check has passed. Format: ``docs/bundle_format.md``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
import yaml

from metarl_robot.algos.buffer import EpisodeBuffer
from metarl_robot.algos.pearl import PEARL
from metarl_robot.algos.registry import ALGORITHMS, get_algorithm
from metarl_robot.algos.task_replay import TaskReplay
from metarl_robot.export.onnx_graphs import (
    PARITY_CRITERION,
    PARITY_TOLERANCE,
    Exporter,
    ExportError,
    check_parity,
    export_graphs,
    measure_parity,
    random_inputs,
    real_inputs,
)
from metarl_robot.export.pearl_graphs import export_pearl_checked
from metarl_robot.models.context_dynamics import ContextDynamics
from metarl_robot.provenance import software_version
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.runtime.kinds import bundle_kind
from metarl_robot.runtime.kinds.context_policy import ContextPolicyBundle
from metarl_robot.runtime.kinds.model_based import ModelBasedBundle
from metarl_robot.runtime.kinds.unadapted import UnadaptedBundle
from metarl_robot.runtime.manifest import (
    BUNDLE_SCHEMA_VERSION,
    MANIFEST_FILE,
    BundleError,
    action_layout,
    observation_layout,
    sha256_file,
)
from metarl_robot.runtime.onnx_graph import make_session
from metarl_robot.spec.family import TaskFamily, load_family
from metarl_robot.spec.robot import RobotSpec, robot_from_dict
from metarl_robot.spec.schema import SpecError, to_plain
from metarl_robot.train.config import RunConfig, build_config, load_config
from metarl_robot.train.runner import load_checkpoint, load_trained


def checkpoint_path(run_dir: Path, checkpoint: str | int | Path = "latest") -> Path:
    """``latest`` → checkpoints/latest.pt; an iteration (``3`` or ``"3"``) → checkpoints/ckpt_0003.pt; else a path."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if checkpoint == "latest":
        return ckpt_dir / "latest.pt"
    if isinstance(checkpoint, int) or (isinstance(checkpoint, str) and checkpoint.isdigit()):
        return ckpt_dir / f"ckpt_{int(checkpoint):04d}.pt"
    path = Path(checkpoint)
    return path if path.is_absolute() or path.exists() else ckpt_dir / path


def _yaml_safe(obj: Any) -> Any:
    """Plain YAML types only: numpy/torch scalars → Python numbers, str subclasses (torch's version) → str."""
    if isinstance(obj, dict):
        return {str(k): _yaml_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_yaml_safe(v) for v in obj]
    if isinstance(obj, np.generic | torch.Tensor):
        return obj.item()
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, str | Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} {obj!r} to bundle.yaml")


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"bundle destination {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"bundle folder {out_dir} is not empty; choose another folder or pass "
                                  "overwrite=True (--overwrite) to replace the bundle in it")
        if not (out_dir / MANIFEST_FILE).is_file():
            raise FileExistsError(f"refusing to overwrite {out_dir}: it is not empty and holds no {MANIFEST_FILE}, so "
                                  "it does not look like a bundle")


def _stable_name(ckpt_file: Path, iteration: int) -> str:
    """``latest.pt`` moves when a run is resumed: name its numbered twin when the bytes are the same."""
    twin = ckpt_file.parent / f"ckpt_{iteration:04d}.pt"
    if ckpt_file.name != twin.name and twin.is_file() and sha256_file(twin) == sha256_file(ckpt_file):
        return twin.name
    return ckpt_file.name


@dataclass
class _Run:
    """A run folder's checkpoint and what it was trained for, checked against each other."""

    run_dir: Path
    cfg: RunConfig
    """The config the checkpoint was trained with."""
    ckpt_file: Path
    state: dict[str, Any]
    """The checkpoint as loaded."""
    robot: RobotSpec
    family: TaskFamily
    run_info: dict[str, Any]
    """``run.json`` (empty if the run has none)."""
    adapter_settings: dict[str, Any] = field(default_factory=dict)
    """Deployment settings the bundle records instead of the run's (``metarl export --set``; only its kind's
    ``adapter_settings``, e.g. ``meta_policy``'s ``episodes_per_step``)."""


def _open_run(run_dir: Path, config_path: Path, cfg: RunConfig, checkpoint: str | int | Path) -> _Run:
    """Load the checkpoint and check its config, robot and family against the run folder's."""
    ckpt_file = checkpoint_path(run_dir, checkpoint)
    state = load_checkpoint(ckpt_file)

    # The checkpoint's own config and robot are what the weights were trained with.
    if isinstance(state.get("config"), str):
        ckpt_cfg = build_config(yaml.safe_load(state["config"]), f"{ckpt_file}: config")
        if to_plain(ckpt_cfg) != to_plain(cfg):
            warnings.warn(f"{config_path} differs from the config stored in {ckpt_file.name} (a resumed run with "
                          "overrides?); exporting with the checkpoint's", stacklevel=3)
            cfg = ckpt_cfg
    robot = robot_from_dict(state["robot"], f"{ckpt_file}: robot")
    family = load_family(cfg.family)
    if state.get("family") not in (None, family.name):
        raise SpecError(str(ckpt_file), "family", f"checkpoint was trained on {state['family']!r}, the config names "
                        f"{family.name!r}")
    if family.spec.robot != robot.name:
        raise SpecError(str(ckpt_file), "robot", f"family {family.name!r} is for robot {family.spec.robot!r}, the "
                        f"checkpoint's robot is {robot.name!r}")
    run_info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    if run_info.get("robot_interface_sha256") not in (None, robot.interface_hash):
        raise SpecError(str(ckpt_file), "robot", f"robot interface hash {robot.interface_hash} differs from the "
                        f"run's {run_info['robot_interface_sha256']} (run.json)")
    family_file = Path(family.where)
    if family_file.is_file() and run_info.get("family_sha256") not in (None, sha256_file(family_file)):
        warnings.warn(f"task family file {family_file} changed since the run started; the bundle copies the current "
                      "one", stacklevel=3)
    return _Run(run_dir, cfg, ckpt_file, state, robot, family, run_info)


@dataclass
class _ExportedGraphs:
    """What a kind's export step hands to the manifest writer."""

    kind: str
    """The bundle kind (``model_based`` / ``context_policy``)."""
    files: dict[str, Path]
    """Graph name (manifest key) → file in the staging folder."""
    interfaces: dict[str, dict]
    """Graph name → ``{inputs, outputs}``."""
    opset: int
    exporter: str
    """Exporter used (``torchscript`` / ``dynamo``)."""
    sections: dict[str, Any]
    """The kind's own manifest sections (``adaptation``, and ``planner`` for model-based), in file order."""
    parity: dict[str, Any]
    """The ``provenance.parity`` record: tolerance, criterion, the per-input-set reports, sample counts."""
    data_files: list[Path] = field(default_factory=list)
    """Files of the bundle that are not graphs (e.g. an online model's prior last layer), hashed with them."""


def _manifest(run: _Run, name: str, graphs: _ExportedGraphs) -> dict[str, Any]:
    """The bundle.yaml of any kind: the common keys and provenance around the kind's own sections."""
    robot = run.robot
    return {
        "schema_version": BUNDLE_SCHEMA_VERSION,
        "name": name,
        "kind": graphs.kind,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),  # not datetime.UTC: Python 3.10
        "software_version": software_version(),
        "robot": robot.to_dict(),
        "robot_interface_sha256": robot.interface_hash,
        "family": to_plain(run.family.spec),
        "observation": observation_layout(robot),
        "action": action_layout(robot),
        "control_period": float(robot.ctrl_dt),
        **graphs.sections,
        "graphs": {gname: {"file": path.name, "opset": graphs.opset, **graphs.interfaces[gname]}
                   for gname, path in graphs.files.items()},
        "provenance": {
            "run_dir": str(run.run_dir.resolve()),
            "checkpoint": {"file": _stable_name(run.ckpt_file, int(run.state["iteration"])),
                           "iteration": int(run.state["iteration"]), "sha256": sha256_file(run.ckpt_file)},
            "git_commit": run.run_info.get("git_commit"),
            "seed": run.cfg.seed,
            "family_sha256": run.run_info.get("family_sha256"),
            "metrics": dict((run.state.get("history") or [{}])[-1]),
            "parity": graphs.parity,
            "exporter": {"name": graphs.exporter, "opset": graphs.opset, "torch": torch.__version__,
                         "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
            "config": to_plain(run.cfg),
        },
        "files": {p.name: sha256_file(p) for p in [*graphs.files.values(), *graphs.data_files]},
    }


def export_model_based(run: _Run, staging: Path, name: str, exporter: Exporter, parity_samples: int, seed: int
                        ) -> _ExportedGraphs:
    """Encoder, dynamics and fused rollout of a context_mbrl checkpoint, parity on random and buffer inputs."""
    robot, cfg = run.robot, run.cfg
    buffer_path = run.run_dir / "buffer.npz"
    if not buffer_path.is_file():
        raise FileNotFoundError(f"{buffer_path} not found: the real-input parity check needs the run's buffer")
    buffer = EpisodeBuffer.load(buffer_path)
    model = ContextDynamics(robot.obs_dim, robot.action_dim, robot.obs_periodic, cfg.model)
    model.load_state_dict(run.state["algo"]["model"])
    model.eval()

    horizon = cfg.planner.horizon
    graphs = export_graphs(model, staging, horizon, exporter, metadata={
        "bundle": name, "robot": robot.name, "robot_interface_sha256": robot.interface_hash})
    rng = np.random.default_rng(seed)
    parity = {"random": measure_parity(model, graphs, random_inputs(model, robot.obs_scale, rng, horizon)),
              "real": measure_parity(model, graphs, real_inputs(model, buffer, rng, horizon, parity_samples))}
    check_parity(parity)
    adaptation = {"context_window": cfg.model.context_window, "context_dim": cfg.model.context_dim,
                  "ensemble_size": cfg.model.ensemble_size, "rollout_horizon": horizon}
    return _ExportedGraphs(
        ModelBasedBundle.kind, {"encoder": graphs.encoder, "dynamics": graphs.dynamics, "rollout": graphs.rollout},
        graphs.interfaces, graphs.opset, graphs.exporter,
        {"adaptation": adaptation, "planner": to_plain(cfg.planner)},
        {"tolerance": PARITY_TOLERANCE, "criterion": PARITY_CRITERION, **parity, "real_samples": parity_samples})


def export_unadapted(run: _Run, staging: Path, name: str, exporter: Exporter, parity_samples: int, seed: int
                     ) -> _ExportedGraphs:
    """The non-adaptive baseline of a context_mbrl checkpoint: :func:`export_model_based`'s dynamics and rollout
    graphs (same parity checks) without the encoder, conditioned on the context the exported encoder graph gives an
    empty window (computed by onnxruntime, as the robot's model-based adapter computes it), written into the
    manifest. The bundle plans exactly as the model-based bundle of the same checkpoint with adaptation off."""
    graphs = export_model_based(run, staging, name, exporter, parity_samples, seed)
    encoder_file = graphs.files.pop("encoder")
    encoder = make_session(encoder_file)
    shapes = {i.name: [1, *i.shape[1:]] for i in encoder.get_inputs()}
    (context,) = encoder.run(None, {n: np.zeros(shape, np.float32) for n, shape in shapes.items()})
    encoder_file.unlink()  # the runtime refuses an ONNX file its manifest does not list
    adaptation = graphs.sections["adaptation"]
    model = {"context": [float(x) for x in context[0]], "ensemble_size": adaptation["ensemble_size"],
             "rollout_horizon": adaptation["rollout_horizon"]}
    return _ExportedGraphs(UnadaptedBundle.kind, graphs.files, {g: graphs.interfaces[g] for g in graphs.files},
                           graphs.opset, graphs.exporter, {"model": model, "planner": graphs.sections["planner"]},
                           graphs.parity)


def export_context_policy(run: _Run, staging: Path, name: str, exporter: Exporter, parity_samples: int, seed: int
                  ) -> _ExportedGraphs:
    """Factor and policy graphs of a PEARL checkpoint, parity on random inputs and on the run's replay."""
    if exporter not in ("auto", "torchscript"):
        raise ValueError(f"exporter: PEARL graphs are exported with the TorchScript exporter only; got {exporter!r} "
                         "(allowed for a pearl run: 'auto', 'torchscript')")
    replay_path = run.run_dir / "replay.npz"
    if not replay_path.is_file():
        raise FileNotFoundError(f"{replay_path} not found: the real-input parity check needs the run's replay")
    _, _, algo = load_trained(run.ckpt_file)
    if not isinstance(algo, PEARL):  # load_trained refuses a kind/config mismatch; this names the type
        raise SpecError(str(run.ckpt_file), "algo_kind", f"loaded a {type(algo).__name__}, not PEARL")
    replay = TaskReplay.load(replay_path)
    tasks = len(replay.trainable_tasks())
    per_task = max(1, -(-parity_samples // max(tasks, 1)))  # at least parity_samples transitions over all tasks
    graphs, parity = export_pearl_checked(algo, staging, replay=replay, seed=seed, replay_per_task=per_task,
                                          metadata={"bundle": name, "robot": run.robot.name,
                                                    "robot_interface_sha256": run.robot.interface_hash})
    return _ExportedGraphs(
        ContextPolicyBundle.kind, {"factors": graphs.factors, "policy": graphs.policy}, graphs.interfaces, graphs.opset,
        "torchscript", {"adaptation": {"algorithm": algo.name, "latent_dim": int(algo.latent_dim)}},
        {"tolerance": PARITY_TOLERANCE, "criterion": PARITY_CRITERION, **parity, "replay_samples": per_task * tasks})


def _exportable() -> list[str]:
    """The registered algorithms whose runs export to a bundle."""
    return [name for name, algorithm in ALGORITHMS.items() if algorithm.exporters]


def export_run(run_dir: str | Path, out_dir: str | Path, checkpoint: str | int | Path = "latest",
               name: str | None = None, overwrite: bool = False, exporter: Exporter = "auto",
               parity_samples: int = 512, seed: int = 0, kind: str | None = None,
               adapter_settings: dict[str, Any] | None = None) -> Path:
    """Export a training run's checkpoint as a bundle folder ``out_dir``; returns its path.

    ``kind``: the bundle kind, one of those the run's algorithm exports to (its ``exporters``); by default
    the one it declares as ``bundle_kind``: ``context_mbrl`` → ``model_based`` (encoder, dynamics, rollout
    graphs; parity on the run's buffer.npz), ``pearl`` → ``context_policy`` (factor and policy graphs; parity
    on the run's replay.npz; TorchScript exporter only), ``mbmpo`` → ``meta_policy`` (the policy-mean graph and
    the meta-parameters; parity on the run's buffer.npz; ``exporter="auto"`` only). ``checkpoint``: ``latest``,
    an iteration number or a checkpoint path. ``name`` defaults to the folder name of ``out_dir``.
    ``parity_samples``: real transitions the parity check uses (for PEARL, spread evenly over the replay's tasks,
    rounded up). A non-empty ``out_dir`` is refused unless ``overwrite`` (and even then only if it holds a bundle.yaml).
    ``adapter_settings``: deployment settings the bundle records instead of the run's (its kind's
    ``adapter_settings`` only, others refused naming them: e.g. ``{"episodes_per_step": 4}`` for a ``meta_policy``).
    Raises :class:`ExportError` if the graphs do not match torch within 1e-5, and :class:`BundleError` if
    the result fails the runtime's own checks.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: {config_path} not found")
    cfg = load_config(config_path)
    algorithm = get_algorithm(cfg.algo)
    if not algorithm.exporters:
        raise SpecError(str(config_path), "algo", f"cannot export {cfg.algo!r} runs to a bundle; exportable: "
                        f"{', '.join(sorted(_exportable()))}")
    kind = algorithm.bundle_kind if kind is None else kind
    if kind not in algorithm.exporters:
        raise SpecError(str(config_path), "kind", f"a {cfg.algo} run exports to {', '.join(algorithm.exporters)}; "
                        f"got {kind!r}")
    export_graphs_of_kind = algorithm.export_step(kind)
    allowed = bundle_kind(kind).adapter_settings
    if unknown := sorted(set(adapter_settings or {}) - set(allowed)):
        raise SpecError(str(config_path), "--set", f"a {kind} bundle takes "
                        f"{', '.join(allowed) if allowed else 'no deployment settings'}; got {unknown}")
    _prepare_out_dir(out_dir, overwrite)
    run = _open_run(run_dir, config_path, cfg, checkpoint)
    run.adapter_settings = dict(adapter_settings or {})

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        bundle_name = name or out_dir.name
        graphs = export_graphs_of_kind(run, staging, bundle_name, exporter, parity_samples, seed)
        if graphs.kind != kind:  # a bug in the algorithm's declaration, never input
            raise RuntimeError(f"{cfg.algo}'s export step for {kind!r} wrote a {graphs.kind!r} bundle")
        (staging / MANIFEST_FILE).write_text(
            "# metarl-robot policy bundle; format: docs/bundle_format.md\n"
            + yaml.safe_dump(_yaml_safe(_manifest(run, bundle_name, graphs)), sort_keys=False, width=120))
        load_bundle(staging)  # the robot-side loader must accept what we wrote
        if out_dir.exists():
            if overwrite and any(out_dir.iterdir()):
                shutil.rmtree(out_dir)
            else:
                out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


__all__ = ["BundleError", "ExportError", "checkpoint_path", "export_run", "software_version"]
