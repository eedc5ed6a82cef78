"""The sub-optimality gap: how far an adaptive controller is from the oracle on a task.

``gap(task) = oracle return(task) - return after adaptation(task)``, both with the same planner
and the same episode length. The oracle plans through MuJoCo with the task's true physics
(:class:`~metarl_robot.envs.oracle.MujocoOracle`, batched ``mujoco.rollout``): the return a
perfect model reaches with this planner. It does not depend on the learner, so
:class:`OracleReturns` computes it once per task and caches it (in memory and, optionally, in a
JSON file shared by several runs with the same planner and seed). ``metarl eval`` and the
adversarial task sampler (AdMRL, :mod:`metarl_robot.train.task_sampler`) both grade with it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from metarl_robot.backend import Backend, Job, LocalBackend
from metarl_robot.envs.meta_env import MetaMujocoEnv
from metarl_robot.envs.oracle import MujocoOracle
from metarl_robot.envs.out_of_family import OutOfFamily
from metarl_robot.envs.rollout import collect, make_vector_env
from metarl_robot.runtime.planner import Planner, PlannerConfig
from metarl_robot.spec.family import Task, TaskFamily
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import RobotSpec

ORACLE_CACHE_SCHEMA_VERSION = 1
"""Layout of the oracle cache file; another version is refused."""


class OracleController:
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


@dataclass
class Episodes:
    """One episode per task, as graded: per-step rewards, reward components and the transitions."""

    rewards: np.ndarray
    """``(tasks, T)`` reward per step (0 after an early termination)."""
    components: dict[str, np.ndarray]
    """Reward components ``(tasks, T)`` recomputed from the transitions with the family's reward."""
    obs: np.ndarray
    """``(tasks, T, obs_dim)``."""
    actions: np.ndarray
    """``(tasks, T, action_dim)`` the commands the envs sent."""
    next_obs: np.ndarray
    """``(tasks, T, obs_dim)``."""

    @property
    def returns(self) -> np.ndarray:
        return self.rewards.sum(axis=1)



def run_episodes(family: TaskFamily, robot: RobotSpec, tasks: list[Task], seed: int | list[int], controller: Any,
                 progress: bool = False, envs: gym.vector.VectorEnv | None = None,
                 effects: OutOfFamily | None = None) -> Episodes:
    """One episode per task through :func:`collect` (own sync vector env, with out-of-family ``effects`` if given,
    unless ``envs`` is given).

    The components are recomputed from the recorded transitions with the family's reward function,
    which is exactly what the env computed (rewards are functions of the transition alone); under
    observation effects (noise, bias) the env's rewards graded the true transitions, the components
    here the observed ones.
    """
    own = envs is None
    envs = envs or make_vector_env(family, len(tasks), "sync", tasks=tasks, effects=effects)
    try:
        rollout = collect(envs, family, controller, tasks, 1, seed=seed, progress=progress)
    finally:
        if own:
            envs.close()
    params = {k: np.array([t[k] for t in tasks])[:, None] for k in family.reward_names}
    _, components = get_reward(family.spec.reward)(robot, rollout.obs, rollout.actions, rollout.next_obs, params)
    return Episodes(np.where(rollout.valid, rollout.rewards, 0.0), components, rollout.obs, rollout.actions,
                    rollout.next_obs)


def episode_success(family: TaskFamily, components: dict[str, np.ndarray]) -> np.ndarray | None:
    """Per episode: did the reward's success component average its threshold over the last fifth?

    ``None`` when the family's reward defines no success criterion.
    """
    crit = get_reward(family.spec.reward).success
    if crit is None:
        return None
    name, threshold = crit
    comp = components[name]
    tail = comp[:, -max(1, comp.shape[1] // 5):]
    return tail.mean(axis=1) >= threshold


def oracle_episodes(family: TaskFamily, robot: RobotSpec, tasks: list[Task], planner_cfg: PlannerConfig,
                    seed: int | list[int], threads: int = 1, progress: bool = False,
                    effects: OutOfFamily | None = None) -> Episodes:
    """The oracle's episodes: ``planner_cfg`` planning through each task's true MuJoCo model (with the physics of
    out-of-family ``effects``, which the envs' models and delay queues carry; see ``OutOfFamily.oracle_record``)."""
    envs = make_vector_env(family, len(tasks), "sync", tasks=tasks, effects=effects)
    try:
        params = {k: np.array([t[k] for t in tasks]) for k in family.reward_names}
        planner = Planner(planner_cfg, robot, get_reward(family.spec.reward), MujocoOracle(threads), len(tasks))
        controller = OracleController(planner, [e.unwrapped for e in envs.envs], params)
        return run_episodes(family, robot, tasks, seed, controller, progress, envs)
    finally:
        envs.close()


class OracleReturns:
    """The oracle's return per task, computed once (in batches of the missing tasks) and cached.

    A return belongs to a task *and* a reset seed: the oracle's episode starts from the initial state
    that seed gives a sub-env reset with it, and plans with the planner seeded alike, whatever batch it
    is computed in (a learner's episode reset with the same seed starts from the same state). With
    ``cache_file`` the returns persist across processes; the file records the family and planner they
    were computed with and is refused for anything else.
    """

    def __init__(self, family: TaskFamily, robot: RobotSpec, planner_cfg: PlannerConfig, threads: int = 1,
                 cache_file: str | Path | None = None, keep_trajectories: bool = False,
                 effects: OutOfFamily | None = None, backend: Backend | None = None) -> None:
        self.family, self.robot, self.threads = family, robot, threads
        self.backend = backend or LocalBackend()
        """Where the missing episodes run (one job per task; any backend gives the same returns)."""
        self.effects = effects or None
        """Out-of-family effects every oracle episode runs with (part of the cache identity)."""
        self.planner_cfg = replace(planner_cfg, seed=0)
        self.keep_trajectories = keep_trajectories
        """Keep each task's oracle transitions (``trajectories``) for gradient estimates."""
        self.identity = {"family": family.name, "episode_steps": family.spec.episode_steps,
                         "planner": {k: v for k, v in asdict(self.planner_cfg).items() if k != "seed"},
                         "robot_interface_sha256": robot.interface_hash}
        if self.effects is not None:  # only then: caches written without effects stay valid
            self.identity["out_of_family"] = self.effects.as_dict()
        self.records: dict[str, dict[str, Any]] = {}
        """Task key → ``{"return": float, "success": bool | None}`` of the oracle's episode."""
        self.trajectories: dict[str, Episodes] = {}
        """Task key → its oracle episode (only with ``keep_trajectories``)."""
        self.episodes_run = 0
        """Oracle episodes simulated by this object (cache misses)."""
        self.cache_file = Path(cache_file) if cache_file else None
        if self.cache_file and self.cache_file.is_file():
            self._load()

    def key(self, task: Task, seed: int) -> str:
        return json.dumps([seed, *(round(float(v), 9) for v in self.family.to_vector(task))])

    def __call__(self, tasks: list[Task], seed: int | list[int] = 0, progress: bool = False) -> np.ndarray:
        """Oracle returns of ``tasks``, each episode reset with ``seed`` (one for all, or one per task),
        computed where not cached."""
        seeds = [int(seed)] * len(tasks) if isinstance(seed, int | np.integer) else [int(s) for s in seed]
        if len(seeds) != len(tasks):
            raise ValueError(f"got {len(seeds)} reset seeds for {len(tasks)} tasks")
        keys = [self.key(t, s) for t, s in zip(tasks, seeds, strict=True)]
        missing = {k: (t, s) for k, t, s in zip(keys, tasks, seeds, strict=True)
                   if k not in self.records or (self.keep_trajectories and k not in self.trajectories)}
        # One task per batch (and per job): the planner's sampling noise is drawn for the whole batch, so a task's
        # oracle episode would otherwise depend on what it was computed together with.
        # Its step bar only in this process (a worker's output is not shown).
        jobs = [Job(f"oracle episode of {self.family.name} task {task} from reset seed {start}",
                    (self.family, self.robot, [task], replace(self.planner_cfg, seed=start), start, self.threads,
                     progress and self.backend.in_process, self.effects), cpus=self.threads)
                for task, start in missing.values()]
        keys_missing = list(missing)
        finished: dict[int, Episodes] = {}
        try:
            for i, ep in self.backend.run(oracle_episodes, jobs, "oracle episodes", progress):
                finished[i] = ep
        finally:  # what finished is kept, also when a job failed; in the tasks' order, whatever order it finished in
            for i in sorted(finished):
                ep = finished[i]
                success = episode_success(self.family, ep.components)
                self.records[keys_missing[i]] = {"return": float(ep.returns[0]),
                                                 "success": None if success is None else bool(success[0])}
                if self.keep_trajectories:
                    self.trajectories[keys_missing[i]] = ep
                self.episodes_run += 1
            if finished and self.cache_file:
                self._save()
        return np.array([self.records[k]["return"] for k in keys])

    def episode(self, task: Task, seed: int = 0) -> Episodes:
        """The oracle's episode of ``task`` from ``seed``'s start (simulated if not kept; needs
        ``keep_trajectories``)."""
        if not self.keep_trajectories:
            raise ValueError("OracleReturns keeps episodes only with keep_trajectories=True")
        self([task], seed)
        return self.trajectories[self.key(task, seed)]

    def success(self, tasks: list[Task], seed: int = 0) -> np.ndarray | None:
        """Whether the oracle's episode of each (already computed) task succeeded; ``None`` without a criterion."""
        flags = [self.records[self.key(t, seed)]["success"] for t in tasks]
        return None if any(f is None for f in flags) else np.array(flags, dtype=bool)

    def _fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()

    def _load(self) -> None:
        data = json.loads(self.cache_file.read_text())
        if data.get("schema_version") != ORACLE_CACHE_SCHEMA_VERSION:
            raise ValueError(f"{self.cache_file}: oracle cache schema {data.get('schema_version')!r}, this version "
                             f"reads {ORACLE_CACHE_SCHEMA_VERSION}; delete the file to recompute")
        if data.get("fingerprint") != self._fingerprint():
            raise ValueError(f"{self.cache_file}: oracle returns computed for {data.get('identity')}, not for "
                             f"{self.identity}; use another cache file")
        self.records.update(data["records"])

    def _save(self) -> None:
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"schema_version": ORACLE_CACHE_SCHEMA_VERSION, "identity": self.identity,
                                   "fingerprint": self._fingerprint(), "records": self.records}, indent=0))
        tmp.replace(self.cache_file)
