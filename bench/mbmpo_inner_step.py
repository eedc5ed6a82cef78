"""Does a ``meta_policy`` (MB-MPO) bundle's inner step improve the return on the real (MuJoCo) tasks, and what
limits it: the step size, or the noise of a gradient taken from one episode?

Prints one JSON document (progress on stderr). Runs from a fresh clone, from the repository root::

    .venv/bin/python bench/mbmpo_inner_step.py --bundle policies/cartpole_mbmpo

What it does, on the tasks ``metarl eval`` draws (``--split``, ``--tasks``, ``--seed``; every episode from the start
the reset with ``--seed`` gives, as the eval's meta-test):

1. ``--episodes`` E episodes of the meta-policy per task (sampled actions, as the robot runs it): the meta-policy's
   return, and the data the steps are taken on.
2. For each pooled size K (``--pooled``) and step size (``--step-sizes``; default: the bundle's own, x3, x10): the
   E episodes of a task are cut into E/K groups of K; one step from the meta-parameters on each group (the robot's
   own step, ``MetaPolicyAdapter.step_on`` on the K episodes pooled: K = the bundle's ``episodes_per_step`` at its
   step size is exactly the step the robot takes after its first K episodes) gives E/K adapted policies per task;
   each runs K episodes (E per task in all, as in 1.).
3. Per task and setting: the adapted policies' mean return minus the meta-policy's, with its standard error over
   the episodes; over tasks: the mean gain, its standard error across tasks and the tasks it raises.

K = 1 at the bundle's step size is issue 19's "one inner step improves the return on average" measured on E
adaptations per task instead of the eval's one. Larger K shows what a less noisy gradient would give at the same
step: if it helps where K = 1 does not, the one-episode gradient's noise is the limit, not the meta-policy (it was:
the robot now pools ``episodes_per_step`` episodes per step, docs/mbmpo.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import numpy as np


class RecordingController:
    """The bundle's adapter (``adapt=False``: the bench sets each env's weights itself) as a rollout controller that
    keeps the policy's samples (what the step's log-probability is of)."""

    def __init__(self, adapter: Any, reward_params: dict[str, np.ndarray]) -> None:
        self.adapter, self.params = adapter, reward_params
        self.samples: list[np.ndarray] = []

    def reset(self) -> None:
        self.adapter.reset()
        self.samples = []

    def act(self, obs: np.ndarray) -> np.ndarray:
        action, diagnostics = self.adapter.act(obs, self.params)
        self.samples.append(diagnostics["policy_sample"])
        return action

    def observe(self, obs: np.ndarray, sent_action: np.ndarray, next_obs: np.ndarray) -> None:
        self.adapter.observe(obs, sent_action, next_obs)


def main(argv: list[str] | None = None) -> int:
    doc = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(description=doc[0], epilog=doc[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default="policies/cartpole_mbmpo", help="a meta_policy bundle (default: "
                                                                            "%(default)s)")
    parser.add_argument("--split", choices=["train", "test"], default="test", help="task split (default: test)")
    parser.add_argument("--tasks", type=int, default=8, help="tasks, drawn as metarl eval draws them (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="task draw, resets and action noise (default 0)")
    parser.add_argument("--episodes", type=int, default=16, help="E: meta-policy episodes per task, and adapted "
                                                                 "episodes per task per setting (default 16)")
    parser.add_argument("--pooled", type=int, nargs="+", default=[1, 4, 16],
                        help="episodes per step, each dividing --episodes (default: 1 4 16)")
    parser.add_argument("--step-sizes", type=float, nargs="+", default=None,
                        help="inner step sizes (default: the bundle's own, x3 and x10)")
    parser.add_argument("--progress", action="store_true", help="progress bars on stderr")
    args = parser.parse_args(argv)
    bad = [k for k in args.pooled if k < 1 or args.episodes % k]
    if bad:
        parser.error(f"--pooled {bad}: each must be >= 1 and divide --episodes ({args.episodes})")
    if args.tasks < 1:
        parser.error("--tasks must be >= 1")

    from metarl_robot.envs.rollout import make_vector_env
    from metarl_robot.runtime.bundle import load_bundle
    from metarl_robot.runtime.meta_policy import MetaPolicyAdapter, PolicyEpisode
    from metarl_robot.train.gap import run_episodes

    started = time.perf_counter()
    bundle = load_bundle(args.bundle)
    if not getattr(bundle, "meta_test_resets", False) or not hasattr(bundle, "meta_params"):
        parser.error(f"{args.bundle} is a {bundle.kind!r} bundle: this bench takes one that adapts by a policy-"
                     "gradient step between episodes (kind meta_policy)")
    fam, robot, inner = bundle.family, bundle.robot, bundle.inner
    step_sizes = args.step_sizes or [inner.step_size, 3 * inner.step_size, 10 * inner.step_size]
    tasks = fam.sample(np.random.default_rng(args.seed), args.split, args.tasks)
    n, e = len(tasks), args.episodes
    env_tasks = [tasks[j // e] for j in range(n * e)]
    reward_params = {k: np.array([t[k] for t in env_tasks]) for k in fam.reward_names}
    adapter = bundle.make_adapter(batch=n * e, adapt=False, seed=args.seed)
    assert isinstance(adapter, MetaPolicyAdapter)
    controller = RecordingController(adapter, reward_params)
    envs = make_vector_env(fam, n * e, "sync", tasks=env_tasks)

    def episodes(params: list | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every env runs one episode with its own weights (the meta-parameters when ``params`` is None):
        rewards (N, T), observations (N, T, o), samples (N, T, a)."""
        adapter.forget()
        if params is not None:
            adapter.params = [list(p) for p in params]
        ep = run_episodes(fam, robot, env_tasks, [args.seed] * (n * e), controller, args.progress, envs)
        samples = np.stack(controller.samples, axis=1)
        if samples.shape[1] != ep.rewards.shape[1]:
            raise RuntimeError("an episode ended early: the step needs full-length episodes")
        return ep.rewards, ep.obs, samples

    try:
        meta_rewards, meta_obs, meta_samples = episodes(None)
        meta_returns = meta_rewards.sum(axis=1).reshape(n, e)
        print(f"meta-policy: mean return {meta_returns.mean():.1f} over {n} tasks x {e} episodes", file=sys.stderr)
        meta = [np.asarray(p, dtype=np.float64) for p in adapter.meta_params]
        recorded = [PolicyEpisode(*ep) for ep in zip(meta_obs, meta_samples, meta_rewards, strict=True)]
        settings: list[dict[str, Any]] = []
        for k in args.pooled:
            for alpha in step_sizes:
                adapted = []
                for j0 in range(0, n * e, k):  # one step per group of k consecutive episodes of one task
                    adapted.extend([adapter.step_on(meta, recorded[j0:j0 + k], step_size=alpha)] * k)
                returns = episodes(adapted)[0].sum(axis=1).reshape(n, e)
                gain = returns.mean(axis=1) - meta_returns.mean(axis=1)
                se = np.sqrt(returns.var(axis=1, ddof=1) / e + meta_returns.var(axis=1, ddof=1) / e)
                settings.append({
                    "pooled_episodes": k, "step_size": alpha,
                    "robot_step": k == inner.episodes_per_step and alpha == inner.step_size,
                    "mean_return": float(returns.mean()), "mean_gain": float(gain.mean()),
                    "gain_se_across_tasks": float(gain.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
                    "tasks_raised": int(np.count_nonzero(gain > 0)),
                    "per_task": [{"return": float(r), "gain": float(g), "gain_se": float(s)}
                                 for r, g, s in zip(returns.mean(axis=1), gain, se, strict=True)]})
                print(f"K={k} step={alpha:g}: mean return {returns.mean():.1f}, gain {gain.mean():+.1f} "
                      f"({np.count_nonzero(gain > 0)}/{n} tasks up)", file=sys.stderr)
    finally:
        envs.close()
    print(json.dumps({
        "bench": "mbmpo_inner_step", "bundle": str(args.bundle), "family": fam.name, "split": args.split,
        "seed": args.seed, "episodes_per_task": e, "bundle_step_size": inner.step_size,
        "bundle_episodes_per_step": inner.episodes_per_step,
        "tasks": [{k: float(v) for k, v in t.items()} for t in tasks],
        "meta_policy": {"mean_return": float(meta_returns.mean()),
                        "per_task": [float(r) for r in meta_returns.mean(axis=1)]},
        "settings": settings, "seconds": round(time.perf_counter() - started, 1),
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
