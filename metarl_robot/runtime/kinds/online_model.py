"""The ``online_model`` bundle kind (made by ``online_mbrl``): the ``model_based`` kind whose ensemble's last layer
also adapts online on the robot (docs/online.md).

Files (written by :mod:`metarl_robot.export.online_graphs`, raw robot units in and out, normalisers baked in):

- ``encoder.onnx``: as ``model_based``
- ``dynamics.onnx``: (E, M, ·) observation, action, context and ``head`` (E, F, o), each member's last layer →
  next-observation mean and log-variance
- ``rollout.onnx``: the dynamics graph chained over H actions, with the same ``head``
- ``features.onnx``: (E, M, ·) observation, action, next observation, context → each member's features
  ``phi`` (E, M, F) and the normalised change of the observation (E, M, o): one transition's regression data
- ``prior_head.npy``: the meta-trained last layer ``W0`` (E, F, o), float32 (numpy's own format, no pickle)

Its adapter (:class:`~metarl_robot.runtime.online_adapter.OnlineModelAdapter`) infers the context as the
``model_based`` one does and keeps a posterior over each member's last layer (prior ``W0`` with precision
``online.prior_precision``) updated with every transition, persisting across episodes until forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from metarl_robot.runtime.kinds.model_based import (
    AdaptationSpec,
    EncodedContext,
    check_outputs,
    check_sizes,
    graph_interfaces,
    load_planner,
    planner_with,
    smoke_rollout,
)
from metarl_robot.runtime.last_layer import LastLayerConfig
from metarl_robot.runtime.manifest import BundleError, LoadedBundle, ManifestCommon
from metarl_robot.runtime.online_adapter import OnlineModelAdapter
from metarl_robot.runtime.onnx_graph import Dim, OnnxGraph
from metarl_robot.runtime.planner import PlannerConfig
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import RobotSpec

PRIOR_HEAD_FILE = "prior_head.npy"


@dataclass(frozen=True)
class OnlineSpec:
    """The online last layer: its size and its prior."""

    feature_dim: int
    """F: features each member's last layer reads (its last hidden layer and a constant 1)."""
    prior_precision: float
    """alpha: precision of the prior around the meta-trained last layer, relative to the noise."""
    prior_file: str
    """The ``.npy`` file holding the prior mean ``W0`` (E, F, o), listed under ``files``."""


@dataclass(frozen=True)
class OnlineModelManifest(ManifestCommon):
    """An ``online_model`` bundle.yaml: the ``model_based`` keys and the online last layer."""

    adaptation: AdaptationSpec
    online: OnlineSpec
    planner: dict[str, Any]


def online_graph_interfaces(obs_dim: int, act_dim: int, context_window: int, context_dim: int, ensemble_size: int,
                            rollout_horizon: int, feature_dim: int) -> dict[str, dict[str, dict[str, list[Dim]]]]:
    """The ``model_based`` interfaces with each member's last layer ``head`` as an input of the dynamics and the
    rollout graph, and the ``features`` graph."""
    e, f, o = ensemble_size, feature_dim, obs_dim
    out = graph_interfaces(obs_dim, act_dim, context_window, context_dim, ensemble_size, rollout_horizon)
    for name in ("dynamics", "rollout"):
        out[name]["inputs"]["head"] = [e, f, o]
    out["features"] = {
        "inputs": {"obs": [e, "rows", o], "action": [e, "rows", act_dim], "next_obs": [e, "rows", o],
                   "context": [e, "rows", context_dim]},
        "outputs": {"features": [e, "rows", f], "target": [e, "rows", o]},
    }
    return out


class OnlineModelBundle(EncodedContext, LoadedBundle):
    """A loaded, validated ``online_model`` bundle: the model-based graphs with a last-layer input, the features
    graph, the prior last layer and the planner defaults."""

    kind: ClassVar[str] = "online_model"
    manifest_class = OnlineModelManifest
    has_dynamics_model = True
    plans = True
    belief_diagnostics = ("context",)
    adaptation_modes: ClassVar[dict[str, dict[str, bool]]] = {
        "adapted": {"adapt": True, "online": True}, "context_only": {"adapt": True, "online": False},
        "online_only": {"adapt": False, "online": True}, "unadapted": {"adapt": False, "online": False}}
    acts_by = ("plans through its dynamics model, conditioned on a context inferred from the last K transitions, "
               "its last layer fitted online to every transition since it was last forgotten")

    def __init__(self, path: Path, manifest: dict[str, Any], robot: RobotSpec, family: Any,
                 graphs: dict[str, OnnxGraph], planner: PlannerConfig, prior_head: np.ndarray,
                 last_layer: LastLayerConfig) -> None:
        super().__init__(path, manifest, robot, family, graphs)
        self.planner = planner
        """Planner defaults (the training run's MPC settings)."""
        self.prior_head = prior_head
        """(E, F, o) the meta-trained last layer (float32)."""
        adaptation = manifest["adaptation"]
        self.context_window: int = adaptation["context_window"]
        self.context_dim: int = adaptation["context_dim"]
        self.ensemble_size: int = adaptation["ensemble_size"]
        self.rollout_horizon: int = adaptation["rollout_horizon"]
        self.last_layer = last_layer
        """The online last layer's prior precision."""

    @classmethod
    def check_sections(cls, m: OnlineModelManifest, robot: RobotSpec, where: str
                       ) -> tuple[dict[str, dict[str, dict[str, list[Dim]]]], dict[str, Any]]:
        """Adaptation sizes, the online section and its prior file (listed, numpy, the right shape, finite), the
        planner defaults; the five graphs."""
        ad, online = m.adaptation, m.online
        check_sizes(where, "adaptation", vars(ad))
        check_sizes(where, "online", {"feature_dim": online.feature_dim})
        last_layer = LastLayerConfig(float(online.prior_precision))
        try:
            last_layer.validate()
        except ValueError as exc:
            raise BundleError(where, "online.prior_precision", str(exc).removeprefix("prior_precision: ")) from None
        prior = _load_prior(Path(where), m, (ad.ensemble_size, online.feature_dim, robot.obs_dim))
        planner = load_planner(where, m.planner)
        return online_graph_interfaces(robot.obs_dim, robot.action_dim, ad.context_window, ad.context_dim,
                                       ad.ensemble_size, ad.rollout_horizon, online.feature_dim), \
            {"planner": planner, "prior_head": prior, "last_layer": last_layer}

    @classmethod
    def smoke_test(cls, m: OnlineModelManifest, robot: RobotSpec, graphs: dict[str, OnnxGraph], parsed: dict[str, Any],
                   where: str) -> None:
        """The encoder on an empty window; the model at the prior last layer (the fused rollout its chain); the
        features of a neutral transition, finite and of the declared sizes."""
        ad = m.adaptation
        e, k, o, a, d = ad.ensemble_size, ad.context_window, robot.obs_dim, robot.action_dim, ad.context_dim
        prior = parsed["prior_head"]
        try:
            (z,) = graphs["encoder"](np.zeros((1, k, o)), np.zeros((1, k, a)), np.zeros((1, k, o)),
                                     np.zeros((1, k)))
            ctx = np.broadcast_to(z, (e, 3, d))
            phi, target = graphs["features"](np.zeros((e, 3, o)), np.broadcast_to(robot.safe_action, (e, 3, a)),
                                             np.broadcast_to(robot.obs_scale, (e, 3, o)), ctx)
        except Exception as exc:  # onnxruntime runtime failures
            raise BundleError(where, "graphs", f"a test run of the graphs failed: {exc}") from None
        check_outputs(where, [("encoder output context", z, (1, d)),
                              ("features output features", phi, (e, 3, m.online.feature_dim)),
                              ("features output target", target, (e, 3, o))])
        smoke_rollout(_with_head(graphs["dynamics"], prior), _with_head(graphs["rollout"], prior), robot, e,
                      ad.rollout_horizon, ctx, where)

    def step(self, obs: np.ndarray, act: np.ndarray, context: np.ndarray, state: np.ndarray | None = None
             ) -> np.ndarray:
        """``(E, M, o), (E, M, a), (E, M, d)`` and a last layer ``(E, F, o)`` (default: the prior) → next-observation
        mean ``(E, M, o)`` float32, raw robot units."""
        head = self.prior_head if state is None else np.ascontiguousarray(state, dtype=np.float32)
        return self.graphs["dynamics"](obs, act, context, head)[0]

    def model_state(self, adapter: Any) -> np.ndarray:
        """The last layer ``(E, F, o)`` the adapter plans with now (its posterior under the latency it plans for)."""
        return np.asarray(adapter.weights[0], dtype=np.float32).copy()

    def rollout(self, obs: np.ndarray, actions: np.ndarray, context: np.ndarray, head: np.ndarray) -> np.ndarray:
        """``(E, M, o), (E, M, H, a), (E, M, d), (E, F, o)`` → ``(E, M, H, o)``."""
        return self.graphs["rollout"](obs, actions, context, head)[0]

    def features(self, obs: np.ndarray, act: np.ndarray, next_obs: np.ndarray, context: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
        """``(E, M, ·)`` transitions → features ``(E, M, F)`` and normalised deltas ``(E, M, o)``."""
        phi, target = self.graphs["features"](obs, act, next_obs, context)
        return phi, target

    def make_adapter(self, batch: int = 1, adapt: bool = True, planner_overrides: dict | None = None,
                     seed: int = 0, online: bool = True) -> OnlineModelAdapter:
        """The online adapter over this bundle's graphs. ``adapt`` switches the context encoder, ``online`` the
        last layer's updates (both on: as on the robot); planner settings as for ``model_based``."""
        cfg = planner_with(self.planner, planner_overrides, seed)
        return OnlineModelAdapter(self.robot, get_reward(self.family.spec.reward), self.encode, self.step,
                                  self.features, self.prior_head, self.last_layer, self.ensemble_size,
                                  self.context_window, cfg, batch=batch, adapt=adapt, online=online,
                                  fused=(self.rollout, self.rollout_horizon))



def _with_head(graph: OnnxGraph, head: np.ndarray):
    """A graph taking ``head`` last, as a callable of the other inputs (for the shared rollout smoke run)."""
    return lambda *arrays: graph(*arrays, head)


def _load_prior(path: Path, m: OnlineModelManifest, shape: tuple[int, int, int]) -> np.ndarray:
    """The prior last layer: a listed ``.npy`` file (its hash was checked with the others), float32, ``shape``,
    finite. Loaded without pickle."""
    where, name = str(path), m.online.prior_file
    if name not in m.files:
        raise BundleError(where, "online.prior_file", f"{name!r} is not listed under files (its sha256 is unknown)")
    try:
        prior = np.load(path / name, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BundleError(where, f"files.{name}", f"not a numpy .npy array: {exc}") from None
    if prior.dtype != np.float32 or prior.shape != shape:
        raise BundleError(where, f"files.{name}", f"holds a {prior.dtype} array of shape {prior.shape}, expected "
                          f"float32 {shape} (ensemble_size, feature_dim, observation size)")
    if not np.isfinite(prior).all():
        raise BundleError(where, f"files.{name}", "the prior last layer holds non-finite values (NaN or Inf)")
    return prior


__all__ = ["PRIOR_HEAD_FILE", "OnlineModelBundle", "OnlineModelManifest", "OnlineSpec", "online_graph_interfaces"]
