"""Real-to-sim identification: the task parameters of a family that best explain a logged episode.

``metarl identify episode.mcap --family F`` replays the logged commands in MuJoCo from the logged
states and searches the family's dynamics-parameter box for the physics whose trajectories match
the log best. Method (docs/identify.md):

- **Multiple shooting.** The log is cut into segments of ``window`` consecutive valid transitions.
  Each segment starts from the logged state (qpos/qvel set from the observation through robot.yaml's
  observation map) and is simulated with the logged commands held for whole control periods, as the
  digital twin and the env apply them. Short segments keep a chaotic system (a swinging pole) from
  turning a small parameter error into a large, non-smooth trajectory error.
- **Cost.** Mean squared difference between simulated and logged observations, each field divided by
  its robot.yaml ``scale`` (so errors are in scale units and fields weigh alike).
- **Search.** CEM (a diagonal Gaussian, refit to the best ``elite_frac`` of each population) in the
  unit cube over the family's full parameter box (train and test ranges); log-uniform parameters are
  searched in log space. Several restarts from random means; the best restart wins. Then a few
  Levenberg-Marquardt steps from its answer (finite-difference Jacobians of the residuals) settle it on
  the cost's local minimum, where the curvature below is taken.
- **Uncertainty.** The cost is read as a Gaussian negative log-likelihood of the residuals (scale units,
  one noise variance sigma^2 = SSR / (N - p) estimated from the residual at the answer). The Gauss-Newton
  curvature J^T J of the residual Jacobian J (central finite differences in search coordinates) gives the
  covariance sigma^2 (J^T J)^-1. Residuals of one segment share its noisy logged initial state, which
  makes that optimistic, so the segment-clustered sandwich covariance is computed too and each
  parameter's variance is the larger of the two. It is mapped to parameter units by the chain rule
  (log-space parameters: the interval is exp of the log-space interval): a standard error and a 95 %
  interval per parameter. One criterion flags a parameter *not identified*: its 95 % interval spans at
  least half its box width (search coordinates), or the curvature is singular in a direction it takes
  part in (the data does not constrain it). The CEM elites' spread is kept as a diagnostic only. The
  assumptions (local linearisation, Gaussian noise, an exact model) and the measured calibration are in
  docs/identify.md.

Only ``kind: dynamics`` parameters can be identified: reward parameters (e.g. a target position) do
not change the physics. They are written from the log's ``task_params`` when the node logged them,
else as the family's nominal, and reported as not identified.

**Delay.** A delay between the command the log says ran and the motors running it (a driver's latency the
robot does not report) is estimated: the search runs once per delay 0..``max_delay`` with each period
simulated with the command that many periods earlier, on the same segments, and the delay whose best fit
has the least residual is the answer (``delay``, ``delay_costs``); a family's ``action_delay`` parameter
takes it.

**Fit test.** With the sensor noise known (robot.yaml ``noise_std`` or ``noise_std=``), the answer's
residuals are whitened by the covariance the noise gives them and tested (chi-square): the verdict is
*explained* or *not explained* (with the fields that carry the misfit), and a fit that is not explained gets
no intervals.

Transitions are used only where the log shows that the next telemetry frame (``state_seq`` + 1)
followed the step's, and each period is simulated with the command its next frame says the motors ran
(``applied_command_seq``: the step's own command, an earlier one that ran late, or the safe command):
dropped, frozen or stale frames, and periods whose applied command the log does not hold, are skipped.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mujoco
import numpy as np
import yaml
from mujoco import rollout as mj_rollout
from tqdm.auto import tqdm

from metarl_robot.envs.dynamics import DynamicsApplier
from metarl_robot.envs.robot_model import ObservationMap, load_model
from metarl_robot.logs.format import Episode
from metarl_robot.logs.reader import read_episode
from metarl_robot.spec.family import ParamBox, TaskFamily, load_family
from metarl_robot.spec.robot import RobotSpec, load_robot
from metarl_robot.spec.schema import parse_yaml

STATE = mujoco.mjtState.mjSTATE_FULLPHYSICS
Z95 = 1.959963984540054
"""Two-sided 95 % quantile of the standard normal (N - p is in the hundreds: Student's t is the same)."""
IDENTIFIED_MAX_BOX_FRACTION = 0.5
"""A parameter is identified only when its 95 % interval spans less than this fraction of its box width
(search coordinates: log space for log-uniform parameters)."""
NOISE_FLOOR = 1e-12
"""Least noise standard deviation sigma (scale units): a log that the model reproduces exactly (a twin's, a
noise-free sim recording) leaves float64 round-off (~1e-16) as residual, which says nothing about the data's
information; no real sensor is this quiet."""
FIT_NOISE_FLOOR = 1e-8
"""Least sensor noise (scale units) the fit test judges the residuals against. A log the family reproduces exactly
(a twin's with exact sensors: noise 0) leaves as residual what the search's finite precision leaves, not round-off:
measured 1.3e-10 (parameters found to ~1e-6 relative) on a demo twin log, which against :data:`NOISE_FLOOR` gave
chi2 2.9e6 and "not explained" for a perfect fit. A physics misfit is orders above 1e-8; no real sensor is this
quiet."""
SINGULAR_RTOL = 1e-10
"""Curvature eigenvalues below this fraction of the largest are treated as zero: unconstrained directions."""
SINGULAR_LOADING = 1e-3
"""A parameter takes part in an unconstrained direction when its share of that eigenvector exceeds this."""
FIT_ALPHA = 0.01
"""Level of the goodness-of-fit test: a log the family explains is called *not explained* with this probability
(the test's false-alarm rate, if its assumptions hold; measured in docs/BENCHMARKS.md)."""
BOX_FACE = 1e-3
"""An estimate within this fraction of its box width from a face of the family's box is flagged as on the face."""


@dataclass(frozen=True)
class IdentifyConfig:
    """Budget and shape of the search."""

    window: int = 5
    """Control steps per shooting segment (0.2 s on the cart-pole): short enough that a swinging pole's
    trajectory error stays a smooth function of the parameters."""
    max_segments: int = 64
    """At most this many segments, spread evenly over the episode (bounds the cost of one evaluation)."""
    population: int = 48
    """Candidates per CEM iteration."""
    elite_frac: float = 0.15
    """Fraction of each population the Gaussian is refit to."""
    iterations: int = 20
    """CEM iterations per restart."""
    restarts: int = 3
    """Independent CEM runs from random means; the best one is the answer."""
    init_std: float = 0.3
    """Initial standard deviation in unit-cube coordinates."""
    min_std: float = 0.002
    """Standard-deviation floor (unit cube) so the search never collapses before the last iteration."""
    refine_iterations: int = 10
    """Levenberg-Marquardt steps from the CEM answer to the cost's local minimum (0: none; the curvature
    and the intervals are then taken where CEM stopped, which may not be a minimum)."""
    fd_step: float = 1e-3
    """Finite-difference step of the residual Jacobian, as a fraction of each parameter's box width."""
    max_delay: int = 2
    """Largest command-to-effect delay tried, in control periods: the search runs once per delay 0..max_delay and
    the delay whose best fit is closest is the answer (docs/identify.md)."""
    delay: int | None = None
    """The delay, in control periods, when it is known (only it is tried); None: estimate it."""
    threads: int = 2
    """Threads of mujoco.rollout."""
    seed: int = 0
    """Seeds the restarts' starting points and the samples."""

    def check(self) -> None:
        for name in ("window", "max_segments", "population", "iterations", "restarts", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"identify: {name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.refine_iterations, int) or self.refine_iterations < 0:
            raise ValueError(f"identify: refine_iterations must be an integer >= 0, got {self.refine_iterations!r}")
        if not 0 < self.fd_step <= 0.05:
            raise ValueError(f"identify: fd_step must be in (0, 0.05] (a fraction of the box width), "
                             f"got {self.fd_step!r}")
        if not isinstance(self.max_delay, int) or not 0 <= self.max_delay <= 10:
            raise ValueError(f"identify: max_delay must be a whole number of control periods in [0, 10], got "
                             f"{self.max_delay!r}")
        if self.delay is not None and (not isinstance(self.delay, int) or not 0 <= self.delay <= 10):
            raise ValueError(f"identify: delay must be a whole number of control periods in [0, 10], got "
                             f"{self.delay!r}")
        if not 0 < self.elite_frac <= 1:
            raise ValueError(f"identify: elite_frac must be in (0, 1], got {self.elite_frac!r}")
        if round(self.population * self.elite_frac) < 2:
            raise ValueError(f"identify: population x elite_frac must leave at least 2 elites "
                             f"(population={self.population}, elite_frac={self.elite_frac})")


@dataclass
class ParamEstimate:
    """One parameter's answer."""

    name: str
    """Family parameter name."""
    kind: str
    """``dynamics`` or ``reward``."""
    value: float
    """Identified value (for a parameter that is not searched: the value written to the task file)."""
    std_error: float | None
    """Standard error in the parameter's units, from the curvature of the cost at the answer (delta method
    for log-space parameters; inf: unconstrained; None: not searched)."""
    std_error_independent: float | None
    """Diagnostic: the standard error if the residuals were independent (sigma^2 (J^T J)^-1 alone); the
    reported :attr:`std_error` is the larger of it and the segment-clustered one (docs/identify.md)."""
    interval: tuple[float, float] | None
    """95 % confidence interval (asymmetric for log-space parameters; not clipped to the box; None: not
    searched). Valid under the assumptions of docs/identify.md: a lower bound on the real uncertainty."""
    box_fraction: float | None
    """Width of the 95 % interval over the box width, in search coordinates (>= 0.5: not identified)."""
    search_spread: float | None
    """Diagnostic only: standard deviation of the best CEM restart's final elites (how far the search had
    contracted, not a statistical uncertainty; None: not searched)."""
    bounds: tuple[float, float]
    """The searched box (the family's train and test ranges together)."""
    identified: bool
    """False when the 95 % interval spans half the box or more, the curvature is singular, or not searched."""
    note: str = ""
    """Why it is not identified, or where its value came from."""
    true_value: float | None = None
    """The true value when the log recorded the task (e.g. a digital twin's hidden task)."""
    box_face: str | None = None
    """``lower``/``upper``: the estimate lies on that face of the family's box (the robot may lie beyond it);
    None: inside, or not searched."""


@dataclass
class FitTest:
    """Whether the identified task explains the log up to the sensor noise: a chi-square test of the residuals
    whitened by the covariance the noise gives them (docs/identify.md)."""

    verdict: str
    """``explained``, ``not explained`` (p below :attr:`alpha`) or ``untested`` (no sensor noise known)."""
    p_value: float | None
    """Probability of a chi-square at least this large if the family (with the answer) and the noise explained
    the log (None: untested)."""
    chi2: float | None
    """Sum of the whitened squared residuals (expected about :attr:`dof` when explained)."""
    dof: int
    """Degrees of freedom: residual entries minus searched parameters."""
    alpha: float
    """The test's level."""
    noise_std: dict[str, float] | None
    """Per observation field, the sensor noise standard deviation tested against, in the field's units."""
    noise_source: str
    """Where the noise came from: ``--noise-std``, ``the log's robot.yaml``, ``the installed robot.yaml``, or
    ``none``."""
    field_ratio: dict[str, float] = field(default_factory=dict)
    """Per field, mean squared residual over the variance the noise gives it (about 1 where the noise explains
    it; much more where the misfit is)."""
    misfit_fields: list[str] = field(default_factory=list)
    """The fields whose residuals the noise does not explain (each tested at ``alpha`` / fields)."""

    def line(self) -> str:
        """One line for the terminal."""
        if self.verdict == "untested":
            return ("fit: UNTESTED: no sensor noise for every field (robot.yaml observation noise_std, or "
                    "--noise-std); the intervals below assume the model is exact")
        if self.chi2 is None:
            return "fit: NOT EXPLAINED by this family: the simulation of the answer diverged (non-finite residuals)"
        ratios = ", ".join(f"{k} {v:.3g}" for k, v in self.field_ratio.items())
        head = (f"fit: {self.verdict.upper()} by this family (chi-square {self.chi2:.4g} on {self.dof} degrees of "
                f"freedom, p = {self.p_value:.3g}, level {self.alpha:g}; noise from {self.noise_source})")
        where = f"; misfit in {', '.join(self.misfit_fields)}" if self.misfit_fields else ""
        return f"{head}{where}\n     residual / noise variance per field: {ratios}"


@dataclass
class IdentifyResult:
    """What :func:`identify` found."""

    family: str
    """Family name."""
    episode: str
    """Path of the episode log."""
    task: dict[str, float]
    """The full task (every family parameter): the answer, ready for ``sim-robot --task``."""
    params: list[ParamEstimate]
    """Per-parameter answers, in family order."""
    cost: float
    """Residual: mean squared trajectory error of the answer, in robot.yaml scale units squared."""
    search_cost: float
    """The same at the best CEM answer, before the Levenberg-Marquardt refinement."""
    nominal_cost: float
    """Same for the family's nominal task (how much identification explained)."""
    noise_std: float
    """Estimated residual noise sigma = sqrt(SSR / (N - p)) in scale units (at least :data:`NOISE_FLOOR`)."""
    residual_count: int
    """N: residual entries (segments x window x observation entries)."""
    correlation: dict[str, dict[str, float]]
    """Correlation of the searched parameters' estimates (search coordinates): near +-1 marks a trade-off."""
    rms_per_field: dict[str, float]
    """Residual RMS error per observation field, in the field's units."""
    restart_costs: list[float]
    """Best cost of each restart."""
    segments: int
    """Shooting segments used."""
    transitions: int
    """Valid transitions in the log (of ``steps`` - 1)."""
    steps: int
    """Steps in the log."""
    evaluations: int
    """Candidate parameter vectors simulated."""
    seconds: float
    """Wall time of the search."""
    config: dict[str, Any] = field(default_factory=dict)
    """The :class:`IdentifyConfig` used."""
    true_task: dict[str, float] | None = None
    """The task recorded in the log, if any."""
    fit: FitTest | None = None
    """Whether the answer explains the log up to the sensor noise."""
    delay: int = 0
    """Command-to-effect delay of the answer, in control periods: on top of what ``applied_command_seq`` shows,
    the motors ran each command this many periods after the log says (a driver's latency the robot does not
    report)."""
    delay_costs: dict[int, float] = field(default_factory=dict)
    """The best residual (scale units squared) with each delay tried: the delay is the one with the least."""
    delay_given: bool = False
    """True: the delay was given (``IdentifyConfig.delay``), not estimated."""

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("params", "fit")}
        out["params"] = [dict(p.__dict__, bounds=list(p.bounds), interval=None if p.interval is None
                              else list(p.interval)) for p in self.params]
        out["fit"] = None if self.fit is None else dict(self.fit.__dict__)
        return out

    def summary(self) -> str:
        """A few lines for the terminal."""
        lines = [f"{self.family}: {self.transitions} of {self.steps - 1} transitions usable, {self.segments} "
                 f"segments; {self.evaluations} candidates in {self.seconds:.1f} s",
                 f"residual {self.cost:.3g} (nominal task {self.nominal_cost:.3g}) scale units^2, noise estimate "
                 f"sigma {self.noise_std:.3g}; RMS per field: "
                 + ", ".join(f"{k} {v:.3g}" for k, v in self.rms_per_field.items())]
        if self.delay_given:
            lines.append(f"command-to-effect delay: {self.delay} period(s), as given")
        elif len(self.delay_costs) > 1:
            lines.append(f"command-to-effect delay: {self.delay} period(s) (best residual per delay: "
                         + ", ".join(f"{k}: {v:.3g}" for k, v in self.delay_costs.items()) + ")")
        if self.fit is not None:
            lines.append(self.fit.line())
        lines.append(f"  {'parameter':<20}{'value':>10}{'std err':>10}  {'95% interval':<21}{'true':>8}  status")
        for p in self.params:
            lines.append(f"  {p.name:<20}{p.value:>10.4g}" + _interval_columns(p)
                         + ("" if p.true_value is None else f"{p.true_value:>8.4g}").rjust(8)
                         + f"  {'identified' if p.identified else 'NOT identified: ' + p.note}")
        if self.fit is not None and self.fit.verdict == "not explained":
            lines.append("  (no intervals: the family does not explain the log, so the curvature says nothing about "
                         "the robot's parameters; docs/identify.md)")
        else:
            lines.append("  (95% interval from the cost's curvature: Gaussian sensor noise, an exact model, locally "
                         "linear; no allowance for model error, docs/identify.md)")
        return "\n".join(lines)


def _interval_columns(p: ParamEstimate) -> str:
    """The std-error and interval cells of a summary row (blank for a parameter that was not searched)."""
    if p.std_error is None or p.interval is None:
        return f"{'':>10}  {'':<21}"
    if not np.isfinite(p.std_error):
        return f"{'inf':>10}  {'unconstrained':<21}"
    return f"{p.std_error:>10.2g}  {f'[{p.interval[0]:.4g}, {p.interval[1]:.4g}]':<21}"


# ---- the problem: segments of the log and their simulation ----------------------------------------------
class _ShootingProblem:
    """The log's segments, and a batched simulator of them under many candidate tasks."""

    def __init__(self, episode: Episode, family: TaskFamily, config: IdentifyConfig, pool: int) -> None:
        robot = episode.robot
        if family.spec.robot != robot.name:
            raise ValueError(f"--family {family.name!r} is for robot {family.spec.robot!r}, but the episode was "
                             f"logged on robot {robot.name!r}")
        # The log holds the spec without its MJCF; the installed robot must have the same interface.
        sim_robot = load_robot(robot.name)
        if sim_robot.interface_hash != robot.interface_hash:
            raise ValueError(f"{episode.path}: the logged robot {robot.name!r} has interface hash "
                             f"{robot.interface_hash[:12]}, the installed sim/robots/{robot.name} has "
                             f"{sim_robot.interface_hash[:12]}: the sim would not match the log's robot")
        robot = sim_robot
        self.family, self.robot, self.config = family, robot, config
        base = load_model(robot)
        self.substeps = robot.control.substeps
        obs_map = ObservationMap(robot, base)
        _check_full_state(obs_map.measured, base, robot.name)
        self._obs_of_state = _obs_of_state(obs_map.measured, base.nq + base.nv)
        self._ctrl_ids = np.array([base.actuator(a).id for a in robot.actuators])
        self.nq, self.nv, self.nu = base.nq, base.nv, base.nu
        self.scale = robot.obs_scale

        controls, valid = _transitions(episode)
        self.transitions = int(valid.sum())
        if valid.any() and np.all(controls[valid] == controls[valid][0]):
            raise ValueError(f"{episode.path}: every usable period ran the same command "
                             f"({controls[valid][0].tolist()}): the actuators' parameters leave no trace in such a "
                             "log; record an episode in which the robot is driven (the node swinging up, or a chirp "
                             "of commands)")
        # Every delay tried is fitted to the same segments: each starts `lead` usable periods into its run, so the
        # commands sent up to `lead` periods before it are known.
        lead = config.max_delay if config.delay is None else config.delay
        starts = _segment_starts(valid, config.window, config.max_segments, lead)
        if len(starts) == 0:
            raise ValueError(f"{episode.path}: no run of {config.window + lead} consecutive usable transitions "
                             f"({self.transitions} usable of {episode.num_steps - 1}; a segment is --window "
                             f"{config.window} steps after the --max-delay {lead} before it); record a longer "
                             "episode without lost frames, or use a smaller --window or --max-delay")
        w = config.window
        self.starts = starts
        self.target = np.stack([episode.obs[s + 1:s + 1 + w] for s in starts])  # (S, W, obs)
        self._base = base
        self.start_obs = np.stack([episode.obs[s] for s in starts])  # (S, obs): the logged states segments start at
        self.initial = self._states(self.start_obs)  # (S, nstate)
        self._controls = controls
        self.use_delay(0)
        self.measured = obs_map.measured

        # One model per candidate of a population, each with its own applier (the applier changes its model).
        self.models = [load_model(robot) for _ in range(pool)]
        self.appliers = [DynamicsApplier(m, family) for m in self.models]
        self.datas = [mujoco.MjData(self.models[0]) for _ in range(config.threads)]
        self.evaluations = 0

    def use_delay(self, delay: int) -> None:
        """Simulate period k with the command applied ``delay`` periods earlier (a delay inside the robot that its
        ``applied_command_seq`` does not show)."""
        ctrl = np.zeros((len(self.starts), self.config.window, self.nu))
        ctrl[..., self._ctrl_ids] = np.stack([self._controls[s - delay:s - delay + self.config.window]
                                              for s in self.starts])
        self.ctrl = np.repeat(ctrl, self.substeps, axis=1)  # zero-order hold over the substeps
        self.delay = delay

    def _states(self, obs: np.ndarray) -> np.ndarray:
        """(rows, nstate) full MuJoCo states set from observations (rows, obs) through the observation map."""
        scratch = mujoco.MjData(self._base)
        states = np.empty((len(obs), mujoco.mj_stateSize(self._base, STATE)))
        for i, row in enumerate(obs):
            mujoco.mj_resetData(self._base, scratch)
            full = row[self._obs_of_state]
            scratch.qpos[:], scratch.qvel[:] = full[:self.nq], full[self.nq:]
            mujoco.mj_getState(self._base, scratch, states[i], STATE)
        return states

    def initial_jacobian(self, task: dict[str, float], step: float = 1e-4) -> np.ndarray:
        """(S, W x obs, obs): how every segment's simulated observations (scale units) move with its logged start
        observation (scale units), by central differences under ``task``: the way sensor noise in the state a
        segment starts from propagates into all its residuals."""
        n_seg, obs_dim = self.start_obs.shape
        columns = []
        for j in range(obs_dim):
            shift = np.zeros(obs_dim)
            shift[j] = step * self.scale[j]
            ends = [self.simulate([task], self._states(self.start_obs + sign * shift))[0] for sign in (1.0, -1.0)]
            columns.append(((ends[0] - ends[1]) / self.scale / (2 * step)).reshape(n_seg, -1))
        return np.stack(columns, axis=-1)

    def simulate(self, tasks: list[dict[str, float]], initial: np.ndarray | None = None) -> np.ndarray:
        """(len(tasks), S, W, obs_dim) simulated observations of every segment under each task (from the logged
        start states, or from ``initial`` (S, nstate))."""
        if len(tasks) > len(self.models):
            raise ValueError(f"at most {len(self.models)} tasks per call, got {len(tasks)}")
        n_seg = len(self.starts)
        for applier, task in zip(self.appliers, tasks, strict=False):
            applier.apply(task)
        models = [self.models[i] for i in range(len(tasks)) for _ in range(n_seg)]
        initial = np.tile(self.initial if initial is None else initial, (len(tasks), 1))
        ctrl = np.tile(self.ctrl, (len(tasks), 1, 1))
        states, sensors = mj_rollout.rollout(models, self.datas, initial, ctrl)
        at_control = slice(self.substeps - 1, None, self.substeps)
        qpos = states[:, at_control, 1:1 + self.nq]
        qvel = states[:, at_control, 1 + self.nq:1 + self.nq + self.nv]
        full = np.concatenate([qpos, qvel, sensors[:, at_control]], axis=-1)[..., self.measured]
        self.evaluations += len(tasks)
        return full.reshape(len(tasks), n_seg, self.config.window, -1)

    def residuals(self, tasks: list[dict[str, float]]) -> np.ndarray:
        """(len(tasks), N) simulated minus logged observations in scale units, every segment, step and entry."""
        out = np.empty((len(tasks), self.target.size))
        pool = len(self.models)
        for lo in range(0, len(tasks), pool):
            sim = self.simulate(tasks[lo:lo + pool])
            out[lo:lo + pool] = ((sim - self.target[None]) / self.scale).reshape(len(sim), -1)
        return out

    def costs(self, tasks: list[dict[str, float]]) -> np.ndarray:
        """Mean squared error in scale units per task (NaN-free: a diverged simulation costs +inf)."""
        c = (self.residuals(tasks) ** 2).mean(axis=1)
        return np.where(np.isfinite(c), c, np.inf)

    def rms_per_field(self, task: dict[str, float]) -> dict[str, float]:
        err = (self.simulate([task])[0] - self.target) ** 2
        return {name: float(np.sqrt(err[..., sl].mean())) for name, sl in self.robot.obs_slices.items()}



def _check_full_state(measured: np.ndarray, model: mujoco.MjModel, robot: str) -> None:
    """Fails unless the observation measures every qpos and qvel entry (the sim is reset to logged states)."""
    need = model.nq + model.nv
    covered = set(int(i) for i in measured if i < need)
    missing = sorted(set(range(need)) - covered)
    if missing:
        raise ValueError(f"robot {robot!r}: the observation does not measure the full state (qpos/qvel entries "
                         f"{missing} of {need} are not observed), so the sim cannot be reset to a logged state; "
                         "identification needs every joint position and velocity in robot.yaml's observation")


def _transitions(episode: Episode) -> tuple[np.ndarray, np.ndarray]:
    """Per step k: the control applied during period k (N, action_dim) and whether k -> k+1 is usable (N,)."""
    n = episode.num_steps
    robot = episode.robot
    controls = np.array(episode.command, dtype=np.float64, copy=True)
    valid = np.zeros(n, dtype=bool)
    if n < 2:
        return controls, valid
    consecutive = np.diff(episode.state_seq) == 1
    # The command that ran during period k is the one frame k + 1 names (a late one included: the period is
    # paired with it, not discarded); a log without applied_command_seq (-1): trust that the step's command ran.
    applied, known = episode.applied_commands()
    unknown = episode.applied_command_seq[1:] == -1
    sent = episode.command_source[:-1] != "none"
    controls[:-1] = applied[1:]
    valid[:-1] = consecutive & (known[1:] | (unknown & sent))
    finite = np.isfinite(controls).all(axis=1) & np.isfinite(episode.obs).all(axis=1)
    valid[:-1] &= finite[:-1] & finite[1:]
    valid[-1] = False
    # What reached the motors: clipped to the action box, then rate limited from the previous period's
    # command (the safety layer and the env/twin do both; on commands that already obey them, a no-op).
    max_step = robot.action_max_rate * robot.ctrl_dt
    last = robot.safe_action.astype(np.float64)
    for k in range(n):
        wanted = controls[k] if np.isfinite(controls[k]).all() else robot.safe_action
        wanted = np.clip(wanted, robot.action_low, robot.action_high)
        last = np.clip(wanted, last - max_step, last + max_step)
        controls[k] = last
    return controls, valid


def _segment_starts(valid: np.ndarray, window: int, max_segments: int, lead: int = 0) -> np.ndarray:
    """Starts of non-overlapping segments of ``window`` usable transitions, each after ``lead`` more usable ones
    (whose commands a delayed simulation needs), thinned evenly to ``max_segments``."""
    starts, k, n = [], 0, len(valid)
    while k + lead + window <= n:
        run = valid[k:k + lead + window]
        if run.all():
            starts.append(k + lead)
            k += window
        else:
            k += int(np.nonzero(~run)[0][-1]) + 1
    starts_arr = np.array(starts, dtype=np.int64)
    if len(starts_arr) > max_segments:
        starts_arr = starts_arr[np.linspace(0, len(starts_arr) - 1, max_segments).round().astype(int)]
    return starts_arr


# ---- the search ---------------------------------------------------------------------------------------------
def identify(episode: str | Path | Episode, family: str | TaskFamily, config: IdentifyConfig | None = None,
             progress: bool = False, noise_std: float | Mapping[str, float] | None = None) -> IdentifyResult:
    """Identify ``family``'s dynamics parameters from a logged ``episode`` (a path or a read Episode) and test
    whether they explain it. ``noise_std``: the sensor noise the test compares with, one standard deviation in
    robot.yaml scale units for every field, or field name → standard deviation in the field's units (None: each
    observation field's ``noise_std`` from the log's robot.yaml, else the installed one's; untested without)."""
    config = config or IdentifyConfig()
    config.check()
    t0 = time.monotonic()
    ep = episode if isinstance(episode, Episode) else read_episode(episode)
    fam = family if isinstance(family, TaskFamily) else load_family(family)
    problem = _ShootingProblem(ep, fam, config, pool=config.population)
    noise = _sensor_noise(noise_std, ep, problem.robot)  # before the search: a bad --noise-std fails at once

    delay_param = getattr(problem.appliers[0], "delay_param", None)
    searched = [n for n in fam.dynamics_names if n != delay_param]
    base_task = fam.nominal()
    notes: dict[str, str] = {}
    for name in fam.reward_names:
        logged = ep.task_params.get(name)
        if logged is not None and len(logged) and np.isfinite(logged).all() and np.ptp(logged) == 0:
            base_task[name] = float(logged[0])
            notes[name] = "reward parameter (no effect on dynamics): the value the node logged"
        else:
            notes[name] = "reward parameter (no effect on dynamics): family nominal"

    box = ParamBox(fam, searched, "bounds")
    d = len(searched)
    rng = np.random.default_rng(config.seed)

    def tasks_of(units: np.ndarray) -> list[dict[str, float]]:
        values = box.to_values(units)
        out = []
        for row in values:
            task = dict(base_task)
            task.update({n: float(v) for n, v in zip(searched, row, strict=True)})
            out.append(task)
        return out

    delays = [config.delay] if config.delay is not None else list(range(config.max_delay + 1))
    bar = tqdm(total=config.restarts * config.iterations * len(delays), desc="identify", unit="it", leave=False,
               disable=None if progress else True)
    fits = {}
    try:
        for delay_periods in delays:  # the same segments, the commands shifted by the delay
            problem.use_delay(delay_periods)
            fits[delay_periods] = _search(problem, tasks_of, base_task, d, config, rng, bar, progress)
    finally:
        bar.close()
    delay_costs = {k: fit[0] for k, fit in fits.items()}
    chosen = min(delays, key=delay_costs.get)  # a diverged fit costs +inf (never NaN)
    problem.use_delay(chosen)
    best_cost, best_u, jac, resid, search_cost, restart_best, best_elites = fits[chosen]
    elite_values = box.to_values(best_elites)
    best_values = box.to_values(best_u)
    answer = tasks_of(best_u[None])[0]
    cov_unit, cov_independent, noise_var = _covariance(jac, resid, len(problem.starts))
    sd_unit = np.sqrt(np.diag(cov_unit))
    sd_independent = np.sqrt(np.diag(cov_independent))
    nominal_cost = float(problem.costs([base_task])[0])
    true_task = {k: float(v) for k, v in ep.task.items()} if ep.task else None
    fit = _fit_test(problem, answer, resid, d, noise)
    failed = fit.verdict == "not explained"
    if delay_param is not None:  # the family models the delay: the one found is its value
        answer[delay_param] = float(chosen)
        notes[delay_param] = (f"the delay given (--delay {chosen})" if config.delay is not None else
                              "estimated: the delay whose fit is closest (delay_costs)")

    estimates = []
    for p in fam.params:
        true_value = None if true_task is None else true_task.get(p.name)
        if p.name not in searched:
            estimated = p.name == delay_param and config.delay is None and not failed
            estimates.append(ParamEstimate(name=p.name, kind=p.kind, value=float(answer[p.name]), std_error=None,
                                           std_error_independent=None, interval=None, box_fraction=None,
                                           search_spread=None, bounds=p.bounds, identified=estimated,
                                           note="" if estimated else notes.get(p.name, "not searched"),
                                           true_value=true_value))
            continue
        i = searched.index(p.name)
        width = box.hi[i] - box.lo[i]
        x = box.lo[i] + best_u[i] * width  # search coordinate: the value, or its log
        sd_x = sd_unit[i] * width
        lo_x, hi_x = x - Z95 * sd_x, x + Z95 * sd_x
        per_x = best_values[i] if box.log[i] else 1.0  # d value / d log(value) = value
        std_error, std_error_independent = float(sd_x * per_x), float(sd_independent[i] * width * per_x)
        interval = (float(np.exp(lo_x)), float(np.exp(hi_x))) if box.log[i] else (float(lo_x), float(hi_x))
        fraction = float(2 * Z95 * sd_unit[i])
        face = "lower" if best_u[i] <= BOX_FACE else "upper" if best_u[i] >= 1.0 - BOX_FACE else None
        if failed:
            note = f"the family does not explain the log (fit p = {fit.p_value:.2g}): no interval"
            std_error = std_error_independent = interval = fraction = None
        elif face is not None:
            note = f"on the {face} face of the family's box: the robot may lie beyond it"
        elif not np.isfinite(sd_unit[i]):
            note = "singular curvature: the data does not constrain it"
        elif fraction >= IDENTIFIED_MAX_BOX_FRACTION:
            note = f"95% interval spans {fraction:.0%} of its box: the data hardly constrains it"
        else:
            note = ""
        estimates.append(ParamEstimate(
            name=p.name, kind=p.kind, value=float(best_values[i]), std_error=std_error,
            std_error_independent=std_error_independent, interval=interval,
            box_fraction=fraction, search_spread=float(elite_values[:, i].std()), bounds=p.bounds,
            identified=not note, note=note, true_value=true_value, box_face=face))
    correlation: dict[str, dict[str, float]] = {}
    for i, a in enumerate(searched):
        correlation[a] = {}
        for j, b in enumerate(searched):
            denom = sd_independent[i] * sd_independent[j]
            finite = np.isfinite(denom) and denom > 0
            correlation[a][b] = float(cov_independent[i, j] / denom) if finite else float("nan")
    return IdentifyResult(
        family=fam.name, episode=str(ep.path), task=answer, params=estimates, cost=best_cost,
        search_cost=search_cost, nominal_cost=nominal_cost, noise_std=float(np.sqrt(noise_var)),
        residual_count=int(resid.size), correlation=correlation, rms_per_field=problem.rms_per_field(answer),
        restart_costs=[b[0] for b in restart_best], segments=len(problem.starts), transitions=problem.transitions,
        steps=ep.num_steps, evaluations=problem.evaluations, seconds=round(time.monotonic() - t0, 3),
        config=dict(config.__dict__), true_task=true_task, fit=fit, delay=chosen,
        delay_costs={k: float(v) for k, v in delay_costs.items()}, delay_given=config.delay is not None)


def _search(problem: _ShootingProblem, tasks_of: Callable[[np.ndarray], list[dict[str, float]]],
            base_task: dict[str, float], d: int, config: IdentifyConfig, rng: np.random.Generator, bar: Any,
            progress: bool) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, float, list, np.ndarray]:
    """CEM restarts, then the refinement, with the problem's current delay: (cost, answer in unit coordinates,
    residual Jacobian, residuals, CEM's best cost, each restart's (cost, point, elites), the best's elites)."""
    n_elite = max(2, round(config.population * config.elite_frac))
    restart_best: list[tuple[float, np.ndarray, np.ndarray]] = []
    for r in range(config.restarts):
        mean = rng.uniform(0.15, 0.85, d)
        std = np.full(d, config.init_std)
        best_cost, best_u = np.inf, mean.copy()
        elites = mean[None]
        for _ in range(config.iterations):
            u = np.clip(mean + std * rng.standard_normal((config.population, d)), 0.0, 1.0)
            u[0] = best_u if np.isfinite(best_cost) else mean  # keep the incumbent (elitism)
            c = problem.costs(tasks_of(u))
            order = np.argsort(c)
            elites = u[order[:n_elite]]
            if c[order[0]] < best_cost:
                best_cost, best_u = float(c[order[0]]), u[order[0]].copy()
            mean, std = elites.mean(axis=0), np.maximum(elites.std(axis=0), config.min_std)
            bar.update()
            bar.set_postfix_str(f"delay {problem.delay}, restart {r + 1}/{config.restarts}, best residual "
                                f"{best_cost:.3g}")
        restart_best.append((best_cost, best_u, elites))
        if progress and not sys.stderr.isatty():  # no bar in a log file: one line per restart
            print(f"identify: delay {problem.delay}, restart {r + 1}/{config.restarts}: best residual "
                  f"{best_cost:.4g} after {config.iterations} iterations", file=sys.stderr, flush=True)
    search_cost, search_u, best_elites = min(restart_best, key=lambda t: t[0])
    if d:
        best_u, jac, resid = _refine(problem, tasks_of, search_u, config)
    else:
        best_u, jac, resid = search_u, np.zeros((problem.target.size, 0)), problem.residuals([base_task])[0]
    cost = float(np.mean(resid ** 2)) if np.isfinite(resid).all() else np.inf  # a diverged simulation
    return cost, best_u, jac, resid, search_cost, restart_best, best_elites


# ---- the goodness-of-fit test ------------------------------------------------------------------------------
def _sensor_noise(given: float | Mapping[str, float] | None, episode: Episode, robot: RobotSpec
                  ) -> tuple[dict[str, float] | None, str]:
    """Per measured field, the sensor noise standard deviation in its units, and where it came from."""
    fields = robot.measured_fields
    if given is not None:
        if isinstance(given, Mapping):
            unknown = sorted(set(given) - {f.name for f in fields})
            if unknown:
                raise ValueError(f"--noise-std {unknown[0]}: not an observation field of {robot.name}; the fields "
                                 f"are {', '.join(f.name for f in fields)}")
            missing = [f.name for f in fields if f.name not in given]
            if missing:
                raise ValueError(f"--noise-std: give every observation field of {robot.name} (missing "
                                 f"{', '.join(missing)}), or one value in scale units for all")
            noise = {f.name: float(given[f.name]) for f in fields}
        else:
            noise = {f.name: float(given) * f.scale for f in fields}
        bad = {k: v for k, v in noise.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            name = next(iter(bad))
            raise ValueError(f"--noise-std {name}: a standard deviation >= 0, got {bad[name]}")
        return noise, "--noise-std"
    for spec, source in ((episode.robot, "the log's robot.yaml"), (robot, "the installed robot.yaml")):
        by_name = {f.name: f.noise_std for f in spec.measured_fields}
        if all(by_name.get(f.name) is not None for f in fields):
            return {f.name: float(by_name[f.name]) for f in fields}, source
    return None, "none"


def chi2_survival(x: float, dof: int) -> float:
    """P(chi-square with ``dof`` degrees of freedom >= ``x``), Wilson-Hilferty's normal approximation (relative
    error well under 1 % of the tail probability for the hundreds of degrees of freedom a log gives)."""
    if dof < 1:
        return float("nan")
    if x <= 0:
        return 1.0
    h = 2.0 / (9.0 * dof)
    z = ((x / dof) ** (1.0 / 3.0) - (1.0 - h)) / math.sqrt(h)
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def _fit_test(problem: _ShootingProblem, answer: dict[str, float], resid: np.ndarray, searched: int,
              noise: tuple[dict[str, float] | None, str]) -> FitTest:
    """The chi-square test of the answer's residuals against the sensor noise (docs/identify.md)."""
    per_field, source = noise
    dof = max(int(resid.size) - searched, 1)
    if per_field is None or not np.isfinite(resid).all():
        verdict = "untested" if per_field is None else "not explained"
        p_value = None if per_field is None else 0.0
        return FitTest(verdict, p_value, None, dof, FIT_ALPHA, per_field, source)
    # Per observation entry, the noise in scale units (floored: a noise-free log still leaves the search's precision).
    slices = problem.robot.obs_slices
    sigma = np.empty(problem.scale.size)
    for name, sl in slices.items():
        sigma[sl] = per_field[name]
    sigma = np.maximum(sigma / problem.scale, FIT_NOISE_FLOOR)
    n_seg, window, obs_dim = problem.target.shape
    r = resid.reshape(n_seg, window * obs_dim)
    # A segment's residuals: its start's noise carried through the simulation, minus each logged sample's noise.
    j0 = problem.initial_jacobian(answer)
    cov = np.einsum("sik,k,sjk->sij", j0, sigma ** 2, j0) + np.diag(np.tile(sigma ** 2, window))[None]
    chi2 = float(sum(r[s] @ np.linalg.solve(cov[s], r[s]) for s in range(n_seg)))
    p_value = chi2_survival(chi2, dof)
    # Which fields carry the misfit: each entry against its own variance.
    z2 = (r ** 2 / np.diagonal(cov, axis1=1, axis2=2)).reshape(n_seg, window, obs_dim)
    ratio, misfit = {}, []
    for name, sl in slices.items():
        block = z2[..., sl]
        ratio[name] = float(block.mean())
        if chi2_survival(float(block.sum()), block.size) < FIT_ALPHA / len(slices):
            misfit.append(name)
    verdict = "explained" if p_value >= FIT_ALPHA else "not explained"
    return FitTest(verdict, p_value, chi2, dof, FIT_ALPHA, per_field, source, ratio, misfit)


# ---- the answer's neighbourhood: refinement and curvature --------------------------------------------------
def _jacobian(problem: _ShootingProblem, tasks_of: Callable[[np.ndarray], list[dict[str, float]]], u: np.ndarray,
              step: float) -> tuple[np.ndarray, np.ndarray]:
    """Residuals at ``u`` (N,) and their Jacobian (N, d) in unit-cube coordinates, by central differences
    (one-sided at a face of the box), all in one batched simulation."""
    d = len(u)
    lo, hi = np.clip(u - step, 0.0, 1.0), np.clip(u + step, 0.0, 1.0)
    points = [u]
    for i in range(d):
        for end in (lo, hi):
            v = u.copy()
            v[i] = end[i]
            points.append(v)
    r = problem.residuals(tasks_of(np.array(points)))
    jac = np.stack([(r[2 + 2 * i] - r[1 + 2 * i]) / (hi[i] - lo[i]) for i in range(d)], axis=1)
    return r[0], jac


LM_DAMPINGS = np.array([1e-6, 1e-4, 1e-2, 1.0, 1e2])
"""Marquardt dampings tried in one batch per refinement step (relative to the curvature's diagonal)."""


def _refine(problem: _ShootingProblem, tasks_of: Callable[[np.ndarray], list[dict[str, float]]], u: np.ndarray,
            config: IdentifyConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Levenberg-Marquardt from ``u`` inside the unit cube; returns the point, its Jacobian and residuals.

    Each step solves (J^T J + mu diag(J^T J)) du = -J^T r for several dampings mu at once and keeps the
    best trial if it lowers the cost; it stops when no trial does (a local minimum, or a face of the box)."""
    r, jac = _jacobian(problem, tasks_of, u, config.fd_step)
    cost = float(np.mean(r ** 2)) if np.isfinite(r).all() else np.inf
    for _ in range(config.refine_iterations):
        if not (np.isfinite(jac).all() and np.isfinite(cost)):
            break
        a, g = jac.T @ jac, jac.T @ r
        scale = np.diag(a) + 1e-12 * max(float(np.max(np.diag(a))), 1e-300)
        trials = []
        for mu in LM_DAMPINGS:
            try:
                trials.append(np.clip(u - np.linalg.solve(a + mu * np.diag(scale), g), 0.0, 1.0))
            except np.linalg.LinAlgError:
                continue
        if not trials:
            break
        trial_costs = problem.costs(tasks_of(np.array(trials)))
        k = int(np.argmin(trial_costs))
        if not trial_costs[k] < cost * (1 - 1e-9):
            break
        u = trials[k]
        r, jac = _jacobian(problem, tasks_of, u, config.fd_step)
        cost = float(np.mean(r ** 2))
    return u, jac, r


def _covariance(jac: np.ndarray, resid: np.ndarray, segments: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The estimate's covariance in unit-cube coordinates: (reported, independent-residual, noise variance).

    Independent residuals: the cost is the Gaussian negative log-likelihood of the residuals with one
    variance, estimated as sigma^2 = SSR / (N - p) (at least :data:`NOISE_FLOOR` squared), and the
    covariance is sigma^2 (J^T J)^-1. The residuals of one segment are correlated (they share its logged,
    noisy initial state), which makes that optimistic; the segment-clustered sandwich
    (J^T J)^-1 [sum_s g_s g_s^T] (J^T J)^-1 S / (S - p), g_s = J_s^T r_s, allows any correlation inside a
    segment. The reported variance of each parameter is the larger of the two (the sandwich is noisy with
    few segments and is skipped below 2p + 2 of them); correlations are the independent-residual ones.
    Directions of (numerically) zero curvature are unconstrained: every parameter that takes part in one
    gets infinite variance and covariance."""
    n, p = jac.shape
    noise_var = max(float(resid @ resid) / max(n - p, 1), NOISE_FLOOR ** 2)
    if p == 0:
        return np.zeros((0, 0)), np.zeros((0, 0)), noise_var
    curvature = jac.T @ jac
    if not np.isfinite(curvature).all():
        return np.full((p, p), np.inf), np.full((p, p), np.inf), noise_var
    eigval, eigvec = np.linalg.eigh(curvature)
    top = float(eigval.max())
    zero = eigval <= SINGULAR_RTOL * top if top > 0 else np.ones(p, dtype=bool)
    keep = eigvec[:, ~zero]
    inverse = (keep / eigval[~zero]) @ keep.T  # (J^T J)^-1 on the constrained directions
    independent = noise_var * inverse
    reported = independent.copy()
    if segments >= 2 * p + 2 and n % segments == 0:
        scores = np.einsum("snp,sn->sp", jac.reshape(segments, -1, p), resid.reshape(segments, -1))
        clustered = inverse @ (scores.T @ scores) @ inverse * segments / (segments - p)
        wider = np.sqrt(np.maximum(np.diag(clustered), np.diag(independent)) / np.maximum(np.diag(independent), 1e-300))
        reported = independent * np.outer(wider, wider)  # the independent correlations, the wider variances
    free = (np.abs(eigvec[:, zero]) > SINGULAR_LOADING).any(axis=1)
    for cov in (reported, independent):
        cov[free, :] = np.inf
        cov[:, free] = np.inf
    return reported, independent, noise_var


def _obs_of_state(measured: np.ndarray, need: int) -> np.ndarray:
    """For each state index 0..need-1, the observation index that measures it."""
    where = {int(s): j for j, s in enumerate(measured)}
    return np.array([where[i] for i in range(need)])


# ---- output -------------------------------------------------------------------------------------------------
def write_task_file(result: IdentifyResult, path: str | Path) -> Path:
    """Write ``{family, task, identification}`` YAML: ``metarl sim-robot --task PATH`` reads its ``task``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "family": result.family,
        "task": {k: float(v) for k, v in result.task.items()},
        "identification": {
            "episode": result.episode,
            "residual": float(result.cost),
            "nominal_residual": float(result.nominal_cost),
            "noise_std": float(result.noise_std),
            "fit": None if result.fit is None else {"verdict": result.fit.verdict, "p_value": result.fit.p_value,
                                                    "misfit_fields": list(result.fit.misfit_fields),
                                                    "noise_source": result.fit.noise_source},
            "params": {p.name: {"std_error": p.std_error,
                                "interval_95": None if p.interval is None else [float(v) for v in p.interval],
                                "identified": p.identified, **({"note": p.note} if p.note else {}),
                                **({"box_face": p.box_face} if p.box_face else {})}
                       for p in result.params},
        },
    }
    header = ("# Identified by `metarl identify` (docs/identify.md). Reproduce the episode in sim with\n"
              f"#   metarl sim-robot --family {result.family} --task {path}\n")
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return path


def load_task_file(path: str | Path, family: TaskFamily) -> dict[str, float]:
    """The validated task of a file written by :func:`write_task_file` (or any ``{task: {...}}`` / mapping)."""
    data = parse_yaml(Path(path).read_text(), str(path))
    if isinstance(data, Mapping) and isinstance(data.get("task"), Mapping):
        data = data["task"]
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping of parameter -> value or {{task: {{...}}}}")
    return family.validate(data)


def parse_noise_std(values: list[str] | None) -> float | dict[str, float] | None:
    """``--noise-std``: None, one number (scale units, every field) or ``FIELD=STD`` items (field units)."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        return _number("--noise-std", values[0])
    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--noise-std {item!r}: give one number for every field (scale units) or FIELD=STD "
                             "for each field")
        out[name.strip()] = _number(f"--noise-std {name}", value)
    return out


def _number(what: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{what}: expected a number, got {text!r}") from None


def identify_to_dir(episode: str | Path, family: str, out_dir: str | Path, config: IdentifyConfig | None = None,
                    progress: bool = False, noise_std: float | Mapping[str, float] | None = None
                    ) -> tuple[IdentifyResult, Path, Path]:
    """Run :func:`identify`, write ``task.yaml`` and ``identify.json`` into ``out_dir``; return all three."""
    import json

    result = identify(episode, family, config, progress=progress, noise_std=noise_std)
    out = Path(out_dir)
    task_path = write_task_file(result, out / "task.yaml")
    json_path = out / "identify.json"
    json_path.write_text(json.dumps(_finite_or_null(result.to_dict()), indent=2, default=float, allow_nan=False))
    return result, task_path, json_path


def _finite_or_null(value: Any) -> Any:
    """``value`` with every inf/NaN float as None: strict JSON (an unconstrained parameter's standard error,
    its interval's box fraction, undefined correlations; the parameter's ``note`` says why)."""
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(v) for v in value]
    if isinstance(value, float | np.floating) and not np.isfinite(value):
        return None
    return value


def run_cli(args: Any) -> int:
    """``metarl identify``: identify, print the summary, write task.yaml and identify.json."""
    config = IdentifyConfig(window=args.window, population=args.population, iterations=args.iterations,
                            restarts=args.restarts, seed=args.seed, max_delay=args.max_delay, delay=args.delay)
    result, task_path, json_path = identify_to_dir(args.episode, args.family, args.out, config, progress=True,
                                                   noise_std=parse_noise_std(args.noise_std))
    print(result.summary())
    print(f"wrote {task_path} (metarl sim-robot --family {result.family} --task {task_path}) and {json_path}")
    return 0
