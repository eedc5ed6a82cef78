"""Offline datasets from episode logs: multi-task transitions with per-episode task labels (docs/datasets.md).

:func:`build_dataset` reads episode logs (:mod:`metarl_robot.logs`: the node's, sim recordings, and other recordings
brought in with ``metarl import-log``) of one robot and one task family, keeps the transitions that are what they
claim to be, computes each one's reward with the family's reward function and labels every episode with its task,
and returns an :class:`OfflineDataset`: flat float32 arrays (observations, actions, rewards, next observations,
terminations, truncations), episode offsets, per-episode task labels and provenance, and a :class:`DatasetReport`
that accounts for every log and every transition it did not keep. :meth:`OfflineDataset.save` writes our format (a
folder with ``dataset.npz`` and a human-readable ``dataset.json``), :func:`load_dataset` reads it back refusing what
does not add up, and :func:`write_minari` writes the same data as a Minari dataset, the offline-RL ecosystem's
format.

What is kept (:func:`transition_faults`): a transition ``k -> k + 1`` of a log is usable when the adapter's command of
step ``k`` went out (no safety stop, fallback or safe command), the next frame is the next one the robot sent (no
lost or stale frame), one control period later (no missed period), reports that command as the one the motors ran,
and every value is finite. The others are excluded, counted by reason; an episode is cut at them into several
dataset episodes (each a run of consecutive usable transitions), and flagged. Nothing is dropped silently: a log is
kept (perhaps flagged) or excluded with its reason, and the report counts both.

Offline tool: numpy and the robot side only (no torch, no MuJoCo). Task labels from identification come from the sim
side, passed in as ``identifier`` (``metarl_robot.real2sim.sim_dataset.identify_label``); Minari (and the gymnasium
spaces it needs) is imported by :func:`write_minari` alone.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metarl_robot.logs.format import Episode, EpisodeLogWarning
from metarl_robot.logs.reader import read_episode
from metarl_robot.provenance import git_commit, software_version
from metarl_robot.replay.importers import import_source
from metarl_robot.runtime.manifest import family_from_dict, sha256_file
from metarl_robot.spec.family import TaskFamily, load_family
from metarl_robot.spec.rewards import get_reward
from metarl_robot.spec.robot import RobotSpec, load_robot, robot_from_dict
from metarl_robot.spec.schema import SpecError, to_plain

DATASET_SCHEMA_VERSION = 1
"""Version of our dataset format (the arrays of ``dataset.npz``, the keys of ``dataset.json``); bump on any change."""
DATA_FILE = "dataset.npz"
"""The arrays (numpy ``.npz``, no pickle)."""
META_FILE = "dataset.json"
"""The metadata, the per-episode labels and provenance, and the report (human-readable)."""
FORMAT_NAME = "metarl-robot offline dataset"
"""``dataset.json``'s ``format``: what the folder is, for someone who finds it."""

LABEL_SOURCES = ("sim", "identify", "unknown")
"""Where an episode's task label came from: ``sim``, the task the log recorded (known in sim and on the digital twin,
or given with ``metarl import-log``'s mapping); ``identify``, identification from the log (``metarl identify``);
``unknown``, none (every value NaN)."""
LABEL_MODES = ("sim", "identify", "unknown", "auto")
"""How :func:`build_dataset` labels a log: one of :data:`LABEL_SOURCES`, or ``auto``, the recorded task where the log
has one and identification where it has none."""

TRANSITION_FAULTS: dict[str, str] = {
    "no_command": "nothing was sent on the step (command_source none: the node was disarmed or had no frame)",
    "safe_command": "the safety layer sent the robot's safe command instead of the adapter's",
    "fallback_controller": "the safety layer sent the fallback controller's command instead of the adapter's",
    "safety_stop": "the safety layer was in FALLBACK, SAFE_STOP or DISARMED",
    "robot_safe_command": "the robot ran its safe command in the period (its watchdog: applied_command_seq 0)",
    "lost_frames": "the next frame is not the next the robot sent (state_seq jumps: frames lost)",
    "stale_frame": "the next frame is not newer (state_seq does not advance: a stale or repeated frame)",
    "missed_period": "the next frame is not one control period later (robot stamps)",
    "command_not_applied": "the robot ran another command in the period (applied_command_seq names an older one)",
    "non_finite": "an observation or the command is NaN or infinite",
    "short_segment": "in a run of usable transitions shorter than min_transitions",
}
"""Why a transition of a log is not kept, in the order they are checked (each transition counts under the first)."""
FAULT_FLAGS = {"no_command": "safety", "safe_command": "safety", "fallback_controller": "safety",
               "safety_stop": "safety", "robot_safe_command": "safety", "lost_frames": "gaps", "stale_frame": "gaps",
               "missed_period": "gaps", "command_not_applied": "gaps", "non_finite": "non_finite",
               "short_segment": "short_segments"}
"""The episode flag each transition fault raises."""
FLAGS: dict[str, str] = {
    "safety": "transitions excluded where the safety layer (or the robot's watchdog) commanded; cut there",
    "gaps": "transitions excluded at lost or stale frames, missed periods or commands not applied; cut there",
    "non_finite": "transitions excluded for NaN or infinite values; cut there",
    "short_segments": "runs of usable transitions shorter than min_transitions excluded",
    "outside_limits": "commands outside robot.yaml's action box or rate limit (kept as logged: the robot limited them)",
    "incomplete": "the log was not closed (a crash): the reader dropped its cut tail",
    "task_partial": "the recorded task lacks some of the family's parameters (NaN in the label)",
    "task_unknown": "no task label: every value NaN",
    "fit_untested": "identified, but the fit could not be tested (no sensor noise known)",
    "no_task": "the log records no task (label sim); kept only with keep=no_task, as unknown",
    "not_explained": "identification: the family does not explain the log; kept only with keep=not_explained",
    "no_reward_params": "no reward parameters (neither in the label nor logged): rewards NaN; kept only with "
                        "keep=no_reward_params",
}
"""Flags an episode can carry, and what each means."""
KEEPABLE = ("no_task", "not_explained", "no_reward_params")
"""Flags that exclude a log unless the build is asked to keep it (``keep``)."""
_SAFETY_STOP_STATES = ("FALLBACK", "SAFE_STOP", "DISARMED")
_PERIOD_TOLERANCE = 0.5
"""A frame interval further than this fraction of the control period from it is a missed period (or a wrong clock)."""
ARRAYS = ("observations", "actions", "rewards", "next_observations", "terminations", "truncations",
          "episode_offsets", "task_values", "task_ids", "label_sources")
"""The arrays of ``dataset.npz``."""
MINARI_ID = re.compile(r"^[A-Za-z0-9_]+/[A-Za-z0-9_.]+(-[A-Za-z0-9_.]+)*-v\d+$")
"""A Minari dataset id of ours: ``namespace/name-v<N>``, e.g. ``metarl/cartpole_swingup-random-v0``."""
MINARI_NAMESPACE = "metarl"
"""The Minari namespace of our default ids."""
_NEEDS_IDENTIFIER = ("label {label!r} needs an identifier (the sim side's real2sim.sim_dataset.identify_label; "
                     "metarl dataset build --label identify passes it)")


class DatasetError(SpecError):
    """A dataset cannot be built, written or read. ``where`` is the file or folder, ``field`` the field at fault."""


@dataclass(frozen=True)
class TaskLabel:
    """What an episode's task is believed to be, and where that belief came from."""

    values: dict[str, float]
    """Family parameter name → value; NaN (or absent) where not known."""
    source: str
    """One of :data:`LABEL_SOURCES`."""
    fit: str = ""
    """For ``identify``: the fit test's verdict (``explained``, ``not explained``, ``untested``); else empty."""
    note: str = ""
    """Anything worth saying about it (e.g. the identification's residual)."""


Identifier = Callable[[Episode, TaskFamily], TaskLabel]
"""Labels a log by identification (the sim side's ``identify_label``, with its budget bound)."""


@dataclass
class EpisodeProvenance:
    """Where one dataset episode came from: a run of consecutive usable transitions of one log."""

    source: str
    """The episode log (path as given)."""
    source_sha256: str
    """sha256 of the log file."""
    first_step: int
    """Log step of the episode's first transition (its observation)."""
    transitions: int
    """Transitions in the episode: log steps ``first_step .. first_step + transitions`` are its observations."""
    policy: str
    """What commanded the robot: the bundle's name, ``random``, ``imported:<format>``, or ``unknown``."""
    policy_sha256: str
    """sha256 of the bundle's bundle.yaml as the log records it (empty when there is none)."""
    robot_interface_sha256: str
    """robot.yaml's interface hash as the log records it."""
    family: str
    """The task family the label and the rewards are of."""
    label_source: str
    """One of :data:`LABEL_SOURCES`."""
    fit: str
    """The identification's fit verdict, or empty."""
    task: dict[str, float | None]
    """The label: every family parameter, None where unknown (NaN in ``task_values``)."""
    flags: list[str]
    """Flags of the log it came from (:data:`FLAGS`)."""
    imported_from: dict[str, Any] | None = None
    """For a log made by ``metarl import-log``: the original file's path, format and sha256."""
    log_episode: int | None = None
    """The episode number the log records (the node's counter; sim collection: per task), if any."""


@dataclass
class LogEntry:
    """The report's line for one log: kept or excluded, why, and where its transitions went."""

    source: str
    """The episode log."""
    status: str
    """``kept`` or ``excluded``."""
    reason: str = ""
    """Why it was excluded (empty when kept)."""
    flags: list[str] = field(default_factory=list)
    """Its flags (:data:`FLAGS`), kept or not."""
    steps: int = 0
    """Steps in the log."""
    transitions: int = 0
    """Transitions in the log (steps - 1)."""
    kept_transitions: int = 0
    """Transitions that went into the dataset."""
    episodes: int = 0
    """Dataset episodes it gave (more than one where it was cut)."""
    excluded_transitions: dict[str, int] = field(default_factory=dict)
    """Fault (:data:`TRANSITION_FAULTS`) → transitions not kept for it; a log excluded as a whole lists none."""
    outside_limits: int = 0
    """Kept transitions whose command lies outside robot.yaml's action box or rate limit (kept as logged)."""
    safety_events: dict[str, int] = field(default_factory=dict)
    """Safety event kind → count in the log."""
    label_source: str = ""
    """Where its label came from (:data:`LABEL_SOURCES`)."""
    fit: str = ""
    """The identification's fit verdict, or empty."""
    notes: list[str] = field(default_factory=list)
    """The reader's warnings and anything else worth knowing."""


@dataclass
class DatasetReport:
    """What a build read, kept, excluded and flagged, per log and in total."""

    logs_read: int = 0
    """Logs given."""
    logs_kept: int = 0
    """Logs that gave at least one dataset episode."""
    logs_excluded: int = 0
    """Logs that gave none (each with its reason)."""
    logs_flagged: int = 0
    """Kept logs with at least one flag."""
    episodes: int = 0
    """Dataset episodes."""
    transitions_read: int = 0
    """Transitions in every log read."""
    transitions_kept: int = 0
    """Transitions in the dataset."""
    excluded_transitions: dict[str, int] = field(default_factory=dict)
    """Fault → transitions of kept logs not kept for it (summed over the logs)."""
    flags: dict[str, int] = field(default_factory=dict)
    """Flag → logs carrying it (kept or excluded)."""
    logs: list[LogEntry] = field(default_factory=list)
    """One entry per log, in the order given."""

    def add(self, entry: LogEntry) -> None:
        self.logs.append(entry)
        self.logs_read += 1
        self.transitions_read += entry.transitions
        if entry.status == "kept":
            self.logs_kept += 1
            self.logs_flagged += bool(entry.flags)
            self.episodes += entry.episodes
            self.transitions_kept += entry.kept_transitions
            for fault, count in entry.excluded_transitions.items():
                self.excluded_transitions[fault] = self.excluded_transitions.get(fault, 0) + count
        else:
            self.logs_excluded += 1
        for flag in entry.flags:
            self.flags[flag] = self.flags.get(flag, 0) + 1

    def summary(self) -> str:
        """A few lines for the terminal: the totals, then every excluded or flagged log."""
        lines = [f"{self.logs_read} log(s) read: {self.logs_kept} kept ({self.logs_flagged} flagged), "
                 f"{self.logs_excluded} excluded; {self.episodes} episode(s), {self.transitions_kept} of "
                 f"{self.transitions_read} transition(s) kept"]
        if self.excluded_transitions:
            lines.append("  transitions excluded from kept logs: " + ", ".join(
                f"{fault} {n}" for fault, n in self.excluded_transitions.items()))
        for e in self.logs:
            if e.status == "excluded":
                lines.append(f"  EXCLUDED {e.source}: {e.reason}")
            elif e.flags:
                lines.append(f"  flagged  {e.source}: {', '.join(e.flags)} ({e.kept_transitions} of {e.transitions} "
                             f"transitions kept in {e.episodes} episode(s))")
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetReport:
        out = cls(**{k: v for k, v in data.items() if k != "logs"})
        out.logs = [LogEntry(**entry) for entry in data.get("logs", [])]
        return out


@dataclass
class OfflineDataset:
    """Transitions of many episodes of many tasks, flat, with episode boundaries and per-episode task labels.

    Episode ``i`` is transitions ``episode_offsets[i]:episode_offsets[i + 1]``, consecutive in time (within an
    episode ``next_observations[t] == observations[t + 1]``), of one task: ``task_values[i]`` (NaN where unknown).
    """

    observations: np.ndarray
    """(T, obs_dim) float32, robot.yaml's measured fields in order, robot units."""
    actions: np.ndarray
    """(T, action_dim) float32: the command sent (after the node's safety layer where a node ran)."""
    rewards: np.ndarray
    """(T,) float32: the family's reward of each transition under its episode's reward parameters (NaN: unknown)."""
    next_observations: np.ndarray
    """(T, obs_dim) float32: the observation one control period later."""
    terminations: np.ndarray
    """(T,) bool: the episode ended in a terminal state (never, from logs: no log records one)."""
    truncations: np.ndarray
    """(T,) bool: the episode's last transition (the log ended, or was cut at an excluded transition)."""
    episode_offsets: np.ndarray
    """(E + 1,) int64: episode boundaries, from 0 to T."""
    task_values: np.ndarray
    """(E, P) float64: each episode's task label over :attr:`task_names` (NaN: unknown)."""
    task_ids: np.ndarray
    """(E,) int64: episodes with the same task share an id (the same complete label, else the same log)."""
    label_sources: np.ndarray
    """(E,) str: where each label came from (:data:`LABEL_SOURCES`)."""
    task_names: list[str]
    """The family's parameters, in order (the columns of :attr:`task_values`)."""
    robot: RobotSpec
    """The robot every log was of."""
    family: TaskFamily
    """The task family of the labels and rewards."""
    episodes: list[EpisodeProvenance]
    """Per episode: where it came from."""
    report: DatasetReport
    """What the build read, kept, excluded and flagged."""
    collection: dict[str, Any] | None = None
    """How sim rollouts were collected (policy, split, tasks, episodes, steps, seed), when they were."""
    created: dict[str, str] = field(default_factory=dict)
    """``created`` (UTC), ``software_version`` and ``git_commit`` of the build."""
    minari: dict[str, str] | None = None
    """``dataset_id`` and ``root`` of the Minari copy, once :func:`write_minari` wrote one."""

    @property
    def num_episodes(self) -> int:
        return len(self.episode_offsets) - 1

    @property
    def num_transitions(self) -> int:
        return len(self.rewards)

    def episode_slice(self, i: int) -> slice:
        """The transitions of episode ``i``."""
        return slice(int(self.episode_offsets[i]), int(self.episode_offsets[i + 1]))

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays of ``dataset.npz``, by name."""
        return {name: getattr(self, name) for name in ARRAYS}

    def to_json(self) -> dict[str, Any]:
        """``dataset.json``: everything but the arrays, with NaN written as null."""
        return {
            "format": FORMAT_NAME, "schema_version": DATASET_SCHEMA_VERSION, **self.created,
            "counts": {"episodes": self.num_episodes, "transitions": self.num_transitions,
                       "tasks": len(np.unique(self.task_ids))},
            "arrays": {name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in self.arrays().items()},
            "robot": {"name": self.robot.name, "interface_sha256": self.robot.interface_hash,
                      "obs_fields": [f.name for f in self.robot.measured_fields],
                      "action_fields": [a.name for a in self.robot.action], "spec": self.robot.to_dict()},
            "family": {"name": self.family.name, "reward": self.family.spec.reward, "env_id": self.family.spec.env_id,
                       "task_names": list(self.task_names), "spec": to_plain(self.family.spec)},
            "label_sources": list(LABEL_SOURCES), "collection": self.collection, "minari": self.minari,
            "episodes": [asdict(e) for e in self.episodes], "report": asdict(self.report),
        }

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write ``folder/dataset.npz`` and ``folder/dataset.json`` (the folder is made; an existing dataset in it is
        refused unless ``overwrite``). Returns the folder."""
        folder = check_output(folder, overwrite)
        folder.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(folder / DATA_FILE, **self.arrays())
        (folder / META_FILE).write_text(json.dumps(_nan_to_none(self.to_json()), indent=1) + "\n")
        return folder

    def summary(self) -> str:
        """A few lines for the terminal."""
        sources = Counter(self.label_sources.tolist())
        returns = np.add.reduceat(self.rewards.astype(np.float64), self.episode_offsets[:-1]) if len(self.rewards) \
            else np.zeros(0)
        policies = Counter(e.policy for e in self.episodes)
        lines = [f"{self.num_episodes} episode(s), {self.num_transitions} transition(s), "
                 f"{len(np.unique(self.task_ids))} task(s) of {self.family.name} on robot {self.robot.name}",
                 "  labels: " + ", ".join(f"{s} {n}" for s, n in sources.items()),
                 "  policies: " + ", ".join(f"{p} {n}" for p, n in policies.items())]
        if len(returns):
            finite = returns[np.isfinite(returns)]
            if len(finite):
                lines.append(f"  episode return: mean {finite.mean():.2f}, min {finite.min():.2f}, max "
                             f"{finite.max():.2f} ({len(finite)} episode(s) with known rewards)")
        return "\n".join(lines)


def check_output(folder: str | Path, overwrite: bool = False) -> Path:
    """``folder`` as a Path, refused if it holds a dataset already and ``overwrite`` is not set (callers check before
    a long build, :meth:`OfflineDataset.save` again before writing)."""
    folder = Path(folder)
    if (folder / META_FILE).exists() and not overwrite:
        raise DatasetError(str(folder), "out", f"already holds a dataset ({META_FILE}); choose another folder or "
                           "overwrite it")
    return folder


# ---- which transitions of a log are usable -------------------------------------------------------------------------
def transition_faults(episode: Episode) -> list[str]:
    """Per transition ``k -> k + 1`` of a log (``N - 1`` of them): ``""`` where it is usable, else the first fault of
    :data:`TRANSITION_FAULTS` it shows (``short_segment`` is the caller's, it depends on the neighbours)."""
    n = episode.num_steps
    if n < 2:
        return []
    robot = episode.robot
    period = robot.ctrl_dt * 1e9
    source, state = episode.command_source, episode.safety_state
    seq, stamp, applied = episode.state_seq, episode.robot_stamp_ns, episode.applied_command_seq
    finite = np.isfinite(episode.obs).all(axis=1)
    finite_command = np.isfinite(episode.command).all(axis=1)
    faults = []
    for k in range(n - 1):
        step_gap = int(seq[k + 1] - seq[k])
        interval = int(stamp[k + 1] - stamp[k])
        if source[k] != "adapter":
            fault = "no_command" if source[k] == "none" else str(source[k])
        elif state[k] in _SAFETY_STOP_STATES:
            fault = "safety_stop"
        elif applied[k + 1] == 0:
            fault = "robot_safe_command"
        elif step_gap > 1:
            fault = "lost_frames"
        elif step_gap < 1:
            fault = "stale_frame"
        elif abs(interval - period) > _PERIOD_TOLERANCE * period:
            fault = "missed_period"
        elif applied[k + 1] not in (-1, episode.command_seq[k]):  # -1: the log does not say (imported logs)
            fault = "command_not_applied"
        elif not (finite[k] and finite[k + 1] and finite_command[k]):
            fault = "non_finite"
        else:
            fault = ""
        faults.append(fault)
    return faults


def _segments(usable: np.ndarray) -> list[tuple[int, int]]:
    """``(start, stop)`` of every maximal run of True in ``usable``."""
    edges = np.diff(np.concatenate([[0], usable.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def _outside_limits(episode: Episode, kept: np.ndarray) -> int:
    """Kept transitions whose command is outside the action box or farther than the rate limit from the previous
    command sent (the safe command before the first): the robot (or the env) ran a limited one."""
    robot = episode.robot
    max_step = robot.action_max_rate * robot.ctrl_dt
    previous = np.empty_like(episode.command)
    last = robot.safe_action.astype(np.float64)
    for k in range(episode.num_steps):
        previous[k] = last
        if episode.command_source[k] != "none":
            last = episode.command[k]
    command = episode.command[:-1]
    tol = 1e-9 * (1.0 + np.abs(command))
    bad = ((command < robot.action_low - tol) | (command > robot.action_high + tol)
           | (np.abs(command - previous[:-1]) > max_step + tol)).any(axis=1)
    return int(np.count_nonzero(bad & kept))


# ---- labels and rewards --------------------------------------------------------------------------------------------
def _label(episode: Episode, family: TaskFamily, mode: str, identifier: Identifier | None) -> tuple[TaskLabel, list]:
    """The log's label, and the flags it raises."""
    recorded = episode.task
    if mode == "unknown" or (mode == "sim" and recorded is None):
        flag = "no_task" if mode == "sim" else "task_unknown"
        return TaskLabel({}, "unknown"), [flag]
    if mode == "sim" or (mode == "auto" and recorded is not None):
        unknown = [k for k in recorded if k not in family.names]
        if unknown:
            raise DatasetError(str(episode.path), f"metarl/task.{unknown[0]}", f"is not a parameter of family "
                               f"{family.name!r} (its parameters: {family.names}): a log of another family")
        values = {}
        for name, value in recorded.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise DatasetError(str(episode.path), f"metarl/task.{name}", f"must be a number, got {value!r}")
            values[name] = float(value)
        return TaskLabel(values, "sim"), ([] if set(values) == set(family.names) else ["task_partial"])
    if identifier is None:  # label auto, and a log without a recorded task
        raise DatasetError(str(episode.path), "label", _NEEDS_IDENTIFIER.format(label=mode))
    label = identifier(episode, family)
    flags = {"not explained": ["not_explained"], "untested": ["fit_untested"]}.get(label.fit, [])
    return label, flags


def _reward_params(episode: Episode, family: TaskFamily, values: dict[str, float]) -> dict[str, np.ndarray] | None:
    """Per reward parameter, its value on each step: the label's where it has one, else what the node gave the
    adapter (``/metarl/task``); None when a parameter has neither."""
    out = {}
    for name in family.reward_names:
        value = values.get(name, math.nan)
        if math.isfinite(value):
            out[name] = np.full(episode.num_steps, value)
        elif name in episode.task_params and np.isfinite(episode.task_params[name]).all():
            out[name] = np.asarray(episode.task_params[name], dtype=np.float64)
        else:
            return None
    return out


def _logged_constants(episode: Episode, family: TaskFamily, values: dict[str, float]) -> dict[str, float]:
    """``values`` with each reward parameter the label lacks filled in from the log, where the node logged one value
    for the whole episode (as identification does)."""
    out = dict(values)
    for name in family.reward_names:
        logged = episode.task_params.get(name)
        if not math.isfinite(out.get(name, math.nan)) and logged is not None and len(logged) \
                and np.isfinite(logged).all() and np.ptp(logged) == 0:
            out[name] = float(logged[0])
    return out


# ---- building --------------------------------------------------------------------------------------------------
def expand_logs(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given; a folder gives its ``*.mcap`` files in name order (none in it is an error)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.mcap"))
            if not found:
                raise DatasetError(str(p), "logs", "is a folder without .mcap episode logs")
            out.extend(found)
        else:
            out.append(p)
    if not out:
        raise DatasetError("<arguments>", "logs", "no episode log given")
    return out


def _policy(episode: Episode) -> tuple[str, str]:
    """What commanded the robot in a log, and the sha256 its log records."""
    if episode.bundle:
        return episode.bundle.get("name", "unknown"), episode.bundle.get("sha256", "")
    imported = import_source(episode)
    return (f"imported:{imported.get('format', '?')}", "") if imported else ("unknown", "")


def read_log(path: str | Path) -> Episode:
    """An episode log, its reader's warnings kept in ``episode.warnings`` (a dataset reports them per log) instead
    of printed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EpisodeLogWarning)
        return read_episode(path)


def build_dataset(logs: Sequence[str | Path], family: str | TaskFamily, *, robot: str | Path | RobotSpec | None = None,
                  label: str = "sim", identifier: Identifier | None = None, keep: Collection[str] = (),
                  min_transitions: int = 1, collection: Mapping[str, Any] | None = None,
                  progress: Callable[[str], None] | None = None) -> OfflineDataset:
    """Read ``logs`` (files, or folders of ``*.mcap``) of one robot and build a dataset over ``family``.

    ``robot``: the robot they must be of (a name, robot.yaml path or spec; default: the first log's); a log of
    another robot (interface hash) is an error naming both. ``label``: one of :data:`LABEL_MODES`; ``identify`` and
    ``auto`` need ``identifier``. ``keep``: flags of :data:`KEEPABLE` whose logs to keep anyway (flagged).
    ``min_transitions``: shorter runs of usable transitions are excluded (``short_segment``). ``collection``: how
    the logs were collected, recorded as is. ``progress``: called with a line per log.
    """
    if label not in LABEL_MODES:
        raise DatasetError("<arguments>", "label", f"must be one of {list(LABEL_MODES)}, got {label!r}")
    if label == "identify" and identifier is None:
        raise DatasetError("<arguments>", "label", _NEEDS_IDENTIFIER.format(label=label))
    bad_keep = sorted(set(keep) - set(KEEPABLE))
    if bad_keep:
        raise DatasetError("<arguments>", "keep", f"{bad_keep[0]!r} is not a flag that excludes a log; allowed: "
                           f"{list(KEEPABLE)}")
    if isinstance(min_transitions, bool) or not isinstance(min_transitions, int) or min_transitions < 1:
        raise DatasetError("<arguments>", "min_transitions", f"must be an integer >= 1, got {min_transitions!r}")
    fam = family if isinstance(family, TaskFamily) else load_family(family)
    reference = robot if isinstance(robot, RobotSpec) or robot is None else load_robot(robot)
    reference_from = "--robot" if reference is not None else ""
    reward = get_reward(fam.spec.reward)
    names = fam.names
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("obs", "act", "rew", "next")}
    lengths: list[int] = []
    labels: list[tuple[np.ndarray, str, str]] = []  # values, source, the log (for task ids)
    provenance: list[EpisodeProvenance] = []
    report = DatasetReport()
    for path in expand_logs(logs):
        episode = read_log(path)
        if reference is None:
            reference, reference_from = episode.robot, f"the first log ({path})"
        if episode.robot_interface_sha256 != reference.interface_hash:
            raise DatasetError(str(path), "metarl/robot.interface_sha256", f"robot {episode.robot.name!r} (interface "
                               f"sha256 {episode.robot_interface_sha256}) differs from robot {reference.name!r} "
                               f"(interface sha256 {reference.interface_hash}) of {reference_from}: a dataset holds "
                               "one robot's logs")
        if episode.robot.name != fam.spec.robot:
            raise DatasetError(str(path), "metarl/robot.name", f"robot {episode.robot.name!r}, but family "
                               f"{fam.name!r} is of robot {fam.spec.robot!r}")
        entry, kept = _read_one(episode, fam, label, identifier, keep, min_transitions)
        report.add(entry)
        if progress is not None:
            progress(f"{path}: {entry.status}" + (f" ({entry.reason})" if entry.reason else "")
                     + (f", flags {', '.join(entry.flags)}" if entry.flags else ""))
        if kept is None:
            continue
        task_label, segments, params = kept
        values = _logged_constants(episode, fam, task_label.values)
        vector = np.array([values.get(n, math.nan) for n in names], dtype=np.float64)
        policy, policy_sha = _policy(episode)
        sha = sha256_file(path)
        obs = episode.obs
        for start, stop in segments:
            parts["obs"].append(obs[start:stop])
            parts["act"].append(episode.command[start:stop])
            parts["next"].append(obs[start + 1:stop + 1])
            if params is None:
                parts["rew"].append(np.full(stop - start, np.nan))
            else:
                step_params = {k: v[start:stop] for k, v in params.items()}
                parts["rew"].append(reward(episode.robot, obs[start:stop], episode.command[start:stop],
                                           obs[start + 1:stop + 1], step_params)[0])
            lengths.append(stop - start)
            labels.append((vector, task_label.source, str(path)))
            log_episode = episode.extra.get("episode")
            provenance.append(EpisodeProvenance(
                source=str(path), source_sha256=sha, first_step=start, transitions=stop - start, policy=policy,
                policy_sha256=policy_sha, robot_interface_sha256=episode.robot_interface_sha256, family=fam.name,
                label_source=task_label.source, fit=task_label.fit,
                task={n: (float(v) if math.isfinite(v) else None) for n, v in zip(names, vector, strict=True)},
                flags=list(entry.flags), imported_from=import_source(episode),
                log_episode=log_episode if isinstance(log_episode, int) else None))
    assert reference is not None  # expand_logs refuses an empty list
    if not lengths:
        raise DatasetError("<logs>", "logs", "no log gave a usable transition:\n" + report.summary())
    total = int(sum(lengths))
    truncations = np.zeros(total, dtype=bool)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    truncations[offsets[1:] - 1] = True
    task_values = np.stack([v for v, _, _ in labels])
    return OfflineDataset(
        observations=np.concatenate(parts["obs"]).astype(np.float32),
        actions=np.concatenate(parts["act"]).astype(np.float32),
        rewards=np.concatenate(parts["rew"]).astype(np.float32),
        next_observations=np.concatenate(parts["next"]).astype(np.float32),
        terminations=np.zeros(total, dtype=bool), truncations=truncations, episode_offsets=offsets,
        task_values=task_values, task_ids=_task_ids(labels), label_sources=np.array([s for _, s, _ in labels]),
        task_names=list(names), robot=reference, family=fam, episodes=provenance, report=report,
        collection=None if collection is None else dict(collection),
        created={"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 "software_version": software_version(), "git_commit": git_commit() or "unknown"})


def _read_one(episode: Episode, family: TaskFamily, mode: str, identifier: Identifier | None,
              keep: Collection[str], min_transitions: int
              ) -> tuple[LogEntry, tuple[TaskLabel, list[tuple[int, int]], dict[str, np.ndarray] | None] | None]:
    """One log's report entry, and what to keep of it: its label, its runs of usable transitions (log steps
    ``start..stop`` are their first observations) and its per-step reward parameters (None: unknown)."""
    entry = LogEntry(source=str(episode.path), status="kept", steps=episode.num_steps,
                     transitions=max(episode.num_steps - 1, 0), notes=list(episode.warnings),
                     safety_events=dict(Counter(e.kind for e in episode.safety_events)))
    flags: list[str] = [] if episode.complete else ["incomplete"]
    faults = transition_faults(episode)
    usable = np.array([not f for f in faults], dtype=bool)
    segments = []
    for start, stop in _segments(usable):
        if stop - start >= min_transitions:
            segments.append((start, stop))
        else:
            for k in range(start, stop):
                faults[k] = "short_segment"
    counts = Counter(f for f in faults if f)
    kept = np.zeros(len(faults), dtype=bool)
    for start, stop in segments:
        kept[start:stop] = True
    entry.excluded_transitions = {f: counts[f] for f in TRANSITION_FAULTS if counts[f]}
    flags += list(dict.fromkeys(FAULT_FLAGS[f] for f in entry.excluded_transitions))
    entry.outside_limits = _outside_limits(episode, kept) if len(faults) else 0
    flags += ["outside_limits"] if entry.outside_limits else []
    if not segments:
        entry.flags = flags
        entry.status = "excluded"
        entry.reason = ("no usable transition" + (": " + ", ".join(f"{f} {n}" for f, n in
                                                                   entry.excluded_transitions.items())
                                                  if entry.excluded_transitions else " (fewer than 2 steps)"))
        entry.excluded_transitions = {}
        return entry, None
    task_label, label_flags = _label(episode, family, mode, identifier)
    if label_flags == ["no_task"] and "no_task" in keep:
        label_flags = ["no_task", "task_unknown"]
    flags += label_flags
    entry.label_source, entry.fit = task_label.source, task_label.fit
    if task_label.note:
        entry.notes.append(task_label.note)
    params = _reward_params(episode, family, task_label.values)
    if params is None:
        flags.append("no_reward_params")
    entry.flags = flags
    refused = [f for f in KEEPABLE if f in flags and f not in keep]
    if refused:
        entry.status = "excluded"
        entry.reason = "; ".join(f"{f}: {FLAGS[f]}" for f in refused)
        entry.excluded_transitions = {}
        return entry, None
    entry.kept_transitions = int(kept.sum())
    entry.episodes = len(segments)
    return entry, (task_label, segments, params)


def _task_ids(labels: list[tuple[np.ndarray, str, str]]) -> np.ndarray:
    """Episodes with the same complete label share an id; an incomplete label is its log's own task."""
    ids: dict[Any, int] = {}
    out = []
    for values, _, source in labels:
        key = tuple(values.tolist()) if np.isfinite(values).all() else ("log", source)
        out.append(ids.setdefault(key, len(ids)))
    return np.array(out, dtype=np.int64)


def _nan_to_none(value: Any) -> Any:
    """JSON has no NaN: write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nan_to_none(v) for v in value]
    return value


# ---- reading ours back ---------------------------------------------------------------------------------------------
def load_dataset(folder: str | Path) -> OfflineDataset:
    """Read a dataset written by :meth:`OfflineDataset.save`, refusing (with a :class:`DatasetError` naming the file
    and field) another schema version, a missing or extra array, wrong dtypes or shapes and counts that disagree."""
    folder = Path(folder)
    meta_path, data_path = folder / META_FILE, folder / DATA_FILE
    for path in (meta_path, data_path):
        if not path.is_file():
            raise DatasetError(str(folder), path.name, "missing: not a dataset folder (metarl dataset build writes "
                               f"{DATA_FILE} and {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(str(meta_path), "", f"not readable JSON: {exc}") from None
    where = str(meta_path)
    if not isinstance(meta, dict):
        raise DatasetError(where, "", "expected a JSON object")
    version = meta.get("schema_version")
    if version != DATASET_SCHEMA_VERSION:
        raise DatasetError(where, "schema_version", f"is {version!r}; this code reads version "
                           f"{DATASET_SCHEMA_VERSION} (written by metarl-robot {meta.get('software_version', '?')})")
    for key in ("robot", "family", "episodes", "report"):
        if key not in meta:
            raise DatasetError(where, key, "missing")
    try:
        robot = robot_from_dict(meta["robot"].get("spec"), f"{where}: robot.spec")
        family = family_from_dict(meta["family"].get("spec"), f"{where}: family.spec")
    except (AttributeError, TypeError) as exc:
        raise DatasetError(where, "robot/family", f"malformed: {exc}") from None
    try:
        with np.load(data_path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise DatasetError(str(data_path), "", f"not a numpy .npz of arrays: {exc}") from None
    _check_arrays(arrays, robot, len(family.names), len(meta["episodes"]), str(data_path))
    try:
        episodes = [EpisodeProvenance(**e) for e in meta["episodes"]]
        report = DatasetReport.from_dict(meta["report"])
    except TypeError as exc:
        raise DatasetError(where, "episodes/report", f"malformed: {exc}") from None
    if meta["family"].get("task_names") != family.names:
        raise DatasetError(where, "family.task_names", f"{meta['family'].get('task_names')} differ from the family "
                           f"spec's parameters {family.names}")
    return OfflineDataset(**arrays, task_names=family.names, robot=robot, family=family, episodes=episodes,
                          report=report, collection=meta.get("collection"), minari=meta.get("minari"),
                          created={k: meta.get(k, "unknown") for k in ("created", "software_version", "git_commit")})


def _check_arrays(arrays: dict[str, np.ndarray], robot: RobotSpec, params: int, episodes: int, where: str) -> None:
    missing = [k for k in ARRAYS if k not in arrays]
    if missing:
        raise DatasetError(where, missing[0], f"array missing (the file holds {sorted(arrays)}; a dataset holds "
                           f"{list(ARRAYS)})")
    extra = sorted(set(arrays) - set(ARRAYS))
    if extra:
        raise DatasetError(where, extra[0], f"unknown array (a dataset holds {list(ARRAYS)})")
    t = len(arrays["rewards"])
    want = {"observations": ((t, robot.obs_dim), "float32"), "actions": ((t, robot.action_dim), "float32"),
            "rewards": ((t,), "float32"), "next_observations": ((t, robot.obs_dim), "float32"),
            "terminations": ((t,), "bool"), "truncations": ((t,), "bool"),
            "episode_offsets": ((episodes + 1,), "int64"), "task_values": ((episodes, params), "float64"),
            "task_ids": ((episodes,), "int64")}
    for name, (shape, dtype) in want.items():
        a = arrays[name]
        if a.shape != shape or a.dtype != np.dtype(dtype):
            raise DatasetError(where, name, f"is {a.dtype}{list(a.shape)}, expected {dtype}{list(shape)} ({t} "
                               f"transitions, {episodes} episodes, {params} task parameters, robot {robot.name!r})")
    sources = arrays["label_sources"]
    if sources.shape != (episodes,) or sources.dtype.kind != "U":
        raise DatasetError(where, "label_sources", f"is {sources.dtype}{list(sources.shape)}, expected {episodes} "
                           "strings")
    bad = sorted(set(sources.tolist()) - set(LABEL_SOURCES))
    if bad:
        raise DatasetError(where, "label_sources", f"{bad[0]!r} is not a label source; allowed: {list(LABEL_SOURCES)}")
    offsets = arrays["episode_offsets"]
    if offsets[0] != 0 or offsets[-1] != t or np.any(np.diff(offsets) < 1):
        raise DatasetError(where, "episode_offsets", f"must rise strictly from 0 to the {t} transitions, got "
                           f"{offsets[:5].tolist()}...{offsets[-2:].tolist()}")
    if not np.array_equal(arrays["truncations"] | arrays["terminations"],
                          np.isin(np.arange(t), offsets[1:] - 1)):
        raise DatasetError(where, "truncations", "every episode must end, and only end, on its last transition "
                           "(truncated or terminated)")


# ---- Minari ---------------------------------------------------------------------------------------------------------
def default_minari_id(dataset: OfflineDataset, quality: str | None = None) -> str:
    """``metarl/<family>-<quality>-v0``; the quality defaults to the one policy that collected every episode (else
    ``mixed``)."""
    policies = {e.policy for e in dataset.episodes}
    name = quality or (policies.pop() if len(policies) == 1 else "mixed")
    return f"{MINARI_NAMESPACE}/{dataset.family.name}-{re.sub(r'[^A-Za-z0-9_.]', '_', name)}-v0"


def check_minari_target(dataset_id: str, root: str | Path | None = None, overwrite: bool = False) -> None:
    """Refuse a malformed Minari id, or one that exists under ``root`` unless ``overwrite`` (callers check before a
    long build, :func:`write_minari` again before writing)."""
    import minari

    if not MINARI_ID.match(dataset_id):
        raise DatasetError("<arguments>", "minari_id", f"{dataset_id!r} must look like 'namespace/name-v<N>', e.g. "
                           f"'{MINARI_NAMESPACE}/cartpole_swingup-random-v0'")
    with _minari_root(root):
        if not overwrite and dataset_id in minari.list_local_datasets():
            where = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
            raise DatasetError(where, "minari_id", f"a Minari dataset {dataset_id!r} exists already; give another id "
                               "(a new version: -v<N+1>) or overwrite it")


@contextmanager
def _minari_root(root: str | Path | None) -> Iterator[None]:
    """Minari finds its datasets through ``MINARI_DATASETS_PATH``: point it at ``root`` for the call (default: as
    set, else ``~/.minari/datasets``)."""
    if root is None:
        yield
        return
    before = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(Path(root).resolve())
    try:
        yield
    finally:
        if before is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = before


def write_minari(dataset: OfflineDataset, dataset_id: str, root: str | Path | None = None,
                 overwrite: bool = False) -> Path:
    """Write ``dataset`` as the Minari dataset ``dataset_id`` (hdf5 backend) under ``root`` (default:
    ``MINARI_DATASETS_PATH``, else ``~/.minari/datasets``); returns its folder and records it in ``dataset.minari``.

    Each episode is a Minari episode (observations: its T + 1 observations); ``infos["task"]`` holds its task label on
    every step ((T + 1, P), NaN where unknown) and ``infos["task_id"]`` its task id. The episode metadata
    (``dataset.storage.get_episode_metadata``) holds the label with its names and source and the provenance; the
    dataset metadata key ``metarl`` holds the robot, the family, the task names and the build report.
    """
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    check_minari_target(dataset_id, root, overwrite)
    robot = dataset.robot
    buffers = []
    for i in range(dataset.num_episodes):
        s = dataset.episode_slice(i)
        n = s.stop - s.start
        buffers.append(EpisodeBuffer(
            id=i, observations=np.concatenate([dataset.observations[s], dataset.next_observations[s.stop - 1:s.stop]]),
            actions=dataset.actions[s], rewards=dataset.rewards[s], terminations=dataset.terminations[s],
            truncations=dataset.truncations[s],
            infos={"task": np.repeat(dataset.task_values[i][None], n + 1, axis=0),
                   "task_id": np.full(n + 1, dataset.task_ids[i], dtype=np.int64)}))
    observation_space = gym.spaces.Box(-np.inf, np.inf, (robot.obs_dim,), np.float32)
    action_space = gym.spaces.Box(robot.action_low.astype(np.float32), robot.action_high.astype(np.float32),
                                  dtype=np.float32)
    policies = sorted({e.policy for e in dataset.episodes})
    with _minari_root(root):
        if dataset_id in minari.list_local_datasets():  # check_minari_target allowed it: overwrite
            minari.delete_dataset(dataset_id)
        with warnings.catch_warnings():
            # Minari asks for a URL, an e-mail and an env spec we do not have: the metadata below says what we do.
            warnings.filterwarnings("ignore", message=r".*(code_permalink|author_email|eval_env|env_spec).*",
                                    category=UserWarning)
            out = minari.create_dataset_from_buffers(
                dataset_id, buffers, observation_space=observation_space, action_space=action_space,
                algorithm_name=", ".join(policies), author="metarl-robot", data_format="hdf5",
                description=f"{dataset.family.name} on robot {robot.name}: {dataset.num_episodes} episodes of "
                f"{len(np.unique(dataset.task_ids))} tasks, labels in infos['task'] over {dataset.task_names} (NaN: "
                "unknown); metadata key 'metarl' (docs/datasets.md)")
        out.storage.update_metadata({"metarl": _nan_to_none({
            "format": FORMAT_NAME, "schema_version": DATASET_SCHEMA_VERSION,
            "robot": {"name": robot.name, "interface_sha256": robot.interface_hash,
                      "obs_fields": [f.name for f in robot.measured_fields],
                      "action_fields": [a.name for a in robot.action]},
            "family": {"name": dataset.family.name, "reward": dataset.family.spec.reward,
                       "env_id": dataset.family.spec.env_id},
            "task_names": list(dataset.task_names), "label_sources": list(LABEL_SOURCES),
            "collection": dataset.collection, "report": asdict(dataset.report), **dataset.created})})
        out.storage.update_episode_metadata([{
            "task_names": list(dataset.task_names), "task_values": dataset.task_values[i],
            "task_id": int(dataset.task_ids[i]), "label_source": e.label_source, "fit": e.fit,
            "source": e.source, "source_sha256": e.source_sha256, "first_step": e.first_step, "policy": e.policy,
            "robot_interface_sha256": e.robot_interface_sha256, "flags": json.dumps(e.flags)}
            for i, e in enumerate(dataset.episodes)])
        folder = Path(out.storage.data_path).parent
    dataset.minari = {"dataset_id": dataset_id, "root": str(folder.parents[len(Path(dataset_id).parts) - 1])}
    return folder


__all__ = [
    "ARRAYS", "DATASET_SCHEMA_VERSION", "DATA_FILE", "FAULT_FLAGS", "FLAGS", "KEEPABLE", "LABEL_MODES",
    "LABEL_SOURCES", "META_FILE", "TRANSITION_FAULTS", "DatasetError", "DatasetReport", "EpisodeProvenance",
    "Identifier", "LogEntry", "OfflineDataset", "TaskLabel", "build_dataset", "check_minari_target", "check_output",
    "default_minari_id", "expand_logs", "load_dataset", "read_log", "transition_faults", "write_minari",
]
