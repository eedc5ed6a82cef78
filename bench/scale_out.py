"""Ray against this process: the speed-up of ``metarl eval``'s grid and of the adversary's grading with 1 and 2
workers, and Ray's overhead per job (issue 21).

Per configuration (``local``: this process, one job after another; ``ray_wN``: a Ray started by this process with
N CPU cores):

- **eval grid**: ``metarl eval`` of a bundle over a ``--grid K`` of the family's test box, one task per job
  (``--tasks-per-job 1``): the controller's episodes and the oracle's, every task its own job;
- **adversary grading**: the oracle episodes of one adversarial iteration, ``--population`` candidate tasks of the
  train box from their reset seeds (``OracleReturns``, one task per job), with the planner of ``--config``;
- **overhead**: ``--noop-jobs`` jobs that return at once, submitted together (throughput: ms per job) and one at a
  time (latency: ms per round trip); and the real work's extra time over the local run per job.

The limit each speed-up is compared with is the number of workers (linear scaling), measured in the same run from
the local time (the mean of a local run before and after the Ray ones; their spread is the machine's run-to-run
noise); every Ray result is checked equal to the local one (``identical``). The machine must be otherwise idle.
A Ray's workers start cold (they import torch, MuJoCo and the package): ``cold_start_s`` is timed apart, by one
warm-up job per worker, so the figures are those of a running cluster.

    python bench/scale_out.py > docs/bench/scale_out.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from metarl_robot.backend import Backend


def _noop(i: int) -> int:
    return i


def _warm_up(seconds: float) -> int:
    """Import what the real jobs import and hold the worker long enough that each warm-up job gets its own."""
    import metarl_robot.train.evaluate  # noqa: F401  (torch, MuJoCo, onnxruntime and the package)

    time.sleep(seconds)
    return os.getpid()


def _eval_grid(args: argparse.Namespace, backend: Backend, out: Path) -> tuple[float, dict]:
    from metarl_robot.train.evaluate import evaluate

    started = time.perf_counter()
    report = evaluate(args.bundle, out, grid=args.grid, grid_params=args.params, seed=0, unadapted=False,
                      oracle_threads=1, planner_overrides={"samples": args.samples, "horizon": args.horizon},
                      progress=False, backend=backend, tasks_per_job=1)
    return time.perf_counter() - started, report


def _grade(args: argparse.Namespace, backend: Backend) -> tuple[float, np.ndarray]:
    from metarl_robot.spec.family import load_family
    from metarl_robot.spec.robot import load_robot
    from metarl_robot.train.config import load_config
    from metarl_robot.train.gap import OracleReturns

    cfg = load_config(args.config, {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)})
    family = load_family(cfg.family)
    candidates = family.sample(np.random.default_rng(0), "train", args.population)
    starts = [cfg.seed * 100_003 + 101 + i for i in range(args.population)]  # as the runner's iteration seeds differ
    oracle = OracleReturns(family, load_robot(family.spec.robot), cfg.planner, threads=1, backend=backend)
    started = time.perf_counter()
    returns = oracle(candidates, seed=starts)
    return time.perf_counter() - started, returns


def _overhead(backend: Backend, n: int) -> dict:
    from metarl_robot.backend import Job, run_all

    jobs = [Job(f"no-op {i}", (i,)) for i in range(n)]
    started = time.perf_counter()
    assert run_all(backend, _noop, jobs) == list(range(n))
    together = time.perf_counter() - started
    started = time.perf_counter()
    for job in jobs[:min(n, 50)]:
        run_all(backend, _noop, [job])
    one_by_one = (time.perf_counter() - started) / min(n, 50)
    return {"throughput_ms_per_job": 1000 * together / n, "round_trip_ms": 1000 * one_by_one}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", default="policies/cartpole_mb", help="bundle graded on the eval grid")
    p.add_argument("--grid", type=int, default=2, help="grid points per varied parameter of the eval grid")
    p.add_argument("--params", nargs="+", default=["pole_length", "motor_gain_scale"], help="varied on the grid")
    p.add_argument("--samples", type=int, default=64, help="the eval's planner samples (controller and oracle)")
    p.add_argument("--horizon", type=int, default=20, help="the eval's planner horizon")
    p.add_argument("--config", default="configs/mb_cartpole_swingup.yaml", help="run config of the adversary")
    p.add_argument("--set", action="append", default=["planner.samples=64", "planner.iterations=1"],
                   metavar="KEY=VALUE", help="override of that config (default: the adversarial comparison's "
                   "planner, docs/BENCHMARKS.md)")
    p.add_argument("--population", type=int, default=8, help="candidate tasks graded (the adversary's default)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray sizes measured")
    p.add_argument("--noop-jobs", type=int, default=200, help="jobs of the overhead measurement")
    args = p.parse_args()

    import ray

    from metarl_robot.backend import Job, LocalBackend, RayBackend, run_all

    result: dict = {"benchmark": "scale_out", "cpu_count": os.cpu_count(), "ray": ray.__version__,
                    "eval_grid": {"bundle": args.bundle, "grid": args.grid, "params": args.params,
                                  "planner": {"samples": args.samples, "horizon": args.horizon}},
                    "adversary_grading": {"config": args.config, "set": args.set, "population": args.population},
                    "configurations": {}}
    with tempfile.TemporaryDirectory() as tmp:
        local = LocalBackend()
        # Warm-up (not timed): the first evaluation in a process pays imports and first calls, as a worker's does.
        evaluate_one = argparse.Namespace(**{**vars(args), "grid": 1})
        _eval_grid(evaluate_one, local, Path(tmp) / "warm")
        eval_s, reference = _eval_grid(args, local, Path(tmp) / "local")
        grade_s, grade_reference = _grade(args, local)
        result["eval_grid"]["tasks"] = len(reference["tasks"])
        result["configurations"]["local"] = {"eval_grid_s": eval_s, "adversary_grading_s": grade_s}
        jobs = {"eval_grid": 2 * len(reference["tasks"]), "adversary_grading": args.population}
        rows = {}
        for workers in args.workers:
            backend = RayBackend(workers=workers)
            started = time.perf_counter()
            pids = run_all(backend, _warm_up, [Job(f"warm-up {i}", (1.0,)) for i in range(workers)])
            cold = time.perf_counter() - started - 1.0
            overhead = _overhead(backend, args.noop_jobs)
            eval_ray, report = _eval_grid(args, backend, Path(tmp) / f"ray{workers}")
            grade_ray, grade_returns = _grade(args, backend)
            row = {"ray_init_s": backend.connect_seconds, "cold_start_s": cold, "distinct_workers": len(set(pids)),
                   "eval_grid_s": eval_ray, "adversary_grading_s": grade_ray, **overhead,
                   "identical": report["tasks"] == reference["tasks"]
                   and bool(np.array_equal(grade_returns, grade_reference))}
            rows[f"ray_w{workers}"] = row
            ray.shutdown()
        # The local run again, last: the spread of the two local runs is this machine's run-to-run noise, against
        # which a speed-up (or an overhead per job) must be read.
        eval_again, _ = _eval_grid(args, local, Path(tmp) / "local_again")
        grade_again, _ = _grade(args, local)
    local_row = result["configurations"]["local"]
    local_row.update({"eval_grid_again_s": eval_again, "adversary_grading_again_s": grade_again})
    for what in ("eval_grid", "adversary_grading"):
        runs = [local_row[f"{what}_s"], local_row[f"{what}_again_s"]]
        local_row[f"{what}_mean_s"] = float(np.mean(runs))
        local_row[f"{what}_spread"] = float(np.ptp(runs) / np.mean(runs))
    for name, row in rows.items():
        workers = int(name.removeprefix("ray_w"))
        for what in ("eval_grid", "adversary_grading"):
            local_s = local_row[f"{what}_mean_s"]
            row[f"{what}_speedup"] = local_s / row[f"{what}_s"]
            row[f"{what}_efficiency"] = row[f"{what}_speedup"] / workers  # of the linear limit
            # Time beyond the linear limit, per job and worker lane (imbalance and noise included).
            row[f"{what}_overhead_ms_per_job"] = 1000 * (row[f"{what}_s"] - local_s / workers) / (jobs[what] / workers)
        result["configurations"][name] = row
    result["jobs"] = jobs
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
