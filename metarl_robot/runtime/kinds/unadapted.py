"""The ``unadapted`` bundle kind: a dynamics ensemble with its context frozen, planned through with MPC.

The non-adaptive baseline: what ``metarl eval`` calls *unadapted* (the meta-trained model with the context of
an empty window), as a bundle a robot can run, so that adaptation on and off can be compared on hardware with
two bundles and the same node. It is exported from a ``context_mbrl`` run (``metarl export --kind
unadapted``): the same dynamics and rollout graphs as the run's ``model_based`` bundle, no encoder, and the
empty-window context written into the manifest (``model.context``), which the adapter feeds every step.

Graphs: ``dynamics.onnx`` and ``rollout.onnx`` with the interfaces of the ``model_based`` kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from metarl_robot.runtime.adapter import ModelBasedAdapter
from metarl_robot.runtime.kinds.model_based import (
    EnsembleGraphs,
    EnsembleSpec,
    check_sizes,
    graph_interfaces,
    load_planner,
    planner_with,
    smoke_rollout,
)
from metarl_robot.runtime.manifest import ADAPTED_OR_NOT, LoadedBundle, ManifestCommon
from metarl_robot.runtime.onnx_graph import Dim, OnnxGraph
from metarl_robot.runtime.planner import PlannerConfig
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import RobotSpec

UNADAPTED_GRAPHS = ("dynamics", "rollout")
"""The ``model_based`` graphs this kind keeps."""
FROZEN_WINDOW = 1
"""Transitions the adapter's context window holds (never read: the context is the manifest's, not inferred)."""


@dataclass(frozen=True)
class FrozenModelSpec(EnsembleSpec):
    """The ensemble's sizes and the context it is conditioned on."""

    context: list[float]
    """The context fed to the dynamics graph every step (the run's encoder on an empty window)."""


@dataclass(frozen=True)
class UnadaptedManifest(ManifestCommon):
    """An ``unadapted`` bundle.yaml: the common keys, the frozen model and the planner defaults."""

    model: FrozenModelSpec
    planner: dict[str, Any]


class UnadaptedBundle(EnsembleGraphs, LoadedBundle):
    """A loaded, validated ``unadapted`` bundle: planner defaults, the dynamics and rollout graphs, a fixed context."""

    kind: ClassVar[str] = "unadapted"
    manifest_class = UnadaptedManifest
    has_dynamics_model = True
    plans = True
    adaptation_modes = ADAPTED_OR_NOT  # both the same here: the baseline, graded like the kinds it is compared with
    acts_by = "plans through its dynamics model with a fixed context (it does not adapt)"

    def __init__(self, path: Path, manifest: dict[str, Any], robot: RobotSpec, family: Any,
                 graphs: dict[str, OnnxGraph], planner: PlannerConfig) -> None:
        super().__init__(path, manifest, robot, family, graphs)
        self.planner = planner
        """Planner defaults (the training run's MPC settings)."""
        model = manifest["model"]
        self.context = np.asarray(model["context"], dtype=np.float32)
        """(d,) the context every prediction is conditioned on."""
        self.ensemble_size: int = model["ensemble_size"]
        self.rollout_horizon: int = model["rollout_horizon"]

    @classmethod
    def check_sections(cls, m: UnadaptedManifest, robot: RobotSpec, where: str
                       ) -> tuple[dict[str, dict[str, dict[str, list[Dim]]]], dict[str, Any]]:
        """The frozen model's sizes and context (finite: the schema refuses NaN and Inf), the planner defaults;
        the dynamics and rollout graphs of the ``model_based`` kind."""
        model = m.model
        check_sizes(where, "model", {"ensemble_size": model.ensemble_size, "rollout_horizon": model.rollout_horizon,
                                     "context": len(model.context)})
        planner = load_planner(where, m.planner)
        every = graph_interfaces(robot.obs_dim, robot.action_dim, FROZEN_WINDOW, len(model.context),
                                 model.ensemble_size, model.rollout_horizon)
        return {name: every[name] for name in UNADAPTED_GRAPHS}, {"planner": planner}

    @classmethod
    def smoke_test(cls, m: UnadaptedManifest, robot: RobotSpec, graphs: dict[str, OnnxGraph], parsed: dict[str, Any],
                   where: str) -> None:
        """The model at its context; the fused rollout the chained dynamics graph."""
        model = m.model
        context = np.asarray(model.context, dtype=np.float32)
        smoke_rollout(graphs["dynamics"], graphs["rollout"], robot, model.ensemble_size, model.rollout_horizon,
                      np.broadcast_to(context, (model.ensemble_size, 3, context.size)), where)

    def frozen_context(self, ctx_obs: np.ndarray, ctx_act: np.ndarray, ctx_next_obs: np.ndarray,
                       ctx_mask: np.ndarray) -> np.ndarray:
        """The adapter's encoder: the manifest's context for every env, whatever the window holds."""
        return np.broadcast_to(self.context, (ctx_obs.shape[0], self.context.size))

    def make_adapter(self, batch: int = 1, adapt: bool = True, planner_overrides: dict | None = None,
                     seed: int = 0) -> ModelBasedAdapter:
        """A model-based adapter that never adapts (``adapt`` changes nothing: the context is the manifest's);
        ``planner_overrides`` and ``seed`` as for a ``model_based`` bundle."""
        cfg = planner_with(self.planner, planner_overrides, seed)
        return ModelBasedAdapter(self.robot, get_reward(self.family.spec.reward), self.frozen_context, self.step,
                                 self.ensemble_size, FROZEN_WINDOW, cfg, batch=batch, adapt=False,
                                 fused=(self.rollout, self.rollout_horizon))

    def empty_context(self, adapter: ModelBasedAdapter) -> np.ndarray:
        return self.context.astype(np.float64)


__all__ = ["FrozenModelSpec", "UnadaptedBundle", "UnadaptedManifest"]
