"""Environment control steps per second: our families vs gymnasium's HalfCheetah-v5 vs raw MuJoCo.

Prints one JSON document to stdout; progress goes to stderr. Run from the repository root::

    .venv/bin/python bench/env_steps.py > env_steps.json     # or: make bench

Three kinds of rows, all measured in the same run on the same machine:

- ``ours``:  every task family's env (``metarl_robot.envs.make_env``, i.e. ``gym.make``), single and
  vectorised with gymnasium's SyncVectorEnv / AsyncVectorEnv (``rollout.make_vector_env``).
- ``peer``:  gymnasium's own ``HalfCheetah-v5`` (same MJCF dynamics as ``half_cheetah_vel``, same
  timestep 0.01 s and frame_skip 5), single and with the same two vector envs.
- ``floor``: raw ``mujoco.mj_step(m, d, nstep=substeps)`` on the robot's compiled MJCF, one call per
  control step with a random ``ctrl``: what the physics alone costs, no Python env around it.

Every row counts environment CONTROL steps (one action each); a vector step of N sub-envs counts N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import redirect_stdout
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np

from metarl_robot.envs import FAMILY_ENV_IDS, make_env
from metarl_robot.envs.rollout import VectorMode, make_vector_env
from metarl_robot.machine import cpu_model
from metarl_robot.spec.family import load_family
from metarl_robot.spec.robot import load_robot

PEER_ENV_ID = "HalfCheetah-v5"
PEER_FAMILY = "half_cheetah_vel"
"""The family whose dynamics equal the peer's: the ours/gymnasium ratio is reported for it."""

DEFAULT_STEPS = 6000
QUICK_STEPS = 300
DEFAULT_REPEATS = 3
ACTION_BANK = 1024
"""Random actions are drawn before timing and cycled, so the generator's cost is in no row."""

EPILOG = """\
what is measured
  Control steps per second with uniform random actions (a seeded numpy generator, drawn before
  timing). Each row: a warm-up of max(1, steps/10) steps, then R repeats of --steps control steps,
  each timed with time.perf_counter; the JSON gives the median, min and max over the repeats.
  Vector rows take steps/num_envs vector steps per repeat and report total env-steps/s
  (num_envs x vector steps / s). Episodes have the family's fixed length; at an episode end the
  loop resets the env (all sub-envs of a vector env, whose autoreset is disabled), and that
  reset is inside the timed loop, as in a user's collection loop. Async env start-up is not timed.

how to read the ratios ("ratios" in the JSON)
  ours_vs_raw_mujoco            ours single / raw mj_step floor, same robot: the fraction of raw
                                MuJoCo speed we reach (0.62 = 62%); 1 - ratio is the overhead we own
                                (Python env, observation gather, reward, info dict, wrappers).
  ours_vs_gymnasium_halfcheetah half_cheetah_vel single / gymnasium HalfCheetah-v5 single: >1 means
                                our env steps faster than gymnasium's on the same dynamics.
  gymnasium_halfcheetah_vs_raw_mujoco   the peer's own fraction of raw MuJoCo speed, for scale.
  Numbers from different machines or runs are not comparable; ratios from one run are.
"""


# ---- measurement ---------------------------------------------------------------------------------
Runner = Callable[[int], None]
"""``run(n)``: advance ``n`` steps (control steps, or vector steps for a vector env)."""


def summarise(rates: Sequence[float]) -> dict[str, float]:
    """Median, min and max of per-repeat rates."""
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def measure(run: Runner, calls: int, env_steps_per_call: int, warmup: int, repeats: int) -> list[float]:
    """Warm up, then time ``repeats`` batches of ``calls`` steps; returns env-steps/s of each batch."""
    run(warmup)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(calls)
        rates.append(calls * env_steps_per_call / (time.perf_counter() - start))
    return rates


def draw_actions(space: gym.spaces.Box, rng: np.random.Generator) -> np.ndarray:
    """``(ACTION_BANK, *space.shape)`` uniform samples in the box, in the space's dtype."""
    return rng.uniform(space.low, space.high, size=(ACTION_BANK, *space.shape)).astype(space.dtype)


class StepLoop:
    """Steps an env with pre-drawn actions, resetting it when an episode ends.

    Works for a single env and for a vector env with autoreset disabled, whose sub-envs are all
    reset together when any episode ends (``np.any`` covers a bool and an array of them).
    """

    def __init__(self, env: gym.Env | gym.vector.VectorEnv, actions: np.ndarray, seed: int) -> None:
        self.env, self.actions, self.i = env, actions, 0
        env.reset(seed=seed)

    def __call__(self, n: int) -> None:
        env, actions, i = self.env, self.actions, self.i
        for _ in range(n):
            _, _, terminated, truncated, _ = env.step(actions[i % ACTION_BANK])
            i += 1
            if np.any(terminated) or np.any(truncated):
                env.reset()
        self.i = i


class RawMujocoLoop:
    """The floor: ``mj_step(nstep=substeps)`` per control step on the robot's MJCF, random ``ctrl``.

    ``mj_resetData`` every ``episode_steps`` control steps, like the env loops' resets.
    """

    def __init__(self, robot_name: str, episode_steps: int, rng: np.random.Generator) -> None:
        robot = load_robot(robot_name)
        self.model = mujoco.MjModel.from_xml_path(str(robot.mjcf_path))
        self.data = mujoco.MjData(self.model)
        self.substeps = robot.control.substeps
        self.episode_steps = episode_steps
        actions = rng.uniform(robot.action_low, robot.action_high, size=(ACTION_BANK, robot.action_dim))
        self.ctrl = np.zeros((ACTION_BANK, self.model.nu))
        self.ctrl[:, [self.model.actuator(a.actuator).id for a in robot.action]] = actions
        self.i = 0

    def __call__(self, n: int) -> None:
        m, d, ctrl, substeps, i = self.model, self.data, self.ctrl, self.substeps, self.i
        for _ in range(n):
            d.ctrl[:] = ctrl[i % ACTION_BANK]
            mujoco.mj_step(m, d, nstep=substeps)
            i += 1
            if i % self.episode_steps == 0:
                mujoco.mj_resetData(m, d)
        self.i = i


# ---- rows ------------------------------------------------------------------------------------------
def peer_env() -> gym.Env:
    """gymnasium's HalfCheetah-v5, truncated at our episode length so both reset equally often."""
    return gym.make(PEER_ENV_ID, max_episode_steps=load_family(PEER_FAMILY).spec.episode_steps)


def peer_vector_env(num_envs: int, mode: VectorMode) -> gym.vector.VectorEnv:
    """The peer in the same vector env class and autoreset mode as ``make_vector_env`` uses."""
    cls = gym.vector.AsyncVectorEnv if mode == "async" else gym.vector.SyncVectorEnv
    return cls([peer_env] * num_envs, autoreset_mode=gym.vector.AutoresetMode.DISABLED)


class Bench:
    """Runs the rows one after another and collects their JSON records."""

    def __init__(self, steps: int, repeats: int, num_envs: int, seed: int, total_rows: int) -> None:
        self.steps, self.repeats, self.num_envs, self.seed = steps, repeats, num_envs, seed
        self.total_rows = total_rows
        self.results: list[dict[str, Any]] = []

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)

    def _record(self, rates: list[float], fields: dict[str, Any], mode: str, num_envs: int) -> dict[str, Any]:
        row = {**fields, "mode": mode, "num_envs": num_envs, "steps_per_s": summarise(rates), "per_repeat": rates}
        self.results.append(row)
        med = row["steps_per_s"]["median"]
        print(f"[{len(self.results)}/{self.total_rows}] {row['name']}: {med:,.0f} steps/s "
              f"(min {min(rates):,.0f}, max {max(rates):,.0f})", file=sys.stderr, flush=True)
        return row

    def single(self, gym_env: gym.Env, **fields: Any) -> dict[str, Any]:
        """Time one env; ``fields`` go into the record."""
        try:
            run = StepLoop(gym_env, draw_actions(gym_env.action_space, self.rng()), self.seed)
            rates = measure(run, self.steps, 1, max(1, self.steps // 10), self.repeats)
        finally:
            gym_env.close()
        return self._record(rates, fields, "single", 1)

    def vector(self, vec_env: gym.vector.VectorEnv, mode: VectorMode, **fields: Any) -> dict[str, Any]:
        """Time a vector env for about ``steps`` env-steps per repeat; ``fields`` go into the record."""
        n = vec_env.num_envs
        calls = max(1, self.steps // n)
        try:
            run = StepLoop(vec_env, draw_actions(vec_env.action_space, self.rng()), self.seed)
            rates = measure(run, calls, n, max(1, calls // 10), self.repeats)
        finally:
            vec_env.close()
        return self._record(rates, fields, mode, n)

    def floor(self, family: str) -> dict[str, Any]:
        """Time raw MuJoCo on the family's robot."""
        fam = load_family(family)
        run = RawMujocoLoop(fam.spec.robot, fam.spec.episode_steps, self.rng())
        rates = measure(run, self.steps, 1, max(1, self.steps // 10), self.repeats)
        fields = {"name": f"raw_mujoco/{fam.spec.robot} ({family})", "kind": "floor", "family": family,
                  "robot": fam.spec.robot}
        return self._record(rates, fields, "single", 1)


def run_all(families: Sequence[str], bench: Bench) -> None:
    """Ours for each family (single, sync, async) and its floor, then the gymnasium peer."""
    for family in families:
        env_id = FAMILY_ENV_IDS[family]
        base = {"kind": "ours", "family": family, "env": env_id}
        bench.single(make_env(family), name=f"ours/{family}/single", **base)
        for mode in ("sync", "async"):
            bench.vector(make_vector_env(family, bench.num_envs, mode), mode,
                         name=f"ours/{family}/{mode}x{bench.num_envs}", **base)
        bench.floor(family)
    base = {"kind": "peer", "env": PEER_ENV_ID, "family": PEER_FAMILY}
    bench.single(peer_env(), name=f"gymnasium/{PEER_ENV_ID}/single", **base)
    for mode in ("sync", "async"):
        bench.vector(peer_vector_env(bench.num_envs, mode), mode,
                     name=f"gymnasium/{PEER_ENV_ID}/{mode}x{bench.num_envs}", **base)


def ratios(results: Sequence[dict[str, Any]], families: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per family: ours single / floor; for the peer's family also ours / gymnasium per mode."""
    def median(kind: str, family: str, mode: str) -> float:
        (row,) = [r for r in results if r["kind"] == kind and r["family"] == family and r["mode"] == mode]
        return row["steps_per_s"]["median"]

    out: dict[str, dict[str, Any]] = {}
    for family in families:
        floor = median("floor", family, "single")
        out[family] = {"ours_vs_raw_mujoco": median("ours", family, "single") / floor}
        if family == PEER_FAMILY:
            by_mode = {m: median("ours", family, m) / median("peer", family, m) for m in ("single", "sync", "async")}
            out[family]["ours_vs_gymnasium_halfcheetah"] = by_mode["single"]
            out[family]["ours_vs_gymnasium_halfcheetah_by_mode"] = by_mode
            out[family]["gymnasium_halfcheetah_vs_raw_mujoco"] = median("peer", family, "single") / floor
    return out


def machine() -> dict[str, Any]:
    """Where the figures come from."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cpu_count": os.cpu_count(), "usable_cpus": affinity, "cpu_model": cpu_model(),
            "platform": platform.platform(), "python": platform.python_version(), "mujoco": mujoco.__version__,
            "gymnasium": gym.__version__, "numpy": np.__version__}


NOTES = [
    "steps_per_s counts environment control steps (one action each); vector rows count num_envs env-steps per "
    "vector step.",
    "Resets are INCLUDED in the timed loop for every row: env.reset() at each episode end (ours: the family's "
    "episode_steps; gymnasium: max_episode_steps set to the same length; vector envs: autoreset disabled, all "
    "sub-envs reset together; floor: mj_resetData every episode_steps).",
    "Random actions are drawn before timing from numpy default_rng(seed) and cycled, so no row pays for the "
    "generator.",
    "Both our envs and the peer come from gym.make, so both carry gymnasium's PassiveEnvChecker and "
    "OrderEnforcing wrappers; the peer also has TimeLimit.",
    "Async rows: env process start-up and the warm-up are not timed.",
    "floor = mujoco.mj_step(model, data, nstep=robot.control.substeps) per control step with ctrl set from the "
    "action box; no observation, reward or Python env.",
    "ratios use medians; ours_vs_raw_mujoco is ours single / floor (1.0 would mean zero env overhead).",
]


def markdown_table(doc: dict[str, Any]) -> str:
    """The docs/BENCHMARKS.md table of a saved result, so the page is regenerated, never hand-copied."""
    floors = {r["family"]: r["steps_per_s"]["median"] for r in doc["results"] if r["kind"] == "floor"}
    lines = ["| row | mode | steps/s (median) | min – max | ratio to raw MuJoCo |", "|---|---|---:|---:|---:|"]
    for r in doc["results"]:
        sps = r["steps_per_s"]
        mode = r["mode"] if r["num_envs"] == 1 else f"{r['mode']} ×{r['num_envs']}"
        if r["kind"] == "floor":
            label, mode = f"`{r['family']}`", f"raw `mj_step` ({r['robot']}, floor)"
        elif r["kind"] == "peer":
            label = f"gymnasium `{r['env']}` (peer)"
        else:
            label = f"`{r['family']}`"
        floor = floors.get(r.get("family"), floors.get(PEER_FAMILY))
        lines.append(f"| {label} | {mode} | {sps['median']:,.0f} | {sps['min']:,.0f} – {sps['max']:,.0f} "
                     f"| {sps['median'] / floor:.2f} |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    families = sorted(FAMILY_ENV_IDS)
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " Prints one JSON document to stdout; progress goes to stderr.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None,
                   help=f"env control steps per timed repeat (default {DEFAULT_STEPS}; vector rows take "
                        f"steps/num_envs vector steps)")
    p.add_argument("--repeats", type=int, default=None, help=f"timed repeats per row (default {DEFAULT_REPEATS})")
    p.add_argument("--num-envs", type=int, default=2, help="sub-envs of the sync/async vector rows (default 2)")
    p.add_argument("--families", nargs="+", choices=families, default=families, metavar="FAMILY",
                   help=f"subset of families (default all: {' '.join(families)})")
    p.add_argument("--seed", type=int, default=0, help="seed of the action generator and env resets (default 0)")
    p.add_argument("--table", metavar="JSON",
                   help="print the Markdown table of a saved result (docs/BENCHMARKS.md) and exit; runs nothing")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke-test budget: {QUICK_STEPS} steps, 1 repeat (explicit --steps/--repeats win)")
    args = p.parse_args(argv)
    args.steps = args.steps or (QUICK_STEPS if args.quick else DEFAULT_STEPS)
    args.repeats = args.repeats or (1 if args.quick else DEFAULT_REPEATS)
    if args.steps < 1 or args.repeats < 1 or args.num_envs < 1:
        p.error("--steps, --repeats and --num-envs must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(markdown_table(json.load(f)))
        return 0
    families = list(dict.fromkeys(args.families))
    bench = Bench(args.steps, args.repeats, args.num_envs, args.seed, total_rows=4 * len(families) + 3)
    start = time.perf_counter()
    with redirect_stdout(sys.stderr):  # stdout carries the JSON only, whatever a library prints
        run_all(families, bench)
    wall = time.perf_counter() - start
    doc = {
        "benchmark": "env_steps",
        "command": " ".join(["bench/env_steps.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "config": {"steps": args.steps, "repeats": args.repeats, "num_envs": args.num_envs,
                   "families": families, "seed": args.seed, "quick": args.quick, "action_bank": ACTION_BANK,
                   "warmup": "max(1, timed calls // 10) calls per row",
                   "peer": {"env": PEER_ENV_ID, "max_episode_steps": load_family(PEER_FAMILY).spec.episode_steps}},
        "results": bench.results,
        "ratios": ratios(bench.results, families),
        "notes": NOTES,
        "wall_s": wall,
    }
    json.dump(doc, sys.stdout, indent=2)
    sys.stdout.write("\n")
    print(f"done in {wall:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
