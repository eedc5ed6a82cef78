"""The ``awr_policy`` bundle kind (made by ``macaw``): a Gaussian MLP policy, its value function and advantage head,
meta-trained offline so that advantage-weighted regression steps on a task's last K episodes adapt it; the steps run
on the robot in numpy (:mod:`metarl_robot.runtime.awr_policy`, docs/macaw.md).

Files (written by :mod:`metarl_robot.export.awr_policy_graphs`):

- ``policy.onnx``: the policy's mean with its weights as graph inputs, the ``meta_policy`` kind's graph
  (:func:`~metarl_robot.runtime.kinds.meta_policy.meta_policy_interfaces`): the adapter feeds the weights it acts with
- ``awr_params.npz``: float32 arrays, loaded without pickle: the policy ``param_0`` ... (weights, biases, then the
  fixed log standard deviation), the value function ``value_0`` ..., the advantage head ``head_0`` ... (none without
  one), the learned inner learning rates ``value_rates`` and ``policy_rates`` (one per tensor; the policy's then the
  head's) and ``advantage_weight`` (1,) (lambda)

Its adapter (:class:`~metarl_robot.runtime.awr_policy.AWRPolicyAdapter`) acts with the policy's mean and, at each
episode start, adapts from the meta-parameters to the env's last ``adapt_episodes`` episodes; the window and the
adapted weights are carried across episodes. It does not plan and has no dynamics model; of ``planner_overrides``
it takes only ``adapt_episodes``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from itertools import pairwise
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from metarl_robot.runtime.awr_policy import AWR_SETTINGS, AWRNetworks, AWRPolicyAdapter, AWRStepConfig
from metarl_robot.runtime.kinds.meta_policy import (
    check_log_std,
    check_policy_graph,
    load_param_file,
    meta_policy_interfaces,
    param_shapes,
)
from metarl_robot.runtime.manifest import BundleError, LoadedBundle, ManifestCommon
from metarl_robot.runtime.onnx_graph import Dim, OnnxGraph
from metarl_robot.runtime.policy_gradient import feature_dim
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import RobotSpec
from metarl_robot.spec.schema import SpecError

PARAMS_FILE = "awr_params.npz"
"""The meta-parameters, rates and lambda."""


@dataclass(frozen=True)
class AWRStepSpec:
    """The adaptation step (:class:`~metarl_robot.runtime.awr_policy.AWRStepConfig`'s fields, all stated)."""

    steps: int
    discount: float
    bootstrap: bool
    return_scale: float
    temperature: float
    weight_clip: float
    normalize_advantages: bool
    adapt_episodes: int
    min_transitions: int


@dataclass(frozen=True)
class AWRPolicySpec:
    """The networks' sizes, their parameter file and the step."""

    hidden: list[int]
    """Widths of the tanh hidden layers of the policy and of the value function."""
    feature_dim: int
    """F: width of the policy features of an observation."""
    advantage_head_hidden: int
    """Width of the advantage head's hidden layer; 0: no head."""
    params_file: str
    """The ``.npz`` file of the parameters, listed under ``files``."""
    step: AWRStepSpec
    """The adaptation step."""


@dataclass(frozen=True)
class AWRPolicyManifest(ManifestCommon):
    """An ``awr_policy`` bundle.yaml: the common keys and the ``awr_policy`` section. No planner: the policy acts."""

    awr_policy: AWRPolicySpec


def mlp_shapes(widths: list[int]) -> list[tuple[int, ...]]:
    """``(W, b)`` shapes of an MLP of these widths."""
    out: list[tuple[int, ...]] = []
    for fan_in, fan_out in pairwise(widths):
        out += [(fan_in, fan_out), (fan_out,)]
    return out


def awr_param_shapes(f: int, a: int, hidden: list[int], head_hidden: int) -> dict[str, tuple[int, ...]]:
    """Every array of the parameter file and its shape (module docstring)."""
    policy = param_shapes(f, a, hidden)
    value = mlp_shapes([f, *hidden, 1])
    head = mlp_shapes([hidden[-1] + a, head_hidden, 1]) if head_hidden else []
    return {**{f"param_{i}": s for i, s in enumerate(policy)}, **{f"value_{i}": s for i, s in enumerate(value)},
            **{f"head_{i}": s for i, s in enumerate(head)}, "value_rates": (len(value),),
            "policy_rates": (len(policy) - 1 + len(head),), "advantage_weight": (1,)}


def _role(key: str) -> str:
    name, _, index = key.rpartition("_")
    if not index.isdigit():
        return {"value_rates": "the value function's inner learning rates", "policy_rates": "the policy's and the "
                "head's inner learning rates", "advantage_weight": "lambda"}.get(key, key)
    part = {"param": "the policy", "value": "the value function", "head": "the advantage head"}[name]
    return f"{part}'s tensor {index}"


class AWRPolicyBundle(LoadedBundle):
    """A loaded, validated ``awr_policy`` bundle (MACAW): robot, family, the policy-mean graph, the networks and the
    step."""

    kind: ClassVar[str] = "awr_policy"
    manifest_class = AWRPolicyManifest
    meta_test_episodes = (0, 1, 3, 5)
    meta_test_resets = True
    adapter_settings = AWR_SETTINGS
    acts_by = ("is its policy's mean, adapted at each episode start by advantage-weighted regression steps from the "
               "meta-parameters on the last few episodes, kept across episodes until forgotten")

    def __init__(self, path: Path, manifest: dict[str, Any], robot: RobotSpec, family: Any,
                 graphs: dict[str, OnnxGraph], nets: AWRNetworks, step: AWRStepConfig) -> None:
        super().__init__(path, manifest, robot, family, graphs)
        self.nets = nets
        """The meta-parameters (float64 copies), rates and lambda: what every adaptation starts from."""
        self.awr_step = step
        """The adaptation step, as meta-training took it."""

    @classmethod
    def check_sections(cls, m: AWRPolicyManifest, robot: RobotSpec, where: str
                       ) -> tuple[dict[str, dict[str, dict[str, list[Dim]]]], dict[str, Any]]:
        """Sizes (the features the robot spec gives), the step, the parameter file (listed, without pickle, exactly
        its arrays, float32, finite, positive rates); the ``policy`` graph."""
        spec = m.awr_policy
        if not spec.hidden or min(spec.hidden) < 1:
            raise BundleError(where, "awr_policy.hidden", f"must be a non-empty list of widths >= 1, got {spec.hidden}")
        if spec.advantage_head_hidden < 0:
            raise BundleError(where, "awr_policy.advantage_head_hidden",
                              f"must be >= 0 (0: no advantage head), got {spec.advantage_head_hidden}")
        want_f = feature_dim(robot)
        if spec.feature_dim != want_f:
            raise BundleError(where, "awr_policy.feature_dim", f"{spec.feature_dim} differs from the width of the "
                              f"robot's policy features, {want_f}")
        step = AWRStepConfig(**{f.name: getattr(spec.step, f.name) for f in fields(AWRStepSpec)})
        try:
            step.validate()
        except SpecError as exc:
            raise BundleError(where, f"awr_policy.step.{exc.field}", exc.problem) from None
        shapes = awr_param_shapes(want_f, robot.action_dim, spec.hidden, spec.advantage_head_hidden)
        arrays = load_param_file(Path(where), m.files, spec.params_file, "awr_policy.params_file", shapes, _role,
                                 f"expected exactly {', '.join(shapes)}")
        n_policy = len(param_shapes(want_f, robot.action_dim, spec.hidden))
        check_log_std(arrays[f"param_{n_policy - 1}"], Path(where), f"files.{spec.params_file}",
                      f"param_{n_policy - 1}")
        def f64(prefix: str) -> list[np.ndarray]:
            return [arrays[k].astype(np.float64) for k in shapes
                    if k.rpartition("_")[0] == prefix and k.rpartition("_")[2].isdigit()]

        nets = AWRNetworks(value=f64("value"), policy=f64("param"), head=f64("head"),
                           value_rates=arrays["value_rates"].astype(np.float64),
                           policy_rates=arrays["policy_rates"].astype(np.float64),
                           advantage_weight=float(arrays["advantage_weight"][0]))
        try:
            nets.check()
        except ValueError as exc:
            raise BundleError(where, f"files.{spec.params_file}", str(exc)) from None
        return meta_policy_interfaces(want_f, robot.action_dim, spec.hidden), {"nets": nets, "step": step}

    @classmethod
    def smoke_test(cls, m: AWRPolicyManifest, robot: RobotSpec, graphs: dict[str, OnnxGraph], parsed: dict[str, Any],
                   where: str) -> None:
        """The policy graph at the meta-parameters equals numpy's MLP over them (finite, shaped)."""
        check_policy_graph(graphs, parsed["nets"].policy, robot, m.awr_policy.feature_dim, m.awr_policy.params_file,
                           where)

    def mean(self, params: list[np.ndarray], feats: np.ndarray) -> np.ndarray:
        """``params`` (the policy's order, the log std last and unused), features ``(N, F)`` → the mean ``(N, a)``
        (normalised units, float64) from the ONNX graph: the adapter's ``mean_fn``."""
        return self.graphs["policy"](feats, *params[:-1])[0].astype(np.float64)

    def make_adapter(self, batch: int = 1, adapt: bool = True, planner_overrides: dict | None = None,
                     seed: int = 0) -> AWRPolicyAdapter:
        """An :class:`~metarl_robot.runtime.awr_policy.AWRPolicyAdapter` over this bundle's graph and networks.
        ``adapt=False``: the meta-policy throughout. It acts with the mean, so ``seed`` changes nothing (the
        signature every kind shares). ``planner_overrides`` may hold only ``adapt_episodes``."""
        step = self.awr_step.with_settings(planner_overrides, f"an {self.kind} bundle does not plan ({self.acts_by})")
        return AWRPolicyAdapter(self.robot, get_reward(self.family.spec.reward), self.nets, step, batch=batch,
                                seed=seed, adapt=adapt, mean_fn=self.mean)


__all__ = ["PARAMS_FILE", "AWRPolicyBundle", "AWRPolicyManifest", "AWRPolicySpec", "AWRStepSpec",
           "awr_param_shapes"]
