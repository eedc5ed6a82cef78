"""The meta-training loop: collect on new tasks, refit, log, checkpoint. Resumable.

Run folder layout (``<out>/<run name>/``)::

    config.yaml        resolved config (every default filled in)
    run.json           provenance: git commit, versions, start time, family file hash
    metrics.csv        one row per iteration
    tasks.jsonl        the tasks drawn at each iteration (none for an offline algorithm: it draws none)
    tb/                TensorBoard events
    checkpoints/       ckpt_<iteration>.pt and latest.pt (versioned, see CHECKPOINT_SCHEMA_VERSION)
    buffer.npz         all collected episodes (context_mbrl; needed to resume)
    replay.npz         every task's RL and encoder buffers (pearl; needed to resume)
    dataset_ref.json   the offline dataset trained on: path, sha256, counts (macaw; a resume refuses other data)

Every algorithm (``algo`` in the config, looked up in :data:`~metarl_robot.algos.registry.ALGORITHMS`)
shares the loop, the samplers, the adversary's grading, the logging and the checkpoints; the
algorithm (:class:`~metarl_robot.algos.base.Algorithm`) collects on the tasks the loop gives it,
keeps its data store and updates: ``context_mbrl`` collects one episode per task (random actions at
iteration 0, MPC through the model after) and refits the model; ``pearl`` runs one exploration round
per task (:func:`~metarl_robot.algos.pearl_exploration.explore_tasks`, as ``pearl_schedule`` says)
and takes SAC gradient steps. An offline algorithm (:attr:`~metarl_robot.algos.base.Algorithm.offline`: ``macaw``)
learns from its dataset alone: no tasks are drawn and no env is made; each iteration is its update and its report.
docs/model_based.md, docs/pearl.md, docs/macaw.md and docs/algorithms.md describe each.
"""

from __future__ import annotations

import csv
import hashlib
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from metarl_robot.algos.base import Algorithm, Collection, IterationReport
from metarl_robot.algos.mpc_controller import MPCController  # noqa: F401  (its old home: importable from here)
from metarl_robot.algos.registry import SCHEMA_1_ALGORITHM, get_algorithm
from metarl_robot.backend import Backend, Job, LocalBackend, run_all
from metarl_robot.provenance import git_commit
from metarl_robot.spec.family import Task, load_family
from metarl_robot.spec.robot import RobotSpec, load_robot, robot_from_dict
from metarl_robot.spec.schema import SpecError, to_plain
from metarl_robot.train.config import RunConfig, build_config, load_config
from metarl_robot.train.gap import OracleReturns
from metarl_robot.train.task_sampler import make_sampler

CHECKPOINT_SCHEMA_VERSION = 2
"""Layout of the checkpoint dict; another version is refused with a clear error, except 1 (below)."""
MODEL_BASED_ONLY_SCHEMA = 1
"""Schema 1 predates the ``algo_kind`` key; only context_mbrl wrote it, so it is read as a context_mbrl checkpoint
(same layout otherwise; :data:`~metarl_robot.algos.registry.SCHEMA_1_ALGORITHM`)."""


INITIAL_TASKS_STREAM = 1
"""The iteration-0 tasks (every algorithm and sampler) are drawn from ``default_rng([seed, INITIAL_TASKS_STREAM])``:
a stream of their own, so the sampler (seeded with ``seed``) does not redraw them at iteration 1."""


def _numpy_data_globals() -> list[Any]:
    """What pickling a numpy array or scalar names besides data (an algorithm's state may hold arrays): the array
    and scalar constructors and the dtypes. Allowed under ``weights_only``; nothing here runs code of the file's."""
    multiarray = getattr(np, "_core", getattr(np, "core", None)).multiarray
    dtypes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8,
                                          np.uint64, np.uint32, np.uint16, np.uint8, np.bool_)]
    return [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, *dtypes]


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint, refusing an unknown schema version; ``state["algo_kind"]`` names its algorithm."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        # weights_only: tensors, numpy arrays, numbers, strings and containers, never code; a checkpoint is data
        with torch.serialization.safe_globals(_numpy_data_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises a different type per way a file can be broken
        raise SpecError(str(path), "", "not a readable metarl checkpoint (truncated, corrupt, or written by something "
                        f"else; each run keeps every iteration's ckpt_NNNN.pt: try an earlier one): {exc}") from None
    if not isinstance(state, dict):
        raise SpecError(str(path), "", f"not a metarl checkpoint: holds a {type(state).__name__}, not a mapping")
    version = state.get("schema_version")
    if version == MODEL_BASED_ONLY_SCHEMA:
        state.setdefault("algo_kind", SCHEMA_1_ALGORITHM)
    elif version != CHECKPOINT_SCHEMA_VERSION:
        raise SpecError(str(path), "schema_version", f"checkpoint schema {version!r} is not supported; this version "
                        f"of metarl-robot reads {CHECKPOINT_SCHEMA_VERSION} (and {MODEL_BASED_ONLY_SCHEMA}, "
                        "context_mbrl checkpoints of earlier versions)")
    return state


def build_algo(cfg: RunConfig, robot: RobotSpec) -> Algorithm:
    """The (untrained) algorithm ``cfg.algo`` names, sized as the config says (to load weights into)."""
    return get_algorithm(cfg.algo).build(cfg, robot)


def load_trained(checkpoint: Path) -> tuple[RunConfig, RobotSpec, Algorithm]:
    """The config, robot and trained algorithm a checkpoint holds (its own config, not the run folder's)."""
    state = load_checkpoint(checkpoint)
    cfg = build_config(yaml.safe_load(state["config"]), f"{checkpoint}: config")
    if state["algo_kind"] != cfg.algo:  # a hand-edited checkpoint; never written so
        raise SpecError(str(checkpoint), "algo_kind", f"checkpoint holds {state['algo_kind']!r} weights but its config "
                        f"says algo {cfg.algo!r}")
    robot = robot_from_dict(state["robot"], f"{checkpoint}: robot")
    algo = build_algo(cfg, robot)
    algo.load_state_dict(state["algo"])
    return cfg, robot, algo


ORACLE_CACHE_FILE = "oracle_returns.json"
"""The adversary's oracle returns in the run folder (train/gap.py's cache format)."""


class Runner:
    """Owns the loop: which tasks (iteration 0's, the sampler's, the adversary's choice), the oracle's accounting,
    logging and checkpoints; the algorithm (:class:`~metarl_robot.algos.base.Algorithm`) owns the math, its data
    store and how it collects on a task."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True,
                 init_from: Path | None = None, backend: Backend | None = None) -> None:
        self.cfg, self.progress = cfg, progress
        self.run_dir = Path(run_dir)
        self.family = load_family(cfg.family)
        self.robot = load_robot(self.family.spec.robot)
        self.algo = get_algorithm(cfg.algo).build(cfg, self.robot, self.family)
        """The algorithm: its math, its data store and how it collects."""
        if cfg.loop.task_sampler == "adversarial":  # before the sampler, which would trip on an unknown param
            try:
                cfg.loop.adversary.validate(self.family, cfg.loop.tasks_per_iteration)
            except ValueError as exc:
                raise SpecError(f"run config {cfg.run_name}", "loop.adversary", str(exc)) from exc
        self.sampler = make_sampler(cfg.loop.task_sampler, self.family, cfg.seed, cfg.loop.gaussian, cfg.loop.adversary)
        cache = self.run_dir / ORACLE_CACHE_FILE if self.sampler.needs_gap else None
        try:
            self.oracle = OracleReturns(self.family, self.robot, cfg.planner, cfg.loop.adversary.oracle_threads,
                                        cache_file=cache, keep_trajectories=cfg.loop.adversary.reward_gradient,
                                        backend=backend)
            """The oracle's return per task and start, for the adversary's gap (kept in the run folder, so a
            resumed run's replayed tasks stay cache hits); its missing episodes run on ``backend``, one task per
            job (the same returns on any backend)."""
        except ValueError as exc:  # the planner changed on resume: the cached returns belong to another oracle
            raise SpecError(f"run config {cfg.run_name}", "planner", f"{exc} (delete {cache} to recompute them "
                            "with this planner)") from exc
        self.reward_adversary = None
        """AdMRL's implicit-gradient step over the reward parameters (``loop.adversary.reward_gradient``)."""
        self.adversary_env_steps = 0
        """Env steps of graded candidate episodes the adversary did not train on."""
        self.oracle_env_steps = 0
        """Env steps the oracle simulated for the adversary's gaps (planning rollouts not counted)."""
        self.history: list[dict[str, float]] = []
        self.last_line = ""
        """The last iteration's summary line (the run's summary.json)."""
        self.start_iteration = 0
        if resume:
            self._resume()
        elif self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise FileExistsError(f"run folder {self.run_dir} exists; resume it with --resume or choose --name")
        else:
            self._start()
            if init_from is not None:
                self._init_from(Path(init_from))

    # ---- run folder ---------------------------------------------------------------------------
    def _init_from(self, run_dir: Path) -> None:
        """Fine-tuning (``metarl retrain``): start from another run's latest weights and keep its data; the loop,
        the sampler and the history start afresh. Recorded in run.json."""
        state = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
        if state["algo_kind"] != self.cfg.algo:
            raise SpecError(str(run_dir), "algo", f"the run to start from is a {state['algo_kind']} one; this run "
                            f"is {self.cfg.algo!r}")
        self.algo.load_state_dict(state["algo"])
        source = load_family(build_config(yaml.safe_load(state["config"]), f"{run_dir}: config").family)
        kept = self.algo.adopt_store(run_dir, source.names)
        run_json = self.run_dir / "run.json"
        info = json.loads(run_json.read_text())
        info["init_from"] = {"run": str(run_dir), "iteration": state["iteration"], "family": source.name,
                             "data_kept": kept}
        run_json.write_text(json.dumps(info, indent=1))
    def _start(self) -> None:
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(self.cfg.to_yaml())
        family_file = Path(self.family.where)
        run = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_commit": git_commit(),
            "family_sha256": hashlib.sha256(family_file.read_bytes()).hexdigest() if family_file.is_file() else None,
            "robot_interface_sha256": self.robot.interface_hash, "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__,
        }
        (self.run_dir / "run.json").write_text(json.dumps(run, indent=1))

    def _resume(self) -> None:
        latest = self.run_dir / "checkpoints" / "latest.pt"
        state = load_checkpoint(latest)
        if state["algo_kind"] != self.cfg.algo:
            raise SpecError(str(self.run_dir / "config.yaml"), "algo", f"the run's checkpoint is a "
                            f"{state['algo_kind']} one; a run cannot resume as {self.cfg.algo!r}")
        self.algo.load_state_dict(state["algo"])
        self.sampler.load_state(state["sampler"])
        self.history = state["history"]
        self.adversary_env_steps = state.get("adversary_env_steps", 0)
        self.oracle_env_steps = state.get("oracle_env_steps", 0)
        self.algo.load_loop_state(state)
        self.algo.load_store(self.run_dir)
        self.start_iteration = state["iteration"] + 1

    def _checkpoint(self, iteration: int) -> None:
        state = {"schema_version": CHECKPOINT_SCHEMA_VERSION, "algo_kind": self.cfg.algo, "iteration": iteration,
                 "algo": self.algo.state_dict(),
                 "sampler": self.sampler.state(), "history": self.history,
                 "adversary_env_steps": self.adversary_env_steps, "oracle_env_steps": self.oracle_env_steps,
                 "config": self.cfg.to_yaml(),
                 "robot": self.robot.to_dict(), "family": self.family.name, **self.algo.loop_state()}
        ckpt_dir = self.run_dir / "checkpoints"
        torch.save(state, ckpt_dir / f"ckpt_{iteration:04d}.pt")
        # A byte copy, not a second torch.save (whose bytes differ): latest.pt and its numbered twin share a sha256.
        shutil.copyfile(ckpt_dir / f"ckpt_{iteration:04d}.pt", ckpt_dir / "latest.pt")
        self.algo.save_store(self.run_dir)

    def _log(self, iteration: int, metrics: dict[str, float], tasks: list[Task], sampler_info: dict[str, Any],
             writer: Any) -> None:
        row = {"iteration": iteration, **metrics}
        self.history.append(row)
        path = self.run_dir / "metrics.csv"
        if path.exists():
            with path.open() as f:
                header = next(csv.reader(f))
            if header != list(row):
                raise RuntimeError(f"metrics columns changed: {header} vs {list(row)}")  # a bug, never input
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if f.tell() == 0:
                w.writeheader()
            w.writerow(row)
        if not self.algo.offline:  # an offline algorithm draws no tasks
            with (self.run_dir / "tasks.jsonl").open("a") as f:
                sampler = self.cfg.loop.task_sampler if iteration else self.algo.initial_sampler
                f.write(json.dumps({"iteration": iteration, "sampler": sampler, "tasks": tasks, **sampler_info})
                        + "\n")
        for k, v in metrics.items():
            writer.add_scalar(k, v, iteration)
        writer.flush()

    # ---- the loop -----------------------------------------------------------------------------
    def _grade(self, candidates: list[Task], returns: np.ndarray, starts: list[int], episodes_per_candidate: int
               ) -> tuple[list[int], dict[str, Any]]:
        """The adversary's choice among ``candidates``: gap = the oracle's return from the start each reset
        seed in ``starts`` gives minus the learner's graded ``returns`` from that start. Counts the graded
        episodes not trained on (``episodes_per_candidate`` each). Returns the chosen indices and the
        tasks.jsonl fields."""
        oracle = self.oracle(candidates, seed=starts)
        chosen = self.sampler.select(candidates, oracle - returns, self.cfg.loop.tasks_per_iteration)
        self.adversary_env_steps += ((len(candidates) - len(chosen)) * episodes_per_candidate
                                     * self.family.spec.episode_steps)
        return chosen, {**self.sampler.describe(), "candidates": candidates, "candidate_returns": returns.tolist(),
                        "oracle_returns": oracle.tolist(), "starts": [int(x) for x in starts], "chosen": chosen,
                        "graded_mean_return": float(returns.mean())}

    def _iteration_seed(self, iteration: int) -> int:
        """The reset seed of an iteration's first episodes (collection and, for the adversary, its gaps)."""
        return self.cfg.seed * 100_003 + iteration * 101

    def _reward_gradient_proposal(self, worst: Task, seed: int) -> dict[str, Any]:
        """AdMRL's step: move the worst candidate's reward parameters up the gap's implicit gradient; the
        result is one of the next candidates. Returns the log of the step(s)."""
        from metarl_robot.train.reward_adversary import RewardGradientAdversary

        if self.reward_adversary is None:
            self.reward_adversary = RewardGradientAdversary(self.algo, self.family, self.robot,
                                                            self.cfg.loop.adversary.gradient, self.cfg.seed)
        steps_before = len(self.reward_adversary.history)
        proposal = self.reward_adversary.propose(worst, lambda task: self.oracle.episode(task, seed), seed)
        self.sampler.propose(proposal)
        return {"from": worst, "proposal": proposal, "steps": self.reward_adversary.history[steps_before:]}

    def _choose_and_collect(self, iteration: int) -> tuple[list[Task], Collection, dict[str, Any]]:
        """The iteration's training data: iteration 0's uniform tasks, else the sampler's candidates, graded
        and chosen when it needs gaps (only the chosen ones' data is kept). Returns the tasks, their data and
        the tasks.jsonl fields."""
        cfg, seed = self.cfg.loop, self._iteration_seed(iteration)
        if iteration == 0:  # the untrained learner on uniform tasks, the same start for every sampler
            tasks = self.family.sample(np.random.default_rng([self.cfg.seed, INITIAL_TASKS_STREAM]), "train",
                                       cfg.random_episodes)
            return tasks, self.algo.collect(tasks, iteration, seed), {}
        candidates = self.sampler.candidates(cfg.tasks_per_iteration)
        if not self.sampler.needs_gap:
            return candidates, self.algo.collect(candidates, iteration, seed), self.sampler.describe()
        starts = self.sampler.starts(candidates, seed)
        collection = self.algo.collect(candidates, iteration, seed, starts)
        graded_starts = [s + collection.graded_start_offset for s in starts]
        oracle_runs = self.oracle.episodes_run
        chosen, info = self._grade(candidates, collection.graded_returns, graded_starts,
                                   collection.episodes_per_task)
        info.update(collection.grading_info)
        if cfg.adversary.reward_gradient:
            worst = chosen[0]
            info["reward_gradient"] = self._reward_gradient_proposal(candidates[worst], graded_starts[worst])
        self.oracle_env_steps += (self.oracle.episodes_run - oracle_runs) * self.family.spec.episode_steps
        return [candidates[i] for i in chosen], collection.take(chosen), info

    def _iteration(self, iteration: int) -> tuple[list[Task], dict[str, Any], IterationReport]:
        """Collect, store, update: the tasks trained on, their tasks.jsonl fields and the iteration's report. An
        offline algorithm only updates (on its dataset): no tasks, no collection, no env."""
        started = time.perf_counter()
        if self.algo.offline:
            tasks, collection, info = [], None, {}
        else:
            tasks, collection, info = self._choose_and_collect(iteration)
            info = {**self.algo.store(tasks, collection), **info}
        fit = self.algo.update()
        counters = {"adversary_env_steps": float(self.adversary_env_steps),
                    "oracle_env_steps": float(self.oracle_env_steps)}
        report = self.algo.report(iteration, collection, fit, info.get("graded_mean_return"), counters)
        report.metrics["seconds"] = time.perf_counter() - started
        return tasks, info, report

    def run(self) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter

        cfg = self.cfg
        torch.set_num_threads(cfg.loop.torch_threads)
        writer = SummaryWriter(str(self.run_dir / "tb"))
        bar = tqdm(range(self.start_iteration, cfg.loop.iterations), desc=f"train {cfg.run_name}", unit="it",
                   disable=None if self.progress else True, initial=self.start_iteration, total=cfg.loop.iterations)
        try:
            for iteration in bar:
                tasks, info, it = self._iteration(iteration)
                self._log(iteration, it.metrics, tasks, info, writer)
                self._checkpoint(iteration)
                self.last_line = it.line
                ret = {"ret": f"{it.metrics['episode_return']:.1f}"} if "episode_return" in it.metrics else {}
                bar.set_postfix(**ret, **it.postfix)
                if self.progress and not sys.stderr.isatty():  # no bar in a log file: one line per iteration
                    print(f"iteration {iteration}/{cfg.loop.iterations - 1}: {it.line}, {it.metrics['seconds']:.0f} s",
                          file=sys.stderr, flush=True)
        finally:
            bar.close()
            writer.close()
        summary = {"run_dir": str(self.run_dir), "iterations": cfg.loop.iterations,
                   "final": self.history[-1] if self.history else {}, "line": self.last_line}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def train(config_path: str | Path, out_dir: str | Path = "runs", resume: bool = False,
          overrides: dict | None = None, progress: bool = True, backend: Backend | None = None) -> dict[str, Any]:
    """``metarl train``: build the runner from a config file (or resume its run folder) and run it; the adversary's
    oracle episodes run on ``backend`` (default: this process)."""
    if resume:
        run_dir = Path(config_path)
        cfg = load_config(run_dir / "config.yaml", overrides)
        return Runner(cfg, run_dir, resume=True, progress=progress, backend=backend).run()
    cfg = load_config(config_path, overrides)
    return Runner(cfg, Path(out_dir) / cfg.run_name, progress=progress, backend=backend).run()


def train_seeds(config_path: str | Path, seeds: list[int], out_dir: str | Path = "runs",
                overrides: dict | None = None, backend: Backend | None = None) -> list[dict[str, Any]]:
    """``metarl train --seeds``: one run per seed, each a job on ``backend`` (a run is the same on any backend). A
    ``name`` in the config or ``overrides`` gets ``_s<seed>`` appended; the default name holds the seed already.

    Every config is built and every run folder checked before any job starts, so a bad value or an existing folder
    fails at once. On a cluster of several machines ``out_dir`` must be a folder every machine writes to (a shared
    filesystem; docs/scale_out.md)."""
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {seeds}: each seed once")
    backend = backend or LocalBackend()
    jobs = []
    for seed in seeds:
        per_seed = {**(overrides or {}), "seed": seed}
        cfg = load_config(config_path, per_seed)
        if cfg.name:
            cfg = load_config(config_path, {**per_seed, "name": f"{cfg.name}_s{seed}"})
        run_dir = Path(out_dir).resolve() / cfg.run_name
        if run_dir.exists() and any(run_dir.iterdir()):
            raise FileExistsError(f"run folder {run_dir} exists; resume it with --resume or choose --name")
        jobs.append(Job(f"training run {cfg.run_name} (seed {seed})", (to_plain(cfg), str(run_dir),
                                                                       backend.in_process)))
    return run_all(backend, _seed_run, jobs, "seeds", progress=True)


def _seed_run(config: dict[str, Any], run_dir: str, progress: bool) -> dict[str, Any]:
    """One seed's run (a backend job) from its resolved config."""
    cfg = build_config(config, f"run config {Path(run_dir).name}")
    return Runner(cfg, Path(run_dir), progress=progress).run()
