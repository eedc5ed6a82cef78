"""Where observation noise hurts an ``online_model`` bundle: in the online fit, or in the plans' start state?

The bundle drives the test tasks of the out-of-family benchmark (``bench/out_of_family.py``: the family's test
split, ``--tasks`` of them, seed ``--seed``) under ``obs_noise`` (docs/out_of_family.md), fed in one of these ways:

- ``noisy``: as on the robot, the noisy observations to both ``act`` and ``observe``;
- ``plan_true``: the true state to ``act`` (the plan starts from it), the noisy transitions to ``observe``;
- ``fit_true``: the noisy observation to ``act``, the true transitions to ``observe`` (the online fit);
- ``blend:W``: a fixed-gain model-based filter outside the adapter, ``x = (1 - W) y + W x_pred`` (``x_pred``: the
  adapter's own prediction of this step from the previous estimate), fed to both — a probe of what a state
  filter could give back, not a shipped feature.

Per way: returns (summed env rewards, which grade the true motion) and whether the pole was upright over the last
2 s (mean cos >= 0.95 on the true angle). Prints one JSON document. Run from the repository root::

    .venv/bin/python bench/online_noise.py --bundle policies/cartpole_online
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

WAYS = ("noisy", "plan_true", "fit_true", "blend:0.3", "blend:0.5")
UPRIGHT_COS = 0.95
"""Mean cos(pole angle) over the last 2 s at or above which the pole counts as swung up and balanced."""


def run(bundle, tasks: list[dict], effects, way: str, seed: int, steps: int) -> dict:
    """One episode per task, all tasks in one batched adapter; ``way`` says what the adapter is fed."""
    from metarl_robot.envs.meta_env import MetaMujocoEnv

    n, blend = len(tasks), float(way.split(":")[1]) if way.startswith("blend:") else None
    envs = [MetaMujocoEnv(bundle.family.name, effects=effects) for _ in range(n)]
    first = [env.reset(seed=seed, options={"task": task}) for env, task in zip(envs, tasks, strict=True)]
    obs = np.array([o for o, _ in first])
    true = np.array([info["true_obs"] for _, info in first])
    params = {k: np.array([env.reward_params[k] for env in envs]) for k in envs[0].reward_params}
    adapter = bundle.make_adapter(batch=n, seed=seed)
    returns, cos = np.zeros(n), []
    estimate = obs
    for _ in range(steps):
        shown = true if way == "plan_true" else estimate if blend is not None else obs
        action, diagnostics = adapter.act(shown, params)
        stepped = [env.step(a) for env, a in zip(envs, action, strict=True)]
        next_obs = np.array([s[0] for s in stepped])
        next_true = np.array([s[4]["true_obs"] for s in stepped])
        returns += [s[1] for s in stepped]
        if way == "fit_true":
            adapter.observe(true, action, next_true)
        elif blend is not None:
            next_estimate = (1.0 - blend) * next_obs + blend * diagnostics["predicted_next_obs"]
            adapter.observe(estimate, action, next_estimate)
            estimate = next_estimate
        else:
            adapter.observe(obs, action, next_obs)
        obs, true = next_obs, next_true
        if blend is None:
            estimate = obs
        cos.append(np.cos(true[:, 1]))
    for env in envs:
        env.close()
    last_2s = np.array(cos)[-round(2.0 / bundle.robot.ctrl_dt):].mean(axis=0)
    return {"returns": returns.round(2).tolist(), "mean_return": float(returns.mean()),
            "swung_up": int((last_2s >= UPRIGHT_COS).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default="policies/cartpole_online", help="an online_model cart-pole bundle")
    parser.add_argument("--obs-noise", type=float, default=0.01, help="noise std in robot.yaml scale units "
                        "(default 0.01, the out-of-family benchmark's)")
    parser.add_argument("--tasks", type=int, default=4, help="test tasks (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tasks, starts, noise and planner")
    parser.add_argument("--steps", type=int, default=250, help="steps per episode (default 250: 10 s)")
    parser.add_argument("--ways", nargs="+", default=list(WAYS), help=f"default: {' '.join(WAYS)}")
    args = parser.parse_args()

    from metarl_robot.envs.out_of_family import OutOfFamily
    from metarl_robot.runtime.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    if "online_only" not in bundle.adaptation_modes or bundle.robot.name != "cartpole":
        sys.exit(f"bench/online_noise.py: {args.bundle} is a {bundle.kind} bundle for {bundle.robot.name}; it needs "
                 "an online_model bundle for the cart-pole (the upright criterion reads the pole angle)")
    effects = OutOfFamily(obs_noise=args.obs_noise)
    tasks = bundle.family.sample(np.random.default_rng(args.seed), "test", args.tasks)
    results = {}
    for way in args.ways:
        started = time.perf_counter()
        results[way] = run(bundle, tasks, effects, way, args.seed, args.steps)
        results[way]["seconds"] = round(time.perf_counter() - started, 1)
        print(f"{way}: mean return {results[way]['mean_return']:.1f}, {results[way]['swung_up']} swung up",
              file=sys.stderr)
    print(json.dumps({"bundle": args.bundle, "bundle_sha256": bundle.sha256, "obs_noise": args.obs_noise,
                      "tasks": tasks, "seed": args.seed, "steps": args.steps, "results": results}, indent=2))


if __name__ == "__main__":
    main()
