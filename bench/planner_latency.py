"""Planning latency on one core: our runtime adapter vs pytorch-mppi vs the onnxruntime floor.

Prints one JSON document (progress on stderr). Run from the repository root::

    .venv/bin/python bench/planner_latency.py --bundle policies/cartpole_mb

Rows, all pinned to one CPU core with one thread each, on observations from real MuJoCo episodes
driven by the adapter itself (the env step is not timed):

- ``ours_adapter``: one full control step of the runtime adapter (context encoding, planning with
  the bundle's defaults, next-state prediction): what the robot pays every period.
- ``ours_planner_1iter``: our planner alone with one MPPI iteration through the fused rollout graph
  (one onnxruntime call per iteration, what the adapter uses), to compare like for like with
- ``pytorch_mppi``: pytorch-mppi's MPPI.command on the *same* model (the bundle's run, in torch,
  members assigned round-robin like ours), same samples and horizon, one iteration per command, and
  the same reward written in torch.
- ``ours_planner_1iter_stepped``: the same planner through H calls of the one-step dynamics graph
  (what any horizon other than the bundle's ``rollout_horizon`` uses).
- ``ort_floor``: one call of the rollout graph on the same batch, nothing else: no sampling, no
  reward, no weighting. A sampling planner over this model cannot beat it.
- ``ort_floor_stepped``: the horizon's sequential calls of the dynamics graph, the floor of the
  stepped path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from metarl_robot.machine import pin_one_core
from metarl_robot.models.rewards import TORCH_REWARDS


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.array(samples_s) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "p999_ms": float(np.percentile(ms, 99.9)), "max_ms": float(ms.max()), "mean_ms": float(ms.mean()),
            "n": len(ms)}


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def trajectories(bundle, steps: int, seed: int) -> tuple[list, list[np.ndarray], dict]:
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


def find_checkpoint(run_dir: Path, prov: dict) -> Path | None:
    """The checkpoint the bundle was exported from, identified by its sha256 (file names can move)."""
    import hashlib

    want = prov["checkpoint"]["sha256"]
    named = run_dir / "checkpoints" / prov["checkpoint"]["file"]
    candidates = [named, *sorted((run_dir / "checkpoints").glob("*.pt"))] if (run_dir / "checkpoints").is_dir() else []
    for path in candidates:
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == want:
            return path
    return None


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="policies/cartpole_mb", help="bundle folder (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=300, help="timed control steps per row (default: 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-peer", action="store_true", help="skip pytorch-mppi (needs the bundle's run folder)")
    parser.add_argument("--run", help="the bundle's training run folder, if it moved (default: from its provenance)")
    args = parser.parse_args(argv)

    core = pin_one_core()
    import torch

    torch.set_num_threads(1)
    from metarl_robot.runtime.bundle import load_bundle
    from metarl_robot.runtime.ensemble_rollout import EnsembleRollout
    from metarl_robot.runtime.planner import Planner
    from metarl_robot.spec.rewards import get_reward

    bundle = load_bundle(args.bundle, threads=1)
    cfg = bundle.planner
    adaptation = bundle.manifest["adaptation"]
    e, window = adaptation["ensemble_size"], adaptation["context_window"]
    print(f"bundle {args.bundle}: planner {cfg.method} H={cfg.horizon} N={cfg.samples} iterations={cfg.iterations}",
          file=sys.stderr)

    results = {}
    adapter_times, visited, params = trajectories(bundle, args.steps, args.seed)
    results["ours_adapter"] = percentiles(adapter_times[10:])

    # Our planner alone, one iteration, on the visited observations with a fixed context: through the
    # fused rollout graph (what the adapter uses) and through H dynamics calls (any other horizon).
    one = replace(cfg, iterations=1)
    adapter = bundle.make_adapter(batch=1, seed=args.seed)
    z = adapter.context()
    last = bundle.robot.safe_action[None]
    fused = (bundle.rollout, bundle.rollout_horizon)
    for row, model in (("ours_planner_1iter", EnsembleRollout(bundle.step, e, fused)),
                       ("ours_planner_1iter_stepped", EnsembleRollout(bundle.step, e))):
        planner = Planner(one, bundle.robot, get_reward(bundle.family.spec.reward), model, 1)
        t = [timed(planner.plan, o[None], (o[None], z), params, last)[1] for o in visited]
        results[row] = percentiles(t[10:])

    # The floors: the model calls alone on the planner's batch, one fused call or H sequential ones.
    rows = -(-cfg.samples * cfg.particles // e)
    obs_b = np.zeros((e, rows, bundle.robot.obs_dim), np.float32)
    act_b = np.zeros((e, rows, bundle.robot.action_dim), np.float32)
    acts_b = np.zeros((e, rows, bundle.rollout_horizon, bundle.robot.action_dim), np.float32)
    z_b = np.zeros((e, rows, z.shape[-1]), np.float32)

    def floor_stepped():
        s = obs_b
        for _ in range(cfg.horizon):
            s = bundle.step(s, act_b, z_b)
    for row, call in (("ort_floor", lambda: bundle.rollout(obs_b, acts_b, z_b)), ("ort_floor_stepped", floor_stepped)):
        t = [timed(call)[1] for _ in range(args.steps)]
        results[row] = percentiles(t[10:])

    notes = []
    prov = bundle.manifest["provenance"]
    run_dir = Path(args.run or prov["run_dir"])
    reward_name = bundle.family.spec.reward
    if not args.skip_peer and reward_name not in TORCH_REWARDS:
        notes.append(f"pytorch_mppi skipped: no torch twin of reward {reward_name!r} "
                     f"(has: {', '.join(TORCH_REWARDS)})")
        args.skip_peer = True
    checkpoint = None if args.skip_peer else find_checkpoint(run_dir, prov)
    if not args.skip_peer and checkpoint is None:
        notes.append(f"pytorch_mppi skipped: no checkpoint with the bundle's sha256 in {run_dir}/checkpoints "
                     "(its torch weights are needed for the same-model comparison)")
        args.skip_peer = True
    if not args.skip_peer:
        from pytorch_mppi import MPPI

        from metarl_robot.train.runner import load_trained

        algo = load_trained(checkpoint)[2]  # the checkpoint whose sha256 the bundle records
        notes.append(f"pytorch_mppi weights: {checkpoint} (sha256 matches the bundle's provenance)")
        zt = torch.as_tensor(z, dtype=torch.float32)
        half = torch.as_tensor((bundle.robot.action_high - bundle.robot.action_low) / 2, dtype=torch.float32)

        def dynamics(state, action):  # (K, o), (K, a): rows on members round-robin, like ours
            k = state.shape[0]
            m = k // e
            s = state[: m * e].reshape(m, e, -1).transpose(0, 1)
            a = action[: m * e].reshape(m, e, -1).transpose(0, 1)
            with torch.no_grad():
                nxt, _ = algo.model(s.float(), a.float(), zt.expand(e, m, -1))
            return nxt.transpose(0, 1).reshape(m * e, -1)

        task_params = {k: float(np.asarray(v).reshape(-1)[0]) for k, v in params.items()}
        mppi = MPPI(dynamics, torch_cost(bundle.robot, reward_name, task_params), bundle.robot.obs_dim,
                    torch.diag((cfg.noise_std * half) ** 2), num_samples=cfg.samples, horizon=cfg.horizon,
                    lambda_=cfg.temperature, u_min=torch.as_tensor(bundle.robot.action_low, dtype=torch.float32),
                    u_max=torch.as_tensor(bundle.robot.action_high, dtype=torch.float32))
        t = [timed(mppi.command, torch.as_tensor(o, dtype=torch.float32))[1] for o in visited]
        results["pytorch_mppi"] = percentiles(t[10:])

    ratios = {"ours_planner_1iter_over_pytorch_mppi_p50": None, "ours_planner_1iter_over_ort_floor_p50":
              results["ours_planner_1iter"]["p50_ms"] / results["ort_floor"]["p50_ms"],
              "fused_over_stepped_planner_p50": (results["ours_planner_1iter"]["p50_ms"]
                                                 / results["ours_planner_1iter_stepped"]["p50_ms"])}
    if "pytorch_mppi" in results:
        ratios["ours_planner_1iter_over_pytorch_mppi_p50"] = (results["ours_planner_1iter"]["p50_ms"]
                                                              / results["pytorch_mppi"]["p50_ms"])
    doc = {"benchmark": "planner_latency", "bundle": args.bundle, "family": bundle.family.name,
           "planner": cfg.__dict__, "ensemble_size": e, "context_window": window,
           "machine": {"pinned_core": core, "cpus": os.cpu_count(), "platform": platform.platform(),
                       "python": platform.python_version(), "onnxruntime": __import__("onnxruntime").__version__,
                       "torch": torch.__version__},
           "results": results, "ratios": ratios,
           "notes": ["one pinned core, one thread per library; first 10 steps of each row dropped as warm-up",
                     "pytorch_mppi evaluates the same torch weights the ONNX graphs were exported from", *notes]}
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
