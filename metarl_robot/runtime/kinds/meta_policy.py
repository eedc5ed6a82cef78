"""The ``meta_policy`` bundle kind (made by ``mbmpo``): a Gaussian MLP meta-policy that adapts to the robot by one
vanilla policy-gradient step per finished episode, taken on the robot in numpy (docs/mbmpo.md).

Files (written by :mod:`metarl_robot.export.meta_policy_graphs`):

- ``policy.onnx``: the MLP's mean with every weight and bias as a graph *input*, so the adapter feeds the weights it
  acts with (adapted ones after a step): ``features`` (rows, F) and ``param_0`` ... ``param_{2L+1}`` (W0, b0, ...,
  W_out, b_out) → ``mean`` (rows, a), in normalised action units
- ``meta_params.npz``: the meta-trained parameters ``param_0`` ... ``param_{2L+2}`` (the weights and biases, then
  the log standard deviation), float32 as trained (numpy's own format, loaded without pickle)

Its adapter (:class:`~metarl_robot.runtime.meta_policy.MetaPolicyAdapter`) samples its actions (a seeded generator:
the step needs the log-probability of what it did), takes one inner step per ``episodes_per_step`` ended episodes
(pooled; 1: at each episode start on the episode just ended), and carries the adapted weights and the episodes pooled
so far across episodes until forgotten. It does not plan and has no dynamics model; of ``planner_overrides`` it takes
only ``episodes_per_step`` (a deployment's choice, e.g. ``metarl eval --set episodes_per_step=4``).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from itertools import pairwise
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from metarl_robot.runtime.manifest import BundleError, LoadedBundle, ManifestCommon
from metarl_robot.runtime.meta_policy import RUNTIME_SETTINGS, InnerStepConfig, InnerStepError, MetaPolicyAdapter
from metarl_robot.runtime.onnx_graph import Dim, OnnxGraph
from metarl_robot.runtime.policy_gradient import FEATURE_CLIP, feature_dim, policy_features, policy_mean
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import RobotSpec

POLICY_FILE = "policy.onnx"
"""The policy-mean graph."""
PARAMS_FILE = "meta_params.npz"
"""The meta-trained parameters."""
SMOKE_TOLERANCE = 1e-4
"""Largest difference (normalised action units, relative to 1 + |mean|) the smoke run allows between the graph's mean
and numpy's MLP over the bundle's meta-parameters: float32 rounding is ~1e-6; another network is orders larger."""


@dataclass(frozen=True)
class InnerStepSpec:
    """The inner step meta-training took (the step's own values stated: the robot must take the same step)."""

    step_size: float
    discount: float
    baseline_reg: float
    min_transitions: int
    episodes_per_step: int = 1
    """Episodes pooled per step (the run's ``mbmpo.inner.episodes_per_step``); absent in bundles exported before
    pooling existed, which step on every episode."""


@dataclass(frozen=True)
class MetaPolicySpec:
    """The policy's sizes, its parameter file and its inner step."""

    hidden: list[int]
    """Widths of the tanh hidden layers."""
    feature_dim: int
    """F: width of the policy's features of an observation (:func:`~metarl_robot.runtime.policy_gradient.
    policy_features`: the observation size plus one per periodic component)."""
    params_file: str
    """The ``.npz`` file holding the meta-parameters, listed under ``files``."""
    inner: InnerStepSpec
    """The inner step (:class:`~metarl_robot.runtime.meta_policy.InnerStepConfig`)."""


@dataclass(frozen=True)
class MetaPolicyManifest(ManifestCommon):
    """A ``meta_policy`` bundle.yaml: the common keys and the ``meta_policy`` section. No planner: the policy acts."""

    meta_policy: MetaPolicySpec


def param_shapes(feature_dim: int, action_dim: int, hidden: tuple[int, ...] | list[int]) -> list[tuple[int, ...]]:
    """The shapes of ``param_0`` ... in the policy's order: ``(F, H0), (H0,), ..., (H, a), (a,)`` and the log standard
    deviation ``(a,)`` last."""
    widths = [feature_dim, *hidden, action_dim]
    shapes: list[tuple[int, ...]] = []
    for fan_in, fan_out in pairwise(widths):
        shapes += [(fan_in, fan_out), (fan_out,)]
    return [*shapes, (action_dim,)]


def meta_policy_interfaces(feature_dim: int, action_dim: int, hidden: tuple[int, ...] | list[int]
                           ) -> dict[str, dict[str, dict[str, list[Dim]]]]:
    """The ``policy`` graph's interface: ``features`` then every weight and bias (not the log standard deviation)."""
    inputs: dict[str, list[Dim]] = {"features": ["rows", feature_dim]}
    for i, shape in enumerate(param_shapes(feature_dim, action_dim, hidden)[:-1]):
        inputs[f"param_{i}"] = list(shape)
    return {"policy": {"inputs": inputs, "outputs": {"mean": ["rows", action_dim]}}}


def _role(i: int, count: int) -> str:
    """What ``param_i`` of ``count`` parameters is, for messages."""
    if i == count - 1:
        return "the log standard deviation"
    layer, bias = divmod(i, 2)
    last = layer == (count - 1) // 2 - 1
    return f"{'the output layer' if last else f'hidden layer {layer}'}'s {'bias' if bias else 'weight'}"


class MetaPolicyBundle(LoadedBundle):
    """A loaded, validated ``meta_policy`` bundle (MB-MPO): robot, family, the policy-mean graph, the meta-parameters
    and the inner step."""

    kind: ClassVar[str] = "meta_policy"
    manifest_class = MetaPolicyManifest
    samples_actions = True
    meta_test_episodes = (0, 1, 2)
    meta_test_resets = True
    adapter_settings = RUNTIME_SETTINGS
    acts_by = ("is its Gaussian policy, sampling its actions and adapted by one policy-gradient step on each finished "
               "episode, the adapted weights kept across episodes until forgotten")

    def __init__(self, path: Path, manifest: dict[str, Any], robot: RobotSpec, family: Any,
                 graphs: dict[str, OnnxGraph], meta_params: list[np.ndarray], inner: InnerStepConfig) -> None:
        super().__init__(path, manifest, robot, family, graphs)
        self.meta_params = meta_params
        """``param_0`` ... (float32, the policy's order): what every adapter starts from."""
        self.inner = inner
        """The inner step, as meta-training took it."""
        spec = manifest["meta_policy"]
        self.hidden: tuple[int, ...] = tuple(spec["hidden"])
        self.feature_dim: int = spec["feature_dim"]

    @classmethod
    def check_sections(cls, m: MetaPolicyManifest, robot: RobotSpec, where: str
                       ) -> tuple[dict[str, dict[str, dict[str, list[Dim]]]], dict[str, Any]]:
        """The sizes (the features the robot spec gives), the inner step, the parameter file (listed, numpy without
        pickle, exactly the policy's arrays with their shapes, float32, finite); the ``policy`` graph."""
        spec = m.meta_policy
        if not spec.hidden or min(spec.hidden) < 1:
            raise BundleError(where, "meta_policy.hidden",
                              f"must be a non-empty list of widths >= 1, got {spec.hidden}")
        want_f = feature_dim(robot)
        if spec.feature_dim != want_f:
            raise BundleError(where, "meta_policy.feature_dim", f"{spec.feature_dim} differs from the width of the "
                              f"robot's policy features, {want_f} (the observation size {robot.obs_dim} plus one per "
                              "periodic component)")
        inner = InnerStepConfig(**{f.name: getattr(spec.inner, f.name) for f in fields(InnerStepSpec)})
        try:
            inner.validate()
        except InnerStepError as exc:
            raise BundleError(where, f"meta_policy.inner.{exc.field}", exc.problem) from None
        params = _load_params(Path(where), m, param_shapes(want_f, robot.action_dim, spec.hidden))
        return meta_policy_interfaces(want_f, robot.action_dim, spec.hidden), {"meta_params": params, "inner": inner}

    @classmethod
    def smoke_test(cls, m: MetaPolicyManifest, robot: RobotSpec, graphs: dict[str, OnnxGraph], parsed: dict[str, Any],
                   where: str) -> None:
        """The graph at the meta-parameters on zero features, on the features of observations at the robot's scale
        and on clipped ones: finite means of shape (rows, a), equal to numpy's MLP over the meta-parameters (a graph
        of another network with the same interface is refused)."""
        check_policy_graph(graphs, parsed["meta_params"], robot, m.meta_policy.feature_dim,
                           m.meta_policy.params_file, where)

    def mean(self, params: list[np.ndarray], feats: np.ndarray) -> np.ndarray:
        """``params`` (the policy's order, the log standard deviation last and unused) and features ``(N, F)`` →
        the mean ``(N, a)`` in normalised action units, float64 (the adapter's ``mean_fn``)."""
        return self.graphs["policy"](feats, *params[:-1])[0].astype(np.float64)

    def make_adapter(self, batch: int = 1, adapt: bool = True, planner_overrides: dict | None = None,
                     seed: int = 0, deterministic: bool = False) -> MetaPolicyAdapter:
        """A :class:`~metarl_robot.runtime.meta_policy.MetaPolicyAdapter` over this bundle's graph and
        meta-parameters: ``seed`` seeds its action noise; ``adapt=False`` the meta-policy throughout (no step);
        ``deterministic`` acts with the mean (comparisons; the step needs sampled actions). This kind does not plan:
        ``planner_overrides`` may hold only the :data:`~metarl_robot.runtime.meta_policy.RUNTIME_SETTINGS`
        (``episodes_per_step``: a bundle trained with 1 may pool), any other key is refused."""
        inner = self.inner.with_settings(planner_overrides, f"a {self.kind} bundle does not plan ({self.acts_by})")
        return MetaPolicyAdapter(self.robot, get_reward(self.family.spec.reward),
                                 [p.astype(np.float64) for p in self.meta_params], inner, batch=batch, seed=seed,
                                 adapt=adapt, deterministic=deterministic, mean_fn=self.mean)


def check_policy_graph(graphs: dict[str, OnnxGraph], params: list[np.ndarray], robot: RobotSpec, feature_dim: int,
                       params_file: str, where: str) -> None:
    """The smoke run of a policy-mean graph whose weights are inputs: at ``params`` (the policy's order, the log std
    last) on zero features, the features of observations at the robot's scale and clipped ones, finite means of
    shape (rows, a) equal to numpy's MLP (a graph of another network with the same interface is refused)."""
    f, a = feature_dim, robot.action_dim
    scale = np.asarray(robot.obs_scale, dtype=np.float64)
    feats = np.concatenate([np.zeros((1, f)), policy_features(robot, np.stack([scale, -scale, 3 * scale])),
                            np.full((1, f), FEATURE_CLIP), np.full((1, f), -FEATURE_CLIP)])
    try:
        (mean,) = graphs["policy"](feats, *params[:-1])
    except Exception as exc:  # onnxruntime runtime failures
        raise BundleError(where, "graphs", f"a test run of the policy graph failed: {exc}") from None
    if mean.shape != (len(feats), a):
        raise BundleError(where, "graphs.policy", f"mean: a test run on {len(feats)} rows returned shape "
                          f"{mean.shape}, expected {(len(feats), a)}")
    if not np.isfinite(mean).all():
        raise BundleError(where, "graphs.policy", "mean: a test run at the meta-parameters returned non-finite "
                          "values")
    want = policy_mean([p.astype(np.float64) for p in params], feats)
    diff = float(np.max(np.abs(mean - want) / (1.0 + np.abs(want))))
    if diff > SMOKE_TOLERANCE:
        raise BundleError(where, "graphs.policy", f"mean: differs from the MLP of {params_file} by "
                          f"{diff:.3g} (relative to 1 + |mean|, allowed {SMOKE_TOLERANCE:g}): the graph is not "
                          "this policy's mean")


def load_param_file(path: Path, files: Mapping[str, Any], name: str, name_field: str, want: dict[str, tuple[int, ...]],
                    role: Callable[[str], str], expected: str) -> dict[str, np.ndarray]:
    """The arrays of a bundle's parameter file ``name`` (named by the manifest's ``name_field``): listed under
    ``files`` (its hash was checked with the others), a numpy ``.npz`` loaded without pickle, holding exactly the
    arrays of ``want`` with their shapes, float32 and finite; ``BundleError`` on ``files.<name>`` naming the array
    (``role``: what it is, ``expected``: the set in words) otherwise."""
    where = str(path)
    if name not in files:
        raise BundleError(where, name_field, f"{name!r} is not listed under files (its sha256 is unknown)")
    field = f"files.{name}"
    try:
        with np.load(path / name, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, AttributeError, TypeError) as exc:
        # AttributeError/TypeError: a plain .npy array (no archive); ValueError: an object array (needs pickle)
        raise BundleError(where, field, f"not a numpy .npz archive of plain arrays: {exc}") from None
    if missing := [k for k in want if k not in arrays]:
        raise BundleError(where, field, f"lacks {', '.join(missing)}; {expected}")
    if extra := sorted(set(arrays) - set(want)):
        raise BundleError(where, field, f"holds arrays that are no parameter of this policy: {extra} ({expected})")
    for key, shape in want.items():
        value = arrays[key]
        if value.dtype != np.float32 or value.shape != shape:
            raise BundleError(where, field, f"{key} ({role(key)}) is a {value.dtype} array of shape {value.shape}, "
                              f"expected float32 {shape}")
        if not np.isfinite(value).all():
            raise BundleError(where, field, f"{key} ({role(key)}) holds non-finite values (NaN or Inf)")
    return {key: arrays[key] for key in want}


def _load_params(path: Path, m: MetaPolicyManifest, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
    """The meta-parameters ``param_0`` ... with ``shapes`` (:func:`load_param_file`), and a log standard deviation
    whose exponential is finite."""
    n = len(shapes)
    arrays = load_param_file(path, m.files, m.meta_policy.params_file, "meta_policy.params_file",
                             {f"param_{i}": shape for i, shape in enumerate(shapes)},
                             lambda key: _role(int(key.split("_")[1]), n),
                             f"a policy of these sizes has exactly param_0 ... param_{n - 1}")
    params = list(arrays.values())
    check_log_std(params[-1], path, f"files.{m.meta_policy.params_file}", f"param_{n - 1}")
    return params


def check_log_std(log_std: np.ndarray, path: Path, field: str, key: str) -> None:
    """``BundleError`` if the exponential of a log standard deviation overflows."""
    if float(log_std.max()) >= np.log(np.finfo(np.float64).max):
        raise BundleError(str(path), field, f"{key} (the log standard deviation) reaches {float(log_std.max()):.3g}, "
                          "whose exponential overflows")


__all__ = ["PARAMS_FILE", "POLICY_FILE", "InnerStepSpec", "MetaPolicyBundle", "MetaPolicyManifest", "MetaPolicySpec",
           "check_log_std", "check_policy_graph", "load_param_file",
           "meta_policy_interfaces", "param_shapes"]
