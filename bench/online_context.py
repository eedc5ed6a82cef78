"""Does the inferred context help or hurt an ``online_model`` bundle's online last layer? The same tasks, starts and
planner seed as the bundle's eval report, three ways of conditioning the model:

- ``adapted``: as on the robot, the context inferred from the last K transitions at every step;
- ``held``: the context inferred once the window first holds K transitions, then held for the rest of the episode
  (tests whether the context's drift is what costs return: the posterior sums features computed under every
  context the episode had);
- ``online_only``: the empty window's context throughout (no context adaptation).

The online last layer is fitted in all three. Per mode: returns, episodes swung up (the family's success
criterion), mean return over the report's oracle mean, and the adapter's own one-step prediction error after 50
steps (RMS, robot.yaml scale units, on its own trajectory). Prints one JSON document. Run from the repository root::

    .venv/bin/python bench/online_context.py --bundle policies/cartpole_online
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

MODES = ("adapted", "held", "online_only")
ADAPTATION_STEPS = 50


def hold_context_once_full(adapter) -> None:
    """Make ``adapter`` keep, per env, the context it inferred when its window first held K transitions."""
    infer, reset = adapter.context, adapter.reset
    held = {"z": None, "set": np.zeros(adapter.batch, bool)}

    def context() -> np.ndarray:
        z = infer()
        if held["z"] is None:
            held["z"] = z.copy()
        newly = (adapter.window.size >= adapter.window.window) & ~held["set"]
        held["z"][newly] = z[newly]
        held["set"] |= newly
        return np.where(held["set"][:, None], held["z"], z)

    def reset_and_release(which=None) -> None:
        reset(which)
        held["z"], held["set"] = None, np.zeros(adapter.batch, bool)

    adapter.context, adapter.reset = context, reset_and_release


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="policies/cartpole_online", help="an online_model bundle folder")
    parser.add_argument("--eval", default=None, help="its eval.json (default: <bundle>/eval/eval.json): the tasks, "
                        "seed, planner and oracle returns")
    parser.add_argument("--tasks", type=int, default=0, help="only the first N of the report's tasks (0: all; "
                        "fewer tasks is a smaller batch, whose planner noise differs from the report's)")
    args = parser.parse_args()

    from metarl_robot.algos.mpc_controller import MPCController
    from metarl_robot.runtime.bundle import load_bundle
    from metarl_robot.train.gap import episode_success, run_episodes

    bundle = load_bundle(args.bundle)
    if "online_only" not in bundle.adaptation_modes:
        sys.exit(f"bench/online_context.py: {args.bundle} is a {bundle.kind} bundle; it has no online last layer")
    report_path = Path(args.eval or Path(args.bundle) / "eval" / "eval.json")
    if not report_path.is_file():
        sys.exit(f"bench/online_context.py: no eval report {report_path}; run metarl eval on the bundle first")
    report = json.loads(report_path.read_text())
    rows = report["tasks"][:args.tasks or None]
    tasks = [row["task"] for row in rows]
    n, seed, family = len(tasks), int(report["seed"]), bundle.family
    params = {k: np.array([t[k] for t in tasks]) for k in family.reward_names}
    planner = {k: v for k, v in report["planner"].items() if k != "seed"}
    oracle = [row["return_oracle"] for row in rows if "return_oracle" in row]
    results = {}
    for mode in MODES:
        started = time.perf_counter()
        adapter = bundle.make_adapter(batch=n, planner_overrides=planner, seed=seed,
                                      **bundle.adaptation_modes["online_only" if mode == "online_only" else "adapted"])
        if mode == "held":
            hold_context_once_full(adapter)
        controller = MPCController(adapter, params)
        episodes = run_episodes(family, bundle.robot, tasks, [seed] * n, controller)
        errors = np.stack(controller.errors, axis=1)
        success = episode_success(family, episodes.components)
        results[mode] = {
            "returns": episodes.returns.round(2).tolist(), "mean_return": float(episodes.returns.mean()),
            "over_oracle": float(episodes.returns.mean() / np.mean(oracle)) if len(oracle) == n else None,
            "swung_up": None if success is None else int(np.sum(success)),
            "pred_err_after_50": float(np.nanmean(errors[:, ADAPTATION_STEPS:])),
            "seconds": round(time.perf_counter() - started, 1)}
        print(f"{mode}: mean return {results[mode]['mean_return']:.1f}", file=sys.stderr)
    print(json.dumps({"bundle": str(args.bundle), "bundle_sha256": bundle.sha256, "eval": str(report_path),
                      "tasks": n, "seed": seed, "oracle_mean_return": float(np.mean(oracle)) if oracle else None,
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
