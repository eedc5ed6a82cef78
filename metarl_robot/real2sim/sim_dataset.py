"""The sim side of offline datasets (docs/datasets.md): sim rollouts collected as episode logs, and task labels by
identification.

:func:`collect_logs` runs a policy (a shipped bundle, or uniform random commands) on ``tasks`` tasks drawn from a
family's split, ``episodes`` episodes each, and writes every episode as an episode log with
:func:`~metarl_robot.real2sim.sim_record.record_sim_episode`, the true task in its metadata; :func:`collect_dataset`
then builds the dataset from them with :func:`~metarl_robot.replay.dataset.build_dataset`, as it builds one from
the robot's logs (one path from logs to datasets; the logs stay as the dataset's provenance). Everything is seeded:
the same arguments give the same logs and the same dataset.

An adapter runs through all the episodes of a task as the ROS 2 node runs its one adapter: reset at each episode
start, so what persists across episodes (an online model's fit, MB-MPO's adapted policy) carries over and a
context-inference belief (PEARL) does not, as on the robot; each task starts from a fresh adapter.

:func:`identify_label` is the ``identifier`` :func:`build_dataset` takes for ``label="identify"``: a log's dynamics
parameters by :func:`~metarl_robot.real2sim.identify.identify`, with its fit verdict.

Not robot-side code: it imports MuJoCo through :mod:`metarl_robot.envs` and :mod:`metarl_robot.real2sim.identify`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metarl_robot.backend import Backend, Job, LocalBackend, run_all
from metarl_robot.logs.format import Episode
from metarl_robot.real2sim.identify import IdentifyConfig, identify
from metarl_robot.real2sim.sim_record import record_sim_episode
from metarl_robot.replay.dataset import (
    DatasetError,
    Identifier,
    OfflineDataset,
    TaskLabel,
    build_dataset,
    expand_logs,
    read_log,
)
from metarl_robot.runtime.adapter import CarriesNothing
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.runtime.manifest import LoadedBundle
from metarl_robot.spec.family import Task, TaskFamily, load_family
from metarl_robot.spec.robot import RobotSpec, load_robot

RANDOM_POLICY = "random"
"""The ``policy`` of :func:`collect_logs` that sends uniform random commands (:class:`RandomAdapter`)."""


class RandomAdapter(CarriesNothing):
    """Uniform random commands over what the robot can reach each period: robot.yaml's action box, within its rate
    limit of the previous command. Drawn within reach so that the command logged is the one the motors run (the
    env, as the node's safety layer, would otherwise rate-limit a draw across the whole box)."""

    observes_sent_commands = False
    """It observes nothing; the attribute every adapter declares."""

    def __init__(self, robot: RobotSpec, batch: int = 1, seed: int = 0) -> None:
        self.robot = robot
        self.batch = batch
        self.rng = np.random.default_rng(seed)
        """Draws the commands: seeded once, so episodes of one adapter differ and the whole run repeats."""
        self.max_step = robot.action_max_rate * robot.ctrl_dt
        self.last = np.tile(robot.safe_action.astype(np.float64), (batch, 1))
        """``(B, a)`` the previous command: the safe command at an episode start, as the env and the robot send."""

    def reset(self, which: np.ndarray | None = None) -> None:
        rows = slice(None) if which is None else np.asarray(which, dtype=bool)
        self.last[rows] = self.robot.safe_action

    def forget(self, which: np.ndarray | None = None) -> None:
        self.reset(which)

    def observe(self, obs: np.ndarray, action: np.ndarray, next_obs: np.ndarray) -> None:
        del obs, action, next_obs  # random commands learn nothing

    def act(self, obs: np.ndarray, task_params: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        del obs, task_params
        low = np.maximum(self.robot.action_low, self.last - self.max_step)
        high = np.minimum(self.robot.action_high, self.last + self.max_step)
        self.last = self.rng.uniform(low, high)
        return self.last.copy(), {}


class RandomPolicy:
    """What :func:`record_sim_episode` asks of a bundle, for random commands on a family's robot: the robot (the
    installed robot.yaml), the family, an identity for the log (name ``random``; as its sha256 the hash of what it
    is, since it has no bundle.yaml) and :class:`RandomAdapter` as its adapter."""

    def __init__(self, family: TaskFamily) -> None:
        self.family = family
        self.robot = load_robot(family.spec.robot)
        self.name = RANDOM_POLICY
        self.path = ""
        self.sha256 = hashlib.sha256(json.dumps({"policy": "uniform random commands within reach",
                                                 "robot_interface_sha256": self.robot.interface_hash},
                                                sort_keys=True).encode()).hexdigest()

    def make_adapter(self, batch: int = 1, adapt: bool = True, planner_overrides: dict | None = None,
                     seed: int = 0) -> RandomAdapter:
        del adapt  # nothing to adapt
        if planner_overrides:
            raise ValueError(f"planner_overrides: random commands do not plan; got {sorted(planner_overrides)}")
        return RandomAdapter(self.robot, batch, seed)

    @staticmethod
    def adapter_switches(adapt: bool) -> dict[str, bool]:
        return {"adapt": adapt}


def _sub_seed(*key: int) -> int:
    """A seed for one part of a collection, independent of the others' (numpy's SeedSequence spawning)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def collect_logs(policy: str | Path, family: str | TaskFamily | None, out_dir: str | Path, *, tasks: int,
                 episodes: int, steps: int | None = None, split: str = "train", seed: int = 0, adapt: bool = True,
                 progress: Callable[[str], None] | None = None, backend: Backend | None = None
                 ) -> tuple[list[Path], dict[str, Any]]:
    """Run ``policy`` (:data:`RANDOM_POLICY` or a bundle folder) on ``tasks`` tasks drawn from ``family``'s ``split``
    with ``seed``, ``episodes`` episodes of ``steps`` control steps each (default: the family's episode length), and
    write them to ``out_dir/task<i>_ep<j>.mcap`` (a folder without logs). ``family`` defaults to the bundle's.
    ``adapt=False``: the bundle's adaptation off. ``backend``: where the tasks run, one job per task (default: this
    process; a Ray cluster's workers must see ``out_dir``, docs/scale_out.md); the logs are the same on any backend.
    Returns the logs and how they were collected."""
    for name, value in (("tasks", tasks), ("episodes", episodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DatasetError("<arguments>", name, f"must be an integer >= 1, got {value!r}")
    bundle = None if str(policy) == RANDOM_POLICY else load_bundle(policy)
    if family is None and bundle is None:
        raise DatasetError("<arguments>", "family", "random commands need a task family (e.g. cartpole_swingup)")
    fam = family if isinstance(family, TaskFamily) else load_family(family) if family else bundle.family
    if bundle is not None and bundle.family.name != fam.name:
        raise DatasetError(str(policy), "family", f"the bundle was trained on family {bundle.family.name!r}, not "
                           f"{fam.name!r}")
    runner = bundle if bundle is not None else RandomPolicy(fam)
    steps = fam.spec.episode_steps if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise DatasetError("<arguments>", "steps", f"must be an integer >= 2 (a transition needs two), got {steps!r}")
    out = Path(out_dir)
    if out.is_dir() and any(out.glob("*.mcap")):
        raise DatasetError(str(out), "logs", "already holds episode logs; collect into a new folder")
    drawn = fam.sample(np.random.default_rng(seed), split, tasks)
    backend = backend or LocalBackend()
    # a worker elsewhere loads the bundle itself (by path, from the driver's folder); this process reuses its own
    source = runner if backend.in_process else str(policy)
    jobs = [Job(f"{fam.name} collection of task {i} ({episodes} episode(s))",
                (source, fam, str(out), i, task, episodes, steps, seed, adapt)) for i, task in enumerate(drawn)]
    per_task: list[list[str]] = [[] for _ in drawn]
    for i, logged in backend.run(_collect_task, jobs, "collected tasks", progress is not None):
        per_task[i] = logged
        for j, path in enumerate(logged if progress is not None else ()):
            progress(f"task {i + 1}/{tasks}, episode {j + 1}/{episodes}: {path}")
    paths = [Path(p) for logged in per_task for p in logged]
    collection = {"policy": runner.name, "policy_path": str(policy), "policy_sha256": runner.sha256,
                  "family": fam.name, "split": split, "tasks": tasks, "episodes": episodes, "steps": steps,
                  "seed": seed, "adapt": adapt, "adapter": "one per task, reset at each episode start (as the node)",
                  "tasks_drawn": drawn}
    return paths, collection


def _collect_task(policy: LoadedBundle | RandomPolicy | str, family: TaskFamily, out: str, index: int, task: Task,
                  episodes: int, steps: int, seed: int, adapt: bool) -> list[str]:
    """One job of :func:`collect_logs`: task ``index``'s episodes, one adapter through them all (reset at each start,
    as the node drives its one adapter); its seeds depend on ``seed`` and the task's index only."""
    if isinstance(policy, str):
        policy = RandomPolicy(family) if policy == RANDOM_POLICY else load_bundle(policy)
    adapter = policy.make_adapter(batch=1, seed=_sub_seed(seed, index), **policy.adapter_switches(adapt))
    paths = []
    for j in range(episodes):
        path = Path(out) / f"task{index:03d}_ep{j:03d}.mcap"
        record_sim_episode(policy, task, path, steps, seed=_sub_seed(seed, index, j), adapt=adapt, adapter=adapter,
                           episode=j + 1)
        paths.append(str(path))
    return paths


def collect_dataset(policy: str | Path, family: str | TaskFamily | None, logs_dir: str | Path, *, tasks: int,
                    episodes: int, steps: int | None = None, split: str = "train", seed: int = 0, adapt: bool = True,
                    progress: Callable[[str], None] | None = None, backend: Backend | None = None) -> OfflineDataset:
    """:func:`collect_logs` into ``logs_dir``, then the dataset of those logs, labelled with their true tasks."""
    paths, collection = collect_logs(policy, family, logs_dir, tasks=tasks, episodes=episodes, steps=steps,
                                     split=split, seed=seed, adapt=adapt, progress=progress, backend=backend)
    return build_dataset(paths, collection["family"], label="sim", collection=collection)


def identify_label(episode: Episode, family: TaskFamily, config: IdentifyConfig | None = None,
                   noise_std: float | Mapping[str, float] | None = None) -> TaskLabel:
    """The label of a log by identification: the family's dynamics parameters that explain it best, with the fit
    test's verdict (``explained``, ``not explained``, ``untested``). Reward parameters are left to the dataset,
    which takes them from the log (identification would put the family's nominal where the log has none)."""
    result = identify(episode, family, config, noise_std=noise_std)
    fit = result.fit.verdict if result.fit is not None else "untested"
    values = {p.name: p.value for p in result.params if p.kind == "dynamics"}
    note = (f"identified: residual {result.cost:.3g} (nominal task {result.nominal_cost:.3g}) scale units^2, delay "
            f"{result.delay} period(s), fit {fit}")
    return TaskLabel(values, "identify", fit, note)


def identify_labels(logs: Sequence[str | Path], family: TaskFamily, *, mode: str = "identify",
                    config: IdentifyConfig | None = None, noise_std: float | Mapping[str, float] | None = None,
                    backend: Backend | None = None, progress: bool = False) -> Identifier:
    """The ``identifier`` for :func:`build_dataset` with ``label=mode`` (``identify`` or ``auto``), its labels
    computed up front as jobs on ``backend``, one log per job: every log of ``logs`` (``auto``: those without a
    recorded task) by :func:`identify_label`. The labels are those :func:`identify_label` gives one log at a time.
    A log identification fails on raises its error when the build asks for its label, as it would there (a log the
    build excludes first, e.g. without a usable transition, is never asked for)."""
    if mode not in ("identify", "auto"):
        raise DatasetError("<arguments>", "label", f"identification labels modes 'identify' and 'auto', not {mode!r}")
    paths = expand_logs(logs)
    jobs = [Job(f"identification of {path}", (str(path), family, mode, config, noise_std)) for path in paths]
    labels = dict(zip((_log_key(p) for p in paths),
                      run_all(backend or LocalBackend(), _identify_job, jobs, "identified logs", progress),
                      strict=True))

    def identifier(episode: Episode, family: TaskFamily) -> TaskLabel:
        key = _log_key(episode.path)
        if key not in labels:
            raise DatasetError(str(episode.path), "logs", "is not among the logs identified (identify_labels was "
                               "given other logs than the build)")
        label = labels[key]
        if isinstance(label, Exception):
            raise label
        assert label is not None, f"{episode.path}: asked for the identified label of a log with a recorded task"
        return label

    return identifier


def _log_key(path: str | Path) -> str:
    return str(Path(path).resolve())


def _identify_job(path: str, family: TaskFamily, mode: str, config: IdentifyConfig | None,
                  noise_std: float | Mapping[str, float] | None) -> TaskLabel | Exception | None:
    """One job of :func:`identify_labels`: the log's label, None where ``auto`` takes its recorded task, or the
    error identification raised (returned, to be raised only if the build needs this log's label)."""
    episode = read_log(path)
    if mode == "auto" and episode.task is not None:
        return None
    try:
        return identify_label(episode, family, config, noise_std)
    except Exception as exc:  # deferred to the build, which raises it if it asks for this label
        return exc


__all__ = ["RANDOM_POLICY", "RandomAdapter", "RandomPolicy", "collect_dataset", "collect_logs", "identify_label",
           "identify_labels"]
