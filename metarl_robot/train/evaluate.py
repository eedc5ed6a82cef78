"""``metarl eval``: grade an adaptive controller on held-out and out-of-distribution tasks.

For every task, in one batched pass each:

- **adapted**: the adapter as it runs on the robot (context from the last K transitions);
- **unadapted**: the same planner with the empty context, i.e. the meta-trained model without
  adaptation (the return adaptation buys);
- **oracle**: the same planner through MuJoCo with the task's true physics (``mujoco.rollout``):
  the return a perfect model reaches with this planner. ``gap = oracle - adapted``.

During the adapted episodes the one-step prediction error is recorded both with the inferred
context and with the empty one, on the *same* transitions, against the steps since reset: that is
what adaptation does to the model. Writes ``eval.json``, ``eval_returns.png`` and
``eval_prediction_error.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from metarl_robot.envs.meta_env import MetaMujocoEnv
from metarl_robot.envs.oracle import MujocoOracle
from metarl_robot.envs.rollout import collect, make_vector_env
from metarl_robot.runtime.adapter import ModelBasedAdapter
from metarl_robot.runtime.planner import Planner, PlannerConfig
from metarl_robot.spec.family import Task, TaskFamily, load_family
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import RobotSpec
from metarl_robot.train.runner import MPCController


class _Source:
    """What is evaluated: an exported bundle (the robot's path) or a training run (torch)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if (path / "bundle.yaml").is_file():
            from metarl_robot.runtime.bundle import load_bundle

            bundle = load_bundle(path)
            self.kind, self.robot, self.family, self.planner = "bundle", bundle.robot, bundle.family, bundle.planner
            self.encode, self.step = bundle.encode, bundle.step
            adaptation = bundle.manifest["adaptation"]
            self.ensemble_size, self.window = adaptation["ensemble_size"], adaptation["context_window"]
        elif (path / "checkpoints" / "latest.pt").is_file():
            from metarl_robot.train.runner import load_trained

            cfg, self.robot, algo = load_trained(path / "checkpoints" / "latest.pt")
            self.family = load_family(cfg.family)
            self.kind, self.planner = "run", cfg.planner
            self.encode, self.step = algo.encode, algo.step
            self.ensemble_size, self.window = cfg.model.ensemble_size, cfg.model.context_window
        else:
            raise FileNotFoundError(f"{path} is neither a bundle (bundle.yaml) nor a run (checkpoints/latest.pt)")

    def adapter(self, batch: int, adapt: bool, planner: PlannerConfig) -> ModelBasedAdapter:
        reward = get_reward(self.family.spec.reward)
        return ModelBasedAdapter(self.robot, reward, self.encode, self.step, self.ensemble_size, self.window,
                                 planner, batch=batch, adapt=adapt)


class _PredictionErrorRecorder(MPCController):
    """The adapted controller, also scoring each step's prediction with the inferred and the empty context."""

    def __init__(self, adapter: ModelBasedAdapter, reward_params: dict[str, np.ndarray]) -> None:
        super().__init__(adapter, reward_params)
        w = adapter.window
        self.z_empty = adapter.encode_fn(w.obs, w.act, w.next_obs, np.zeros_like(w.mask()))
        self.with_context: list[np.ndarray] = []
        self.without_context: list[np.ndarray] = []

    def observe(self, obs: np.ndarray, sent_action: np.ndarray, next_obs: np.ndarray) -> None:
        a, scale = self.adapter, self.adapter.robot.obs_scale
        # The context this step was planned with: the window has not taken the new transition yet.
        planned_with = self.last_diagnostics["context"]
        for z, store in ((planned_with, self.with_context), (self.z_empty, self.without_context)):
            pred = a.predict(obs, sent_action, z)
            store.append(np.sqrt(np.mean(((pred - next_obs) / scale) ** 2, axis=-1)))
        super().observe(obs, sent_action, next_obs)


class _OracleController:
    """The same planner through MuJoCo with each sub-env's true physics."""

    def __init__(self, planner: Planner, envs: list[MetaMujocoEnv], reward_params: dict[str, np.ndarray]) -> None:
        self.planner, self.envs, self.params = planner, envs, reward_params
        self.last = np.tile(planner.robot.safe_action, (planner.batch, 1))

    def reset(self) -> None:
        self.planner.reset()
        self.last[:] = self.planner.robot.safe_action

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.planner.plan(obs, self.envs, self.params, self.last).action

    def observe(self, obs: np.ndarray, sent_action: np.ndarray, next_obs: np.ndarray) -> None:
        self.last = np.asarray(sent_action, dtype=np.float64)


def _episodes(family: TaskFamily, robot: RobotSpec, tasks: list[Task], seed: int, controller: Any, progress: bool,
              envs: gym.vector.VectorEnv | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One episode per task through :func:`collect`; returns per-step rewards and reward components.

    The components are recomputed from the recorded transitions with the family's reward function,
    which is exactly what the env computed (rewards are functions of the transition alone).
    """
    own = envs is None
    envs = envs or make_vector_env(family, len(tasks), "sync", tasks=tasks)
    try:
        rollout = collect(envs, family, controller, tasks, 1, seed=seed, progress=progress)
    finally:
        if own:
            envs.close()
    params = {k: np.array([t[k] for t in tasks])[:, None] for k in family.reward_names}
    _, components = get_reward(family.spec.reward)(robot, rollout.obs, rollout.actions, rollout.next_obs, params)
    return np.where(rollout.valid, rollout.rewards, 0.0), components


def _success(family: TaskFamily, components: dict[str, np.ndarray]) -> np.ndarray | None:
    crit = get_reward(family.spec.reward).success
    if crit is None:
        return None
    name, threshold = crit
    comp = components[name]
    tail = comp[:, -max(1, comp.shape[1] // 5):]
    return tail.mean(axis=1) >= threshold


def evaluate(source_path: str | Path, out_dir: str | Path, family: str | None = None, split: str = "test",
             tasks: int | list[Task] = 8, grid: int | None = None, grid_params: list[str] | None = None, seed: int = 0,
             oracle: bool = True, oracle_threads: int = 2, planner_overrides: dict[str, Any] | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Evaluate a bundle or a run on ``tasks`` (a number to draw from ``split``, or the tasks themselves)."""
    started = time.perf_counter()
    src = _Source(Path(source_path))
    fam = load_family(family) if family else src.family
    if fam.spec.robot != src.robot.name:
        raise ValueError(f"family {fam.name!r} is for robot {fam.spec.robot!r}, the controller for {src.robot.name!r}")
    if isinstance(tasks, list):
        task_list = [fam.validate(t) for t in tasks]
    elif grid:
        task_list = fam.grid(grid, split, grid_params)
    else:
        task_list = fam.sample(np.random.default_rng(seed), split, tasks)
    planner_cfg = replace(src.planner, **(planner_overrides or {}), seed=seed)
    robot: RobotSpec = src.robot
    n = len(task_list)
    params = {k: np.array([t[k] for t in task_list]) for k in fam.reward_names}

    recorder = _PredictionErrorRecorder(src.adapter(n, True, planner_cfg), params)
    unadapted = MPCController(src.adapter(n, False, planner_cfg), params)
    results = {"adapted": _episodes(fam, robot, task_list, seed, recorder, progress),
               "unadapted": _episodes(fam, robot, task_list, seed, unadapted, progress)}
    if oracle:
        envs = make_vector_env(fam, n, "sync", tasks=task_list)
        try:
            planner = Planner(planner_cfg, robot, get_reward(fam.spec.reward), MujocoOracle(oracle_threads), n)
            controller = _OracleController(planner, [e.unwrapped for e in envs.envs], params)
            results["oracle"] = _episodes(fam, robot, task_list, seed, controller, progress, envs)
        finally:
            envs.close()
    errors_on, errors_off = recorder.with_context, recorder.without_context

    ret = {mode: rewards.sum(axis=1) for mode, (rewards, _) in results.items()}
    err_on, err_off = np.stack(errors_on, axis=1), np.stack(errors_off, axis=1)  # (tasks, steps)
    k = src.window
    rows = []
    for i, task in enumerate(task_list):
        row = {"task": task, "ood": fam.is_ood(task), **{f"return_{m}": float(v[i]) for m, v in ret.items()},
               "pred_err_adapted_after_k": float(err_on[i, k:].mean()),
               "pred_err_unadapted_after_k": float(err_off[i, k:].mean())}
        if "oracle" in ret:
            row["gap"] = float(ret["oracle"][i] - ret["adapted"][i])
        for mode, (_, components) in results.items():
            succ = _success(fam, components)
            if succ is not None:
                row[f"success_{mode}"] = bool(succ[i])
        rows.append(row)

    def stats(key: str) -> dict[str, float]:
        values = np.array([r[key] for r in rows], dtype=float)
        return {"mean": float(values.mean()), "worst": float(values.min() if "return" in key else values.max()),
                "std": float(values.std())}

    summary: dict[str, Any] = {f"return_{m}": stats(f"return_{m}") for m in ret}
    if "oracle" in ret:
        summary["gap"] = stats("gap")
        # A ratio of returns means something only when they are positive (not for a -|v - v*| reward).
        oracle_mean = float(ret["oracle"].mean())
        summary["adapted_over_oracle"] = float(ret["adapted"].mean()) / oracle_mean if oracle_mean > 0 else None
    summary["pred_err_adapted_after_k"] = float(err_on[:, k:].mean())
    summary["pred_err_unadapted_after_k"] = float(err_off[:, k:].mean())
    summary["pred_err_ratio_after_k"] = summary["pred_err_adapted_after_k"] / summary["pred_err_unadapted_after_k"]
    for mode in ret:
        if f"success_{mode}" in rows[0]:
            summary[f"success_rate_{mode}"] = float(np.mean([r[f"success_{mode}"] for r in rows]))
    report = {
        "source": str(source_path), "source_kind": src.kind, "family": fam.name, "split": split, "seed": seed,
        "tasks": rows, "summary": summary, "context_window": k, "planner": planner_cfg.__dict__,
        "prediction_error_by_step": {"adapted": err_on.mean(axis=0).tolist(),
                                     "unadapted": err_off.mean(axis=0).tolist()},
        "prediction_error_by_task": {"adapted": err_on.tolist(), "unadapted": err_off.tolist()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    _plots(report, ret, err_on, err_off, robot.ctrl_dt, out)
    return report


def _plots(report: dict, ret: dict[str, np.ndarray], err_on: np.ndarray, err_off: np.ndarray, dt: float,
           out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(report["tasks"])
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * n + 2), 4))
    width = 0.8 / len(ret)
    colors = {"adapted": "tab:blue", "unadapted": "tab:gray", "oracle": "tab:green"}
    for j, (mode, values) in enumerate(ret.items()):
        ax.bar(np.arange(n) + (j - (len(ret) - 1) / 2) * width, values, width, label=mode, color=colors[mode])
    ax.set_xticks(np.arange(n), [f"{i}{'*' if r['ood'] else ''}" for i, r in enumerate(report["tasks"])])
    ax.set_xlabel("task (* = out of distribution)")
    ax.set_ylabel("episode return")
    ax.set_title(f"{report['family']} ({report['split']} split): return per task")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(ret), frameon=False)
    fig.tight_layout()
    fig.savefig(out / "eval_returns.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    t = np.arange(err_on.shape[1]) * dt
    for label, err, color in (("adapted (context of the last K steps)", err_on, "tab:blue"),
                              ("unadapted (empty context)", err_off, "tab:gray")):
        # Median and interquartile band over tasks: a ±std band is meaningless on a log axis.
        low, mid, high = np.percentile(err, [25, 50, 75], axis=0)
        ax.plot(t, mid, label=label, color=color)
        ax.fill_between(t, low, high, color=color, alpha=0.15)
    ax.axvline(report["context_window"] * dt, color="k", linestyle=":", label="K steps since reset")
    ax.set_xlabel("time since reset (s)")
    ax.set_ylabel("one-step prediction error, median\nand quartiles over tasks (scale units)")
    ax.set_yscale("log")
    ax.set_title("same transitions, with and without the inferred context")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "eval_prediction_error.png", dpi=110)
    plt.close(fig)
