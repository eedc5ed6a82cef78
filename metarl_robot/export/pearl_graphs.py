"""Torch → ONNX for a trained PEARL agent: the per-transition factor graph and the deterministic policy graph.

These are the two graphs :class:`metarl_robot.runtime.context_policy.ContextPolicyAdapter` runs on the
robot (the batch ``posterior`` is not exported: the robot multiplies factors in incrementally). Both
take and return raw robot units; the normalisers are buffers of the agent and are baked in as
constants. Export uses the TorchScript exporter at :data:`~metarl_robot.export.onnx_graphs.OPSET` (the
one PEARL's networks are tested with), then ``onnx.checker`` with ``full_check``, and parity against
torch through onnxruntime sessions built as the runtime builds them, with the model-based export's
criterion (:data:`~metarl_robot.export.onnx_graphs.PARITY_CRITERION`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from metarl_robot.algos.pearl import PEARL
from metarl_robot.algos.registry import get_algorithm
from metarl_robot.algos.task_replay import TaskReplay
from metarl_robot.export.onnx_graphs import (
    OPSET,
    ExportError,
    _export_one,
    check_parity,
    finish_graph,
    parity_report,
)
from metarl_robot.models.pearl import PEARLAgent
from metarl_robot.runtime.context_policy import (
    FACTORS_FILE,
    FACTORS_INPUTS,
    FACTORS_OUTPUTS,
    POLICY_FILE,
    POLICY_INPUTS,
    POLICY_OUTPUTS,
    pearl_graph_interfaces,
)
from metarl_robot.runtime.onnx_graph import make_session
from metarl_robot.train.runner import load_checkpoint, load_trained


class FactorsGraph(nn.Module):
    """``agent.transition_factors`` with the runtime's input names: one Gaussian factor per transition, its
    variance as a log. An uninformative transition's variance reaches 10^3-10^4, where float32 GEMMs in two
    runtimes differ by a few ULPs (~1e-3 absolute, 3e-7 relative): the log puts every variance on one scale,
    and the robot needs only ``exp(-log_var)``, the factor's precision."""

    def __init__(self, agent: PEARLAgent) -> None:
        super().__init__()
        self.agent = agent

    def forward(self, obs: torch.Tensor, action: torch.Tensor, reward: torch.Tensor, next_obs: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        mean, var = self.agent.transition_factors(obs, action, reward, next_obs)
        return mean, torch.log(var)


class PolicyGraph(nn.Module):
    """``agent.deterministic_action``: ``box(tanh(mean))`` of the z-conditioned actor."""

    def __init__(self, agent: PEARLAgent) -> None:
        super().__init__()
        self.agent = agent

    def forward(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.agent.deterministic_action(obs, z)


@dataclass
class ExportedPEARLGraphs:
    """What :func:`export_pearl_graphs` wrote."""

    factors: Path
    """The per-transition factor graph (:data:`FACTORS_FILE`)."""
    policy: Path
    """The deterministic policy graph (:data:`POLICY_FILE`)."""
    opset: int
    """ONNX opset of both graphs."""
    interfaces: dict
    """:func:`pearl_graph_interfaces` for this agent: input/output names and shapes per graph."""


def interfaces_of(agent: PEARLAgent) -> dict:
    """The runtime interface of an agent's two graphs."""
    return pearl_graph_interfaces(agent.inputs.obs_dim, agent.inputs.act_dim, agent.cfg.latent_dim)


def export_pearl_graphs(agent: PEARLAgent, out_dir: str | Path, metadata: dict[str, str] | None = None
                        ) -> ExportedPEARLGraphs:
    """Write :data:`FACTORS_FILE` and :data:`POLICY_FILE` into ``out_dir`` and run ``onnx.checker`` (full check).

    ``metadata`` goes into each model's ``metadata_props`` (with ``graph``: ``factors`` or ``policy``).
    Parity is a separate step (:func:`measure_pearl_parity`, :func:`export_pearl_checked`).
    """
    agent = agent.eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    o, a, d = agent.inputs.obs_dim, agent.inputs.act_dim, agent.cfg.latent_dim
    g = torch.Generator().manual_seed(0)
    b = 2
    examples = {"factors": (torch.randn(b, o, generator=g), torch.rand(b, a, generator=g), torch.randn(b, generator=g),
                            torch.randn(b, o, generator=g)),
                "policy": (torch.randn(b, o, generator=g), torch.randn(b, d, generator=g))}
    modules = {"factors": FactorsGraph(agent).eval(), "policy": PolicyGraph(agent).eval()}
    paths = {"factors": out_dir / FACTORS_FILE, "policy": out_dir / POLICY_FILE}
    interfaces = interfaces_of(agent)
    for name, module in modules.items():
        try:
            with torch.no_grad():
                _export_one(module, examples[name], paths[name], interfaces[name], "torchscript")
        except Exception as exc:  # the exporter raises many types
            raise ExportError(f"ONNX export of the PEARL {name} graph failed: {type(exc).__name__}: {exc}") from exc
        finish_graph(paths[name], name, interfaces[name], "PEARL", metadata)
    return ExportedPEARLGraphs(paths["factors"], paths["policy"], OPSET, interfaces)


# ---- parity ---------------------------------------------------------------------------------------------
PEARLInputs = tuple[tuple[np.ndarray, ...], tuple[np.ndarray, ...]]
"""Factor-graph and policy-graph inputs, in the runtime's order."""


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def random_pearl_inputs(agent: PEARLAgent, obs_scale: np.ndarray, rng: np.random.Generator, rows: int = 257
                        ) -> PEARLInputs:
    """Random transitions at the robot's scale (actions across the whole box) and z from wide to the prior's."""
    inputs = agent.inputs
    o, a, d = inputs.obs_dim, inputs.act_dim, agent.cfg.latent_dim
    scale = np.asarray(obs_scale, dtype=np.float64)
    centre, half = inputs.action_centre.numpy().astype(np.float64), inputs.action_half_range.numpy().astype(np.float64)
    obs = rng.standard_normal((rows, o)) * scale
    factors = (_f32(obs), _f32(centre + half * rng.uniform(-1, 1, (rows, a))), _f32(rng.standard_normal(rows) * 2),
               _f32(obs + 0.1 * rng.standard_normal((rows, o)) * scale))
    z = rng.standard_normal((rows, d)) * np.linspace(0.1, 3.0, rows)[:, None]
    return factors, (_f32(rng.standard_normal((rows, o)) * scale), _f32(z))


def replay_pearl_inputs(agent: PEARLAgent, replay: TaskReplay, rng: np.random.Generator, per_task: int = 32
                        ) -> PEARLInputs:
    """Encoder-buffer transitions of every trainable task; the policy sees those states with z = the torch
    posterior mean of each task's sampled context (the z the robot would hold)."""
    tasks = replay.trainable_tasks()
    if not len(tasks):
        raise ValueError("replay holds no task with exploration data: no replay-like parity inputs")
    ctx = replay.sample_context(rng, tasks, per_task)
    with torch.no_grad():
        z, _ = agent.posterior(*(torch.as_tensor(_f32(x)) for x in (ctx.obs, ctx.act, ctx.reward, ctx.next_obs,
                                                                      ctx.mask)))
    flat = lambda x: _f32(x.reshape(len(tasks) * per_task, *x.shape[2:]))  # noqa: E731
    factors = (flat(ctx.obs), flat(ctx.act), flat(ctx.reward), flat(ctx.next_obs))
    policy_z = np.repeat(z.numpy(), per_task, axis=0)
    return factors, (flat(ctx.next_obs), _f32(policy_z))


def _torch_outputs(agent: PEARLAgent, inputs: PEARLInputs, dtype: torch.dtype) -> dict[str, np.ndarray]:
    factors_in, policy_in = inputs

    def t(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(x).to(dtype)

    with torch.no_grad():  # the very modules that were exported, so the reference computes what the graphs do
        mean, logvar = FactorsGraph(agent)(*map(t, factors_in))
        action = PolicyGraph(agent)(*map(t, policy_in))
    return {"factor_mean": mean.numpy(), "factor_logvar": logvar.numpy(), "action": action.numpy()}


def measure_pearl_parity(agent: PEARLAgent, graphs: ExportedPEARLGraphs, inputs: PEARLInputs
                         ) -> dict[str, dict[str, float]]:
    """Torch vs onnxruntime per output (``factor_mean``, ``factor_logvar``, ``action``), in the format of
    :func:`metarl_robot.export.onnx_graphs.measure_parity` (so :func:`check_parity` applies)."""
    agent = agent.eval()
    factors_in, policy_in = inputs
    mean_o, logvar_o = make_session(graphs.factors).run(list(FACTORS_OUTPUTS),
                                                         dict(zip(FACTORS_INPUTS, factors_in, strict=True)))
    (action_o,) = make_session(graphs.policy).run(list(POLICY_OUTPUTS),
                                                  dict(zip(POLICY_INPUTS, policy_in, strict=True)))
    ort = {"factor_mean": mean_o, "factor_logvar": logvar_o, "action": action_o}
    ref32 = _torch_outputs(agent, inputs, torch.float32)
    ref64 = _torch_outputs(copy.deepcopy(agent).double(), inputs, torch.float64)
    return parity_report(ort, ref32, ref64)


def export_pearl_checked(algo: PEARL, out_dir: str | Path, replay: TaskReplay | None = None, seed: int = 0,
                         metadata: dict[str, str] | None = None, replay_per_task: int = 32
                         ) -> tuple[ExportedPEARLGraphs, dict[str, dict[str, dict[str, float]]]]:
    """Export, then measure parity on random inputs (and on ``replay_per_task`` transitions of each of the
    replay's tasks when given); :class:`ExportError` if any output fails the criterion. Returns the graphs
    and the parity report (``random``/``replay`` → :func:`measure_pearl_parity`)."""
    graphs = export_pearl_graphs(algo.agent, out_dir, metadata)
    rng = np.random.default_rng(seed)
    parity = {"random": measure_pearl_parity(algo.agent, graphs,
                                             random_pearl_inputs(algo.agent, algo.robot.obs_scale, rng))}
    if replay is not None:
        inputs = replay_pearl_inputs(algo.agent, replay, rng, replay_per_task)
        parity["replay"] = measure_pearl_parity(algo.agent, graphs, inputs)
    check_parity(parity)
    return graphs, parity


def export_pearl_checkpoint(checkpoint: str | Path, out_dir: str | Path, seed: int = 0
                            ) -> tuple[PEARL, ExportedPEARLGraphs, dict[str, dict[str, dict[str, float]]]]:
    """:func:`export_pearl_checked` for a ``metarl train`` checkpoint of a PEARL run; the replay-like parity
    inputs come from the run folder's ``replay.npz`` (``<run>/checkpoints/<ckpt>.pt`` → ``<run>/replay.npz``)
    when it is there. :class:`ExportError` for a checkpoint of another algorithm."""
    checkpoint = Path(checkpoint)
    kind = load_checkpoint(checkpoint)["algo_kind"]
    if not issubclass(get_algorithm(kind), PEARL):
        raise ExportError(f"{checkpoint}: algo_kind is {kind!r}; PEARL graphs export only {PEARL.name!r} checkpoints "
                          "(other algorithms' runs export with metarl export)")
    _, _, algo = load_trained(checkpoint)
    if not isinstance(algo, PEARL):  # load_trained already refuses a kind/config mismatch; this names the type
        raise ExportError(f"{checkpoint}: loaded a {type(algo).__name__}, not PEARL")
    replay_path = checkpoint.parent.parent / "replay.npz"
    replay = TaskReplay.load(replay_path) if replay_path.is_file() else None
    graphs, parity = export_pearl_checked(algo, out_dir, replay=replay, seed=seed,
                                          metadata={"checkpoint": checkpoint.name, "algo_kind": kind})
    return algo, graphs, parity
