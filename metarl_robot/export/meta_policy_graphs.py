"""Export an ``mbmpo`` checkpoint as a ``meta_policy`` bundle: the policy's mean as an ONNX graph whose weights are
inputs (the robot feeds the weights it acts with, adapted ones after its inner step) and the meta-parameters.

The graph is written node by node with ``onnx.helper`` (a ``Gemm`` per layer, ``Tanh`` between them: the arithmetic
of :func:`~metarl_robot.models.meta_policy.functional_mean`), pinned and checked with ``onnx.checker`` (full check)
as the other exports are. Parity (torch's ``functional_mean`` vs onnxruntime,
:data:`~metarl_robot.export.onnx_graphs.PARITY_CRITERION`, and at most
:data:`~metarl_robot.export.onnx_graphs.PARITY_TOLERANCE` absolute) is measured on three input sets: random features
at the policy's scale, the features of the run's stored episodes (both at the meta-parameters), and those features
with the weights one robot-side inner step on a stored episode reaches (``adapted``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from metarl_robot.algos.buffer import EpisodeBuffer
from metarl_robot.algos.mbmpo import MBMPOTrainConfig
from metarl_robot.export.onnx_graphs import (
    OPSET,
    PARITY_CRITERION,
    PARITY_TOLERANCE,
    Exporter,
    ExportError,
    check_parity,
    finish_graph,
    parity_report,
)
from metarl_robot.models.meta_policy import GaussianMLPPolicy, functional_mean
from metarl_robot.runtime.kinds.meta_policy import PARAMS_FILE, POLICY_FILE, MetaPolicyBundle, meta_policy_interfaces
from metarl_robot.runtime.meta_policy import InnerStepConfig, MetaPolicyAdapter, PolicyEpisode
from metarl_robot.runtime.onnx_graph import make_session
from metarl_robot.runtime.policy_gradient import feature_dim, from_env_action, policy_features
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import RobotSpec
from metarl_robot.spec.schema import SpecError, to_plain

if TYPE_CHECKING:
    from metarl_robot.export.bundle_writer import _ExportedGraphs, _Run

EXPORTER_NAME = "onnx.helper"
"""What ``provenance.exporter.name`` records: the graph is built node by node, not traced."""


def policy_graph(feature_dim: int, action_dim: int, hidden: tuple[int, ...] | list[int], opset: int = OPSET
                 ) -> onnx.ModelProto:
    """The policy's mean with its weights as inputs: ``features (rows, F), param_0 ... param_{2L+1} → mean (rows, a)``
    (:func:`~metarl_robot.runtime.kinds.meta_policy.meta_policy_interfaces`); ``Gemm`` per layer, ``Tanh`` after each
    hidden one."""
    interface = meta_policy_interfaces(feature_dim, action_dim, hidden)["policy"]
    layers = len(hidden) + 1
    nodes, h = [], "features"
    for i in range(layers):
        last = i == layers - 1
        pre = "mean" if last else f"hidden_{i}_pre"
        nodes.append(helper.make_node("Gemm", [h, f"param_{2 * i}", f"param_{2 * i + 1}"], [pre], name=f"layer_{i}"))
        if not last:
            h = f"hidden_{i}"
            nodes.append(helper.make_node("Tanh", [pre], [h], name=f"tanh_{i}"))
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "meta_policy_mean",
        [helper.make_tensor_value_info(name, f32, shape) for name, shape in interface["inputs"].items()],
        [helper.make_tensor_value_info(name, f32, shape) for name, shape in interface["outputs"].items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="metarl_robot")


def write_policy_graph(path: Path, feature_dim: int, action_dim: int, hidden: tuple[int, ...] | list[int],
                       metadata: dict[str, str] | None = None, model: str = "MB-MPO meta-policy") -> dict:
    """Write :func:`policy_graph` to ``path``, pinned and checked (:func:`finish_graph`); returns the interfaces."""
    interfaces = meta_policy_interfaces(feature_dim, action_dim, hidden)
    onnx.save(policy_graph(feature_dim, action_dim, hidden), str(path))
    finish_graph(path, "policy", interfaces["policy"], model, metadata)
    return interfaces


def measure_meta_policy_parity(path: Path, params: list[np.ndarray], feats: np.ndarray) -> dict[str, dict[str, float]]:
    """onnxruntime (a session built as the runtime builds it) vs torch's ``functional_mean`` at float32 and float64,
    on ``feats`` (N, F) with ``params`` (float32, the policy's order): the report :func:`check_parity` judges."""
    params = [np.ascontiguousarray(p, dtype=np.float32) for p in params]
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    feed = {"features": feats, **{f"param_{i}": p for i, p in enumerate(params[:-1])}}
    (mean,) = make_session(path).run(["mean"], feed)

    def torch_mean(dtype: torch.dtype) -> np.ndarray:
        with torch.no_grad():
            return functional_mean([torch.as_tensor(p).to(dtype) for p in params],
                                   torch.as_tensor(feats).to(dtype)).numpy()

    return parity_report({"mean": mean}, {"mean": torch_mean(torch.float32)}, {"mean": torch_mean(torch.float64)})


def check_mean_parity(parity: dict[str, dict]) -> None:
    """:func:`check_parity` on the policy-mean reports, and every set's largest difference within
    :data:`PARITY_TOLERANCE` absolute (:class:`ExportError` naming the sets' figures otherwise)."""
    check_parity(parity)
    worst = {k: p["max_abs_diff"]["mean"] for k, p in parity.items()}
    if max(worst.values()) > PARITY_TOLERANCE:
        raise ExportError(f"torch vs onnxruntime: the policy mean differs by more than {PARITY_TOLERANCE:g}: "
                          f"max abs diff {worst}")


def random_features(robot: RobotSpec, rng: np.random.Generator, rows: int = 257) -> np.ndarray:
    """Features of random observations from a tenth of robot.yaml's scale to five times it (the wide end reaches
    the features' clip)."""
    widths = np.linspace(0.1, 5.0, rows)[:, None]
    obs = rng.standard_normal((rows, robot.obs_dim)) * np.asarray(robot.obs_scale) * widths
    return policy_features(robot, obs)


def stored_features(robot: RobotSpec, buffer: EpisodeBuffer, rng: np.random.Generator, samples: int) -> np.ndarray:
    """Features of ``samples`` observations drawn from the buffer's stored episodes (valid steps only)."""
    obs = buffer.obs[buffer.valid]
    if not len(obs):
        raise ValueError("the run's buffer holds no transition: no real parity inputs")
    return policy_features(robot, obs[rng.integers(0, len(obs), samples)])


def adapted_params(robot: RobotSpec, run: _Run, buffer: EpisodeBuffer, params: list[np.ndarray],
                   inner: InnerStepConfig) -> list[np.ndarray]:
    """The weights the robot's inner step (:meth:`MetaPolicyAdapter.step_on`, numpy) reaches from ``params`` on the
    last stored episode (its actions mapped back to normalised units, its rewards the family's with its task's
    parameters), as float32."""
    ep = len(buffer) - 1
    valid = buffer.valid[ep]
    obs, act, next_obs = buffer.obs[ep][valid], buffer.act[ep][valid], buffer.next_obs[ep][valid]
    if len(obs) < inner.min_transitions:
        raise ValueError(f"the run's last stored episode has {len(obs)} transitions, fewer than the inner step's "
                         f"min_transitions {inner.min_transitions}: no adapted parity inputs")
    reward = get_reward(run.family.spec.reward)
    task = run.family.from_vector(buffer.tasks[ep])
    task_params = {k: np.full(len(obs), float(task[k])) for k in run.family.reward_names}
    rewards = reward(robot, obs, act, next_obs, task_params)[0]
    samples = from_env_action(robot, act)
    adapter = MetaPolicyAdapter(robot, reward, [p.astype(np.float64) for p in params], inner)
    step = adapter.step_on(adapter.meta_params, [PolicyEpisode(obs, samples, np.asarray(rewards, dtype=np.float64))])
    return [p.astype(np.float32) for p in step]


def export_meta_policy(run: _Run, staging: Path, name: str, exporter: Exporter, parity_samples: int, seed: int
                       ) -> _ExportedGraphs:
    """``policy.onnx`` and ``meta_params.npz`` of an mbmpo checkpoint, parity on random features, on the run's
    buffer and with adapted weights; the ``meta_policy`` manifest section."""
    from metarl_robot.export.bundle_writer import _ExportedGraphs

    if exporter != "auto":
        raise ValueError(f"exporter: the meta-policy graph is written node by node with onnx.helper, not by a torch "
                         f"exporter; got {exporter!r} (allowed for an mbmpo run: 'auto')")
    robot, cfg = run.robot, run.cfg
    if not isinstance(cfg, MBMPOTrainConfig):  # the registry routes only mbmpo runs here; this names the type
        raise SpecError(str(run.ckpt_file), "algo", f"a meta_policy bundle is exported from an mbmpo run, got a "
                        f"{type(cfg).__name__}")
    buffer_path = run.run_dir / "buffer.npz"
    if not buffer_path.is_file():
        raise FileNotFoundError(f"{buffer_path} not found: the real-input parity check needs the run's buffer")
    buffer = EpisodeBuffer.load(buffer_path)
    f, a, hidden = feature_dim(robot), robot.action_dim, list(cfg.mbmpo.hidden)
    policy = GaussianMLPPolicy(f, a, tuple(hidden), cfg.mbmpo.init_std)
    policy.load_state_dict(run.state["algo"]["policy"])
    params = [p.detach().cpu().numpy().astype(np.float32) for p in policy.param_list()]

    graph_path, params_path = staging / POLICY_FILE, staging / PARAMS_FILE
    interfaces = write_policy_graph(graph_path, f, a, hidden, {
        "bundle": name, "robot": robot.name, "robot_interface_sha256": robot.interface_hash})
    np.savez(params_path, **{f"param_{i}": p for i, p in enumerate(params)})

    rng = np.random.default_rng(seed)
    real = stored_features(robot, buffer, rng, parity_samples)
    parity = {"random": measure_meta_policy_parity(graph_path, params, random_features(robot, rng)),
              "real": measure_meta_policy_parity(graph_path, params, real),
              "adapted": measure_meta_policy_parity(graph_path, adapted_params(robot, run, buffer, params,
                                                                               cfg.mbmpo.inner), real)}
    check_mean_parity(parity)
    # The step as trained, with the deployment's choices (metarl export --set episodes_per_step=K) in place.
    inner = cfg.mbmpo.inner.with_settings(run.adapter_settings, "a meta_policy bundle")
    sections = {"meta_policy": {"hidden": hidden, "feature_dim": f, "params_file": PARAMS_FILE,
                                "inner": to_plain(inner)}}
    return _ExportedGraphs(MetaPolicyBundle.kind, {"policy": graph_path}, interfaces, OPSET, EXPORTER_NAME, sections,
                           {"tolerance": PARITY_TOLERANCE, "criterion": PARITY_CRITERION, **parity,
                            "real_samples": parity_samples}, data_files=[params_path])


__all__ = ["EXPORTER_NAME", "check_mean_parity", "export_meta_policy", "measure_meta_policy_parity", "policy_graph",
           "write_policy_graph"]
