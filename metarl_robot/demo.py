"""``metarl demo``: the largest pipeline that exists today, on the cart-pole family.

It checks the robot against its MJCF, draws in- and out-of-distribution test tasks, drives every
task with the *same* open-loop command sequence (the spread of motions an adaptive controller has
to absorb), then lets the shipped bundle ``policies/cartpole_mb`` — loaded by the torch- and
MuJoCo-free runtime, exactly as a robot would — control the same tasks with online adaptation on
and off. The ZeroMQ/ROS 2 path, the episode log and its replay join in later milestones.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

FAMILY = "cartpole_swingup"
BUNDLE = "policies/cartpole_mb"


def _stage(i: int, n: int, text: str) -> None:
    print(f"[{i}/{n}] {text}", flush=True)


def pumping_policy(period: float, ctrl_dt: float, amplitude: float = 0.5):
    """Open loop: u(t) = amplitude * sin(2 pi t / period), the same for every sub-env."""
    step = 0

    def act(obs: np.ndarray) -> np.ndarray:
        nonlocal step
        u = amplitude * np.sin(2 * np.pi * step * ctrl_dt / period)
        step += 1
        return np.full((len(obs), 1), u)
    return act


def run_demo(out_dir: Path, seed: int = 0) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metarl_robot.envs.robot_model import load_model
    from metarl_robot.envs.rollout import collect, make_vector_env
    from metarl_robot.spec.family import load_family
    from metarl_robot.spec.robot import load_robot

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 5
    family = load_family(FAMILY)
    robot = load_robot(family.spec.robot)
    _stage(1, n, f"robot {robot.name}: robot.yaml checked against {robot.mjcf_path.name}")
    model = load_model(robot)
    print(f"      {robot.obs_dim} observations, {robot.action_dim} action, {1 / robot.ctrl_dt:g} Hz control, "
          f"{model.nbody - 1} bodies; interface sha256 {robot.interface_hash[:16]}…")

    _stage(2, n, f"family {family.name}: nominal task + 5 test tasks (seed {seed})")
    rng = np.random.default_rng(seed)
    tasks = [family.nominal(), *family.sample(rng, "test", 5)]
    for i, task in enumerate(tasks):
        label = "nominal" if i == 0 else ("OOD" if family.is_ood(task) else "in-distribution")
        print(f"      task {i}: " + ", ".join(f"{k}={v:.3g}" for k, v in task.items()) + f"  [{label}]")

    # Pump near the nominal pole's natural period (uniform rod pivoted at one end: 2 pi sqrt(2L / 3g)).
    period = 2 * np.pi * np.sqrt(2 * 1.0 / (3 * 9.81))
    _stage(3, n, f"same open-loop command u(t) = 0.5 sin(2 pi t / {period:.2f} s) on every task, async vector env "
           f"x{len(tasks)}")
    envs = make_vector_env(family, len(tasks), "async")
    try:
        rollout = collect(envs, family, pumping_policy(period, robot.ctrl_dt), tasks, episodes=1, seed=seed,
                          progress=True)
    finally:
        envs.close()

    _stage(4, n, "plot of the open-loop spread")
    t = np.arange(rollout.obs.shape[1]) * robot.ctrl_dt
    angle = rollout.next_obs[..., robot.obs_slices["pole_angle"]][..., 0]
    cart = rollout.next_obs[..., robot.obs_slices["cart_pos"]][..., 0]
    returns = rollout.episode_returns()[:, 0]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for i, task in enumerate(tasks):
        label = ("nominal" if i == 0 else f"task {i}" + (" (OOD)" if family.is_ood(task) else "")) + \
            f": m×{task['pole_mass_scale']:.2f}, L={task['pole_length']:.2f} m, gain×{task['motor_gain_scale']:.2f}"
        style = {"color": "black", "linewidth": 2.2} if i == 0 else {"linewidth": 1.2}
        ax1.plot(t, np.cos(angle[i]), label=label, **style)
        ax2.plot(t, cart[i], **style)
    ax1.set_ylabel("cos(pole angle)\n1 = upright, -1 = hanging")
    ax2.set_ylabel("cart position (m)")
    ax2.set_xlabel("time (s)")
    ax1.set_title(f"{family.name}: the same commands on six tasks")
    ax1.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    plot = out_dir / "demo_tasks.png"
    fig.savefig(plot, dpi=110)
    plt.close(fig)

    summary = {
        "family": family.name,
        "robot": robot.name,
        "robot_interface_sha256": robot.interface_hash,
        "command": f"u(t) = 0.5 sin(2 pi t / {period:.4f} s)",
        "seed": seed,
        "tasks": [
            {"task": task, "ood": family.is_ood(task), "return": float(returns[i]),
             "max_height_cos": float(np.max(np.cos(angle[i]))), "cart_range_m": float(np.ptp(cart[i]))}
            for i, task in enumerate(tasks)
        ],
        "seconds": round(time.perf_counter() - started, 2),
    }
    summary_path = out_dir / "demo_summary.json"
    summary_path.write_text(json.dumps(summary, indent=1))
    print(f"      {'task':<6}{'return':>9}{'best cos(angle)':>17}{'cart travel (m)':>17}")
    for i, row in enumerate(summary["tasks"]):
        print(f"      {i:<6}{row['return']:>9.2f}{row['max_height_cos']:>17.2f}{row['cart_range_m']:>17.2f}")
    from metarl_robot.paths import REPO_ROOT
    from metarl_robot.train.evaluate import evaluate

    bundle = REPO_ROOT / BUNDLE
    _stage(5, n, f"bundle {BUNDLE} (onnxruntime, no torch/MuJoCo on the controller side) on the same tasks, "
           "adaptation on and off")
    report = evaluate(bundle, out_dir / "bundle", tasks=tasks, seed=seed, oracle=False, progress=True)
    rows = report["tasks"]
    print(f"      {'task':<6}{'adapted':>9}{'unadapted':>11}{'swung up':>10}")
    for i, row in enumerate(rows):
        print(f"      {i:<6}{row['return_adapted']:>9.1f}{row['return_unadapted']:>11.1f}"
              f"{'yes' if row.get('success_adapted') else 'no':>10}")
    summ = report["summary"]
    summary["bundle"] = {"path": BUNDLE, "summary": summ}
    summary["seconds"] = round(time.perf_counter() - started, 2)
    summary_path.write_text(json.dumps(summary, indent=1))
    print(f"      prediction error after {report['context_window']} steps: adapted "
          f"{summ['pred_err_adapted_after_k']:.4f} vs unadapted {summ['pred_err_unadapted_after_k']:.4f} "
          f"(robot.yaml scale units)")
    swung = sum(bool(r.get("success_adapted")) for r in rows)
    swung_off = sum(bool(r.get("success_unadapted")) for r in rows)
    print(f"\nDone in {summary['seconds']} s. Open-loop, the same commands move each task differently. The shipped")
    print(f"bundle swung the pole up and balanced it on {swung} of {len(rows)} tasks "
          f"({swung_off} with adaptation off);")
    print("where it fails, and by how much against an oracle, is in docs/BENCHMARKS.md.")
    print(f"  plots:   {plot}, {out_dir / 'bundle' / 'eval_returns.png'}, "
          f"{out_dir / 'bundle' / 'eval_prediction_error.png'}\n  summary: {summary_path}")
    return 0
