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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from metarl_robot.envs.meta_env import MetaMujocoEnv
from metarl_robot.envs.oracle import MujocoOracle
from metarl_robot.envs.rollout import make_vector_env
from metarl_robot.runtime.adapter import ModelBasedAdapter
from metarl_robot.runtime.planner import Planner, PlannerConfig
from metarl_robot.spec.family import Task, TaskFamily, load_family
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import RobotSpec

AdapterFactory = Callable[[int, bool, PlannerConfig], ModelBasedAdapter]
"""``(batch, adapt, planner config) → adapter``."""


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
            from metarl_robot.algos.context_mbrl import ContextMBRL
            from metarl_robot.spec.robot import robot_from_dict
            from metarl_robot.train.config import load_config
            from metarl_robot.train.runner import load_checkpoint

            cfg = load_config(path / "config.yaml")
            state = load_checkpoint(path / "checkpoints" / "latest.pt")
            self.robot = robot_from_dict(state["robot"])
            self.family = load_family(cfg.family)
            algo = ContextMBRL(self.robot, cfg.model, cfg.training, cfg.seed)
            algo.load_state_dict(state["algo"])
            self.kind, self.planner = "run", cfg.planner
            self.encode, self.step = algo.encode, algo.step
            self.ensemble_size, self.window = cfg.model.ensemble_size, cfg.model.context_window
        else:
            raise FileNotFoundError(f"{path} is neither a bundle (bundle.yaml) nor a run (checkpoints/latest.pt)")

    def adapter(self, batch: int, adapt: bool, planner: PlannerConfig) -> ModelBasedAdapter:
        reward = get_reward(self.family.spec.reward)
        return ModelBasedAdapter(self.robot, reward, self.encode, self.step, self.ensemble_size, self.window,
                                 planner, batch=batch, adapt=adapt)


def _run_episodes(family: TaskFamily, tasks: list[Task], seed: int, act: Callable, observe: Callable | None,
                  desc: str, progress: bool) -> dict[str, np.ndarray]:
    """Run one episode per task in a sync vector env; ``act(obs, envs) -> action`` each step."""
    envs = make_vector_env(family, len(tasks), "sync", tasks=tasks)
    inner: list[MetaMujocoEnv] = [e.unwrapped for e in envs.envs]
    steps = family.spec.episode_steps
    rewards = np.zeros((len(tasks), steps))
    components: dict[str, np.ndarray] = {}
    try:
        obs, _ = envs.reset(seed=seed)
        for t in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
            action = act(obs, inner)
            next_obs, reward, _, _, info = envs.step(action)
            if observe is not None:
                observe(obs, info["sent_action"], next_obs)
            rewards[:, t] = reward
            for k, v in info["reward_components"].items():
                components.setdefault(k, np.zeros((len(tasks), steps)))[:, t] = v
            obs = next_obs
    finally:
        envs.close()
    return {"rewards": rewards, **{f"component/{k}": v for k, v in components.items()}}


def _success(family: TaskFamily, result: dict[str, np.ndarray]) -> np.ndarray | None:
    crit = get_reward(family.spec.reward).success
    if crit is None:
        return None
    name, threshold = crit
    comp = result[f"component/{name}"]
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

    # Adapted, recording prediction errors with and without the inferred context on the same transitions.
    adapted = src.adapter(n, True, planner_cfg)
    errors_on, errors_off = [], []
    z_empty = adapted.encode_fn(adapted.window.obs, adapted.window.act, adapted.window.next_obs,
                                np.zeros_like(adapted.window.mask()))
    pending: dict[str, np.ndarray] = {}

    def act_adapted(obs, envs):
        action, diag = adapted.act(obs, params)
        pending["off"] = adapted.predict(obs, action, z_empty)
        pending["on"] = diag["predicted_next_obs"]
        return action

    def observe_adapted(obs, sent, next_obs):
        # The planner's first action can differ from the sent one only if the env limited it.
        for key, store in (("on", errors_on), ("off", errors_off)):
            pred = adapted.predict(obs, sent, adapted.context() if key == "on" else z_empty)
            store.append(np.sqrt(np.mean(((pred - next_obs) / robot.obs_scale) ** 2, axis=-1)))
        adapted.observe(obs, sent, next_obs)

    res_adapted = _run_episodes(fam, task_list, seed, act_adapted, observe_adapted, "adapted", progress)
    unadapted = src.adapter(n, False, planner_cfg)

    def act_unadapted(obs, envs):
        return unadapted.act(obs, params)[0]

    res_unadapted = _run_episodes(fam, task_list, seed, act_unadapted, unadapted.observe, "unadapted", progress)
    res_oracle = None
    if oracle:
        planner = Planner(planner_cfg, robot, get_reward(fam.spec.reward), MujocoOracle(oracle_threads), n)
        last = {"a": np.tile(robot.safe_action, (n, 1))}

        def act_oracle(obs, envs):
            return planner.plan(obs, envs, params, last["a"]).action

        def observe_oracle(obs, sent, next_obs):
            last["a"] = np.asarray(sent, dtype=np.float64)

        res_oracle = _run_episodes(fam, task_list, seed, act_oracle, observe_oracle, "oracle", progress)

    ret = {k: r["rewards"].sum(axis=1) for k, r in (("adapted", res_adapted), ("unadapted", res_unadapted),
                                                      ("oracle", res_oracle)) if r is not None}
    err_on, err_off = np.stack(errors_on, axis=1), np.stack(errors_off, axis=1)  # (tasks, steps)
    k = src.window
    rows = []
    for i, task in enumerate(task_list):
        row = {"task": task, "ood": fam.is_ood(task), **{f"return_{m}": float(v[i]) for m, v in ret.items()},
               "pred_err_adapted_after_k": float(err_on[i, k:].mean()),
               "pred_err_unadapted_after_k": float(err_off[i, k:].mean())}
        if "oracle" in ret:
            row["gap"] = float(ret["oracle"][i] - ret["adapted"][i])
        for mode, res in (("adapted", res_adapted), ("unadapted", res_unadapted), ("oracle", res_oracle)):
            succ = _success(fam, res) if res is not None else None
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
        summary["adapted_over_oracle"] = float(ret["adapted"].mean() / ret["oracle"].mean())
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
