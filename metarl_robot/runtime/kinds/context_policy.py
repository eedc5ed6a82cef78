"""The ``context_policy`` bundle kind (made by PEARL): a policy conditioned on a belief over a latent task.

Graphs (written by :mod:`metarl_robot.export.pearl_graphs`; interfaces in :mod:`metarl_robot.runtime.context_policy`):

- ``pearl_factors.onnx``: one transition (B, ·) → a Gaussian factor of the belief over z (B, d)
- ``pearl_policy.onnx``: observation (B, o), z (B, d) → action (B, a), inside the action box

Its adapter (:class:`~metarl_robot.runtime.context_policy.ContextPolicyAdapter`) keeps the product of the factors
with the prior and acts at the posterior mean. It does not plan and has no dynamics model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from metarl_robot.runtime.context_policy import ContextPolicyAdapter, pearl_graph_interfaces
from metarl_robot.runtime.kinds.model_based import check_outputs
from metarl_robot.runtime.manifest import (
    BundleError,
    LoadedBundle,
    ManifestCommon,
    refuse_planner_overrides,
)
from metarl_robot.runtime.onnx_graph import OnnxGraph
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import RobotSpec

CONTEXT_POLICY_ALGORITHMS = ("pearl",)
"""Algorithms whose context-policy graphs this runtime runs (the factor/policy interface)."""


@dataclass(frozen=True)
class ContextPolicyAdaptation:
    """How a context-policy bundle adapts: the algorithm whose graphs it holds and the size of its belief."""

    algorithm: str
    """Algorithm that produced the graphs (one of :data:`CONTEXT_POLICY_ALGORITHMS`)."""
    latent_dim: int
    """d: size of the latent task variable z."""


@dataclass(frozen=True)
class ContextPolicyManifest(ManifestCommon):
    """A ``context_policy`` bundle.yaml: the common keys and the belief's size. No planner: the policy graph acts."""

    adaptation: ContextPolicyAdaptation


class ContextPolicyBundle(LoadedBundle):
    """A loaded, validated ``context_policy`` bundle (PEARL): robot, family and the factor and policy graphs."""

    kind: ClassVar[str] = "context_policy"
    manifest_class = ContextPolicyManifest
    belief_diagnostics = ("context_mean", "context_var")
    meta_test_episodes = (0, 1, 2)
    acts_by = "is its policy, acting on the posterior mean of its belief over the task"

    def __init__(self, path: Path, manifest: dict[str, Any], robot: RobotSpec, family: Any,
                 graphs: dict[str, OnnxGraph]) -> None:
        super().__init__(path, manifest, robot, family, graphs)
        adaptation = manifest["adaptation"]
        self.algorithm: str = adaptation["algorithm"]
        """Algorithm that produced the graphs (``pearl``)."""
        self.latent_dim: int = adaptation["latent_dim"]
        """d: size of the latent task variable z."""

    @classmethod
    def check_sections(cls, m: ContextPolicyManifest, robot: RobotSpec, where: str
                       ) -> tuple[dict[str, dict[str, dict[str, list]]], dict[str, Any]]:
        """The belief's algorithm and size (there is no planner section: the policy graph acts); the factor and
        policy graphs."""
        ad = m.adaptation
        if ad.algorithm not in CONTEXT_POLICY_ALGORITHMS:
            raise BundleError(where, "adaptation.algorithm", f"got {ad.algorithm!r}; this runtime runs context-policy "
                              f"graphs of: {', '.join(CONTEXT_POLICY_ALGORITHMS)}")
        if ad.latent_dim < 1:
            raise BundleError(where, "adaptation.latent_dim", f"must be >= 1, got {ad.latent_dim}")
        return pearl_graph_interfaces(robot.obs_dim, robot.action_dim, ad.latent_dim), {}

    @classmethod
    def smoke_test(cls, m: ContextPolicyManifest, robot: RobotSpec, graphs: dict[str, OnnxGraph],
                   parsed: dict[str, Any], where: str) -> None:
        """Neutral transitions (zeros, and one at the robot's observation scale with the safe command) must give
        finite factors with positive variance; the policy at the prior mean and at those factors' z must give
        finite actions inside the action box (the box the safety layer would otherwise have to clip to)."""
        o, a, d = robot.obs_dim, robot.action_dim, m.adaptation.latent_dim
        obs = np.stack([np.zeros(o), robot.obs_scale]).astype(np.float32)
        action = np.broadcast_to(robot.safe_action, (2, a))
        try:
            mean, logvar = graphs["factors"](obs, action, np.zeros(2), obs[::-1])
            z = np.concatenate([np.zeros((2, d), np.float32), np.nan_to_num(mean)])  # the prior mean, and a factor's
            (act,) = graphs["policy"](np.concatenate([obs, obs]), z)
        except Exception as exc:  # onnxruntime runtime failures
            raise BundleError(where, "graphs", f"a test run of the graphs failed: {exc}") from None
        check_outputs(where, [("factors output factor_mean", mean, (2, d)),
                              ("factors output factor_logvar", logvar, (2, d)), ("policy output action", act, (4, a))])
        if not np.all(np.isfinite(np.exp(-logvar.astype(np.float64)))):
            raise BundleError(where, "graphs.factors", f"factor_logvar: a test run returned {float(logvar.min()):.3g}"
                              ", whose precision exp(-log_var) overflows; a belief factor needs a finite precision")
        outside = (act < robot.action_low) | (act > robot.action_high)
        if outside.any():
            raise BundleError(where, "graphs.policy", f"action: a test run returned "
                              f"{act[outside.any(axis=1)][0].tolist()}, outside the robot's action box "
                              f"[{robot.action_low.tolist()}, {robot.action_high.tolist()}]: the policy graph does not "
                              "end in the robot's box")

    def transition_factors(self, obs: np.ndarray, action: np.ndarray, reward: np.ndarray, next_obs: np.ndarray
                           ) -> list[np.ndarray]:
        """``(B, o), (B, a), (B,), (B, o)`` → ``[factor_mean (B, d), factor_logvar (B, d)]`` float32."""
        return self.graphs["factors"](obs, action, reward, next_obs)

    def policy(self, obs: np.ndarray, z: np.ndarray) -> list[np.ndarray]:
        """``(B, o), (B, d)`` → ``[action (B, a)]`` float32, inside the robot's action box."""
        return self.graphs["policy"](obs, z)

    def make_adapter(self, batch: int = 1, adapt: bool = True, planner_overrides: dict | None = None,
                     seed: int = 0) -> ContextPolicyAdapter:
        """A :class:`~metarl_robot.runtime.context_policy.ContextPolicyAdapter` over this bundle's graphs.

        ``adapt=False`` keeps z at the prior mean (the unadapted policy, for comparisons). The policy acts
        deterministically (``box(tanh(mean))`` at the posterior mean), so ``seed`` changes nothing; it is
        accepted for the signature every bundle kind shares. ``planner_overrides`` must be empty: this kind
        does not plan.
        """
        refuse_planner_overrides(self, planner_overrides)
        # The graphs themselves, not the bound methods above: the adapter runs a checked OnnxGraph's session on its
        # own float32 buffers (the same numbers, without re-checking and re-copying its inputs every step).
        return ContextPolicyAdapter(self.robot, get_reward(self.family.spec.reward), self.graphs["factors"],
                                    self.graphs["policy"], self.latent_dim, batch=batch, adapt=adapt)

    def empty_context(self, adapter: ContextPolicyAdapter) -> np.ndarray:
        """The prior mean of the belief."""
        return np.asarray(adapter.posterior()[0][0], dtype=np.float64)


__all__ = ["CONTEXT_POLICY_ALGORITHMS", "ContextPolicyAdaptation", "ContextPolicyBundle", "ContextPolicyManifest"]
