"""The ``model_based`` bundle kind: a context encoder and a dynamics ensemble, planned through with MPC.

Graphs (written by :mod:`metarl_robot.export.onnx_graphs`, raw robot units in and out, normalisers baked in):

- ``encoder.onnx``: context transitions (B, K, ·) → context (B, d)
- ``dynamics.onnx``: (E, M, ·) observation, action, context → next-observation mean and log-variance
- ``rollout.onnx``: (E, M, ·) start observation, H actions, context → the H chained mean predictions:
  the planner's whole horizon in one onnxruntime call instead of H

Its adapter (:class:`~metarl_robot.runtime.adapter.ModelBasedAdapter`) infers the context from the last K
transitions and plans through the ensemble with the manifest's planner settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from metarl_robot.runtime.adapter import ModelBasedAdapter
from metarl_robot.runtime.manifest import (
    ADAPTED_OR_NOT,
    BundleError,
    LoadedBundle,
    ManifestCommon,
    rethrow,
)
from metarl_robot.runtime.onnx_graph import Dim, OnnxGraph
from metarl_robot.runtime.planner import PlannerConfig
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import RobotSpec
from metarl_robot.spec.schema import SpecError, build, to_plain

ENCODER_INPUTS = ("context_obs", "context_action", "context_next_obs", "context_mask")
ENCODER_OUTPUTS = ("context",)
DYNAMICS_INPUTS = ("obs", "action", "context")
DYNAMICS_OUTPUTS = ("next_obs_mean", "next_obs_logvar")
ROLLOUT_INPUTS = ("obs", "actions", "context")
ROLLOUT_OUTPUTS = ("next_obs",)
ROLLOUT_CHAIN_TOLERANCE = 1e-4
"""Largest allowed |fused rollout - chained dynamics steps|, relative to the observation scale, at load time.
Both are onnxruntime float32; only kernel fusion order differs, so a real mismatch (a rollout graph from
another model) is orders of magnitude larger."""


@dataclass(frozen=True)
class EnsembleSpec:
    """Sizes of the dynamics ensemble's graphs (the kinds that plan through it)."""

    ensemble_size: int
    """E: ensemble members in the dynamics graph."""
    rollout_horizon: int
    """H of the fused rollout graph (the planner's horizon at export; other horizons step the dynamics graph)."""


@dataclass(frozen=True)
class AdaptationSpec(EnsembleSpec):
    """Sizes the graphs were exported with."""

    context_window: int
    """K: transitions the encoder sees."""
    context_dim: int
    """d: size of the context vector."""


@dataclass(frozen=True)
class ModelBasedManifest(ManifestCommon):
    """A ``model_based`` bundle.yaml: the common keys, the model's sizes and the planner defaults."""

    adaptation: AdaptationSpec
    planner: dict[str, Any]


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


def load_planner(where: str, planner: dict[str, Any]) -> PlannerConfig:
    """Step 8 of a kind that plans: the manifest's ``planner`` section as a checked :class:`PlannerConfig`."""
    try:
        cfg = build(PlannerConfig, planner, where, "planner")
        cfg.validate()
    except SpecError as exc:
        raise rethrow(where, "", exc) from None
    except ValueError as exc:
        raise BundleError(where, "planner", str(exc)) from None
    return cfg


def planner_with(defaults: PlannerConfig, overrides: dict | None, seed: int) -> PlannerConfig:
    """``defaults`` with ``seed`` and ``overrides`` (checked like the manifest's, unknown keys refused)."""
    data = {**to_plain(defaults), "seed": seed, **(overrides or {})}
    cfg = build(PlannerConfig, data, "planner_overrides")
    try:
        cfg.validate()
    except ValueError as exc:
        raise SpecError("planner_overrides", "", str(exc)) from exc
    return cfg


def check_sizes(where: str, section: str, sizes: dict[str, int]) -> None:
    """Every size of the kind's ``adaptation`` section must be >= 1."""
    for key, value in sizes.items():
        if value < 1:
            raise BundleError(where, f"{section}.{key}", f"must be >= 1, got {value}")


def smoke_rollout(dynamics: OnnxGraph, rollout: OnnxGraph, robot: RobotSpec, ensemble_size: int, horizon: int,
                  context: np.ndarray | None, where: str) -> None:
    """A test run of a dynamics graph and its fused rollout on zero observations and a short ramp of actions
    from the safe command (every step sees a different action): the right shapes come back, finite, and the
    fused rollout is the dynamics graph chained. ``context``: ``(E, M, d)`` fed to both, or None for graphs
    that take none."""
    e, m, h, o, a = ensemble_size, 3, horizon, robot.obs_dim, robot.action_dim
    actions = np.broadcast_to(robot.safe_action + 0.1 * np.linspace(-1, 1, h)[:, None] * (robot.action_high
                              - robot.action_low) / 2, (e, m, h, a))
    ctx = () if context is None else (context,)
    try:
        mean, logvar = dynamics(np.zeros((e, m, o)), actions[:, :, 0], *ctx)
        (fused,) = rollout(np.zeros((e, m, o)), actions, *ctx)
        chained, state = [], np.zeros((e, m, o), np.float32)
        for t in range(h):
            state = dynamics(state, actions[:, :, t], *ctx)[0]
            chained.append(state)
    except Exception as exc:  # onnxruntime runtime failures
        raise BundleError(where, "graphs", f"a test run of the graphs failed: {exc}") from None
    check_outputs(where, [("dynamics output next_obs_mean", mean, (e, m, o)),
                          ("dynamics output next_obs_logvar", logvar, (e, m, o)),
                          ("rollout output next_obs", fused, (e, m, h, o))])
    gap = float(np.max(np.abs(fused - np.stack(chained, axis=2)) / robot.obs_scale))
    if not gap <= ROLLOUT_CHAIN_TOLERANCE:
        raise BundleError(where, "graphs.rollout", f"the fused rollout differs from the chained dynamics graph by "
                          f"{gap:.3g} (in observation-scale units, allowed {ROLLOUT_CHAIN_TOLERANCE:g}): the two "
                          "graphs are not the same model")


def check_outputs(where: str, outputs: list[tuple[str, np.ndarray, tuple[int, ...]]]) -> None:
    """Each smoke-run output ``(label, array, wanted shape)`` has its shape and is finite."""
    for label, arr, shape in outputs:
        if arr.shape != shape:
            raise BundleError(where, "graphs", f"{label}: a test run returned shape {arr.shape}, expected {shape}")
        if not np.all(np.isfinite(arr)):
            raise BundleError(where, "graphs", f"{label}: a test run on neutral inputs returned non-finite values")


class EnsembleGraphs:
    """The dynamics and rollout graphs of the ``model_based`` interface as numpy callables (kinds that plan
    through them with a context input)."""

    graphs: dict[str, OnnxGraph]

    def step(self, obs: np.ndarray, act: np.ndarray, context: np.ndarray, state: Any = None) -> np.ndarray:
        """``(E, M, o), (E, M, a), (E, M, d)`` → next-observation mean ``(E, M, o)`` float32, raw robot units (no
        ``state``: the model is the meta-trained one)."""
        del state
        return self.graphs["dynamics"](obs, act, context)[0]

    def rollout(self, obs: np.ndarray, actions: np.ndarray, context: np.ndarray) -> np.ndarray:
        """``(E, M, o), (E, M, H, a), (E, M, d)`` → ``(E, M, H, o)``: :meth:`step` chained over the fused horizon."""
        return self.graphs["rollout"](obs, actions, context)[0]


class EncodedContext:
    """The context encoder graph of the ``model_based`` interface (kinds that infer their context with it)."""

    graphs: dict[str, OnnxGraph]

    def encode(self, ctx_obs: np.ndarray, ctx_act: np.ndarray, ctx_next_obs: np.ndarray, ctx_mask: np.ndarray
               ) -> np.ndarray:
        """``(B, K, o), (B, K, a), (B, K, o), (B, K)`` → context ``(B, d)`` float32."""
        return self.graphs["encoder"](ctx_obs, ctx_act, ctx_next_obs, ctx_mask)[0]

    def empty_context(self, adapter: ModelBasedAdapter) -> np.ndarray:
        """The encoder's output for an empty window (what the adapter conditions on when it does not adapt)."""
        return np.asarray(adapter.empty_context()[0], dtype=np.float64)


class ModelBasedBundle(EncodedContext, EnsembleGraphs, LoadedBundle):
    """A loaded, validated ``model_based`` bundle: robot, family, planner defaults and the three graphs."""

    kind: ClassVar[str] = "model_based"
    manifest_class = ModelBasedManifest
    has_dynamics_model = True
    plans = True
    belief_diagnostics = ("context",)
    adaptation_modes = ADAPTED_OR_NOT
    acts_by = "plans through its dynamics model, conditioned on a context inferred from the last K transitions"

    def __init__(self, path: Path, manifest: dict[str, Any], robot: RobotSpec, family: Any,
                 graphs: dict[str, OnnxGraph], planner: PlannerConfig) -> None:
        super().__init__(path, manifest, robot, family, graphs)
        self.planner = planner
        """Planner defaults (the training run's MPC settings)."""
        adaptation = manifest["adaptation"]
        self.context_window: int = adaptation["context_window"]
        self.context_dim: int = adaptation["context_dim"]
        self.ensemble_size: int = adaptation["ensemble_size"]
        self.rollout_horizon: int = adaptation["rollout_horizon"]

    @classmethod
    def check_sections(cls, m: ModelBasedManifest, robot: RobotSpec, where: str
                       ) -> tuple[dict[str, dict[str, dict[str, list[Dim]]]], dict[str, Any]]:
        """Adaptation sizes >= 1 and the planner defaults; the encoder, dynamics and rollout graphs."""
        ad = m.adaptation
        check_sizes(where, "adaptation", vars(ad))
        planner = load_planner(where, m.planner)
        return graph_interfaces(robot.obs_dim, robot.action_dim, ad.context_window, ad.context_dim, ad.ensemble_size,
                                ad.rollout_horizon), {"planner": planner}

    @classmethod
    def smoke_test(cls, m: ModelBasedManifest, robot: RobotSpec, graphs: dict[str, OnnxGraph], parsed: dict[str, Any],
                   where: str) -> None:
        """The encoder on an empty and a one-transition window, then the model at its context."""
        ad = m.adaptation
        b, k, o, a = 2, ad.context_window, robot.obs_dim, robot.action_dim
        mask = np.zeros((b, k), np.float32)
        mask[1, -1] = 1.0
        try:
            (z,) = graphs["encoder"](np.zeros((b, k, o)), np.zeros((b, k, a)), np.zeros((b, k, o)), mask)
        except Exception as exc:  # onnxruntime runtime failures
            raise BundleError(where, "graphs", f"a test run of the graphs failed: {exc}") from None
        check_outputs(where, [("encoder output context", z, (b, ad.context_dim))])
        smoke_rollout(graphs["dynamics"], graphs["rollout"], robot, ad.ensemble_size, ad.rollout_horizon,
                      np.broadcast_to(z[:1], (ad.ensemble_size, 3, ad.context_dim)), where)

    def make_adapter(self, batch: int = 1, adapt: bool = True, planner_overrides: dict | None = None,
                     seed: int = 0) -> ModelBasedAdapter:
        """A model-based adapter over this bundle's graphs, deterministic given ``seed``.

        ``planner_overrides`` replaces planner settings (checked like the manifest's, unknown keys refused);
        ``seed`` seeds the planner's sampling noise unless the overrides set ``seed`` themselves.
        """
        cfg = planner_with(self.planner, planner_overrides, seed)
        return ModelBasedAdapter(self.robot, get_reward(self.family.spec.reward), self.encode, self.step,
                                 self.ensemble_size, self.context_window, cfg, batch=batch, adapt=adapt,
                                 fused=(self.rollout, self.rollout_horizon))



__all__ = ["DYNAMICS_INPUTS", "DYNAMICS_OUTPUTS", "ENCODER_INPUTS", "ENCODER_OUTPUTS", "ROLLOUT_CHAIN_TOLERANCE",
           "ROLLOUT_INPUTS", "ROLLOUT_OUTPUTS", "AdaptationSpec", "EncodedContext", "EnsembleGraphs", "EnsembleSpec",
           "ModelBasedBundle", "ModelBasedManifest", "graph_interfaces"]
