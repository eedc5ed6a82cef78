"""Does the loop from hardware logs back to training help? ``metarl retrain`` on logs of an out-of-family twin, then
the old and the new bundle on that twin itself.

Prints one JSON document (progress on stderr). Run from the repository root::

    .venv/bin/python bench/retrain_loop.py --run runs/online_mbrl_cartpole_swingup_s0 \\
        --bundle policies/cartpole_online --out runs/bench/retrain_loop

Per out-of-family effect (``--effect``, docs/out_of_family.md): a twin task drawn from the family's train box,
``--logs`` sim recordings of the bundle driving the twin (``record_sim_episode`` with the effect and ``--noise``
sensor noise, as the node would log them), ``metarl retrain`` on them (``--iterations`` fine-tuning iterations from
the run's weights and data; retrain's own comparison on the identified tasks is skipped), then the old and the new
bundle's adapted controller on the twin's task *with the effect*, from ``--twin-starts`` initial states (reset
seeds; the mean return is compared: one episode's return is chaotic in the swing-up), beside the oracle, which
plans through the delay, damping, friction and integrator. ``--control`` also fine-tunes the run the same number of
iterations on its *own* family (no logs) once and grades that bundle on every twin: what the identified family
gives beyond what more training gives (``--control-only``: that alone, on the same twins, with the old bundle's
unadapted controller). The old bundle is graded unadapted too (empty context, prior last layer): the reference of
no adaptation at all. The target of issue 16:
the new bundle's return beats the old one's in at least 4 of 5 effects, over 3 seeds (run once per ``--seed``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

EFFECTS = ["delay=1", "damping=hinge:0.02", "friction=hinge:0.01", "integrator=RK4", "bias=pole_angle:0.03"]
TARGET_IMPROVED = 4
"""Effects (of 5) in which the retrained bundle must beat the old one on the twin (issue 16)."""


def twin_returns(source: str | Path, folder: Path, name: str, family: str, task: dict, starts: list[int], effects,
                 oracle: bool, unadapted: bool = False) -> list[dict]:
    """``source``'s adapted controller (and with ``unadapted`` its unadapted one) on the twin (``task`` with
    ``effects``) from each reset seed in ``starts``."""
    from metarl_robot.train.evaluate import evaluate

    return [evaluate(source, folder / f"twin_{name}_{start}", family=family, tasks=[task], seed=start,
                     effects=effects, progress=False, modes=("unadapted",) if unadapted else (), oracle=oracle,
                     oracle_cache=folder / "twin_oracle_cache.json")["tasks"][0] for start in starts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the run folder the bundle was exported from")
    parser.add_argument("--bundle", required=True, help="the bundle the twin's logs run")
    parser.add_argument("--out", type=Path, required=True, help="folder for the logs, retrain runs and evaluations")
    parser.add_argument("--effect", action="append", metavar="KIND=VALUE", help=f"default: {' '.join(EFFECTS)}")
    parser.add_argument("--logs", type=int, default=3, help="logs per effect (default 3)")
    parser.add_argument("--steps", type=int, default=250, help="control steps per log (default 250: the node's 10 s)")
    parser.add_argument("--noise", type=float, default=0.002, help="sensor noise std, scale units (default 0.002)")
    parser.add_argument("--iterations", type=int, default=5, help="fine-tuning iterations (default 5)")
    parser.add_argument("--twin-starts", type=int, default=3, help="twin episodes per bundle (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the twin tasks, logs and evaluations")
    parser.add_argument("--control", action="store_true",
                        help="also grade a control: the run fine-tuned as long on its own family, no logs")
    parser.add_argument("--control-only", action="store_true",
                        help="only the control, on the twins the same --seed gives (no logs, no retrain)")
    args = parser.parse_args()

    from metarl_robot.envs.out_of_family import OutOfFamily
    from metarl_robot.real2sim.retrain import fine_tune, retrain
    from metarl_robot.real2sim.sim_record import record_sim_episode
    from metarl_robot.runtime.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    family = bundle.family
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    control = None
    if args.control or args.control_only:
        control = fine_tune(args.run, args.out / "control", None, args.iterations, progress=False)
        print(f"control: fine-tuned on {family.name}, {time.perf_counter() - started:.0f} s", file=sys.stderr)
    starts = [args.seed * 100 + j for j in range(args.twin_starts)]
    rows = {}
    for label in args.effect or EFFECTS:
        effects = OutOfFamily.parse([label])
        folder = args.out / label.replace("=", "_").replace(":", "_")
        folder.mkdir(parents=True, exist_ok=False)
        task = family.sample(rng, "train", 1)[0]  # drawn first, so the control grades on the same twins
        row: dict = {"task": task, "twin_starts": starts}
        if not args.control_only:
            logs = [record_sim_episode(bundle, task, folder / f"log{i}.mcap", args.steps, seed=args.seed * 100 + i,
                                       obs_noise=args.noise, effects=effects) for i in range(args.logs)]
            summary = retrain(logs, args.run, args.bundle, folder / "retrain", iterations=args.iterations,
                              noise_std=args.noise, progress=False, compare=False)
            old = twin_returns(args.bundle, folder, "old", family.name, task, starts, effects, oracle=True,
                               unadapted=True)
            new = twin_returns(summary["bundle_new"], folder, "new", family.name, task, starts, effects, oracle=False)
            row.update({"verdicts": [r["verdict"] for r in summary["per_log"]],
                        "delays": [r["delay"] for r in summary["per_log"]],
                        "twin_returns_old": [r["return_adapted"] for r in old],
                        "twin_returns_new": [r["return_adapted"] for r in new],
                        "twin_returns_unadapted": [r["return_unadapted"] for r in old],
                        "twin_return_oracle": float(np.mean([r["return_oracle"] for r in old])),
                        "retrain_seconds": summary["seconds"]})
            row["twin_return_old"] = float(np.mean(row["twin_returns_old"]))
            row["twin_return_new"] = float(np.mean(row["twin_returns_new"]))
            row["improved"] = bool(row["twin_return_new"] > row["twin_return_old"])
        if control is not None:
            graded = twin_returns(control, folder, "control", family.name, task, starts, effects, oracle=False)
            row["twin_returns_control"] = [r["return_adapted"] for r in graded]
        if args.control_only:  # the no-adaptation reference the full run takes from its old-bundle episodes
            old = twin_returns(args.bundle, folder, "old", family.name, task, starts, effects, oracle=True,
                               unadapted=True)
            row["twin_returns_unadapted"] = [r["return_unadapted"] for r in old]
            row["twin_return_oracle"] = float(np.mean([r["return_oracle"] for r in old]))
        for key in ("control", "unadapted"):
            if f"twin_returns_{key}" in row:
                row[f"twin_return_{key}"] = float(np.mean(row[f"twin_returns_{key}"]))
        rows[label] = row
        graded = ", ".join(f"{k} {row[f'twin_return_{k}']:.1f}" for k in ("old", "new", "control", "unadapted")
                           if f"twin_return_{k}" in row)
        print(f"{label}: twin return {graded} (mean of {len(starts)} starts), {time.perf_counter() - started:.0f} s",
              file=sys.stderr, flush=True)
    improved = None if args.control_only else sum(r["improved"] for r in rows.values())
    print(json.dumps({"benchmark": "retrain_loop", "bundle": args.bundle, "run": args.run, "seed": args.seed,
                      "logs_per_effect": args.logs, "steps": args.steps, "noise": args.noise,
                      "iterations": args.iterations, "twin_starts": args.twin_starts,
                      "control": str(control) if control else None, "effects": rows, "improved": improved,
                      "target_improved": TARGET_IMPROVED if len(rows) == 5 and improved is not None else None,
                      "seconds": round(time.perf_counter() - started, 1)}, indent=2, default=float))


if __name__ == "__main__":
    main()
