"""How often does ``metarl replay --calibration`` call an episode outside the training distribution, in family and
out of it?

Prints one JSON document (progress on stderr). Run from the repository root::

    .venv/bin/python bench/replay_verdict.py --bundle policies/cartpole_mb

The bundle is calibrated first (``calibrate_safety``: ``--calibration-episodes`` train-range sim episodes give the
in-distribution levels). Then sim recordings (``record_sim_episode``, ``--steps`` each, no sensor noise) are
replayed with those levels: ``--per-group`` logs on train-range tasks, on test-range (out-of-distribution) tasks,
and on train-range tasks with each out-of-family effect of ``--effect``. Per group: how many were called *outside*,
and the ratios of their one-step error to the level. The reference is the calibration itself: on its own kind of
episode (train range) the verdict should say *within*.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

EFFECTS = ["delay=1", "damping=hinge:0.02", "friction=hinge:0.01"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="policies/cartpole_mb", help="a bundle with a dynamics model")
    parser.add_argument("--per-group", type=int, default=5, help="logs per group (default 5)")
    parser.add_argument("--steps", type=int, default=200, help="control steps per log (default 200: 8 s)")
    parser.add_argument("--calibration-episodes", type=int, default=8, help="calibration episodes (default 8)")
    parser.add_argument("--effect", action="append", metavar="KIND=VALUE",
                        help=f"out-of-family effects, each its own group (default: {' '.join(EFFECTS)})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tasks and starts")
    args = parser.parse_args()

    from metarl_robot.envs.out_of_family import OutOfFamily
    from metarl_robot.real2sim.sim_record import record_sim_episode
    from metarl_robot.replay.shadow import replay_episode
    from metarl_robot.runtime.bundle import load_bundle
    from metarl_robot.train.safety_calibration import REPORT_FILE, calibrate_safety

    bundle = load_bundle(args.bundle)
    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    groups = [("train", None), ("test", None)] + [(label, OutOfFamily.parse([label]))
                                                  for label in (args.effect or EFFECTS)]
    results = {}
    with tempfile.TemporaryDirectory(prefix="replay_verdict_") as tmp:
        calibrate_safety(args.bundle, tmp, episodes=args.calibration_episodes, check_episodes=1, seed=args.seed,
                         progress=False)
        levels = json.loads((Path(tmp) / REPORT_FILE).read_text())["levels"]
        for label, effects in groups:
            rows = []
            for i in range(args.per_group):
                task = bundle.family.sample(rng, "test" if label == "test" else "train", 1)[0]
                path = Path(tmp) / f"{label.replace('=', '_').replace(':', '_')}_{i}.mcap"
                record_sim_episode(bundle, task, path, args.steps, seed=args.seed + i, effects=effects)
                verdict = replay_episode(path, bundle, levels=levels).verdict
                rows.append({"within": verdict.within, "error_ratio": verdict.error_ratio, "fields": verdict.fields,
                             "line": verdict.line})
                print(f"{label} {i + 1}/{args.per_group}: {verdict.line}", file=sys.stderr, flush=True)
            results[label] = {"outside": sum(r["within"] is False for r in rows), "logs": len(rows),
                              "error_ratios": [r["error_ratio"] for r in rows], "episodes": rows}
    print(json.dumps({"benchmark": "replay_verdict", "bundle": args.bundle, "bundle_sha256": bundle.sha256,
                      "steps": args.steps, "seed": args.seed, "levels": levels, "groups": results,
                      "seconds": round(time.perf_counter() - started, 1)}, indent=2))


if __name__ == "__main__":
    main()
