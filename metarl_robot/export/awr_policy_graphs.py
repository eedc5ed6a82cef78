"""Export a ``macaw`` checkpoint as an ``awr_policy`` bundle: the policy's mean as the ``meta_policy`` kind's graph
(weights as inputs: the robot feeds the weights its numpy adaptation reaches) and every array the robot's step needs
(value function, advantage head, learned rates, lambda) in ``awr_params.npz``.

Parity (torch's ``functional_mean`` vs onnxruntime, as the ``meta_policy`` export measures it) on three input sets:
random features at the policy's scale, features of the run's dataset (both at the meta-parameters), and those
features with the weights the robot's adaptation (:func:`~metarl_robot.runtime.awr_policy.awr_adapt`, numpy) reaches
on the first ``adapt_episodes`` episodes of the dataset's first task.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from metarl_robot.algos.macaw import MACAW, MACAWTrainConfig
from metarl_robot.export.meta_policy_graphs import (
    EXPORTER_NAME,
    check_mean_parity,
    measure_meta_policy_parity,
    random_features,
    write_policy_graph,
)
from metarl_robot.export.onnx_graphs import (
    OPSET,
    PARITY_CRITERION,
    PARITY_TOLERANCE,
    Exporter,
)
from metarl_robot.replay.dataset import DatasetError, load_dataset
from metarl_robot.runtime.awr_policy import AWRBatch, AWREpisode, awr_adapt
from metarl_robot.runtime.kinds.awr_policy import PARAMS_FILE, AWRPolicyBundle
from metarl_robot.runtime.kinds.meta_policy import POLICY_FILE
from metarl_robot.runtime.policy_gradient import feature_dim, policy_features
from metarl_robot.spec.schema import SpecError, to_plain

if TYPE_CHECKING:
    from metarl_robot.export.bundle_writer import _ExportedGraphs, _Run


def export_awr_policy(run: _Run, staging: Path, name: str, exporter: Exporter, parity_samples: int, seed: int
                      ) -> _ExportedGraphs:
    """``policy.onnx`` and ``awr_params.npz`` of a macaw checkpoint, parity on random features, on the run's dataset
    and with adapted weights; the ``awr_policy`` manifest section."""
    from metarl_robot.export.bundle_writer import _ExportedGraphs

    if exporter != "auto":
        raise ValueError(f"exporter: the policy graph is written node by node with onnx.helper, not by a torch "
                         f"exporter; got {exporter!r} (allowed for a macaw run: 'auto')")
    robot, cfg = run.robot, run.cfg
    if not isinstance(cfg, MACAWTrainConfig):  # the registry routes only macaw runs here; this names the type
        raise SpecError(str(run.ckpt_file), "algo", f"an awr_policy bundle is exported from a macaw run, got a "
                        f"{type(cfg).__name__}")
    algo = MACAW.build(cfg, robot)
    algo.load_state_dict(run.state["algo"])
    try:
        nets = algo.nets.numpy_networks()
    except ValueError as exc:
        raise SpecError(str(run.ckpt_file), "macaw_net.weight_transform_dim", str(exc)) from None
    dataset_path = Path((algo.dataset_ref or {}).get("path") or cfg.dataset)
    try:
        data = load_dataset(dataset_path)
    except DatasetError as exc:
        raise FileNotFoundError(f"the run's dataset ({dataset_path}, from its dataset_ref) is needed for the "
                                f"real-input parity check: {exc}") from None
    step = algo.robot_step().with_settings(run.adapter_settings, "an awr_policy bundle")
    f, a, hidden = feature_dim(robot), robot.action_dim, list(cfg.macaw_net.hidden)
    f32 = lambda arrays: [np.asarray(x, dtype=np.float32) for x in arrays]  # noqa: E731
    policy, value, head = f32(nets.policy), f32(nets.value), f32(nets.head)
    graph_path, params_path = staging / POLICY_FILE, staging / PARAMS_FILE
    interfaces = write_policy_graph(graph_path, f, a, hidden, {
        "bundle": name, "robot": robot.name, "robot_interface_sha256": robot.interface_hash}, "MACAW policy")
    np.savez(params_path, **{f"param_{i}": p for i, p in enumerate(policy)},
             **{f"value_{i}": p for i, p in enumerate(value)}, **{f"head_{i}": p for i, p in enumerate(head)},
             value_rates=np.float32(nets.value_rates), policy_rates=np.float32(nets.policy_rates),
             advantage_weight=np.array([nets.advantage_weight], dtype=np.float32))

    rng = np.random.default_rng(seed)
    real = policy_features(robot, data.observations[rng.integers(0, data.num_transitions, parity_samples)])
    # The robot adapts from the float32 parameters it loads: the adapted parity input is that step's result.
    first = np.flatnonzero(data.task_ids == data.task_ids[0])[:step.adapt_episodes]
    episodes = [(e := AWREpisode.logged(data, i))._replace(reward=np.nan_to_num(e.reward)) for i in first]
    as64 = lambda arrays: [a.astype(np.float64) for a in arrays]  # noqa: E731
    loaded = replace(nets, value=as64(value), policy=as64(policy), head=as64(head))
    adapted = f32(awr_adapt(loaded, AWRBatch.of(robot, episodes, step), step))
    parity = {"random": measure_meta_policy_parity(graph_path, policy, random_features(robot, rng)),
              "real": measure_meta_policy_parity(graph_path, policy, real),
              "adapted": measure_meta_policy_parity(graph_path, adapted, real)}
    check_mean_parity(parity)
    sections = {"awr_policy": {"hidden": hidden, "feature_dim": f,
                               "advantage_head_hidden": cfg.macaw_net.advantage_head_hidden if head else 0,
                               "params_file": PARAMS_FILE, "step": to_plain(step)}}
    return _ExportedGraphs(AWRPolicyBundle.kind, {"policy": graph_path}, interfaces, OPSET, EXPORTER_NAME, sections,
                           {"tolerance": PARITY_TOLERANCE, "criterion": PARITY_CRITERION, **parity,
                            "real_samples": parity_samples}, data_files=[params_path])


__all__ = ["export_awr_policy"]
