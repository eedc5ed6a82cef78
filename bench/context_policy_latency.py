"""One PEARL control step on one core: the robot-side ONNX adapter against the torch controller.

A PEARL policy step on the robot is two calls: ``observe`` (the factor graph on the last transition,
added to the running precision sums of the belief over z) and ``act`` (the policy graph on the
observation and the posterior mean). This benchmark times both, per control step, for

- ``onnx``: :class:`metarl_robot.runtime.context_policy.ContextPolicyAdapter` (numpy + onnxruntime, what
  the robot runs), on graphs exported by :func:`metarl_robot.export.pearl_graphs.export_pearl_graphs`;
- ``torch``: :class:`metarl_robot.algos.pearl_controller.PEARLController` (``deterministic=True, z_mode="mean"``, the
  same online belief and action) on the same weights, under ``torch.no_grad``;
- ``ort_floor``: the two graphs' ``session.run`` calls alone on the same float32 inputs (no belief update,
  no reward, no input checks): what onnxruntime itself costs, so the adapter's own overhead is visible.
- ``ort_floor_bound``: the same two calls the way the adapter makes them since issue 18, through
  onnxruntime's IOBinding on preallocated float32 buffers (the inputs copied in each step): the cheapest
  way to run these graphs, so ``onnx_over_ort_floor_bound_p50`` is the adapter's overhead like for like.

Inputs: real MuJoCo episodes of the config's family (test-split tasks, reset seeds from ``--seed``),
recorded first (untimed) with the torch controller driving the env, then replayed through each side
with identical inputs; both sides' actions are compared (``agreement``) so the comparison is of equal
work. Each episode is replayed by each side in turn (onnx, torch, floor), so slow drift in the load of
a shared machine reaches all three alike while each keeps its weights in cache for an episode. The
first ``--warmup`` steps of each side are left out of the statistics. Both sides reset their belief to
the prior at each episode start (not timed), as a robot does at a new task. A control step at an
episode's start has no transition to observe, so it is ``act`` alone.

Pinned to one CPU (``os.sched_setaffinity``, where the OS has it; the JSON records which), one torch
thread, one onnxruntime intra-op thread. Without ``--checkpoint`` the weights are freshly initialised
with the config's network sizes (and identity normalisers): the cost of a dense network does not
depend on the values of its weights, so the latency is that of a trained policy of the same sizes.

The physical limit is the robot's control period (``ctrl_dt``): a step must fit in it. The issue's
target is p99 <= 1 ms for the robot-side step (``target`` in the JSON). ``--table FILE`` prints the
Markdown table of a saved JSON instead of measuring.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metarl_robot.machine import cpu_model, pin_one_core

REPO_ROOT = Path(__file__).resolve().parents[1]
FAMILY_CONFIGS = {"cartpole_swingup": "configs/pearl_cartpole_swingup.yaml",
                  "half_cheetah_vel": "configs/pearl_half_cheetah_vel.yaml"}
"""``--family`` → the shipped PEARL config whose network sizes are timed."""
TARGET_P99_US = 1000.0
"""Issue 7's target for the robot-side PEARL step: p99 <= 1 ms on one core."""
PERCENTILES = (50, 90, 99)


def stats_us(samples_s: list[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean in microseconds, and the sample count."""
    us = np.asarray(samples_s) * 1e6
    out = {f"p{p}_us": float(np.percentile(us, p)) for p in PERCENTILES}
    return out | {"max_us": float(us.max()), "mean_us": float(us.mean()), "n": len(us)}


@dataclass
class Episode:
    """One recorded episode: what each control step's ``observe`` and ``act`` receive."""

    task: dict[str, float]
    """The task's parameters."""
    obs: np.ndarray
    """``(T + 1, o)``: the observation at each step, then the last next observation."""
    sent_action: np.ndarray
    """``(T, a)``: the action the env applied at each step (after its rate limit)."""

    @property
    def steps(self) -> int:
        return len(self.sent_action)


def record_episodes(algo, family, reward, robot, steps: int, seed: int) -> list[Episode]:
    """Episodes of the family, driven by the torch controller, until ``steps`` control steps in all."""
    from metarl_robot.algos.pearl_controller import PEARLController, family_reward_fn
    from metarl_robot.envs.registry import make_env

    rng = np.random.default_rng(seed)
    env = make_env(family.name)
    episodes: list[Episode] = []
    total = 0
    try:
        while total < steps:
            task = family.sample(rng, "test", 1)[0]
            params = {n: np.array([task[n]]) for n in family.reward_names}
            controller = PEARLController(algo, 1, deterministic=True, z_mode="mean",
                                         reward_fn=family_reward_fn(reward, robot, params))
            env.unwrapped.set_task(task)
            obs, _ = env.reset(seed=seed + len(episodes))
            observations, sent = [obs], []
            for _ in range(min(family.spec.episode_steps, steps - total)):
                action = controller.act(obs[None])
                next_obs, _, terminated, truncated, info = env.step(action[0])
                controller.observe(obs[None], info["sent_action"][None], next_obs[None])
                observations.append(next_obs)
                sent.append(info["sent_action"])
                obs = next_obs
                if terminated or truncated:
                    break
            episodes.append(Episode(dict(task), np.array(observations), np.array(sent)))
            total += len(sent)
    finally:
        env.close()
    return episodes


def main(argv: list[str] | None = None) -> int:
    doc = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(description=doc[0], epilog=doc[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILY_CONFIGS), default="cartpole_swingup",
                        help="time the shipped PEARL config of this family (default: %(default)s)")
    parser.add_argument("--config", help="a PEARL run config instead of --family's (its network sizes are timed)")
    parser.add_argument("--checkpoint", help="a trained PEARL checkpoint (metarl train); its config and weights "
                        "are used and --family/--config ignored (default: fresh weights of the config's sizes)")
    parser.add_argument("--steps", type=int, default=3000, help="timed control steps per side (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=100,
                        help="control steps per side run before the timed ones, left out (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="tasks, reset seeds and fresh weights (default: 0)")
    parser.add_argument("--table", metavar="JSON", help="print the Markdown table of a saved output and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())))
        return 0
    for name in ("steps", "warmup"):
        if getattr(args, name) < (1 if name == "steps" else 0):
            parser.error(f"--{name} must be >= {1 if name == 'steps' else 0}, got {getattr(args, name)}")

    core = pin_one_core()
    import onnxruntime
    import torch

    torch.set_num_threads(1)
    from metarl_robot.algos.pearl import PEARL
    from metarl_robot.algos.pearl_controller import PEARLController, family_reward_fn
    from metarl_robot.algos.registry import get_algorithm
    from metarl_robot.export.pearl_graphs import export_pearl_graphs
    from metarl_robot.runtime.context_policy import (
        FACTORS_INPUTS,
        FACTORS_OUTPUTS,
        POLICY_INPUTS,
        POLICY_OUTPUTS,
        ContextPolicyAdapter,
    )
    from metarl_robot.runtime.onnx_graph import make_session
    from metarl_robot.spec.family import load_family
    from metarl_robot.spec.rewards import get_reward
    from metarl_robot.spec.robot import load_robot
    from metarl_robot.train.config import load_config
    from metarl_robot.train.runner import load_trained

    if args.checkpoint:
        cfg, robot, algo = load_trained(Path(args.checkpoint))
        if not isinstance(algo, PEARL):
            parser.error(f"--checkpoint {args.checkpoint}: holds a {cfg.algo!r} run; this benchmark times PEARL")
        weights = f"checkpoint {args.checkpoint}"
        config_path = None
    else:
        config_path = args.config or str(REPO_ROOT / FAMILY_CONFIGS[args.family])
        cfg = load_config(config_path)
        if not issubclass(get_algorithm(cfg.algo), PEARL):
            parser.error(f"--config {config_path}: algo is {cfg.algo!r}; this benchmark times {PEARL.name!r} configs")
        robot = load_robot(load_family(cfg.family).spec.robot)
        algo = PEARL(robot, cfg.pearl_net, cfg.pearl, seed=args.seed)
        weights = f"freshly initialised (seed {args.seed}), identity normalisers"
    family = load_family(cfg.family)
    reward = get_reward(family.spec.reward)
    net = cfg.pearl_net
    print(f"{family.name}: obs {robot.obs_dim}, action {robot.action_dim}, z {net.latent_dim}, policy "
          f"{net.layers}x{net.hidden}, encoder {net.encoder_layers}x{net.encoder_hidden}; pinned core {core}",
          file=sys.stderr)

    episodes = record_episodes(algo, family, reward, robot, args.warmup + args.steps, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        graphs = export_pearl_graphs(algo.agent, tmp)
        adapter = ContextPolicyAdapter.from_onnx(robot, reward, graphs.factors, graphs.policy, threads=1)
        factors_session, policy_session = make_session(graphs.factors, 1), make_session(graphs.policy, 1)

    clock = time.perf_counter
    sides = ("onnx", "torch", "ort_floor", "ort_floor_bound")
    times = {side: {"observe": [], "act": [], "step": []} for side in sides}
    actions = {side: [] for side in sides}
    factors_in = {n: np.zeros((1, *shape[1:]), np.float32) for n, shape in zip(
        FACTORS_INPUTS, ((1, robot.obs_dim), (1, robot.action_dim), (1,), (1, robot.obs_dim)), strict=True)}
    policy_in = {n: np.zeros((1, dim), np.float32) for n, dim in zip(POLICY_INPUTS, (robot.obs_dim, net.latent_dim),
                                                                         strict=True)}
    run_factors = bound_call(factors_session, factors_in, {n: (1, net.latent_dim) for n in FACTORS_OUTPUTS})
    run_policy = bound_call(policy_session, policy_in, {n: (1, robot.action_dim) for n in POLICY_OUTPUTS})
    worst_belief_mean = 0.0
    for episode in episodes:
        params = {n: np.array([episode.task[n]]) for n in family.reward_names}
        f32 = lambda x: np.ascontiguousarray(x, dtype=np.float32)  # noqa: E731
        obs_all, sent_all = episode.obs, episode.sent_action
        rewards = reward(robot, obs_all[:-1], sent_all, obs_all[1:], {k: np.repeat(v, episode.steps)
                                                                      for k, v in params.items()})[0]

        # The robot's adapter.
        adapter.reset()
        means_onnx = []
        for t in range(episode.steps):
            obs = obs_all[t][None]
            t0 = clock()
            if t:
                adapter.observe(obs_all[t - 1][None], sent_all[t - 1][None], obs)
            t1 = clock()
            action, diag = adapter.act(obs, params)
            t2 = clock()
            record(times["onnx"], t, t0, t1, t2)
            actions["onnx"].append(action[0])
            means_onnx.append(diag["context_mean"][0])

        # The torch controller on the same weights and transitions.
        controller = PEARLController(algo, 1, deterministic=True, z_mode="mean",
                                     reward_fn=family_reward_fn(reward, robot, params))
        controller.reset()
        with torch.no_grad():
            for t in range(episode.steps):
                obs = obs_all[t][None]
                t0 = clock()
                if t:
                    controller.observe(obs_all[t - 1][None], sent_all[t - 1][None], obs)
                t1 = clock()
                action = controller.act(obs)
                t2 = clock()
                record(times["torch"], t, t0, t1, t2)
                actions["torch"].append(action[0])
                worst_belief_mean = max(worst_belief_mean,
                                        float(np.abs(controller.posterior().mean[0] - means_onnx[t]).max()))

        # onnxruntime alone: the two session calls on prepared float32 inputs, z = the adapter's belief.
        transitions = [f32(x) for x in (obs_all[:-1], sent_all, rewards, obs_all[1:])]
        z_all = f32(np.array(means_onnx))
        for t in range(episode.steps):
            t0 = clock()
            if t:
                factors_session.run(list(FACTORS_OUTPUTS), {n: x[t - 1: t] for n, x in
                                                            zip(FACTORS_INPUTS, transitions, strict=True)})
            t1 = clock()
            (action,) = policy_session.run(list(POLICY_OUTPUTS), dict(zip(POLICY_INPUTS, (transitions[0][t: t + 1],
                                                                                           z_all[t: t + 1]),
                                                                          strict=True)))
            t2 = clock()
            record(times["ort_floor"], t, t0, t1, t2)
            actions["ort_floor"].append(action[0])

        # The same two calls through IOBinding on preallocated buffers (the adapter's way).
        for t in range(episode.steps):
            t0 = clock()
            if t:
                for buffer, x in zip(factors_in.values(), transitions, strict=True):
                    buffer[...] = x[t - 1: t]
                run_factors()
            t1 = clock()
            policy_in[POLICY_INPUTS[0]][...] = transitions[0][t: t + 1]
            policy_in[POLICY_INPUTS[1]][...] = z_all[t: t + 1]
            (action,) = run_policy()
            t2 = clock()
            record(times["ort_floor_bound"], t, t0, t1, t2)
            actions["ort_floor_bound"].append(action[0].copy())

    results = {}
    for side, parts in times.items():
        results[side] = {part: stats_us(drop_warmup(samples, args.warmup)) for part, samples in parts.items()}
    onnx_actions, torch_actions = np.array(actions["onnx"]), np.array(actions["torch"])
    period_us = robot.ctrl_dt * 1e6
    onnx_p99, torch_p99 = results["onnx"]["step"]["p99_us"], results["torch"]["step"]["p99_us"]
    out = {
        "benchmark": "context_policy_latency",
        "family": family.name, "config": config_path, "weights": weights,
        "sizes": {"obs": robot.obs_dim, "action": robot.action_dim, "latent": net.latent_dim,
                  "policy_hidden": net.hidden, "policy_layers": net.layers, "encoder_hidden": net.encoder_hidden,
                  "encoder_layers": net.encoder_layers},
        "steps": args.steps, "warmup": args.warmup, "episodes": len(episodes), "seed": args.seed,
        "results": results,
        "ratios": {"torch_over_onnx_p50": results["torch"]["step"]["p50_us"] / results["onnx"]["step"]["p50_us"],
                   "torch_over_onnx_p99": torch_p99 / onnx_p99,
                   **{f"onnx_over_{floor}_{p}": results["onnx"]["step"][f"{p}_us"] / results[floor]["step"][f"{p}_us"]
                      for floor in ("ort_floor", "ort_floor_bound") for p in ("p50", "p99")}},
        "control_period_us": period_us,
        "fraction_of_control_period": {"onnx_p99": onnx_p99 / period_us, "torch_p99": torch_p99 / period_us},
        "target": {"what": "p99 of the robot-side (onnx) step <= 1 ms", "p99_us_max": TARGET_P99_US,
                   "onnx_met": onnx_p99 <= TARGET_P99_US, "torch_met": torch_p99 <= TARGET_P99_US},
        "agreement": {"max_abs_action_diff_onnx_torch": float(np.abs(onnx_actions - torch_actions).max()),
                      "max_abs_action_diff_floor_onnx": float(np.abs(np.array(actions["ort_floor"])
                                                                     - onnx_actions).max()),
                      "max_abs_action_diff_bound_floor_onnx": float(np.abs(np.array(actions["ort_floor_bound"])
                                                                           - onnx_actions).max()),
                      "max_abs_belief_mean_diff_onnx_torch": worst_belief_mean},
        "machine": {"cpu_model": cpu_model(), "cpus": os.cpu_count(), "pinned_core": core,
                    "platform": platform.platform(), "python": platform.python_version(), "numpy": np.__version__,
                    "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "notes": [
            "latency does not depend on the weight values: fresh weights of the config's sizes time the same "
            "work as trained ones" if not args.checkpoint else "trained weights from the checkpoint",
            "one pinned core (null: the OS has no affinity call), torch.set_num_threads(1), onnxruntime 1 intra-op "
            "thread",
            "step = observe (the previous transition; none at an episode's first step) + act; observe includes the "
            "reward computed from the task's parameters on both sides",
            "the torch controller keeps a list of factors and sums it each step (cost grows with the episode); the "
            "adapter keeps running sums",
            f"the first {args.warmup} steps of each side are left out; episodes replayed in turn onnx, torch, "
            "ort_floor, ort_floor_bound",
        ],
    }
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def bound_call(session, inputs: dict[str, np.ndarray], output_shapes: dict[str, tuple[int, ...]]):
    """The adapter's way of calling a graph (:func:`~metarl_robot.runtime.onnx_graph.bound_run`): ``inputs``
    (float32 buffers, refilled by the caller) bound once, outputs written into buffers allocated here and returned
    by the call."""
    from metarl_robot.runtime.onnx_graph import bound_run

    outputs = {name: np.zeros(shape, np.float32) for name, shape in output_shapes.items()}
    run = bound_run(session, inputs, outputs)
    if run is None:
        raise RuntimeError("this onnxruntime copies bound inputs: the IOBinding floor cannot be timed")

    def call() -> list[np.ndarray]:
        run()
        return list(outputs.values())
    return call


def record(parts: dict[str, list[float]], t: int, t0: float, t1: float, t2: float) -> None:
    """One control step's timings; ``observe`` only where there was a transition to observe."""
    if t:
        parts["observe"].append(t1 - t0)
    parts["act"].append(t2 - t1)
    parts["step"].append(t2 - t0)


def drop_warmup(samples: list[float], warmup: int) -> list[float]:
    """All but the first ``warmup`` samples (all of them if fewer are left, so a smoke run still reports)."""
    return samples[warmup:] if len(samples) > warmup else samples


def markdown_table(doc: dict) -> str:
    rows = ["| side | part | p50 (µs) | p90 (µs) | p99 (µs) | max (µs) |", "|---|---|---:|---:|---:|---:|"]
    labels = {"onnx": "ONNX adapter (robot side)", "torch": "torch PEARLController", "ort_floor": "onnxruntime floor",
              "ort_floor_bound": "onnxruntime floor, IOBinding"}
    for side, parts in doc["results"].items():
        for part in ("step", "observe", "act"):
            s = parts[part]
            rows.append(f"| {labels.get(side, side)} | {part} | {s['p50_us']:,.0f} | {s['p90_us']:,.0f} | "
                        f"{s['p99_us']:,.0f} | {s['max_us']:,.0f} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
