"""The meta-training loop: collect on new tasks, refit, log, checkpoint. Resumable.

Run folder layout (``<out>/<run name>/``)::

    config.yaml        resolved config (every default filled in)
    run.json           provenance: git commit, versions, start time, family file hash
    metrics.csv        one row per iteration
    tasks.jsonl        the tasks drawn at each iteration
    tb/                TensorBoard events
    checkpoints/       ckpt_<iteration>.pt and latest.pt (versioned, see CHECKPOINT_SCHEMA_VERSION)
    buffer.npz         all collected episodes (context_mbrl; needed to resume)
    replay.npz         every task's RL and encoder buffers (pearl; needed to resume)

Two algorithms share the loop, the samplers, the logging and the checkpoints (``algo`` in the config):
``context_mbrl`` collects one episode per task (random actions at iteration 0, MPC through the model
after) into an :class:`EpisodeBuffer` and refits the model; ``pearl`` gives every chosen task a new
id, runs one exploration round per task (:func:`~metarl_robot.algos.pearl.explore_tasks`, as
``pearl_schedule`` says) into a :class:`~metarl_robot.algos.pearl.TaskReplay` and takes SAC gradient
steps. docs/model_based.md and docs/pearl.md describe each.
"""

from __future__ import annotations

import csv
import hashlib
import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from metarl_robot.algos.buffer import EpisodeBuffer
from metarl_robot.algos.context_mbrl import ContextMBRL
from metarl_robot.algos.pearl import PEARL, TaskReplay, explore_tasks
from metarl_robot.envs.rollout import Rollout, collect, make_vector_env, random_policy
from metarl_robot.provenance import git_commit
from metarl_robot.runtime.adapter import ModelBasedAdapter
from metarl_robot.spec.family import Task, load_family
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import RobotSpec, load_robot, robot_from_dict
from metarl_robot.spec.schema import SpecError
from metarl_robot.train.config import PEARLTrainConfig, RunConfig, build_config, load_config
from metarl_robot.train.gap import OracleReturns
from metarl_robot.train.task_sampler import make_sampler

CHECKPOINT_SCHEMA_VERSION = 2
"""Layout of the checkpoint dict; another version is refused with a clear error, except 1 (below)."""
MODEL_BASED_ONLY_SCHEMA = 1
"""Schema 1 predates the ``algo_kind`` key; only context_mbrl wrote it, so it is read as a context_mbrl checkpoint
(same layout otherwise)."""


class MPCController:
    """Collection controller: the model-based adapter planning with each env's own reward parameters."""

    def __init__(self, adapter: ModelBasedAdapter, reward_params: dict[str, np.ndarray]) -> None:
        self.adapter, self.params = adapter, reward_params
        self.errors: list[np.ndarray] = []
        """Per step: each env's prediction error of the previous step (online adaptation, in scale units)."""
        self.last_diagnostics: dict[str, np.ndarray] = {}
        """The adapter's diagnostics of the latest step (its context, prediction, ...)."""

    def reset(self) -> None:
        self.adapter.reset()

    def act(self, obs: np.ndarray) -> np.ndarray:
        action, self.last_diagnostics = self.adapter.act(obs, self.params)
        self.errors.append(self.last_diagnostics["prediction_error"])
        return action

    def observe(self, obs: np.ndarray, sent_action: np.ndarray, next_obs: np.ndarray) -> None:
        self.adapter.observe(obs, sent_action, next_obs)


INITIAL_TASKS_STREAM = 1
"""The iteration-0 tasks (every algorithm and sampler) are drawn from ``default_rng([seed, INITIAL_TASKS_STREAM])``:
a stream of their own, so the sampler (seeded with ``seed``) does not redraw them at iteration 1."""


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint, refusing an unknown schema version; ``state["algo_kind"]`` names its algorithm."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    version = state.get("schema_version")
    if version == MODEL_BASED_ONLY_SCHEMA:
        state.setdefault("algo_kind", "context_mbrl")
    elif version != CHECKPOINT_SCHEMA_VERSION:
        raise SpecError(str(path), "schema_version", f"checkpoint schema {version!r} is not supported; this version "
                        f"of metarl-robot reads {CHECKPOINT_SCHEMA_VERSION} (and {MODEL_BASED_ONLY_SCHEMA}, "
                        "context_mbrl checkpoints of earlier versions)")
    return state


def build_algo(cfg: RunConfig, robot: RobotSpec) -> ContextMBRL | PEARL:
    """The (untrained) algorithm ``cfg.algo`` names, sized as the config says."""
    if isinstance(cfg, PEARLTrainConfig):
        return PEARL(robot, cfg.pearl_net, cfg.pearl, cfg.seed)
    return ContextMBRL(robot, cfg.model, cfg.training, cfg.seed)


def load_trained(checkpoint: Path) -> tuple[RunConfig, RobotSpec, ContextMBRL | PEARL]:
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


@dataclass
class Collected:
    """An iteration's episodes (one per task) and the controller's online prediction errors."""

    rollout: Rollout
    """Transitions, one sub-env row per task."""
    errors: np.ndarray | None
    """``(T, tasks)`` online one-step prediction error by step since reset (MPC iterations only)."""
    seed: int
    """Reset seed of the iteration (by default chunk sub-env ``i`` resets with it + its index; graded candidates
    reset with the sampler's ``starts``)."""

    def summary(self, window: int) -> tuple[float, dict[str, float]]:
        """Mean return and the online errors before / after the first ``window`` steps (NaN for random data)."""
        mean_return = float(np.mean(self.rollout.episode_returns()[:, 0]))
        if self.errors is None:  # every iteration logs the same columns
            return mean_return, {"online_pred_err_first_k": float("nan"), "online_pred_err_after_k": float("nan")}
        return mean_return, {"online_pred_err_first_k": float(np.nanmean(self.errors[1:window + 1])),
                             "online_pred_err_after_k": float(np.nanmean(self.errors[window + 1:]))}


@dataclass
class Iteration:
    """What one training iteration reports to the loop."""

    tasks: list[Task]
    """The tasks trained on."""
    metrics: dict[str, float]
    """The metrics.csv row (the same columns every iteration)."""
    sampler_info: dict[str, Any]
    """Extra fields of the iteration's tasks.jsonl line."""
    line: str
    """The progress line's summary (one line per iteration when stderr is not a terminal)."""
    postfix: dict[str, str]
    """Extra fields of the progress bar."""


ORACLE_CACHE_FILE = "oracle_returns.json"
"""The adversary's oracle returns in the run folder (train/gap.py's cache format)."""


class Runner:
    """Owns the loop, the data, logging and checkpoints; the algorithm owns the math."""

    def __init__(self, cfg: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True) -> None:
        self.cfg, self.progress = cfg, progress
        self.run_dir = Path(run_dir)
        self.family = load_family(cfg.family)
        self.robot = load_robot(self.family.spec.robot)
        self.reward = get_reward(self.family.spec.reward)
        self.algo = build_algo(cfg, self.robot)
        if cfg.loop.task_sampler == "adversarial":  # before the sampler, which would trip on an unknown param
            try:
                cfg.loop.adversary.validate(self.family, cfg.loop.tasks_per_iteration)
            except ValueError as exc:
                raise SpecError(f"run config {cfg.run_name}", "loop.adversary", str(exc)) from exc
        self.sampler = make_sampler(cfg.loop.task_sampler, self.family, cfg.seed, cfg.loop.gaussian, cfg.loop.adversary)
        cache = self.run_dir / ORACLE_CACHE_FILE if self.sampler.needs_gap else None
        try:
            self.oracle = OracleReturns(self.family, self.robot, cfg.planner, cfg.loop.adversary.oracle_threads,
                                        cache_file=cache, keep_trajectories=cfg.loop.adversary.reward_gradient)
            """The oracle's return per task and start, for the adversary's gap (kept in the run folder, so a
            resumed run's replayed tasks stay cache hits)."""
        except ValueError as exc:  # the planner changed on resume: the cached returns belong to another oracle
            raise SpecError(f"run config {cfg.run_name}", "planner", f"{exc} (delete {cache} to recompute them "
                            "with this planner)") from exc
        self.reward_adversary = None
        """AdMRL's implicit-gradient step over the reward parameters (``loop.adversary.reward_gradient``)."""
        self.adversary_env_steps = 0
        """Env steps of graded candidate episodes the adversary did not train on."""
        self.oracle_env_steps = 0
        """Env steps the oracle simulated for the adversary's gaps (planning rollouts not counted)."""
        self.buffer = EpisodeBuffer(self.robot.obs_dim, self.robot.action_dim, holdout_every=5)
        """context_mbrl's episodes (empty for pearl)."""
        self.replay: TaskReplay | None = None
        """pearl's per-task RL and encoder buffers (None for context_mbrl)."""
        if isinstance(cfg, PEARLTrainConfig):
            self.replay = TaskReplay(self.robot.obs_dim, self.robot.action_dim, cfg.pearl.replay_capacity,
                                     cfg.pearl.encoder_capacity, cfg.pearl.max_tasks)
        self.next_task_id = 0
        """pearl: the id the next trained task gets (a running count; tasks.jsonl maps ids to tasks)."""
        self.episodes_collected = 0
        """pearl: training episodes collected so far (all phases of every exploration round)."""
        self.history: list[dict[str, float]] = []
        self.start_iteration = 0
        if resume:
            self._resume()
        elif self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise FileExistsError(f"run folder {self.run_dir} exists; resume it with --resume or choose --name")
        else:
            self._start()

    # ---- run folder ---------------------------------------------------------------------------
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
        if self.cfg.algo == "pearl":
            self.replay = TaskReplay.load(self.run_dir / "replay.npz")
            self.next_task_id, self.episodes_collected = state["next_task_id"], state["episodes_collected"]
        else:
            self.buffer = EpisodeBuffer.load(self.run_dir / "buffer.npz")
        self.start_iteration = state["iteration"] + 1

    def _checkpoint(self, iteration: int) -> None:
        state = {"schema_version": CHECKPOINT_SCHEMA_VERSION, "algo_kind": self.cfg.algo, "iteration": iteration,
                 "algo": self.algo.state_dict(),
                 "sampler": self.sampler.state(), "history": self.history,
                 "adversary_env_steps": self.adversary_env_steps, "oracle_env_steps": self.oracle_env_steps,
                 "config": self.cfg.to_yaml(),
                 "robot": self.robot.to_dict(), "family": self.family.name}
        if self.cfg.algo == "pearl":
            state.update(next_task_id=self.next_task_id, episodes_collected=self.episodes_collected)
        ckpt_dir = self.run_dir / "checkpoints"
        torch.save(state, ckpt_dir / f"ckpt_{iteration:04d}.pt")
        # A byte copy, not a second torch.save (whose bytes differ): latest.pt and its numbered twin share a sha256.
        shutil.copyfile(ckpt_dir / f"ckpt_{iteration:04d}.pt", ckpt_dir / "latest.pt")
        if self.cfg.algo == "pearl":
            self.replay.save(self.run_dir / "replay.npz")
        else:
            self.buffer.save(self.run_dir / "buffer.npz")

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
        with (self.run_dir / "tasks.jsonl").open("a") as f:
            sampler = self.cfg.loop.task_sampler if iteration else ("initial" if self.cfg.algo == "pearl" else "random")
            f.write(json.dumps({"iteration": iteration, "sampler": sampler, "tasks": tasks, **sampler_info}) + "\n")
        for k, v in metrics.items():
            writer.add_scalar(k, v, iteration)
        writer.flush()

    # ---- the loop -----------------------------------------------------------------------------
    def _collect(self, iteration: int, tasks: list[Task], starts: list[int] | None = None) -> Collected:
        """One episode per task; random actions at iteration 0, MPC through the current model after.

        ``starts``: each task's reset seed, as a gap measurement needs (the oracle's episode starts
        there too); by default sub-env ``i`` of a chunk resets with the iteration's seed + its index.
        """
        num = min(self.cfg.loop.tasks_per_iteration, len(tasks))
        envs = make_vector_env(self.family, num, self.cfg.loop.vector)
        seed0 = self._iteration_seed(iteration)
        parts: list[Rollout] = []
        errors: list[np.ndarray] = []
        try:
            for start in range(0, len(tasks), num):
                chunk = tasks[start:start + num]
                chunk = chunk + [chunk[-1]] * (num - len(chunk))  # pad the last chunk; duplicates dropped below
                seed = seed0 + start
                reset: int | list[int] = seed
                if starts is not None:
                    reset = starts[start:start + num]
                    reset = reset + [reset[-1]] * (num - len(reset))
                if iteration == 0:
                    controller = random_policy(self.robot.action_low, self.robot.action_high, seed)
                else:
                    planner_cfg = type(self.cfg.planner)(**{**self.cfg.planner.__dict__, "seed": seed})
                    adapter = ModelBasedAdapter(self.robot, self.reward, self.algo.encode, self.algo.step,
                                                self.cfg.model.ensemble_size, self.cfg.model.context_window,
                                                planner_cfg, batch=num)
                    params = {n: np.array([t[n] for t in chunk]) for n in self.family.reward_names}
                    controller = MPCController(adapter, params)
                rollout = collect(envs, self.family, controller, chunk, 1, seed=reset)
                parts.append(rollout.take(np.arange(len(tasks[start:start + num]))))
                if isinstance(controller, MPCController):
                    errors.append(np.stack(controller.errors)[:, :len(tasks[start:start + num])])
        finally:
            envs.close()
        return Collected(Rollout.concatenate(parts), np.concatenate(errors, axis=1) if errors else None, seed0)

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

    def _choose_and_collect(self, iteration: int) -> tuple[list[Task], Collected, dict[str, Any]]:
        """The iteration's training episodes: the sampler's candidates, graded and chosen when it needs gaps."""
        cfg = self.cfg.loop
        if iteration == 0:  # random-action episodes on uniform tasks, the same start for every sampler
            tasks = self.family.sample(np.random.default_rng([self.cfg.seed, INITIAL_TASKS_STREAM]), "train",
                                       cfg.random_episodes)
            return tasks, self._collect(iteration, tasks), {}
        candidates = self.sampler.candidates(cfg.tasks_per_iteration)
        if not self.sampler.needs_gap:
            return candidates, self._collect(iteration, candidates), self.sampler.describe()
        starts = self.sampler.starts(candidates, self._iteration_seed(iteration))
        collected = self._collect(iteration, candidates, starts)
        returns = collected.rollout.episode_returns()[:, 0]
        oracle_runs = self.oracle.episodes_run
        chosen, info = self._grade(candidates, returns, starts, episodes_per_candidate=1)
        if cfg.adversary.reward_gradient:
            worst = chosen[0]
            info["reward_gradient"] = self._reward_gradient_proposal(candidates[worst], starts[worst])
        self.oracle_env_steps += (self.oracle.episodes_run - oracle_runs) * self.family.spec.episode_steps
        errors = collected.errors[:, chosen] if collected.errors is not None else None
        return ([candidates[i] for i in chosen], Collected(collected.rollout.take(np.array(chosen)), errors,
                                                            collected.seed), info)

    # ---- pearl --------------------------------------------------------------------------------
    def _explore(self, replay: TaskReplay, tasks: list[Task], task_ids: list[int], seed: int,
                 starts: list[int] | None = None) -> dict[str, Rollout]:
        """One exploration round per task into ``replay``, ``tasks_per_iteration`` sub-envs at a time.

        Returns each phase's rollout (``prior``, ``posterior``, ``extra_rl``), one row per task.
        ``starts``: each task's own reset seed ``s`` (its phases' first episodes reset with ``s``, ``s + 1``,
        ``s + 2``), as a gap measurement needs; by default chunk sub-env ``i`` resets with ``seed`` + its index.
        """
        num = min(self.cfg.loop.tasks_per_iteration, len(tasks))
        envs: dict[int, Any] = {}
        parts: list[dict[str, Rollout]] = []
        try:
            for start in range(0, len(tasks), num):
                chunk, ids = tasks[start:start + num], task_ids[start:start + num]
                if len(chunk) not in envs:  # a smaller last chunk gets its own envs: no padded duplicates
                    envs[len(chunk)] = make_vector_env(self.family, len(chunk), self.cfg.loop.vector)
                chunk_seed = seed + start if starts is None else starts[start:start + num]
                parts.append(explore_tasks(self.algo, replay, envs[len(chunk)], self.family, chunk, ids,
                                           self.cfg.pearl_schedule, seed=chunk_seed))
        finally:
            for env in envs.values():
                env.close()
        return {name: Rollout.concatenate([p[name] for p in parts]) for name in parts[0]}

    def _new_task_ids(self, n: int) -> list[int]:
        ids = list(range(self.next_task_id, self.next_task_id + n))
        self.next_task_id += n
        return ids

    def _pearl_collect(self, iteration: int) -> tuple[list[Task], list[int], dict[str, Rollout], dict[str, Any]]:
        """The iteration's exploration rounds: the sampler's candidates (uniform draws at iteration 0), each
        task under a new id; with the adversarial sampler every candidate is explored and graded, and only
        the chosen ones' rounds enter the replay."""
        cfg, schedule = self.cfg.loop, self.cfg.pearl_schedule
        seed0 = self._iteration_seed(iteration)
        if iteration == 0:  # the untrained policy on uniform tasks, the same for every sampler
            # A stream of its own: the samplers' generators start from cfg.seed, and iteration 1 would
            # otherwise redraw iteration 0's first tasks.
            initial_rng = np.random.default_rng([self.cfg.seed, INITIAL_TASKS_STREAM])
            tasks = self.family.sample(initial_rng, "train", cfg.random_episodes)
            ids = self._new_task_ids(len(tasks))
            return tasks, ids, self._explore(self.replay, tasks, ids, seed0), {}
        candidates = self.sampler.candidates(cfg.tasks_per_iteration)
        if not self.sampler.needs_gap:
            ids = self._new_task_ids(len(candidates))
            return candidates, ids, self._explore(self.replay, candidates, ids, seed0), self.sampler.describe()
        # Graded episode: the first one under the posterior of the round so far (after the prior
        # episodes), each candidate from the start of its oracle episode (sampler.starts).
        scratch = TaskReplay(self.robot.obs_dim, self.robot.action_dim, self.cfg.pearl.replay_capacity,
                             self.cfg.pearl.encoder_capacity)
        starts = self.sampler.starts(candidates, seed0)
        rounds = self._explore(scratch, candidates, list(range(len(candidates))), seed0, starts=starts)
        graded_phase = "posterior" if schedule.posterior_episodes else "extra_rl"
        graded_starts = [s + (1 if graded_phase == "posterior" else 2) for s in starts]
        returns = rounds[graded_phase].episode_returns()[:, 0]
        oracle_runs = self.oracle.episodes_run
        per_round = schedule.prior_episodes + schedule.posterior_episodes + schedule.extra_rl_episodes
        chosen, info = self._grade(candidates, returns, graded_starts, episodes_per_candidate=per_round)
        info["graded_phase"] = graded_phase
        self.oracle_env_steps += (self.oracle.episodes_run - oracle_runs) * self.family.spec.episode_steps
        tasks = [candidates[i] for i in chosen]
        ids = self._new_task_ids(len(tasks))
        rounds = {name: r.take(np.array(chosen)) for name, r in rounds.items()}
        for task_id, task in zip(ids, tasks, strict=True):  # as explore_tasks stores a round
            self.replay.begin_exploration(task_id, self.family.to_vector(task))
        for name, rollout in rounds.items():
            self.replay.add_rollout(ids, rollout, encoder=name != "extra_rl")
        return tasks, ids, rounds, info

    def _pearl_iteration(self, iteration: int) -> Iteration:
        started = time.perf_counter()
        tasks, ids, rounds, info = self._pearl_collect(iteration)
        self.episodes_collected += sum(r.episode_returns().size for r in rounds.values())
        first = {name: float(np.mean(r.episode_returns()[:, 0])) for name, r in rounds.items()}
        explore_return = first.get("prior", first.get("posterior", float("nan")))
        posterior_return = first.get("posterior", first.get("extra_rl", float("nan")))
        fit = self.algo.update(self.replay)
        metrics = {
            "episode_return": explore_return, "posterior_return": posterior_return,
            "graded_episode_return": info.get("graded_mean_return", posterior_return),
            "tasks": float(len(self.replay)), "episodes": float(self.episodes_collected),
            "transitions": float(sum(len(store) for store in self.replay.rl.values())),
            "adversary_env_steps": float(self.adversary_env_steps), "oracle_env_steps": float(self.oracle_env_steps),
            **{f"fit_{k}": v for k, v in fit.items()},
            "seconds": time.perf_counter() - started,
        }
        line = (f"return {explore_return:.1f} exploring, {posterior_return:.1f} under the posterior, critic loss "
                f"{fit.get('critic_loss', float('nan')):.3g}, kl {fit.get('kl', float('nan')):.3g}")
        return Iteration(tasks, metrics, {"task_ids": ids, **info}, line, {"post": f"{posterior_return:.1f}"})

    # ---- context_mbrl -------------------------------------------------------------------------
    def _mbrl_iteration(self, iteration: int) -> Iteration:
        cfg = self.cfg
        started = time.perf_counter()
        tasks, collected, sampler_info = self._choose_and_collect(iteration)
        self.buffer.add(collected.rollout, np.stack([self.family.to_vector(t) for t in tasks]))
        mean_return, online = collected.summary(cfg.model.context_window)
        # The adversary trains on its worst graded episodes: the mean over all it graded compares
        # with the other samplers' training return.
        graded_return = sampler_info.get("graded_mean_return", mean_return)
        fit = self.algo.update(self.buffer)
        sizes = tuple(cfg.loop.eval_context_sizes)
        pred = self.algo.prediction_error(self.buffer, sizes) if len(self.buffer.split(True)) \
            else dict.fromkeys(sizes, float("nan"))  # no held-out episode yet
        metrics = {
            "episode_return": mean_return, "graded_episode_return": graded_return,
            "policy": 0.0 if iteration == 0 else 1.0,
            "episodes": float(len(self.buffer)), "transitions": float(self.buffer.transitions),
            "adversary_env_steps": float(self.adversary_env_steps),
            "oracle_env_steps": float(self.oracle_env_steps),
            **{f"fit_{k}": v for k, v in fit.items()}, **online,
            **{f"pred_err_ctx{c}": v for c, v in pred.items()},
            "seconds": time.perf_counter() - started,
        }
        err0, err_k = pred.get(0, np.nan), pred.get(max(pred, default=0), np.nan)
        line = f"return {mean_return:.1f}, held-out error {err0:.4f} without context, {err_k:.4f} with"
        return Iteration(tasks, metrics, sampler_info, line, {"err0": f"{err0:.3f}", "errK": f"{err_k:.3f}"})

    def run(self) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter

        cfg = self.cfg
        torch.set_num_threads(cfg.loop.torch_threads)
        writer = SummaryWriter(str(self.run_dir / "tb"))
        bar = tqdm(range(self.start_iteration, cfg.loop.iterations), desc=f"train {cfg.run_name}", unit="it",
                   disable=None if self.progress else True, initial=self.start_iteration, total=cfg.loop.iterations)
        iterate = self._pearl_iteration if cfg.algo == "pearl" else self._mbrl_iteration
        try:
            for iteration in bar:
                it = iterate(iteration)
                self._log(iteration, it.metrics, it.tasks, it.sampler_info, writer)
                self._checkpoint(iteration)
                bar.set_postfix(ret=f"{it.metrics['episode_return']:.1f}", **it.postfix)
                if self.progress and not sys.stderr.isatty():  # no bar in a log file: one line per iteration
                    print(f"iteration {iteration}/{cfg.loop.iterations - 1}: {it.line}, {it.metrics['seconds']:.0f} s",
                          file=sys.stderr, flush=True)
        finally:
            bar.close()
            writer.close()
        summary = {"run_dir": str(self.run_dir), "iterations": cfg.loop.iterations,
                   "final": self.history[-1] if self.history else {}}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def train(config_path: str | Path, out_dir: str | Path = "runs", resume: bool = False,
          overrides: dict | None = None, progress: bool = True) -> dict[str, Any]:
    """``metarl train``: build the runner from a config file (or resume its run folder) and run it."""
    if resume:
        run_dir = Path(config_path)
        cfg = load_config(run_dir / "config.yaml", overrides)
        return Runner(cfg, run_dir, resume=True, progress=progress).run()
    cfg = load_config(config_path, overrides)
    return Runner(cfg, Path(out_dir) / cfg.run_name, progress=progress).run()
