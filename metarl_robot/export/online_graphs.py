"""Export an ``online_mbrl`` checkpoint as an ``online_model`` bundle: the model-based graphs with each member's
last layer as an input, the features graph the robot's online update reads, and the prior last layer.

Parity (torch vs onnxruntime, :data:`~metarl_robot.export.onnx_graphs.PARITY_CRITERION`) is measured on random
inputs at the robot's scale and on the run's buffer, each with last layers around the prior (the prior plus
noise: the online update moves them), the rollout teacher-forced step by step as for ``model_based``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from torch import nn

from metarl_robot.algos.buffer import EpisodeBuffer
from metarl_robot.algos.online_mbrl import head_per_row
from metarl_robot.export.lean_rollout import EnsembleWeights, rollout_graph
from metarl_robot.export.onnx_graphs import (
    PARITY_CRITERION,
    PARITY_TOLERANCE,
    EncoderGraph,
    Exporter,
    _example_inputs,
    check_parity,
    export_modules,
    finish_graph,
    parity_report,
    random_inputs,
    real_inputs,
)
from metarl_robot.models.online_dynamics import OnlineContextDynamics
from metarl_robot.runtime.kinds.online_model import PRIOR_HEAD_FILE, OnlineModelBundle, online_graph_interfaces
from metarl_robot.runtime.onnx_graph import make_session
from metarl_robot.spec.schema import to_plain

if TYPE_CHECKING:
    from metarl_robot.export.bundle_writer import _ExportedGraphs, _Run

HEAD_NOISE = 0.05
"""Std of the noise added to the prior last layer in the parity inputs (the heads an online update reaches)."""


class HeadDynamicsGraph(nn.Module):
    """``forward_with_head`` with one last layer per member: ``(obs, action, context, head (E, F, o))``."""

    def __init__(self, model: OnlineContextDynamics) -> None:
        super().__init__()
        self.model = model

    def forward(self, obs: torch.Tensor, action: torch.Tensor, context: torch.Tensor, head: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_with_head(obs, action, context, head_per_row(head, obs.shape[1]))


class FeaturesGraph(nn.Module):
    """One transition's regression data: each member's features and the normalised change of the observation."""

    def __init__(self, model: OnlineContextDynamics) -> None:
        super().__init__()
        self.model = model

    def forward(self, obs: torch.Tensor, action: torch.Tensor, next_obs: torch.Tensor, context: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.head_features(obs, action, context), self.model.delta_norm(next_obs - obs)


OnlineInputs = dict[str, tuple[np.ndarray, ...]]
"""Graph name → its inputs in the runtime's order."""


def _inputs(model: OnlineContextDynamics, base: tuple, next_obs: np.ndarray, rng: np.random.Generator
            ) -> OnlineInputs:
    """The model-based input sets ``base`` (encoder, dynamics, rollout) with last layers near the prior, and the
    features graph's transitions (the dynamics inputs with ``next_obs``)."""
    enc, dyn, roll = base
    prior = model.prior_head().detach().numpy()
    head = np.ascontiguousarray(prior + HEAD_NOISE * rng.standard_normal(prior.shape), dtype=np.float32)
    return {"encoder": enc, "dynamics": (*dyn, head), "rollout": (*roll, head),
            "features": (dyn[0], dyn[1], np.ascontiguousarray(next_obs, dtype=np.float32), dyn[2])}


def _torch_outputs(model: OnlineContextDynamics, inputs: OnlineInputs, roll_o: np.ndarray, dtype: torch.dtype
                   ) -> dict[str, np.ndarray]:
    """Every parity output computed by torch at ``dtype``; the rollout teacher-forced on onnxruntime's states."""
    t = lambda x: torch.as_tensor(x).to(dtype)  # noqa: E731
    with torch.no_grad():
        mean, logvar = HeadDynamicsGraph(model)(*map(t, inputs["dynamics"]))
        obs0, actions, ctx, head = map(t, inputs["rollout"])
        rows = head_per_row(head, obs0.shape[1])
        starts = torch.cat([obs0[:, :, None], t(roll_o[:, :, :-1])], dim=2)
        roll = torch.stack([model.forward_with_head(starts[:, :, i], actions[:, :, i], ctx, rows)[0]
                            for i in range(actions.shape[2])], dim=2)
        phi, target = FeaturesGraph(model)(*map(t, inputs["features"]))
        return {"context": model.encode(*map(t, inputs["encoder"])).numpy(), "next_obs_mean": mean.numpy(),
                "next_obs_logvar": logvar.numpy(), "rollout_next_obs": roll.numpy(), "features": phi.numpy(),
                "target": target.numpy()}


def measure_online_parity(model: OnlineContextDynamics, paths: dict[str, Path], interfaces: dict[str, dict],
                          inputs: OnlineInputs) -> dict[str, dict[str, float]]:
    """Torch vs onnxruntime on the same inputs, per output (the report :func:`check_parity` judges)."""
    ort: dict[str, np.ndarray] = {}
    for name, path in paths.items():
        io = interfaces[name]
        values = make_session(path).run(list(io["outputs"]), dict(zip(io["inputs"], inputs[name], strict=True)))
        ort.update(zip(io["outputs"], values, strict=True))
    ort = {"context": ort["context"], "next_obs_mean": ort["next_obs_mean"], "next_obs_logvar": ort["next_obs_logvar"],
           "rollout_next_obs": ort["next_obs"], "features": ort["features"], "target": ort["target"]}
    ref32 = _torch_outputs(model, inputs, ort["rollout_next_obs"], torch.float32)
    ref64 = _torch_outputs(copy.deepcopy(model).double(), inputs, ort["rollout_next_obs"], torch.float64)
    return parity_report(ort, ref32, ref64)


def export_online_model(run: _Run, staging: Path, name: str, exporter: Exporter, parity_samples: int, seed: int
                        ) -> _ExportedGraphs:
    """The five files of an ``online_model`` bundle from an online_mbrl checkpoint, parity on random and buffer
    inputs."""
    from metarl_robot.export.bundle_writer import _ExportedGraphs

    robot, cfg = run.robot, run.cfg
    buffer_path = run.run_dir / "buffer.npz"
    if not buffer_path.is_file():
        raise FileNotFoundError(f"{buffer_path} not found: the real-input parity check needs the run's buffer")
    buffer = EpisodeBuffer.load(buffer_path)
    model = OnlineContextDynamics(robot.obs_dim, robot.action_dim, robot.obs_periodic, cfg.model, cfg.online)
    model.load_state_dict(run.state["algo"]["model"])
    model.eval()
    horizon, c = cfg.planner.horizon, cfg.model
    interfaces = online_graph_interfaces(robot.obs_dim, robot.action_dim, c.context_window, c.context_dim,
                                         c.ensemble_size, horizon, model.feature_dim)
    enc_args, dyn_args, _ = _example_inputs(model, horizon)
    head = model.prior_head().detach()
    jobs = {"encoder": (EncoderGraph(model).eval(), enc_args),
            "dynamics": (HeadDynamicsGraph(model).eval(), (*dyn_args, head)),
            "features": (FeaturesGraph(model).eval(), (dyn_args[0], dyn_args[1], dyn_args[0] + 0.1, dyn_args[2]))}
    paths = {g: staging / f"{g}.onnx" for g in (*jobs, "rollout")}
    metadata = {"bundle": name, "robot": robot.name, "robot_interface_sha256": robot.interface_hash}
    which, opset = export_modules(jobs, {g: paths[g] for g in jobs}, interfaces, exporter, "online context dynamics",
                                  metadata)
    # The rollout is built from the weights (lean_rollout), its last layer the graph's ``head`` input.
    onnx.save(rollout_graph(EnsembleWeights.from_model(model), horizon, model.act_dim, c.context_dim, opset,
                            head_input="head"), str(paths["rollout"]))
    finish_graph(paths["rollout"], "rollout", interfaces["rollout"], "online context dynamics", metadata)
    prior_file = staging / PRIOR_HEAD_FILE
    np.save(prior_file, head.numpy().astype(np.float32), allow_pickle=False)

    rng = np.random.default_rng(seed)
    scale = np.asarray(robot.obs_scale)
    random_base = random_inputs(model, scale, rng, horizon)
    real_base = real_inputs(model, buffer, rng, horizon, parity_samples)
    parity = {
        "random": measure_online_parity(model, paths, interfaces, _inputs(
            model, random_base, random_base[1][0] + 0.1 * scale * rng.standard_normal(random_base[1][0].shape), rng)),
        "real": measure_online_parity(model, paths, interfaces, _inputs(
            model, real_base, _next_states(buffer, rng, real_base[1][0].shape), rng)),
    }
    check_parity(parity)
    sections = {"adaptation": {"context_window": c.context_window, "context_dim": c.context_dim,
                               "ensemble_size": c.ensemble_size, "rollout_horizon": horizon},
                "online": {"feature_dim": model.feature_dim, "prior_precision": model.prior_precision(),
                           "prior_file": PRIOR_HEAD_FILE},
                "planner": to_plain(cfg.planner)}
    return _ExportedGraphs(OnlineModelBundle.kind, paths, interfaces, opset, which, sections,
                           {"tolerance": PARITY_TOLERANCE, "criterion": PARITY_CRITERION, **parity,
                            "real_samples": parity_samples}, data_files=[prior_file])


def _next_states(buffer: EpisodeBuffer, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Real next observations for the features graph's parity: ``shape`` (E, M, o) sampled from the buffer."""
    batch = buffer.sample(rng, int(np.prod(shape[:2])), 1)
    return batch.next_obs.reshape(shape).astype(np.float32)


__all__ = ["FeaturesGraph", "HeadDynamicsGraph", "export_online_model", "measure_online_parity"]
