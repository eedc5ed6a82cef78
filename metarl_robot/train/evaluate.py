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
``eval_prediction_error.png``; a grid evaluation (``--grid k``) also writes the gap over the grid
(worst case and mean in the summary) as heat maps, one per pair of varied parameters.

A PEARL run or checkpoint (``algo: pearl``) is graded by PEARL's meta-test protocol instead: three
episodes per task with a belief that keeps the evidence of the earlier ones (``return_after_k``, the
return after ``k`` = 0, 1, 2 exploration episodes: the first runs on z drawn from the prior, each later
one on z drawn from the posterior of everything the controller saw on the task), deterministic actions;
every episode starts from the oracle's start, so each column has its own gap (``gap_after_k``; ``gap``
is the one after 2). Writes ``eval.json`` and ``eval_returns.png`` (and the grid's heat maps).

A ``context_policy`` bundle (an exported PEARL run) is graded by the same meta-test, run by the robot-side
``ContextPolicyAdapter`` over its ONNX graphs, as it runs on the robot: z is the posterior *mean*, updated every
step (the adapter has no sampled-z mode), and the belief is kept across the three episodes of a task. So
``return_after_0`` is here an episode that adapts online from the prior, not one on a fixed prior draw;
``eval.json`` records the protocol under ``controller``. The oracle plans with the ``planner`` of the run config
recorded in the bundle's provenance (the defaults if it records none: ``oracle_planner`` in ``eval.json`` says which).

An MB-MPO run or ``meta_policy`` bundle is graded by the same meta-test with the robot's adapter, reset at every
episode start (where it takes its inner step), actions sampled: with ``episodes_per_step`` K (the bundle's, or
``--set episodes_per_step=K``) it steps once per K episodes, so every episode from 0 to 2K runs and the columns are
``after_0``, ``after_K`` and ``after_2K`` (the meta-policy's episode, after one pooled step, after two); K = 1 gives
``after_0/1/2``. ``eval.json`` records K under ``controller``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metarl_robot.algos.mbmpo import PolicyController
from metarl_robot.algos.mpc_controller import MPCController
from metarl_robot.algos.pearl_controller import PEARLController, Posterior, family_reward_fn
from metarl_robot.backend import Backend, Job, LocalBackend, run_all
from metarl_robot.envs.out_of_family import OutOfFamily
from metarl_robot.envs.rollout import make_vector_env
from metarl_robot.runtime.adapter import ModelBasedAdapter
from metarl_robot.runtime.kinds import bundle_kind
from metarl_robot.runtime.manifest import LoadedBundle
from metarl_robot.runtime.planner import PlannerConfig
from metarl_robot.spec.family import Task, TaskFamily, load_family
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import RobotSpec
from metarl_robot.spec.schema import SpecError, build, to_plain
from metarl_robot.train.gap import OracleReturns, episode_success, run_episodes


class _Source:
    """What is evaluated: an exported bundle (the robot's path, any kind) or a training run (torch).

    The protocol is the bundle kind's (for a run: the kind its algorithm exports): a kind with
    ``meta_test_episodes`` is graded by the meta-test, any other by adapted vs unadapted through its dynamics
    model."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if (path / "bundle.yaml").is_file():
            from metarl_robot.runtime.bundle import load_bundle

            bundle = load_bundle(path)
            self.kind, self.robot, self.family = "bundle", bundle.robot, bundle.family
            self.bundle_class: type[LoadedBundle] = type(bundle)
            """The bundle kind that decides the protocol (for a run: the kind its algorithm exports)."""
            self.bundle = bundle
            """The loaded bundle (bundles only): its adapter is the controller, as on the robot."""
            self.algo_name = ((bundle.manifest.get("provenance") or {}).get("config") or {}).get("algo")
            """The algorithm that trained the controller (a bundle's provenance records it; None if it does not)."""
            self.torch_threads = torch.get_num_threads()  # bundles run on onnxruntime: leave torch as it is
            if bundle.plans:
                self.planner, self.oracle_planner_source = bundle.planner, "bundle planner"
                """The planner (the oracle's, and for planning controllers their own) and where it comes from."""
            else:
                self.planner, self.oracle_planner_source = _provenance_planner(bundle.manifest)
        elif (path / "checkpoints" / "latest.pt").is_file() or (path.suffix == ".pt" and path.is_file()):
            from metarl_robot.train.runner import load_trained

            cfg, self.robot, algo = load_trained(path if path.suffix == ".pt" else path / "checkpoints" / "latest.pt")
            self.family = load_family(cfg.family)
            self.kind, self.planner, self.bundle, self.algo_name = "run", cfg.planner, None, cfg.algo
            if algo.bundle_kind is None:  # its controller is not built yet (macaw: docs/macaw.md)
                raise ValueError(f"{path}: a run of algo {cfg.algo!r}, which metarl eval cannot grade yet (it has no "
                                 "controller to run in MuJoCo)")
            self.bundle_class = bundle_kind(algo.bundle_kind)
            self.oracle_planner_source = "run config"
            self.torch_threads = cfg.loop.torch_threads
            """torch threads for the controller's many tiny calls (the run's own setting)."""
            self.algo = algo
            """The trained algorithm (runs only): its torch model is the controller."""
            algo.family = self.family  # its adapters plan with the family's reward
        else:
            raise FileNotFoundError(f"{path} is neither a bundle (bundle.yaml), a run (checkpoints/latest.pt) nor a "
                                    "checkpoint file (.pt)")
        self.meta_test_episodes = self.bundle_class.meta_test_episodes
        """Non-empty: the meta-test protocol, the return after each of these numbers of exploration episodes."""
        if not self.meta_test_episodes and not self.bundle_class.has_dynamics_model:
            raise ValueError(f"{path}: a {self.bundle_class.kind} controller has neither a meta-test protocol nor a "
                             "dynamics model; metarl eval cannot grade it")

    def meta_test_controller(self, batch: int, family: TaskFamily, params: dict[str, np.ndarray], seed: int,
                             settings: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any], list[int]]:
        """The meta-test's controller for ``batch`` tasks, how it acts (recorded in ``eval.json``) and the episodes
        graded (the return after that many episodes on the task). ``settings``: the kind's ``adapter_settings``
        given with ``--set``."""
        graded = list(self.meta_test_episodes)
        if self.bundle_class.meta_test_resets:  # it adapts at episode starts (MB-MPO): the robot's own adapter
            adapter = self.bundle.make_adapter(batch=batch, adapt=True, seed=seed, planner_overrides=settings) \
                if self.bundle is not None else self.algo.make_policy_adapter(batch, seed, settings=settings)
            # A fresh adapter, reset at every episode start (the first included) as the node resets it: it pools the
            # episode just ended there, steps on every k-th and keeps the result. An adaptation is k episodes.
            k = adapter.inner.episodes_per_step
            sampled = self.bundle_class.samples_actions
            adapts = adapter.adapts_by()
            return PolicyController(adapter, params), {
                "deterministic": not sampled, "adapts": adapts, "episodes_per_step": k,
                "runtime": f"{type(adapter).__name__} ({'ONNX' if self.bundle is not None else 'the run'}'s policy, "
                           f"numpy adaptation), as on the robot: {'actions sampled' if sampled else 'the mean acts'}"
            }, [k * e for e in graded]
        if self.bundle is not None:
            adapter = self.bundle.make_adapter(batch=batch, adapt=True, seed=seed, planner_overrides=settings)
            return _BeliefKeepingAdapter(adapter, params), {
                "deterministic": True, "z_mode": "mean", "keep_context": True,
                "runtime": f"{type(adapter).__name__} (ONNX), as on the robot: z is the posterior mean, updated every "
                           "step"}, graded
        # The context must hold the rewards the env gives: the family's reward with each task's parameters.
        controller = PEARLController(self.algo, batch, deterministic=True, z_mode="sample", keep_context=True,
                                     reward_fn=family_reward_fn(get_reward(family.spec.reward), self.robot, params),
                                     seed=seed)
        return controller, {"deterministic": True, "z_mode": "sample", "keep_context": True}, graded

    def split_settings(self, overrides: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """``--set`` values as (the controller's own settings: its kind's ``adapter_settings``, the planner's);
        ``ValueError`` naming what is allowed for any other key."""
        planner = dict(overrides or {})
        own = {k: planner.pop(k) for k in list(planner) if k in self.bundle_class.adapter_settings}
        planner_keys = [f.name for f in fields(PlannerConfig) if f.name != "seed"]
        if unknown := sorted(set(planner) - set(planner_keys)):
            takes = (f"a {self.bundle_class.kind} controller takes {', '.join(self.bundle_class.adapter_settings)}; "
                     if self.bundle_class.adapter_settings else "")
            whose = "the planner" if self.bundle_class.plans else "the oracle's planner"
            raise ValueError(f"--set {', '.join(unknown)}: not a setting of this evaluation: {takes}{whose} takes "
                             f"{', '.join(planner_keys)} (the seed is --seed)")
        return own, planner

    def adapter(self, batch: int, mode: dict[str, bool], planner: PlannerConfig) -> ModelBasedAdapter:
        """The controller that plans through the dynamics model in adaptation ``mode`` (the kind's switches)."""
        if self.bundle is not None:
            return self.bundle.make_adapter(batch=batch, planner_overrides=to_plain(planner), seed=planner.seed,
                                            **mode)
        return self.algo.make_adapter(planner, batch, **mode)


ADAPTATION_STEPS = 50
"""Steps of adaptation after which the summary also compares the adapted model's one-step error with the unadapted
model's (``pred_err_ratio_after_50``: the ratio of the means over tasks, and the worst task's ratio)."""


def _provenance_planner(manifest: dict[str, Any]) -> tuple[PlannerConfig, str]:
    """The oracle's planner for a bundle without one: the run config's ``planner`` its provenance records, else the
    defaults; and which of the two it is."""
    recorded = ((manifest.get("provenance") or {}).get("config") or {}).get("planner")
    if not isinstance(recorded, dict):
        return PlannerConfig(), "defaults (the bundle's provenance records no run config planner)"
    try:
        planner = build(PlannerConfig, recorded, "provenance.config.planner")
        planner.validate()
    except (SpecError, ValueError) as exc:
        raise SpecError("bundle.yaml", "provenance.config.planner", f"cannot be the oracle's planner: {exc}") from exc
    return planner, "run config (bundle provenance)"


class _BeliefKeepingAdapter:
    """A context-policy adapter as a rollout controller for PEARL's meta-test: the belief is reset once (a new
    task for every sub-env) and kept across episode starts, so later episodes act on earlier ones' evidence."""

    def __init__(self, adapter: Any, reward_params: dict[str, np.ndarray]) -> None:
        self.adapter, self.params = adapter, reward_params
        adapter.reset()

    def reset(self) -> None:
        """An episode start: the belief is kept (the meta-test's ``keep_context``)."""

    def act(self, obs: np.ndarray) -> np.ndarray:
        return self.adapter.act(obs, self.params)[0]

    def observe(self, obs: np.ndarray, sent_action: np.ndarray, next_obs: np.ndarray) -> None:
        self.adapter.observe(obs, sent_action, next_obs)

    def posterior(self) -> Posterior:
        return Posterior(*self.adapter.posterior())


class _PredictionErrorRecorder(MPCController):
    """The adapted controller, also scoring each step's prediction by the adapted model (as it was when the step
    was planned) and by the meta-trained model without any adaptation, on the same transitions."""

    def __init__(self, adapter: ModelBasedAdapter, reward_params: dict[str, np.ndarray]) -> None:
        super().__init__(adapter, reward_params)
        self.with_context: list[np.ndarray] = []
        self.without_context: list[np.ndarray] = []

    def observe(self, obs: np.ndarray, sent_action: np.ndarray, next_obs: np.ndarray) -> None:
        a, scale = self.adapter, self.adapter.robot.obs_scale
        # The adapter's own prediction when it planned the step (its context, last layer and latency then).
        adapted = self.last_diagnostics["predicted_next_obs"]
        for pred, store in ((adapted, self.with_context), (a.unadapted_prediction(obs, sent_action),
                                                           self.without_context)):
            store.append(np.sqrt(np.mean(((pred - next_obs) / scale) ** 2, axis=-1)))
        super().observe(obs, sent_action, next_obs)


def evaluate(source_path: str | Path, out_dir: str | Path, family: str | None = None, split: str = "test",
             tasks: int | list[Task] = 8, grid: int | None = None, grid_params: list[str] | None = None, seed: int = 0,
             oracle: bool = True, oracle_threads: int = 2, oracle_cache: str | Path | None = None,
             unadapted: bool = True, planner_overrides: dict[str, Any] | None = None,
             progress: bool = True, effects: OutOfFamily | None = None,
             modes: Collection[str] | None = None, adapt_from: str | Path | None = None,
             backend: Backend | None = None, tasks_per_job: int | None = None) -> dict[str, Any]:
    """Evaluate a bundle or a run on ``tasks`` (a number to draw from ``split``, or the tasks themselves).

    Every episode, of every task and mode, starts from the initial state a reset with ``seed`` gives,
    so tasks differ only by their parameters and the gap compares the same start. ``effects``: out-of-family
    effects every episode (adapted, unadapted, oracle) runs with; ``eval.json`` records them and what the
    oracle sees of them under ``out_of_family``. ``modes``: which of the kind's adaptation modes to run besides
    ``adapted`` (``None``: all of them, less ``unadapted`` when that is ``False``; ``()``: the adapted controller
    only, a third to a fifth of the episodes when only its return is wanted). ``adapt_from``: a dataset folder of
    logged episodes of the tasks (a controller that adapts from logs, MACAW's: :func:`logged_episodes`); the
    adaptation after k of them reads all k (``adapt_episodes`` is the largest count graded unless ``--set``).

    ``backend``: where the episodes run (default: this process; :mod:`metarl_robot.backend`). The controller's
    episodes run in jobs of ``tasks_per_job`` tasks (default: all in one), each job batched as one vector env; the
    oracle's run one task per job. The tasks of a job share the planner's noise draws, so ``tasks_per_job`` is part
    of what decides the returns (recorded in ``eval.json``); the backend is not.
    """
    started = time.perf_counter()
    src = _Source(Path(source_path))
    if tasks_per_job is not None and tasks_per_job < 1:
        raise ValueError(f"--tasks-per-job must be >= 1, got {tasks_per_job}")
    with _torch_threads(src.torch_threads):
        return _evaluate(src, source_path, out_dir, family, split, tasks, grid, grid_params, seed, oracle,
                         oracle_threads, oracle_cache, unadapted, planner_overrides, progress, started, effects or None,
                         modes, adapt_from, backend or LocalBackend(), tasks_per_job)


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op threads set for the block. A run's controller makes many tiny torch calls per step: with
    torch's default pool a busy 2-core machine ran them 12x slower, so runs evaluate with their own
    loop.torch_threads (bundles run on onnxruntime and leave it as it is)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _chunks(tasks: list[Task], tasks_per_job: int | None) -> list[tuple[int, list[Task]]]:
    """The tasks in jobs of ``tasks_per_job`` (all in one by default), in order: (index of the first, the tasks)."""
    size = tasks_per_job or len(tasks)
    return [(i, tasks[i:i + size]) for i in range(0, len(tasks), size)]


@functools.lru_cache(maxsize=2)
def _loaded_in_worker(path: str, modified: float) -> _Source:
    """A worker's loaded source, kept for the next job of the same evaluation (keyed by its files' time stamp)."""
    return _Source(Path(path))


def _in_job(source: _Source | str) -> _Source:
    """A job's controller source: the driver's own (in process) or loaded from its path in a worker (once per worker
    and version of the files: a bundle's ONNX sessions take a while to build)."""
    if isinstance(source, _Source):
        return source
    path = Path(source)
    stamp = max((f.stat().st_mtime for f in (path / "bundle.yaml", path / "checkpoints" / "latest.pt", path)
                 if f.is_file()), default=0.0)
    return _loaded_in_worker(str(path), stamp)


def _job_source(src: _Source, backend: Backend) -> _Source | str:
    return src if backend.in_process else str(src.path.resolve())


def _jobs_record(backend: Backend, tasks_per_job: int | None, tasks: int) -> dict[str, Any]:
    """``eval.json``'s ``jobs``: how the episodes were split (part of what decides the returns) and where they ran
    (not part of it)."""
    return {"tasks_per_job": tasks_per_job or tasks, **backend.describe()}


def _concat(parts: list[dict[str, np.ndarray | None]]) -> dict[str, np.ndarray | None]:
    """Per-key arrays of the jobs, joined along the task axis (``None`` stays ``None``)."""
    return {key: None if parts[0][key] is None else np.concatenate([p[key] for p in parts]) for key in parts[0]}


def _evaluate(src: _Source, source_path: str | Path, out_dir: str | Path, family: str | None, split: str,
              tasks: int | list[Task], grid: int | None, grid_params: list[str] | None, seed: int, oracle: bool,
              oracle_threads: int, oracle_cache: str | Path | None, unadapted: bool,
              planner_overrides: dict[str, Any] | None, progress: bool, started: float,
              effects: OutOfFamily | None, only_modes: Collection[str] | None,
              adapt_from: str | Path | None, backend: Backend, tasks_per_job: int | None) -> dict[str, Any]:
    fam = load_family(family) if family else src.family
    if fam.spec.robot != src.robot.name:
        raise ValueError(f"family {fam.name!r} is for robot {fam.spec.robot!r}, the controller for {src.robot.name!r}")
    if isinstance(tasks, list):
        task_list = [fam.validate(t) for t in tasks]
    elif grid:
        task_list = fam.grid(grid, split, grid_params)
    else:
        task_list = fam.sample(np.random.default_rng(seed), split, tasks)
    settings, planner_overrides = src.split_settings(planner_overrides)
    planner_cfg = replace(src.planner, **planner_overrides, seed=seed)
    robot: RobotSpec = src.robot
    grid_info = {"k": grid, "params": grid_params or fam.names} if grid and not isinstance(tasks, list) else None
    if src.meta_test_episodes:
        if not unadapted:
            raise ValueError("--no-unadapted is for model-based controllers; a PEARL evaluation always runs its "
                             "first episode on the prior (return_after_0, the unadapted return)")
        return _meta_test(src, source_path, out_dir, fam, split, task_list, grid_info, seed, planner_cfg, oracle,
                          oracle_threads, oracle_cache, progress, started, effects, settings, adapt_from, backend,
                          tasks_per_job)
    if adapt_from is not None:
        raise ValueError(f"--adapt-from: a {src.bundle_class.kind} controller does not adapt from logged episodes")
    modes = src.bundle_class.adaptation_modes
    if only_modes is not None and not set(only_modes) <= set(modes) - {"adapted"}:
        raise ValueError(f"modes: {sorted(set(only_modes) - set(modes))} not among this {src.bundle_class.kind!r} "
                         f"controller's other adaptation modes {sorted(set(modes) - {'adapted'})}")
    run_modes = ["adapted", *(m for m in modes if m != "adapted" and (m != "unadapted" or unadapted)
                              and (only_modes is None or m in only_modes))]
    jobs = [Job(f"{fam.name} controller episodes of tasks {first}..{first + len(chunk) - 1}", (
        _job_source(src, backend), fam, chunk, seed, planner_cfg, run_modes, effects, progress and backend.in_process))
        for first, chunk in _chunks(task_list, tasks_per_job)]
    parts = run_all(backend, _model_based_job, jobs, "controller episodes", progress)
    k = parts[0].pop("context_window")
    joined = _concat(parts)
    ret = {mode: joined[f"return_{mode}"] for mode in run_modes}
    success = {mode: joined[f"success_{mode}"] for mode in run_modes}
    if oracle:
        oracle_returns = OracleReturns(fam, robot, planner_cfg, oracle_threads, oracle_cache, effects=effects,
                                       backend=backend)
        ret["oracle"] = oracle_returns(task_list, seed, progress)
        success["oracle"] = oracle_returns.success(task_list, seed)
    err_on, err_off = joined["err_adapted"], joined["err_unadapted"]  # (tasks, steps)
    rows = []
    for i, task in enumerate(task_list):
        row = {"task": task, "ood": fam.is_ood(task), **{f"return_{m}": float(v[i]) for m, v in ret.items()},
               "pred_err_adapted_after_k": float(err_on[i, k:].mean()),
               "pred_err_unadapted_after_k": float(err_off[i, k:].mean())}
        if "oracle" in ret:
            row["gap"] = float(ret["oracle"][i] - ret["adapted"][i])
        for mode, succ in success.items():
            if succ is not None:
                row[f"success_{mode}"] = bool(succ[i])
        rows.append(row)

    summary: dict[str, Any] = {f"return_{m}": _stats(rows, f"return_{m}") for m in ret}
    if "oracle" in ret:
        summary["gap"] = _stats(rows, "gap")
        # A ratio of returns means something only when they are positive (not for a -|v - v*| reward).
        oracle_mean = float(ret["oracle"].mean())
        summary["adapted_over_oracle"] = float(ret["adapted"].mean()) / oracle_mean if oracle_mean > 0 else None
    summary["pred_err_adapted_after_k"] = float(err_on[:, k:].mean())
    summary["pred_err_unadapted_after_k"] = float(err_off[:, k:].mean())
    summary["pred_err_ratio_after_k"] = summary["pred_err_adapted_after_k"] / summary["pred_err_unadapted_after_k"]
    if err_on.shape[1] > ADAPTATION_STEPS:  # after 50 steps of adaptation (issue 15's measure), every task
        on, off = err_on[:, ADAPTATION_STEPS:].mean(axis=1), err_off[:, ADAPTATION_STEPS:].mean(axis=1)
        summary[f"pred_err_ratio_after_{ADAPTATION_STEPS}"] = {"mean": float(on.mean() / off.mean()),
                                                               "worst_task": float((on / off).max())}
    summary.update(_success_rates(rows, ret))
    report = {
        "source": str(source_path), "source_kind": src.kind, "algo": src.algo_name,
        "bundle_kind": src.bundle_class.kind,
        "family": fam.name, "split": split, "seed": seed,
        "grid": grid_info, "out_of_family": _effects_record(effects, oracle),
        "tasks": rows, "summary": summary, "context_window": k, "planner": planner_cfg.__dict__,
        "jobs": _jobs_record(backend, tasks_per_job, len(task_list)),
        "prediction_error_by_step": {"adapted": err_on.mean(axis=0).tolist(),
                                     "unadapted": err_off.mean(axis=0).tolist()},
        "prediction_error_by_task": {"adapted": err_on.tolist(), "unadapted": err_off.tolist()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    return _write_report(report, ret, out_dir, lambda out: _plots(report, ret, err_on, err_off, robot.ctrl_dt, out))


def _model_based_job(source: _Source | str, fam: TaskFamily, tasks: list[Task], seed: int, planner_cfg: PlannerConfig,
                     run_modes: list[str], effects: OutOfFamily | None, progress: bool) -> dict[str, Any]:
    """One job of a model-based evaluation: every mode's episodes on ``tasks`` (one batch), from ``seed``'s start.

    Returns per mode ``return_<mode>`` and ``success_<mode>``, the adapted episodes' one-step prediction errors with
    and without adaptation (``err_adapted``, ``err_unadapted``: tasks x steps) and the ``context_window``."""
    src = _in_job(source)
    with _torch_threads(src.torch_threads):
        n, modes, robot = len(tasks), src.bundle_class.adaptation_modes, src.robot
        params = {k: np.array([t[k] for t in tasks]) for k in fam.reward_names}
        recorder = _PredictionErrorRecorder(src.adapter(n, modes["adapted"], planner_cfg), params)
        out: dict[str, Any] = {}
        for mode in run_modes:  # the adapted controller first, then the kind's others (context only, unadapted, ..)
            controller = recorder if mode == "adapted" else MPCController(src.adapter(n, modes[mode], planner_cfg),
                                                                         params)
            ep = run_episodes(fam, robot, tasks, [seed] * n, controller, progress, effects=effects)
            out[f"return_{mode}"], out[f"success_{mode}"] = ep.returns, episode_success(fam, ep.components)
        out["err_adapted"] = np.stack(recorder.with_context, axis=1)
        out["err_unadapted"] = np.stack(recorder.without_context, axis=1)
        out["context_window"] = recorder.adapter.window.window
        return out


def _effects_record(effects: OutOfFamily | None, oracle: bool) -> dict[str, Any] | None:
    """``eval.json``'s ``out_of_family``: the effects, and (with an oracle) which of them it plans through."""
    if effects is None:
        return None
    return {**effects.record(), **({"oracle": effects.oracle_record()} if oracle else {})}


def _stats(rows: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Mean, std and the worst task (lowest return, or highest gap) of a per-task column."""
    values = np.array([r[key] for r in rows], dtype=float)
    worst = int(values.argmin() if "return" in key else values.argmax())
    return {"mean": float(values.mean()), "worst": float(values[worst]), "std": float(values.std()),
            "worst_task": worst}


def _success_rates(rows: list[dict[str, Any]], ret: dict[str, np.ndarray]) -> dict[str, float]:
    """Per mode whose reward defines success: the fraction of tasks that succeeded."""
    return {f"success_rate_{mode}": float(np.mean([r[f"success_{mode}"] for r in rows]))
            for mode in ret if f"success_{mode}" in rows[0]}


def _write_report(report: dict[str, Any], ret: dict[str, np.ndarray], out_dir: str | Path,
                  plot: Callable[[Path], None]) -> dict[str, Any]:
    """Write ``eval.json`` (first: a failing plot loses no result), the plots and a grid's gap heat maps (then
    listed in the report) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    plot(out)
    if report["grid"] and "oracle" in ret:
        report["heatmaps"] = gap_heatmaps(report, out)
        (out / "eval.json").write_text(json.dumps(report, indent=1))
    return report


def _meta_test(src: _Source, source_path: str | Path, out_dir: str | Path, fam: TaskFamily, split: str,
               task_list: list[Task], grid_info: dict[str, Any] | None, seed: int, planner_cfg: PlannerConfig,
               oracle: bool, oracle_threads: int, oracle_cache: str | Path | None, progress: bool, started: float,
               effects: OutOfFamily | None = None, settings: dict[str, Any] | None = None,
               adapt_from: str | Path | None = None, backend: Backend | None = None,
               tasks_per_job: int | None = None) -> dict[str, Any]:
    """Run the episodes (in jobs of ``tasks_per_job`` tasks on ``backend``) and the oracle, write ``eval.json`` and
    the plots, return the report."""
    robot: RobotSpec = src.robot
    backend = backend or LocalBackend()
    jobs = [Job(f"{fam.name} meta-test episodes of tasks {first}..{first + len(chunk) - 1}", (
        _job_source(src, backend), fam, chunk, seed, settings, effects, adapt_from, progress and backend.in_process))
        for first, chunk in _chunks(task_list, tasks_per_job)]
    parts = run_all(backend, _meta_test_job, jobs, "meta-test episodes", progress)
    protocol, graded = parts[0].pop("controller"), parts[0].pop("graded")
    for part in parts[1:]:
        del part["controller"], part["graded"]
    columns = [f"after_{episode}" for episode in graded]
    joined = _concat(parts)
    ret: dict[str, np.ndarray] = {c: joined[f"return_{c}"] for c in columns}
    success: dict[str, np.ndarray | None] = {c: joined[f"success_{c}"] for c in columns}
    belief_var = {c: joined[f"belief_var_{c}"] for c in columns if f"belief_var_{c}" in joined}
    if oracle:
        oracle_returns = OracleReturns(fam, robot, planner_cfg, oracle_threads, oracle_cache, effects=effects,
                                       backend=backend)
        ret["oracle"] = oracle_returns(task_list, seed, progress)
        success["oracle"] = oracle_returns.success(task_list, seed)
    rows = []
    for i, task in enumerate(task_list):
        row: dict[str, Any] = {"task": task, "ood": fam.is_ood(task),
                               **{f"return_{m}": float(v[i]) for m, v in ret.items()},
                               **{f"belief_var_{c}": float(v[i]) for c, v in belief_var.items()}}
        if "oracle" in ret:
            for c in columns:
                row[f"gap_{c}"] = float(ret["oracle"][i] - ret[c][i])
            row["gap"] = row[f"gap_{columns[-1]}"]
        for mode, succ in success.items():
            if succ is not None:
                row[f"success_{mode}"] = bool(succ[i])
        rows.append(row)
    summary: dict[str, Any] = {f"return_{m}": _stats(rows, f"return_{m}") for m in ret}
    if "oracle" in ret:
        summary.update({f"gap_{c}": _stats(rows, f"gap_{c}") for c in columns})
        summary["gap"] = _stats(rows, "gap")
    summary[f"return_gain_{columns[-1]}"] = float(np.mean(ret[columns[-1]] - ret[columns[0]]))
    summary.update(_success_rates(rows, ret))
    report = {
        "source": str(source_path), "source_kind": src.kind, "algo": src.algo_name,
        "bundle_kind": src.bundle_class.kind,
        "family": fam.name, "split": split, "seed": seed, "grid": grid_info,
        "out_of_family": _effects_record(effects, oracle), "tasks": rows, "summary": summary,
        "exploration_episodes": graded, "adapt_from": str(adapt_from) if adapt_from else None,
        "controller": protocol, "planner": planner_cfg.__dict__, "oracle_planner": src.oracle_planner_source,
        "jobs": _jobs_record(backend, tasks_per_job, len(task_list)),
        "seconds": round(time.perf_counter() - started, 1),
    }
    shades = ("#9ecae1", "#4292c6", "#08519c")  # lighter to darker: more adaptation
    colors = {c: shades[round(i * (len(shades) - 1) / max(len(columns) - 1, 1))] for i, c in enumerate(columns)}
    colors["oracle"] = "tab:green"
    return _write_report(report, ret, out_dir,
                         lambda out: _returns_plot(report, ret, out, colors, "return after k exploration episodes"))


def _meta_test_job(source: _Source | str, fam: TaskFamily, tasks: list[Task], seed: int,
                   settings: dict[str, Any] | None, effects: OutOfFamily | None, adapt_from: str | Path | None,
                   progress: bool) -> dict[str, Any]:
    """One job of a meta-test: its controller's episodes on ``tasks`` (one batch), every one from ``seed``'s start.

    Returns per graded column ``return_<c>``, ``success_<c>`` (and ``belief_var_<c>`` for a belief-keeping
    controller), the protocol (``controller``) and the ``graded`` episode counts."""
    src = _in_job(source)
    with _torch_threads(src.torch_threads):
        robot, n = src.robot, len(tasks)
        params = {k: np.array([t[k] for t in tasks]) for k in fam.reward_names}
        controller, protocol, graded = src.meta_test_controller(n, fam, params, seed, settings)
        column_of = {episode: f"after_{episode}" for episode in graded}
        out: dict[str, Any] = {"controller": protocol, "graded": graded}
        if adapt_from and not hasattr(getattr(controller, "adapter", None), "adapt_on"):
            raise ValueError("--adapt-from: this controller does not adapt from logged episodes (a MACAW awr_policy "
                             "bundle or run does)")
        logged = logged_episodes(adapt_from, fam, robot, tasks, graded[-1]) if adapt_from else None
        envs = make_vector_env(fam, n, "sync", tasks=tasks, effects=effects)
        try:
            if logged is not None:  # one episode per graded count, each by a fresh adapter on that many logged ones
                protocol["adapts"] = f"from the first k logged episodes of each task in {adapt_from}, k = {graded}"
                # "after k logs" reads all k: the window is the largest k unless the command line chose it.
                settings = {"adapt_episodes": graded[-1], **(settings or {})}
                for episode in graded:
                    controller = src.meta_test_controller(n, fam, params, seed, settings)[0]
                    for b in range(n) if episode else ():
                        controller.adapter.adapt_on(b, logged[b][:episode])
                    ep = run_episodes(fam, robot, tasks, [seed] * n, controller, progress, envs)
                    column = column_of[episode]
                    out[f"return_{column}"], out[f"success_{column}"] = ep.returns, episode_success(fam, ep.components)
            # Every episode runs, those between the graded ones too: a pooling adapter steps on them.
            for episode in range(graded[-1] + 1) if logged is None else ():
                column = column_of.get(episode)
                if column and hasattr(controller, "posterior"):  # the belief z is drawn from at this episode's reset
                    out[f"belief_var_{column}"] = controller.posterior().var.mean(axis=1)
                ep = run_episodes(fam, robot, tasks, [seed] * n, controller, progress, envs)
                if column:
                    out[f"return_{column}"], out[f"success_{column}"] = ep.returns, episode_success(fam, ep.components)
        finally:
            envs.close()
        return out


def logged_episodes(adapt_from: str | Path, fam: TaskFamily, robot: RobotSpec, tasks: list[Task], count: int
                    ) -> list[list[Any]]:
    """Per task the first ``count`` episodes of the dataset ``adapt_from`` whose task is that task (its parameter
    vector within 1e-6), as :class:`~metarl_robot.runtime.awr_policy.AWREpisode` (commands in normalised units);
    ``ValueError`` naming what is missing: another robot or family, a task with too few episodes or unknown
    rewards."""
    from metarl_robot.replay.dataset import load_dataset
    from metarl_robot.runtime.awr_policy import AWREpisode

    data = load_dataset(adapt_from)
    if data.robot.interface_hash != robot.interface_hash or data.family.name != fam.name:
        raise ValueError(f"--adapt-from {adapt_from}: episodes of robot {data.robot.name!r}, family "
                         f"{data.family.name!r}; this evaluation runs robot {robot.name!r}, family {fam.name!r}")
    out = []
    for i, task in enumerate(tasks):
        want = fam.to_vector(task)
        mine = [e for e in range(data.num_episodes) if np.allclose(data.task_values[e], want, rtol=0, atol=1e-6)]
        if len(mine) < count:
            raise ValueError(f"--adapt-from {adapt_from}: task {i} ({task}) has {len(mine)} logged episode(s), "
                             f"{count} needed (metarl dataset collect with the eval's --split, --tasks and --seed "
                             "logs them)")
        episodes = [AWREpisode.logged(data, e) for e in mine[:count]]
        for e, episode in zip(mine[:count], episodes, strict=True):
            if not np.isfinite(episode.reward).all():
                raise ValueError(f"--adapt-from {adapt_from}: episode {e} of task {i} has unknown rewards")
        out.append(episodes)
    return out


def _returns_plot(report: dict, ret: dict[str, np.ndarray], out: Path, colors: dict[str, str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(report["tasks"])
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * n + 2), 4))
    width = 0.8 / len(ret)
    for j, (mode, values) in enumerate(ret.items()):
        ax.bar(np.arange(n) + (j - (len(ret) - 1) / 2) * width, values, width, label=mode, color=colors[mode])
    ax.set_xticks(np.arange(n), [f"{i}{'*' if r['ood'] else ''}" for i, r in enumerate(report["tasks"])])
    ax.set_xlabel("task (* = out of distribution)")
    ax.set_ylabel("episode return")
    ax.set_title(f"{report['family']} ({report['split']} split): {title}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=len(ret), frameon=False)
    fig.tight_layout()
    fig.savefig(out / "eval_returns.png", dpi=110)
    plt.close(fig)


def _plots(report: dict, ret: dict[str, np.ndarray], err_on: np.ndarray, err_off: np.ndarray, dt: float,
           out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _returns_plot(report, ret, out, {"adapted": "tab:blue", "context_only": "tab:cyan", "online_only": "tab:purple",
                                     "unadapted": "tab:gray", "oracle": "tab:green"},
                  "return per task")

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


def gap_heatmaps(report: dict[str, Any], out: Path) -> list[str]:
    """Gap over a grid evaluation: a heat map per pair of varied parameters (the worst case over the
    other axes in each cell), or a line over the one varied parameter. Returns the PNG file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["tasks"]
    varied = [p for p in report["grid"]["params"] if len({r["task"][p] for r in rows}) > 1]
    gaps = np.array([r["gap"] for r in rows])
    files = []
    if len(varied) == 1:
        name = varied[0]
        x = np.array([r["task"][name] for r in rows])
        order = np.argsort(x)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(x[order], gaps[order], "o-")
        ax.set_xlabel(name)
        ax.set_ylabel("gap = oracle - adapted return")
        ax.set_title(f"{report['family']}: worst gap {gaps.max():.1f}, mean {gaps.mean():.1f}")
        fig.tight_layout()
        files.append(f"eval_gap_{name}.png")
        fig.savefig(out / files[-1], dpi=110)
        plt.close(fig)
    for a, b in itertools.combinations(varied, 2):
        xs, ys = sorted({r["task"][a] for r in rows}), sorted({r["task"][b] for r in rows})
        cell = np.full((len(ys), len(xs)), -np.inf)
        for r, g in zip(rows, gaps, strict=True):  # worst case over the other axes
            i, j = ys.index(r["task"][b]), xs.index(r["task"][a])
            cell[i, j] = max(cell[i, j], g)
        fig, ax = plt.subplots(figsize=(1.0 * len(xs) + 3, 0.8 * len(ys) + 2))
        im = ax.imshow(cell, origin="lower", cmap="magma_r", aspect="auto")
        ax.set_xticks(range(len(xs)), [f"{v:.3g}" for v in xs])
        ax.set_yticks(range(len(ys)), [f"{v:.3g}" for v in ys])
        for i in range(len(ys)):
            for j in range(len(xs)):
                ax.text(j, i, f"{cell[i, j]:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if cell[i, j] > (cell.min() + cell.max()) / 2 else "black")
        ax.set_xlabel(a)
        ax.set_ylabel(b)
        others = " (worst over the other axes)" if len(varied) > 2 else ""
        ax.set_title(f"{report['family']}: gap{others}")
        fig.colorbar(im, ax=ax, label="oracle - adapted return")
        fig.tight_layout()
        files.append(f"eval_gap_{a}_{b}.png")
        fig.savefig(out / files[-1], dpi=110)
        plt.close(fig)
    return files
