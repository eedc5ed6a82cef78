"""Planning latency on one core: our runtime adapter vs pytorch-mppi vs the onnxruntime floor.

Prints one JSON document (progress on stderr). Runs from a fresh clone, from the repository root::

    .venv/bin/python bench/planner_latency.py --bundle policies/cartpole_mb

Rows, all pinned to one CPU core with one thread each, on observations from real MuJoCo episodes
driven by the adapter itself (the env step is not timed). At the bundle's own sample count N:

- ``ours_adapter``: one full control step of the runtime adapter (context encoding, planning with
  the bundle's defaults, next-state prediction): what the robot pays every period.
- ``ours_planner_1iter_stepped``: our planner with one MPPI iteration through H calls of the
  one-step dynamics graph (what any horizon other than the bundle's ``rollout_horizon`` uses).
- ``ort_floor_stepped``: the horizon's sequential calls of the dynamics graph, the floor of the
  stepped path.

And at each sample count of ``--samples`` (``by_samples`` in the JSON; default 128, 256 and 1024):

- ``ours_planner_1iter``: our planner alone with one MPPI iteration through the fused rollout graph
  (one onnxruntime call per iteration, what the adapter uses), to compare like for like with
- ``pytorch_mppi``: pytorch-mppi's MPPI.command on the *same* model, same samples and horizon, one
  iteration per command, members assigned round-robin like ours, and the same reward written in torch.
- ``ort_floor``: one call of the rollout graph on the same batch, nothing else: no sampling, no
  reward, no weighting. A sampling planner over this model cannot beat it.
- ``ort_floor_lean`` and ``ours_planner_1iter_lean``: the same two rows through the rollout graph that
  ``metarl export`` builds today (``metarl_robot/export/lean_rollout.py``) from the same weights, for
  bundles exported with the traced graph before it (the shipped ones).
- ``torch_rollout_fused``: the lean graph's arithmetic written by hand in torch (normalisers folded, the
  first layer's context and action shares once per call, one ``baddbmm`` per layer over all members, SiLU
  in place), the same weights, checked against the lean graph before timing: the reference the issue's
  "rollout graph <= 1.3x a hand-fused torch reference" target compares with.

The peer's torch model is rebuilt from the bundle itself: the weights of ``dynamics.onnx`` loaded into a
:class:`~metarl_robot.models.context_dynamics.ContextDynamics` without its encoder (the peer plans with
the fixed context our planner rows use, so the encoder is never run). Before anything is timed, that
model and onnxruntime's dynamics graph must agree on random inputs at the robot's scale; if they do not,
the script refuses to run (exit status 1) rather than compare against other weights. ``--run`` takes the
weights from the bundle's training checkpoint instead (same check).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from metarl_robot.machine import pin_one_core
from metarl_robot.models.rewards import TORCH_REWARDS

WARMUP = 10
"""Timed calls dropped at the start of every row (allocator, caches, onnxruntime's first-call work)."""
MIN_TIMED = 20
"""Fewest timed calls of a row at a large N (``--steps`` scales down with N, but not below this)."""
DEFAULT_SAMPLES = (128, 256, 1024)
TARGET_RATIO = 0.33
"""Issue 18: ours / pytorch-mppi, same weights, samples, horizon and iterations, at N = 128, 256 and 1024."""
PEER_PARITY_TOLERANCE = 1e-4
"""Largest |torch peer - onnxruntime| on the dynamics graph's outputs: the mean in observation-scale units, the
log-variance in its own. Both are float32 evaluations of one model (differences ~1e-6); a wrong or misplaced
weight is orders of magnitude larger."""
PARITY_ROWS = 97
"""Rows per member of the parity check's random inputs (odd, so nothing lines up with a kernel's blocking)."""


TORCH_REFERENCE_TARGET = 1.3
"""Issue 18: our rollout graph's time <= 1.3x a hand-fused torch reference of the same arithmetic."""


class PeerWeightsError(RuntimeError):
    """The peer's torch model is not the bundle's dynamics model: timing it would compare different models."""


def percentiles(samples_s: list[float]) -> dict[str, float]:
    """Summary in milliseconds of the timed calls after the warm-up."""
    ms = np.array(samples_s[WARMUP:]) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "p999_ms": float(np.percentile(ms, 99.9)), "max_ms": float(ms.max()), "mean_ms": float(ms.mean()),
            "n": len(ms)}


def timed(fn: Callable, *args: Any) -> tuple[Any, float]:
    """``fn(*args)`` and its wall time in seconds."""
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def steps_at(samples: int, default_samples: int, steps: int) -> int:
    """Calls of a row at ``samples``: ``steps`` at the bundle's N, proportionally fewer above it (the cost of a
    call grows with N), never fewer than the warm-up plus :data:`MIN_TIMED` unless ``steps`` itself is."""
    return min(steps, max(WARMUP + MIN_TIMED, steps * default_samples // samples))


def trajectories(bundle, steps: int, seed: int) -> tuple[list[float], list[np.ndarray], dict]:
    """Drive the env with the adapter, timing each adapter step; returns timings and the visited obs."""
    from metarl_robot.envs.meta_env import MetaMujocoEnv

    env = MetaMujocoEnv(bundle.family.name)
    task = bundle.family.sample(np.random.default_rng(seed), "test", 1)[0]
    obs, _ = env.reset(seed=seed, options={"task": task})
    adapter = bundle.make_adapter(batch=1, seed=seed)
    params = {k: np.array([v]) for k, v in env.reward_params.items()}
    times, visited = [], []
    for _ in range(steps):
        (action, _), dt = timed(adapter.act, obs[None], params)
        times.append(dt)
        visited.append(obs.copy())
        next_obs, *_, info = env.step(action[0])
        adapter.observe(obs[None], info["sent_action"][None], next_obs[None])
        obs = next_obs
    return times, visited, params


# ---- the peer's weights ---------------------------------------------------------------------------------------

def onnx_state_dict(path: Path, sha256: str | None = None) -> dict[str, np.ndarray]:
    """The weights of a model_based bundle's ``dynamics.onnx`` by :class:`ContextDynamics` state-dict key.

    The exporter names every parameter and buffer ``model.<key>`` except the ensemble layers' biases:
    ``torch.baddbmm(bias, x, weight)`` exports as ``MatMul(x, weight)``, a ``Mul`` by a constant (baddbmm's
    alpha) and ``Add(·, bias)``, and the bias becomes an anonymous ``onnx::Add_NNN`` initializer. Each bias is
    therefore found by following its layer's MatMul through the graph, never by name or order (both are the
    exporter's business); a graph of another shape is refused. ``sha256``: the manifest's hash of the file,
    checked on the bytes that are parsed.
    """
    import onnx
    from onnx import numpy_helper

    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise PeerWeightsError(f"{path}: sha256 differs from the bundle manifest's (the file changed)")
    graph = onnx.load_from_string(data).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
              if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value"}
    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    state = {name.removeprefix("model."): arr for name, arr in inits.items() if name.startswith("model.")}
    for key in [k for k in state if k.endswith(".weight") and state[k].ndim == 3]:
        matmuls = [n for n in consumers[f"model.{key}"] if n.op_type == "MatMul"]
        if len(matmuls) != 1:
            raise PeerWeightsError(f"{path}: {key} feeds {len(matmuls)} MatMul nodes, expected one")
        out, scale = matmuls[0].output[0], 1.0
        while True:
            nxt = consumers[out]
            if len(nxt) != 1:
                raise PeerWeightsError(f"{path}: the output of {key}'s MatMul has {len(nxt)} consumers before its "
                                       "bias Add, expected one")
            node = nxt[0]
            (other,) = [x for x in node.input if x != out] or [None]
            if node.op_type == "Mul" and other in consts and consts[other].size == 1:
                scale *= float(consts[other])  # baddbmm's alpha (1 as exported); folded into the weight
                out = node.output[0]
            elif node.op_type == "Add" and other in inits:
                state[key.removesuffix("weight") + "bias"] = inits[other]
                break
            else:
                raise PeerWeightsError(f"{path}: {key}'s MatMul is followed by {node.op_type}({', '.join(node.input)})"
                                       ", not the bias Add of an exported EnsembleLinear")
        if scale != 1.0:
            state[key] = state[key] * np.float32(scale)
    return state


def bundle_peer_model(bundle):
    """The bundle's dynamics ensemble as a torch :class:`ContextDynamics`, from ``dynamics.onnx``.

    Sizes: E, d and K from the manifest's ``adaptation`` section, the observation layout (which components
    are angles) from the robot spec, the hidden width and depth from the weights themselves (the manifest
    does not record them). The encoder is not in ``dynamics.onnx``, and the peer never encodes (it plans with
    a fixed context), so it is removed: ``load_state_dict(strict=True)`` then checks every key that remains.
    """
    import torch

    from metarl_robot.models.context_dynamics import ContextDynamics, ContextDynamicsConfig

    graph = bundle.manifest["graphs"]["dynamics"]["file"]
    state = onnx_state_dict(bundle.path / graph, bundle.manifest["files"].get(graph))
    ad = bundle.manifest["adaptation"]
    layers = sum(1 for k in state if k.startswith("hidden_layers.") and k.endswith(".weight"))
    if layers == 0 or "head.weight" not in state:
        raise PeerWeightsError(f"{bundle.path / graph}: no hidden_layers.*.weight or head.weight initializers: not "
                               "an exported ContextDynamics")
    cfg = ContextDynamicsConfig(ensemble_size=ad["ensemble_size"], hidden=state["hidden_layers.0.weight"].shape[-1],
                                layers=layers, context_dim=ad["context_dim"], context_window=ad["context_window"])
    robot = bundle.robot
    model = ContextDynamics(robot.obs_dim, robot.action_dim, robot.obs_periodic, cfg)
    model.encoder = None  # not in the graph, never run by the peer: gone from the state dict, so strict works
    try:
        model.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise PeerWeightsError(f"{bundle.path / graph}: its weights do not fit a ContextDynamics with {cfg}: "
                               f"{exc}") from None
    return model.eval().requires_grad_(False)


def find_checkpoint(run_dir: Path, prov: dict) -> Path | None:
    """The checkpoint the bundle was exported from, identified by its sha256 (file names can move)."""
    want = prov["checkpoint"]["sha256"]
    named = run_dir / "checkpoints" / prov["checkpoint"]["file"]
    candidates = [named, *sorted((run_dir / "checkpoints").glob("*.pt"))] if (run_dir / "checkpoints").is_dir() else []
    for path in candidates:
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == want:
            return path
    return None


def peer_parity(model, bundle, z: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Largest differences between the torch ``model`` and the bundle's onnxruntime dynamics graph on random
    inputs at the robot's scale (observations ~ N(0, obs_scale), actions uniform in the box, contexts: half
    the rows ``z``, the rest N(0, 1)); raises :class:`PeerWeightsError` beyond :data:`PEER_PARITY_TOLERANCE`."""
    import torch

    robot, e, d = bundle.robot, bundle.ensemble_size, bundle.context_dim
    rng = np.random.default_rng(seed)
    obs = (rng.standard_normal((e, PARITY_ROWS, robot.obs_dim)) * robot.obs_scale).astype(np.float32)
    act = rng.uniform(robot.action_low, robot.action_high, (e, PARITY_ROWS, robot.action_dim)).astype(np.float32)
    ctx = rng.standard_normal((e, PARITY_ROWS, d)).astype(np.float32)
    ctx[:, : PARITY_ROWS // 2] = np.asarray(z, np.float32).reshape(-1)
    mean, logvar = bundle.graphs["dynamics"](obs, act, ctx)
    with torch.no_grad():
        t_mean, t_logvar = (x.numpy() for x in model(*(torch.as_tensor(x) for x in (obs, act, ctx))))
    parity = {"next_obs_mean_max_abs_diff_over_obs_scale": float(np.max(np.abs(t_mean - mean) / robot.obs_scale)),
              "next_obs_logvar_max_abs_diff": float(np.max(np.abs(t_logvar - logvar))),
              "tolerance": PEER_PARITY_TOLERANCE, "rows": e * PARITY_ROWS}
    worst = max(parity["next_obs_mean_max_abs_diff_over_obs_scale"], parity["next_obs_logvar_max_abs_diff"])
    if not worst <= PEER_PARITY_TOLERANCE:  # `not <=`: a NaN fails too
        raise PeerWeightsError(f"the peer's torch model and the bundle's dynamics graph differ by {worst:.3g} (allowed "
                               f"{PEER_PARITY_TOLERANCE:g}): they are not the same model, so pytorch-mppi is not run")
    return parity


def torch_cost(robot, reward_name: str, params: dict[str, float]):
    """The peer's cost (pytorch-mppi plans in torch): the negative of our reward's torch twin on the
    (next) state pytorch-mppi passes, with the task's reward parameters."""
    import torch

    from metarl_robot.models.rewards import get_torch_reward

    reward = get_torch_reward(reward_name)
    theta = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in params.items()}

    def cost(state, action):  # our rewards read the next state and the action only
        return -reward(robot, state, action, state, {k: v.to(state.dtype) for k, v in theta.items()})
    return cost


def peer_dynamics(model, e: int, z: np.ndarray):
    """pytorch-mppi's ``dynamics(state (K, o), action (K, a))`` over the torch ensemble: row r on member r mod E,
    like ours (K not a multiple of E: the first rows padded on, their predictions dropped), at the fixed ``z``."""
    import torch

    zt = torch.as_tensor(np.asarray(z, np.float32).reshape(-1))

    def dynamics(state, action):
        k = state.shape[0]
        m = -(-k // e)
        pad = m * e - k
        if pad:
            state, action = torch.cat([state, state[:pad]]), torch.cat([action, action[:pad]])
        s = state.reshape(m, e, -1).transpose(0, 1)
        a = action.reshape(m, e, -1).transpose(0, 1)
        with torch.no_grad():
            nxt, _ = model(s.float(), a.float(), zt.expand(e, m, -1))
        return nxt.transpose(0, 1).reshape(m * e, -1)[:k]
    return dynamics


ROLLOUT_PARITY_TOLERANCE = 1e-3
"""Largest |torch reference - lean graph| over the horizon, in observation-scale units: two float32 orders of the
same arithmetic drift apart over 40 steps of a chaotic system (~1e-5 in practice); other weights are ~1 off."""


def rollout_parity(reference, lean, bundle, z: np.ndarray, seed: int = 0, rows: int = 33) -> dict[str, float]:
    """Largest difference between two rollout functions over every step, on random states at the robot's scale,
    actions in the box and the fixed context ``z``; raises :class:`PeerWeightsError` beyond
    :data:`ROLLOUT_PARITY_TOLERANCE` (the same arithmetic or no comparison)."""
    robot, e, h = bundle.robot, bundle.ensemble_size, bundle.rollout_horizon
    rng = np.random.default_rng(seed)
    obs = (rng.standard_normal((e, rows, robot.obs_dim)) * robot.obs_scale).astype(np.float32)
    actions = rng.uniform(robot.action_low, robot.action_high, (e, rows, h, robot.action_dim)).astype(np.float32)
    context = np.broadcast_to(np.asarray(z, np.float32).reshape(-1), (e, rows, np.size(z))).copy()
    worst = float(np.max(np.abs(reference(obs, actions, context) - lean(obs, actions, context)) / robot.obs_scale))
    if not worst <= ROLLOUT_PARITY_TOLERANCE:  # `not <=`: a NaN fails too
        raise PeerWeightsError(f"the hand-fused torch rollout and the lean graph differ by {worst:.3g} over {h} steps "
                               f"(allowed {ROLLOUT_PARITY_TOLERANCE:g}): not the same arithmetic")
    return {"max_abs_diff_over_obs_scale": worst, "tolerance": ROLLOUT_PARITY_TOLERANCE, "steps": h,
            "rows": e * rows}


def torch_fused_rollout(weights, horizon: int):
    """The lean rollout's arithmetic by hand in torch (float32, no autograd): ``(obs (E, M, o), actions (E, M, H,
    a), context (E, M, d)) -> next_obs (E, M, H, o)`` like the graph, from :func:`fold_weights` of the same
    weights."""
    import torch

    from metarl_robot.export.lean_rollout import fold_weights

    fold = fold_weights(weights)
    angles = len(weights.angle_idx) > 0

    def f32(x: np.ndarray):
        return torch.as_tensor(np.ascontiguousarray(x, np.float32))

    w_state, w_action, w_context, bias = f32(fold.state), f32(fold.action), f32(fold.context), f32(fold.bias)
    hidden = [(f32(w), f32(b)[:, None]) for w, b in fold.hidden]
    head_w, head_b = f32(fold.head[0]), f32(fold.head[1])[:, None]
    silu = torch.nn.functional.silu

    @torch.inference_mode()
    def rollout(obs: np.ndarray, actions: np.ndarray, context: np.ndarray) -> np.ndarray:
        s, a = torch.from_numpy(obs), torch.from_numpy(actions)
        e, m = s.shape[:2]
        # Once per call: the first layer's share of the context (with its bias) and of every action.
        first = (torch.baddbmm(bias[:, None], torch.from_numpy(context), w_context)[:, :, None]
                 + torch.bmm(a.reshape(e, m * horizon, -1), w_action).reshape(e, m, horizon, -1))
        out = torch.empty(e, m, horizon, s.shape[-1])
        for t in range(horizon):
            u = torch.cat([s, torch.sin(s), torch.cos(s)], -1) if angles else s
            x = silu(torch.baddbmm(first[:, :, t], u, w_state), inplace=True)
            for w, b in hidden:
                x = silu(torch.baddbmm(b, x, w), inplace=True)
            s = torch.baddbmm(head_b, x, head_w).add_(s)
            out[:, :, t] = s
        return out.numpy()
    return rollout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="policies/cartpole_mb", help="bundle folder (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=200,
                        help=f"calls per row at the bundle's N, the first {WARMUP} untimed; proportionally fewer at a "
                             f"larger N, at least {WARMUP + MIN_TIMED} (default: %(default)s)")
    parser.add_argument("--samples", type=int, nargs="+", default=list(DEFAULT_SAMPLES),
                        help="sample counts N of the like-for-like rows (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-peer", action="store_true", help="skip pytorch-mppi (its rows and ratios are null)")
    parser.add_argument("--run", help="take the peer's torch weights from the bundle's training checkpoint (found in "
                                      "this run folder by its sha256) instead of from the bundle's dynamics.onnx")
    args = parser.parse_args(argv)
    if args.steps <= WARMUP:
        parser.error(f"--steps must be > {WARMUP} (the first {WARMUP} calls of a row are warm-up)")
    if min(args.samples) < 2:
        parser.error("--samples must be >= 2")

    core = pin_one_core()
    import torch

    torch.set_num_threads(1)
    from metarl_robot.runtime.bundle import load_bundle
    from metarl_robot.runtime.ensemble_rollout import EnsembleRollout
    from metarl_robot.runtime.kinds.model_based import EncodedContext, EnsembleGraphs
    from metarl_robot.runtime.planner import Planner
    from metarl_robot.spec.rewards import get_reward

    bundle = load_bundle(args.bundle, threads=1)
    # The rows below use a context encoder and the (obs, actions, context) rollout graph: a capability, not a name.
    if not (isinstance(bundle, EnsembleGraphs) and isinstance(bundle, EncodedContext)):
        parser.error(f"{args.bundle} is a {bundle.kind} bundle: this benchmark times bundles with a context encoder "
                     "and the model_based ensemble graphs (dynamics, rollout)")
    cfg = bundle.planner
    e, window = bundle.ensemble_size, bundle.context_window
    reward_name = bundle.family.spec.reward
    print(f"bundle {args.bundle}: planner {cfg.method} H={cfg.horizon} N={cfg.samples} iterations={cfg.iterations}; "
          f"like-for-like rows at N={args.samples}", file=sys.stderr)
    # The fixed context of every planner row (the empty window's, what the peer is conditioned on too).
    z = bundle.make_adapter(batch=1, seed=args.seed).context()

    notes = []
    peer_model, peer = None, {"ran": False}
    if args.skip_peer:
        notes.append("pytorch_mppi skipped: --skip-peer")
    elif reward_name not in TORCH_REWARDS:
        notes.append(f"pytorch_mppi skipped: no torch twin of reward {reward_name!r} (has: {', '.join(TORCH_REWARDS)})")
    else:
        # Before anything is timed: the peer's model must be the bundle's, or the comparison means nothing.
        try:
            if args.run:
                checkpoint = find_checkpoint(Path(args.run), bundle.manifest["provenance"])
                if checkpoint is None:
                    raise PeerWeightsError(f"no checkpoint with the bundle's sha256 in {args.run}/checkpoints")
                from metarl_robot.train.runner import load_trained

                peer_model = load_trained(checkpoint)[2].model.eval().requires_grad_(False)
                peer["weights"] = f"{checkpoint} (sha256 matches the bundle's provenance)"
            else:
                peer_model = bundle_peer_model(bundle)
                peer["weights"] = (f"{bundle.path / 'dynamics.onnx'}: its initializers loaded into a torch "
                                   "ContextDynamics without the encoder (the peer plans with a fixed context)")
            peer["parity"] = peer_parity(peer_model, bundle, z, args.seed)
        except PeerWeightsError as exc:
            print(f"planner_latency: refusing to run pytorch-mppi: {exc}", file=sys.stderr)
            return 1
        peer["ran"] = True
        print(f"peer weights agree with onnxruntime: {peer['parity']}", file=sys.stderr)

    results: dict[str, Any] = {}
    adapter_times, visited, params = trajectories(bundle, args.steps, args.seed)
    results["ours_adapter"] = percentiles(adapter_times)
    last = bundle.robot.safe_action[None]
    one = replace(cfg, iterations=1)

    lean_rollout = None
    if peer_model is not None:
        # The rollout as export builds it now (export/lean_rollout.py) from the same weights: a shipped bundle
        # exported before it carries the traced graph, so both are timed.
        import onnxruntime as ort

        from metarl_robot.export.lean_rollout import EnsembleWeights, rollout_graph
        from metarl_robot.runtime.onnx_graph import session_options

        lean = ort.InferenceSession(rollout_graph(
            EnsembleWeights.from_model(peer_model), bundle.rollout_horizon, bundle.robot.action_dim, z.shape[-1],
            17).SerializeToString(), sess_options=session_options(1), providers=["CPUExecutionProvider"])

        def lean_rollout(obs: np.ndarray, actions: np.ndarray, context: np.ndarray) -> np.ndarray:
            return lean.run(None, {"obs": obs, "actions": actions, "context": context})[0]

        torch_rollout = torch_fused_rollout(EnsembleWeights.from_model(peer_model), bundle.rollout_horizon)
        try:
            peer["torch_reference_parity"] = rollout_parity(torch_rollout, lean_rollout, bundle, z, args.seed)
        except PeerWeightsError as exc:
            print(f"planner_latency: refusing to time the torch reference: {exc}", file=sys.stderr)
            return 1

    def planner_row(samples: int, fused: bool, rollout=None) -> dict[str, float]:
        """Our planner, one iteration at ``samples``, on the visited observations with the fixed context."""
        rollout = rollout or bundle.rollout
        model = EnsembleRollout(bundle.step, e, (rollout, bundle.rollout_horizon) if fused else None)
        planner = Planner(replace(one, samples=samples), bundle.robot, get_reward(reward_name), model, 1)
        n = steps_at(samples, cfg.samples, args.steps)
        return percentiles([timed(planner.plan, o[None], (o[None], z), params, last)[1] for o in visited[:n]])

    def batch(samples: int) -> tuple[np.ndarray, ...]:
        """The model's inputs for one planning iteration at ``samples`` (zeros: the floors time the calls only)."""
        rows = -(-samples * cfg.particles // e)
        return (np.zeros((e, rows, bundle.robot.obs_dim), np.float32),
                np.zeros((e, rows, bundle.robot.action_dim), np.float32),
                np.zeros((e, rows, bundle.rollout_horizon, bundle.robot.action_dim), np.float32),
                np.zeros((e, rows, z.shape[-1]), np.float32))

    # The stepped path, at the bundle's N only: H calls of the one-step graph instead of one fused call.
    results["ours_planner_1iter_stepped"] = planner_row(cfg.samples, fused=False)
    obs_b, act_b, _, z_b = batch(cfg.samples)

    def floor_stepped():
        s = obs_b
        for _ in range(cfg.horizon):
            s = bundle.step(s, act_b, z_b)
    results["ort_floor_stepped"] = percentiles([timed(floor_stepped)[1] for _ in range(args.steps)])

    task_params = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in params.items()}
    by_samples: dict[str, dict[str, Any]] = {}
    for n in args.samples:
        print(f"N={n}: {steps_at(n, cfg.samples, args.steps)} calls per row", file=sys.stderr)
        rows: dict[str, Any] = {"ours_planner_1iter": planner_row(n, fused=True), "pytorch_mppi": None}
        if peer_model is not None:
            from pytorch_mppi import MPPI

            half = torch.as_tensor((bundle.robot.action_high - bundle.robot.action_low) / 2, dtype=torch.float32)
            mppi = MPPI(peer_dynamics(peer_model, e, z), torch_cost(bundle.robot, reward_name, task_params),
                        bundle.robot.obs_dim, torch.diag((cfg.noise_std * half) ** 2), num_samples=n,
                        horizon=cfg.horizon, lambda_=cfg.temperature,
                        u_min=torch.as_tensor(bundle.robot.action_low, dtype=torch.float32),
                        u_max=torch.as_tensor(bundle.robot.action_high, dtype=torch.float32))
            t = [timed(mppi.command, torch.as_tensor(o, dtype=torch.float32))[1]
                 for o in visited[:steps_at(n, cfg.samples, args.steps)]]
            rows["pytorch_mppi"] = percentiles(t)
        obs_b, _, acts_b, z_b = batch(n)
        rows["ort_floor"] = percentiles([timed(bundle.rollout, obs_b, acts_b, z_b)[1]
                                         for _ in range(steps_at(n, cfg.samples, args.steps))])
        if lean_rollout is not None:
            rows["ours_planner_1iter_lean"] = planner_row(n, fused=True, rollout=lean_rollout)
            rows["ort_floor_lean"] = percentiles([timed(lean_rollout, obs_b, acts_b, z_b)[1]
                                                  for _ in range(steps_at(n, cfg.samples, args.steps))])
            rows["torch_rollout_fused"] = percentiles([timed(torch_rollout, obs_b, acts_b, z_b)[1]
                                                       for _ in range(steps_at(n, cfg.samples, args.steps))])
        by_samples[str(n)] = rows

    ratios: dict[str, Any] = {"by_samples": {}, "fused_over_stepped_planner_p50": (
        by_samples[str(cfg.samples)]["ours_planner_1iter"]["p50_ms"] / results["ours_planner_1iter_stepped"]["p50_ms"]
        if str(cfg.samples) in by_samples else None)}
    met: dict[str, bool | None] = {}
    for n, rows in by_samples.items():
        ours, theirs = rows["ours_planner_1iter"], rows["pytorch_mppi"]
        r = {f"ours_planner_1iter_over_pytorch_mppi_{p}": ours[f"{p}_ms"] / theirs[f"{p}_ms"] if theirs else None
             for p in ("p50", "p99")}
        r["ours_planner_1iter_over_ort_floor_p50"] = ours["p50_ms"] / rows["ort_floor"]["p50_ms"]
        if "ort_floor_lean" in rows:
            r["lean_over_bundle_rollout_p50"] = rows["ort_floor_lean"]["p50_ms"] / rows["ort_floor"]["p50_ms"]
            r["lean_rollout_over_torch_fused_p50"] = (rows["ort_floor_lean"]["p50_ms"]
                                                      / rows["torch_rollout_fused"]["p50_ms"])
            r["bundle_rollout_over_torch_fused_p50"] = (rows["ort_floor"]["p50_ms"]
                                                        / rows["torch_rollout_fused"]["p50_ms"])
            r["ours_planner_1iter_lean_over_pytorch_mppi_p50"] = (
                rows["ours_planner_1iter_lean"]["p50_ms"] / theirs["p50_ms"] if theirs else None)
        ratios["by_samples"][n] = r
        met[n] = None if theirs is None else all(r[f"ours_planner_1iter_over_pytorch_mppi_{p}"] <= TARGET_RATIO
                                                 for p in ("p50", "p99"))

    try:
        peer_version = importlib.metadata.version("pytorch-mppi")
    except importlib.metadata.PackageNotFoundError:  # --skip-peer without the bench extra
        peer_version = None
    doc = {"benchmark": "planner_latency", "bundle": args.bundle, "family": bundle.family.name,
           "planner": cfg.__dict__, "samples": args.samples, "ensemble_size": e, "context_window": window,
           "machine": {"pinned_core": core, "cpus": os.cpu_count(), "platform": platform.platform(),
                       "python": platform.python_version(), "onnxruntime": __import__("onnxruntime").__version__,
                       "torch": torch.__version__, "pytorch_mppi": peer_version},
           "peer": peer, "results": results, "by_samples": by_samples, "ratios": ratios,
           "target": {"what": f"ours_planner_1iter / pytorch_mppi <= {TARGET_RATIO:g} (p50 and p99) at every N, same "
                              "weights, samples, horizon and iterations", "ratio_max": TARGET_RATIO, "met": met},
           "target_torch_reference": {
               "what": f"lean rollout graph / hand-fused torch rollout <= {TORCH_REFERENCE_TARGET:g} (p50) at every N",
               "ratio_max": TORCH_REFERENCE_TARGET,
               "met": {n: r["lean_rollout_over_torch_fused_p50"] <= TORCH_REFERENCE_TARGET
                       for n, r in ratios["by_samples"].items() if "lean_rollout_over_torch_fused_p50" in r} or None},
           "notes": [f"one pinned core, one thread per library; the first {WARMUP} calls of each row dropped as "
                     "warm-up",
                     f"results: rows at the bundle's N = {cfg.samples}; by_samples: the like-for-like rows per N",
                     f"calls per row: --steps {args.steps} at N = {cfg.samples}, proportionally fewer at larger N "
                     f"but at least {WARMUP + MIN_TIMED} or --steps if smaller (so p99 of a large N is close to its "
                     "max): "
                     + ", ".join(f"N = {n}: {steps_at(n, cfg.samples, args.steps)}" for n in args.samples),
                     "pytorch_mppi plans over the torch model of the same weights the ONNX graphs hold (checked "
                     "against onnxruntime before timing: peer.parity), at the same fixed context as our planner rows",
                     *notes]}
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
