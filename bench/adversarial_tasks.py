"""Adversarial vs uniform vs Gaussian task sampling at equal training budgets (issue 6, AdMRL).

For each sampler and seed, trains the same config (``metarl train --set loop.task_sampler=...``),
then grades checkpoints along the way with ``metarl eval --grid K --split train``: the gap to the
oracle on every task of a K-per-axis grid over the chosen parameters of the family's *train* box
(the box every sampler draws from; the adversary's objective is its worst case). Every sampler
adds the same number of training transitions per iteration; the adversary also grades and
discards candidates, reported as ``adversary_env_steps``. The oracle's returns on the grid are
computed once and shared by every evaluation (same planner, same start).

Prints one JSON document: per sampler, per checkpoint, worst-case and mean gap and the share of grid tasks
that succeeded (where the family's reward defines success, e.g. the cart-pole swung up) as mean ± std over seeds,
and whether each seed's worst task succeeded (a worst case that failed sits at "oracle minus a failed episode"
whatever else improved); where each sampler trained (share of its chosen tasks per third of every grid
parameter's range); with ``loop.adversary.reward_gradient``, how the gradient's proposals ranked when graded
and the estimator's health; and the comparison the issue sets (adversarial worst case ≥ 25% below uniform's,
mean gap not more than 10% worse). Writes the learning-curve PNG next to the runs.

    python bench/adversarial_tasks.py --out runs/bench/adversarial --seeds 0 1 2 --jobs 2 > result.json

With ``--ray-address`` (a cluster started with ``ray start``; docs/scale_out.md) the adversary's oracle episodes,
most of an adversarial run's time, run on the cluster, and ``--jobs`` can grow with it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path

import numpy as np

SAMPLERS = ("uniform", "gaussian", "adversarial")
METARL = [sys.executable, "-m", "metarl_robot.cli"]


def _run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")


def _train(args: argparse.Namespace, sampler: str, seed: int) -> Path:
    name = f"{sampler}_s{seed}"
    run = args.out / "runs" / name
    if (run / "summary.json").is_file():
        return run  # already trained (the benchmark can be resumed)
    sets = [f"loop.task_sampler={sampler}", f"seed={seed}", f"loop.iterations={args.iterations}", f"name={name}",
            *args.set]
    if (run / "checkpoints" / "latest.pt").is_file():  # interrupted: go on from its last iteration
        cmd = [*METARL, "train", "--resume", str(run), "--set", f"loop.iterations={args.iterations}"]
    else:
        cmd = [*METARL, "train", args.config, "--out", str(args.out / "runs")]
        for s in sets:
            cmd += ["--set", s]
    if args.ray_address:  # the adversary's oracle episodes on the cluster (the same runs: docs/scale_out.md)
        cmd += ["--backend", "ray", "--ray-address", args.ray_address]
    log = args.out / "logs" / f"train_{name}.log"
    _run(cmd, log.with_name(f"{log.stem}_resumed_{time.strftime('%Y%m%d%H%M%S')}.log") if "--resume" in cmd else log)
    return run


def _evaluate(args: argparse.Namespace, run: Path, iteration: int) -> dict:
    out = args.out / "eval" / run.name / f"it{iteration:04d}"
    if not (out / "eval.json").is_file():
        cmd = [*METARL, "eval", str(run / "checkpoints" / f"ckpt_{iteration:04d}.pt"), "--split", "train",
               "--grid", str(args.grid), "--params", ",".join(args.params), "--no-unadapted", "--seed", "0",
               "--oracle-cache", str(args.out / "oracle_cache.json"), "--out", str(out)]
        _run(cmd, args.out / "logs" / f"eval_{run.name}_it{iteration:04d}.log")
    report = json.loads((out / "eval.json").read_text())
    metrics = {int(float(r["iteration"])): r for r in _csv(run / "metrics.csv")}[iteration]
    worst = report["tasks"][report["summary"]["gap"]["worst_task"]]
    return {"iteration": iteration, "transitions": float(metrics["transitions"]),
            "adversary_env_steps": float(metrics.get("adversary_env_steps", 0.0)),
            "worst_gap": report["summary"]["gap"]["worst"], "mean_gap": report["summary"]["gap"]["mean"],
            "success_rate": report["summary"].get("success_rate_adapted"), "worst_task": worst["task"],
            "worst_task_succeeded": worst.get("success_adapted")}  # None: the family's reward defines no success


def _task_log(run: Path) -> list[dict]:
    """A run's ``tasks.jsonl``: one dict per iteration."""
    return [json.loads(line) for line in (run / "tasks.jsonl").read_text().splitlines() if line.strip()]


def _training_spread(run: Path, box, bins: int = 3) -> dict[str, list[float]]:
    """Where a run trained: per parameter of ``box`` (a ``ParamBox`` over the grid's parameters, train range),
    the fraction of its sampler-chosen training tasks (iterations >= 1; iteration 0 is the same random start for
    every sampler) in each of ``bins`` equal parts of the range, in unit coordinates (log space for
    log-uniform parameters)."""
    rows = _task_log(run)
    values = np.array([[task[n] for n in box.names] for row in rows if row["iteration"] >= 1 for task in row["tasks"]])
    if values.size == 0:
        return {name: [] for name in box.names}
    units = np.clip(box.to_unit(values), 0.0, 1.0)
    return {name: (np.histogram(units[:, i], bins=bins, range=(0.0, 1.0))[0] / len(units)).tolist()
            for i, name in enumerate(box.names)}


def _gradient_proposals(run: Path) -> dict | None:
    """How the reward-gradient adversary's proposals fared when graded (``loop.adversary.reward_gradient``).

    Each iteration's step from its worst candidate is the next iteration's first candidate (``tasks.jsonl``):
    its gap rank among that iteration's candidates (1 = the worst), whether it was trained on, and its gap
    against the median candidate's. A uniform pick among P candidates has mean rank (P + 1) / 2.
    """
    rows = _task_log(run)
    graded = []
    for before, row in pairwise(rows):
        proposal = (before.get("reward_gradient") or {}).get("proposal")
        if proposal is None or not row.get("candidates") or row["candidates"][0] != proposal:
            continue
        gaps = np.asarray(row["candidate_gaps"], dtype=float)
        graded.append({"iteration": row["iteration"], "rank": int(1 + np.sum(gaps > gaps[0])),
                       "trained": 0 in row["chosen"], "gap_minus_median": float(gaps[0] - np.median(gaps)),
                       "population": len(gaps),
                       "clipped_to_box": any(step.get("projected", 0) for step in before["reward_gradient"]["steps"])})
    if not graded:
        return None
    # The estimator's health over every step taken: CG meeting negative curvature (the adapted policy is not a
    # strict maximum of the model's objective, so -H^-1 M is unreliable), and the implicit correction term
    # outweighing the envelope terms (oracle - direct) that need no Hessian.
    steps = [step for row in rows for step in (row.get("reward_gradient") or {}).get("steps", [])]
    names = sorted(k.removeprefix("correction_") for k in steps[0] if k.startswith("correction_")) if steps else []
    dominated = [abs(s[f"correction_{n}"]) > abs(s[f"oracle_term_{n}"] - s[f"direct_term_{n}"]) for s in steps
                 for n in names]
    health = {"steps": len(steps),
              "cg_negative_curvature_fraction": float(np.mean([s.get("cg_negative_curvature", 0) for s in steps])),
              "median_cg_relative_residual": float(np.median([s.get("cg_relative_residual", np.nan) for s in steps])),
              "correction_dominates_fraction": float(np.mean(dominated)) if dominated else float("nan")}
    return {"graded": len(graded), "mean_rank": float(np.mean([g["rank"] for g in graded])), **health,
            "uniform_mean_rank": (graded[0]["population"] + 1) / 2,
            "trained_fraction": float(np.mean([g["trained"] for g in graded])),
            "mean_gap_minus_median": float(np.mean([g["gap_minus_median"] for g in graded])),
            "clipped_fraction": float(np.mean([g["clipped_to_box"] for g in graded])), "per_iteration": graded}


def _csv(path: Path) -> list[dict]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))


def _family_name(args: argparse.Namespace) -> str:
    from metarl_robot.train.config import load_config

    return load_config(args.config, _overrides(args)).family


def _overrides(args: argparse.Namespace) -> dict[str, str] | None:
    import yaml

    return {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)} if args.set else None


def _warm_oracle(args: argparse.Namespace) -> None:
    """Compute the grid's oracle returns once, before parallel evaluations share the cache file."""
    from metarl_robot.spec.family import load_family
    from metarl_robot.spec.robot import load_robot
    from metarl_robot.train.config import load_config
    from metarl_robot.train.gap import OracleReturns

    cfg = load_config(args.config, _overrides(args))
    family = load_family(cfg.family)
    tasks = family.grid(args.grid, "train", args.params)
    OracleReturns(family, load_robot(family.spec.robot), cfg.planner, threads=args.jobs,
                  cache_file=args.out / "oracle_cache.json")(tasks, seed=0)


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for sampler, color in zip(SAMPLERS, ("tab:gray", "tab:blue", "tab:red"), strict=True):
        curve = result["samplers"].get(sampler)
        if not curve:
            continue
        x = [c["transitions"] for c in curve["curve"]]
        for ax, key in zip(axes, ("worst_gap", "mean_gap"), strict=True):
            mean = np.array([c[key]["mean"] for c in curve["curve"]])
            std = np.array([c[key]["std"] for c in curve["curve"]])
            ax.plot(x, mean, "o-", color=color, label=sampler)
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15)
    for ax, title in zip(axes, ("worst-case gap over the grid", "mean gap over the grid"), strict=True):
        ax.set_xlabel("training transitions")
        ax.set_ylabel("oracle - adapted return")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{result['family']}: mean ± std over seeds {result['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/mb_cartpole_swingup.yaml", help="training config of every run")
    p.add_argument("--out", type=Path, default=Path("runs/bench/adversarial"), help="runs, evaluations, plot")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--iterations", type=int, default=8, help="training iterations of every run")
    p.add_argument("--eval-at", nargs="+", type=int, help="checkpoints graded (default: the middle and the last)")
    p.add_argument("--grid", type=int, default=4, help="grid points per varied parameter")
    p.add_argument("--params", nargs="+", default=["pole_mass_scale", "pole_length"],
                   help="parameters varied on the grid (the others at nominal)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    p.add_argument("--jobs", type=int, default=2, help="runs trained / evaluated at once")
    p.add_argument("--ray-address", metavar="HOST:PORT", help="a running Ray cluster: every run's adversary grades "
                   "its candidates there (metarl train --backend ray), with the same results; raise --jobs to the "
                   "runs the cluster should train at once")
    args = p.parse_args()
    eval_at = args.eval_at or sorted({args.iterations // 2, args.iterations - 1})
    started = time.time()
    _warm_oracle(args)
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = dict(zip([(s, seed) for s in args.samplers for seed in args.seeds],
                        pool.map(lambda job: _train(args, *job), [(s, seed) for s in args.samplers
                                                                   for seed in args.seeds]), strict=True))
        graded = dict(zip([(k, it) for k in runs for it in eval_at],
                          pool.map(lambda job: _evaluate(args, runs[job[0]], job[1]),
                                   [(k, it) for k in runs for it in eval_at]), strict=True))
    result: dict = {"benchmark": "adversarial_tasks", "config": args.config, "set": args.set,
                    "family": _family_name(args),
                    "seeds": args.seeds, "iterations": args.iterations, "grid": {"k": args.grid, "params": args.params,
                                                                                 "split": "train"},
                    "samplers": {}}
    from metarl_robot.spec.family import ParamBox, load_family

    box = ParamBox(load_family(result["family"]), args.params, "train")
    for sampler in args.samplers:
        curve = []
        for it in eval_at:
            rows = [graded[((sampler, seed), it)] for seed in args.seeds]
            curve.append({"iteration": it, "transitions": float(np.mean([r["transitions"] for r in rows])),
                          "adversary_env_steps": float(np.mean([r["adversary_env_steps"] for r in rows])),
                          **{key: {"mean": float(np.mean([r[key] for r in rows])),
                                   "std": float(np.std([r[key] for r in rows])),
                                   "per_seed": [r[key] for r in rows]}
                             for key in ("worst_gap", "mean_gap", "success_rate") if rows[0][key] is not None},
                          "worst_tasks": [r["worst_task"] for r in rows],
                          "worst_tasks_succeeded": [r["worst_task_succeeded"] for r in rows]})
        result["samplers"][sampler] = {"curve": curve}
        spreads = [_training_spread(runs[(sampler, seed)], box) for seed in args.seeds]
        result["samplers"][sampler]["trained_in_thirds_of_range"] = {
            name: np.mean([s[name] for s in spreads], axis=0).tolist() for name in args.params}
        proposals = {seed: _gradient_proposals(runs[(sampler, seed)]) for seed in args.seeds}
        if any(proposals.values()):
            result["samplers"][sampler]["reward_gradient_proposals"] = proposals
    if {"uniform", "adversarial"} <= set(args.samplers):
        uni, adv = result["samplers"]["uniform"]["curve"][-1], result["samplers"]["adversarial"]["curve"][-1]
        worst_cut = 1 - adv["worst_gap"]["mean"] / uni["worst_gap"]["mean"]
        mean_worse = adv["mean_gap"]["mean"] / uni["mean_gap"]["mean"] - 1
        result["comparison"] = {
            "worst_gap_reduction_vs_uniform": worst_cut, "mean_gap_increase_vs_uniform": mean_worse,
            "target": "worst-case gap reduced >= 25% vs uniform with the mean gap not more than 10% worse",
            "met": bool(worst_cut >= 0.25 and mean_worse <= 0.10)}
    result["seconds"] = round(time.time() - started)
    _plot(result, args.out / "learning_curves.png")
    result["plot"] = str(args.out / "learning_curves.png")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
