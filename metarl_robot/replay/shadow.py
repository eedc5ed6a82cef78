"""Shadow replay: feed a logged episode through a bundle's adapter exactly as the ROS 2 node did, and grade it.

Why: on hardware the only record of what happened is the episode log. Replaying it through the same
bundle must reproduce the node's decisions bit for bit (up to onnxruntime float noise), which proves the
log is complete; from there the replay can ask what the robot could not: how good the dynamics model's
predictions were with adaptation on vs off, whether the inferred context settled, what another
(candidate) bundle would have commanded on the same states, and how healthy the link was.

How the node fed the adapter (``control_loop.ControlLoop._decide``), reproduced by :func:`shadow_pass`:
the adapter runs only on usable frames (steps the log marks ``adapted``); before acting on frame ``k`` it
observes ``(obs of the previous usable frame, action applied between them, obs_k)`` only when the frame's
``state_seq`` is the previous usable frame's + 1. The applied action is what the robot reported in frame
``k`` (``applied_command_seq``): the logged command with that ``command_seq``, the robot's safe command for
0, and the last command sent when it is not logged (-1) -- the node's own fallback. An adapter that
``observes_sent_commands`` (an online model that tells the actuator latency itself) is fed the last command
sent before frame ``k`` instead, as the node fed it.

Every bundle kind replays; the pass asks the kind what it is (``LoadedBundle``'s declarations), never its
name: its context is the first of its ``belief_diagnostics`` (a ``model_based`` bundle's encoder output; a
``context_policy`` (PEARL) bundle's posterior mean, whose variance is kept too; an ``unadapted`` bundle infers
none, so its context is its fixed one); a kind that ``has_dynamics_model`` is graded by the prediction errors
below, one without has them *not applicable* (``errors`` is None, the metrics and the report say so) rather
than a number that would mean something else.

Definitions (docs/replay.md): prediction errors are RMS over the observation in robot.yaml scale units,
as the adapter's ``prediction_error``; an ``h``-step error starts at usable frame ``k`` with the context
the adapter had there (on) or the empty-window context (off) and chains the ensemble mean through the
``h`` actions actually applied, compared with the frame ``h`` steps later (only over consecutive frames).
The context has *settled* at the first adapter step after which it stays within ``settle_fraction`` of
its final value, measured relative to how far adaptation moved it: ``|z_i - z_final| <= f |z_final -
z_empty|`` (``z_empty``: the empty window's context, or PEARL's prior mean).

Imports runtime and replay only (numpy, onnxruntime, mcap): it runs on a robot computer too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metarl_robot.logs.format import Episode
from metarl_robot.logs.reader import read_episode
from metarl_robot.replay.importers import import_source
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.runtime.manifest import NO_DYNAMICS_MODEL, LoadedBundle
from metarl_robot.spec.schema import SpecError

DEFAULT_HORIZON = 10
"""Open-loop steps of the multi-step prediction error."""
DEFAULT_SETTLE_FRACTION = 0.1
"""The context has settled once it stays within this fraction of its final value (see the module docstring)."""
REPRODUCTION_TOLERANCE = 1e-6
"""Largest |replayed action - logged adapter action| for a replay with the logged bundle to count as exact."""


class ReplayError(SpecError):
    """A log and a bundle that cannot be replayed together (another robot, no adapter steps, ...)."""


@dataclass(frozen=True)
class ReplayConfig:
    """How to replay."""

    horizon: int = DEFAULT_HORIZON
    """Open-loop steps of the multi-step prediction error (>= 1)."""
    settle_fraction: float = DEFAULT_SETTLE_FRACTION
    """Settling band relative to how far adaptation moved the context, in (0, 1]."""
    seed: int | None = None
    """Planner seed; None: the ``seed`` the log records (the node's parameter), else 0."""

    def validate(self) -> None:
        if not (isinstance(self.horizon, int) and self.horizon >= 1):
            raise ValueError(f"horizon: must be an integer >= 1, got {self.horizon!r}")
        if not 0.0 < self.settle_fraction <= 1.0:
            raise ValueError(f"settle_fraction: must be in (0, 1] (a percentage 0-100 on the command line), got "
                             f"{self.settle_fraction!r}")


@dataclass
class ShadowPass:
    """One bundle's adapter driven through the log's usable frames."""

    bundle_name: str
    """The bundle replayed."""
    bundle_sha256: str
    """sha256 of its bundle.yaml."""
    adapt: bool
    """Whether its adapter adapted (the node's ``adapt`` parameter for the logged bundle, True for candidates)."""
    seed: int
    """Its planner seed."""
    actions: np.ndarray
    """(N, a) the adapter's action at each logged step (NaN where the node did not run the adapter)."""
    context: np.ndarray
    """(N, d) the context it acted with (NaN where it did not run)."""
    context_empty: np.ndarray
    """(d,) the context of an empty window, or PEARL's prior mean (what an unadapted adapter acts with)."""
    observed: np.ndarray
    """(N,) bool: before acting on this step the adapter observed a transition."""
    kind: str
    """The bundle's kind."""
    context_var: np.ndarray | None = None
    """(N, d) the belief's variance per step (``context_policy`` bundles; None for a model-based one)."""
    model_states: dict[int, Any] | None = None
    """Step → what the adapter predicted with beyond its context at that step (an online model's fitted last
    layer, :meth:`LoadedBundle.model_state`); None for a kind whose model is the meta-trained one."""


@dataclass
class PredictionErrors:
    """h-step prediction errors for h = 1..H, from every usable frame, adaptation on and off."""

    on: np.ndarray
    """(U, H) error from the i-th usable frame h steps ahead with the adapter's context (NaN: no consecutive
    frames that far ahead)."""
    off: np.ndarray
    """(U, H) the same with the empty-window context."""
    steps_since_reset: np.ndarray
    """(U,) adapter steps since the episode start (the i of the i-th usable frame)."""

    def summary(self, h: int) -> dict[str, float]:
        """Mean error at horizon ``h`` (1-based) on and off, and their ratio, over frames with both."""
        on, off = self.on[:, h - 1], self.off[:, h - 1]
        both = np.isfinite(on) & np.isfinite(off)
        if not both.any():
            return {"on": math.nan, "off": math.nan, "on_over_off": math.nan, "count": 0}
        mean_on, mean_off = float(on[both].mean()), float(off[both].mean())
        return {"on": mean_on, "off": mean_off, "on_over_off": mean_on / mean_off if mean_off > 0 else math.nan,
                "count": int(both.sum())}


@dataclass
class Counterfactual:
    """A pass's actions against what the node did."""

    bundle_name: str
    bundle_sha256: str
    same_bundle_as_log: bool | None
    """True/False: its bundle.yaml sha256 equals / differs from the one the log records; None: the log records none."""
    max_abs_diff_adapter: float
    """max |action - logged adapter action| over the steps the adapter ran (NaN if none)."""
    max_abs_diff_command: float
    """max |action - logged command| over steps whose command came from the adapter (NaN if none)."""
    mean_abs_diff_command: float
    """mean |action - logged command| over those steps."""
    steps_compared: int
    """Steps the adapter ran."""
    reproduced: bool | None
    """For the logged bundle: max_abs_diff_adapter <= REPRODUCTION_TOLERANCE (None for a candidate, and when the
    adapter never ran)."""


@dataclass
class LinkHealth:
    """What the log says about the link and the safety layer."""

    period_ms_median: float
    """Median time between commands answering consecutive usable frames."""
    period_ms_max: float
    jitter_ms_std: float
    """Standard deviation of those periods."""
    jitter_ms_p99: float
    """99th percentile of |period - median|."""
    nominal_period_ms: float
    """robot.yaml control period."""
    frames_seen: int
    """Distinct ``state_seq`` values in the log."""
    frames_dropped: int
    """Frames missing from the sequence numbers (gaps in ``state_seq``)."""
    seq_gaps: list[tuple[int, int]]
    """(step, frames missing before it) for every gap."""
    stale_steps: int
    """Steps that decided on a frame already seen (no new frame arrived in time)."""
    unusable_frames: int
    """New frames on which the adapter did not run (rejected by the safety layer)."""
    steps_by_source: dict[str, int]
    """Command source → steps."""
    steps_by_state: dict[str, int]
    """Safety state → steps."""
    degraded_periods: list[dict[str, Any]]
    """Runs of steps whose command did not come from the adapter or whose safety state was not OK: start_step,
    end_step (inclusive), seconds, sources, states."""
    safety_events: list[dict[str, Any]]
    """Every safety event: step, kind, level, action, message."""
    fallbacks: int
    """Steps commanded by the fallback controller."""
    command_lag: dict[int, int] = field(default_factory=dict)
    """Periods between a command's frame and the period the robot ran it → frames (from each frame's
    ``applied_command_seq``; 0: the period right after the frame it answered, as in training; 1: a robot that
    applies commands at its next period boundary). Frames that ran the safe command or do not say are left out."""
    compute_timed_steps: int = 0
    """Adapter steps on which the log holds both compute times (0: a version-1 log, an import, a sim recording)."""
    adapter_compute_ms_p50: float = math.nan
    """Median over those steps of the adapter's ``observe`` + ``act`` (the log's ``adapter_compute_ns``)."""
    adapter_compute_ms_p99: float = math.nan
    node_compute_ms_p50: float = math.nan
    """Median over those steps of the node's whole decision, frame received → command sent (``node_compute_ns``)."""
    node_compute_ms_p99: float = math.nan
    node_overhead_ms_p50: float = math.nan
    """Median over those steps of node - adapter, paired per step: what the node added to the adapter."""
    node_overhead_ms_p99: float = math.nan


@dataclass
class Verdict:
    """One line per episode: within the training distribution or outside it, and where."""

    within: bool | None
    """True: the log's own one-step prediction error stayed at the level of the bundle's in-distribution episodes;
    False: above it; None: no calibrated level to compare with, or no dynamics model."""
    error_median: float | None
    """Median over the adapter's steps (after the context window filled) of the ``prediction_error`` it logged."""
    error_ratio: float | None
    """That median over the highest per-episode median of the calibration episodes (``metarl calibrate-safety``)."""
    field_ratios: dict[str, float]
    """Per observation field, the same ratio from the logged ``predicted_next_obs``."""
    fields: list[str]
    """For an episode outside: the fields above their calibrated level, the largest ratio first."""
    command_lag: int | None
    """The most common applied-command lag in periods (:attr:`LinkHealth.command_lag`; None: not logged)."""
    line: str
    """The verdict, in words."""


@dataclass
class EpisodeReplay:
    """Everything the replay learned about one episode."""

    path: Path
    episode: Episode
    config: ReplayConfig
    logged: ShadowPass
    """The logged bundle's pass (the one that must reproduce the commands)."""
    counterfactual: Counterfactual
    errors: PredictionErrors | None
    """Prediction errors of the logged bundle (None: it has no dynamics model, see :data:`NO_DYNAMICS_MODEL`)."""
    usable_steps: np.ndarray
    """(U,) indices of the logged steps on which the adapter ran."""
    settle_step: int | None
    """Adapter steps since reset after which the context stayed within the band (None: no adapter steps)."""
    context_distance: np.ndarray
    """(U,) |z_i - z_final| / |z_final - z_empty|."""
    link: LinkHealth
    candidate: ShadowPass | None = None
    candidate_counterfactual: Counterfactual | None = None
    candidate_errors: PredictionErrors | None = None
    notes: list[str] = field(default_factory=list)
    """Things the reader must know (bundle mismatch, truncated log, a later episode of a node process, ...)."""
    verdict: Verdict | None = None
    """Whether the episode lies within what the bundle was trained on (:func:`distribution_verdict`)."""

    def metrics(self) -> dict[str, Any]:
        """JSON-ready metrics (no per-step arrays)."""
        ep, h = self.episode, self.config.horizon
        out: dict[str, Any] = {
            "path": str(self.path), "robot": ep.robot.name, "steps": int(ep.num_steps),
            "adapter_steps": int(self.usable_steps.size), "complete": ep.complete, "end_reason": ep.end_reason,
            "logged_bundle": ep.bundle, "task": ep.task,
            "bundle": {"name": self.logged.bundle_name, "sha256": self.logged.bundle_sha256,
                       "adapt": self.logged.adapt, "seed": self.logged.seed},
            "bundle_kind": self.logged.kind,
            "prediction_error": error_summary(self.errors, h),
            "context": {"settle_step": self.settle_step,
                        "settle_s": None if self.settle_step is None else self.settle_step * ep.robot.ctrl_dt,
                        "settle_fraction": self.config.settle_fraction, **belief_summary(self.logged)},
            "counterfactual": _plain(self.counterfactual), "link": _plain(self.link), "notes": list(self.notes),
            "verdict": None if self.verdict is None else _plain(self.verdict),
        }
        if self.candidate_counterfactual is not None:
            out["candidate"] = {"counterfactual": _plain(self.candidate_counterfactual),
                                "bundle_kind": self.candidate.kind,
                                "prediction_error": error_summary(self.candidate_errors, h)}
        return out


def error_summary(errors: PredictionErrors | None, horizon: int) -> dict[str, Any]:
    """The 1-step and ``horizon``-step summaries, or ``{"applicable": False, "reason": ...}`` without a model."""
    if errors is None:
        return {"applicable": False, "reason": NO_DYNAMICS_MODEL}
    return {"one_step": errors.summary(1), f"{horizon}_step": errors.summary(horizon)}


def belief_summary(shadow: ShadowPass) -> dict[str, Any]:
    """For a pass with a belief variance: its mean over z at the last adapter step and the steps it rested on."""
    if shadow.context_var is None:
        return {}
    ran = np.flatnonzero(np.isfinite(shadow.context_var).all(axis=1))
    if ran.size == 0:
        return {"final_var_mean": None, "transitions_observed": 0}
    return {"final_mean": shadow.context[ran[-1]].tolist(), "final_var_mean": float(shadow.context_var[ran[-1]].mean()),
            "transitions_observed": int(shadow.observed.sum())}


def _plain(obj: Any) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in vars(obj).items()}


# ---- the pass ---------------------------------------------------------------------------------------------
def applied_actions(episode: Episode, sent: bool = False) -> np.ndarray:
    """(N, a) the action the robot reported as applied in each step's frame (see the module docstring); ``sent``:
    instead the last command sent before it (what an adapter that ``observes_sent_commands`` was fed)."""
    return episode.applied_commands(sent)[0]


def usable_frames(episode: Episode) -> np.ndarray:
    """(N,) bool: the frames the adapter acts on — those the node's log marks ``adapted``; for a log imported
    from another controller (no adapter ran), every frame with a finite observation."""
    if import_source(episode) is not None:
        return np.isfinite(episode.obs).all(axis=1)
    return np.asarray(episode.adapted, dtype=bool)


def _task_params(episode: Episode, k: int, bundle: LoadedBundle) -> dict[str, float]:
    """The reward parameters the node passed at step ``k``; a log without them (an import) gets the family's
    nominal ones (:func:`replay_episode` notes it). A PEARL adapter also computes its context's rewards with them."""
    if not episode.task_params:
        nominal = bundle.family.nominal()
        return {name: float(nominal[name]) for name in bundle.family.reward_names}
    return {name: float(values[k]) for name, values in episode.task_params.items()}


def shadow_pass(episode: Episode, bundle: LoadedBundle, adapt: bool, seed: int,
                applied: np.ndarray | None = None, carried: Mapping[str, np.ndarray] | None = None) -> ShadowPass:
    """Drive a fresh adapter of ``bundle`` (any kind) through the log's usable frames as the node did, starting
    from ``carried`` (what the node's adapter carried into the episode, :attr:`Episode.adapter_state`; None or
    empty: the prior)."""
    n, robot = episode.num_steps, episode.robot
    adapter = bundle.make_adapter(batch=1, seed=seed, **bundle.adapter_switches(adapt))
    if adapter.observes_sent_commands:
        applied = applied_actions(episode, sent=True)
    elif applied is None:
        applied = applied_actions(episode)
    z_empty = bundle.empty_context(adapter)
    adapter.restore(carried or {})
    # What the adapter acted with: its first belief diagnostic; a kind that infers nothing acts with its fixed one.
    context_key = bundle.belief_diagnostics[0] if bundle.belief_diagnostics else None
    actions = np.full((n, robot.action_dim), np.nan)
    context = np.full((n, z_empty.size), np.nan)
    context_var = np.full((n, z_empty.size), np.nan) if "context_var" in bundle.belief_diagnostics else None
    observed = np.zeros(n, dtype=bool)
    model_states: dict[int, Any] = {}
    prev: int | None = None
    for k in np.flatnonzero(usable_frames(episode)):
        if prev is not None and episode.state_seq[k] == episode.state_seq[prev] + 1:
            adapter.observe(episode.obs[prev][None], applied[k][None], episode.obs[k][None])
            observed[k] = True
        prev = k
        action, diagnostics = adapter.act(episode.obs[k][None], _task_params(episode, k, bundle))
        state = bundle.model_state(adapter)
        if state is not None:
            model_states[int(k)] = state
        actions[k] = np.asarray(action, dtype=np.float64)[0]
        context[k] = z_empty if context_key is None else np.asarray(diagnostics[context_key], dtype=np.float64)[0]
        if context_var is not None:
            context_var[k] = np.asarray(diagnostics["context_var"], dtype=np.float64)[0]
    return ShadowPass(bundle.name, bundle.sha256, adapt, seed, actions, context, z_empty, observed, bundle.kind,
                      context_var, model_states or None)


def prediction_errors(episode: Episode, bundle: LoadedBundle, shadow: ShadowPass, horizon: int,
                      applied: np.ndarray | None = None) -> PredictionErrors | None:
    """h-step errors (h = 1..horizon) from every usable frame, with the pass's context (on) and the empty one (off);
    None for a bundle without a dynamics model (:data:`NO_DYNAMICS_MODEL`)."""
    if not bundle.has_dynamics_model:
        return None
    applied = applied_actions(episode) if applied is None else applied
    usable = np.flatnonzero(usable_frames(episode))
    u = usable.size
    scale = episode.robot.obs_scale
    # chain[i, h]: the usable index h frames after i, if every frame in between is consecutive (seq + 1).
    consecutive = np.zeros(u, dtype=bool)
    if u > 1:
        consecutive[:-1] = episode.state_seq[usable[1:]] == episode.state_seq[usable[:-1]] + 1
    consecutive[:-1] &= np.isfinite(episode.obs[usable[1:]]).all(axis=1)
    errors = {}
    empty = np.broadcast_to(shadow.context_empty, (u, shadow.context_empty.size))
    # on: the context, and for a kind whose model changes online the model, the adapter had at each start
    on_states = None if shadow.model_states is None else [shadow.model_states.get(int(k)) for k in usable]
    for label, z_all, states in (("on", shadow.context[usable], on_states), ("off", empty, None)):
        err = np.full((u, horizon), np.nan)
        state = episode.obs[usable].copy()
        alive = np.isfinite(state).all(axis=1) & np.isfinite(z_all).all(axis=1)
        for h in range(1, horizon + 1):
            # from start i, step h uses the action applied in frame i + h and is compared with frame i + h
            target = np.arange(u) + h
            ok = alive & (target < u)
            ok[ok] &= consecutive[target[ok] - 1]
            alive = ok
            if not ok.any():
                break
            idx = np.flatnonzero(ok)
            frames = usable[target[idx]]
            state[idx] = _predict(bundle, state[idx], applied[frames], z_all[idx],
                                  None if states is None else [states[i] for i in idx])
            err[idx, h - 1] = np.sqrt(np.mean(((state[idx] - episode.obs[frames]) / scale) ** 2, axis=1))
        errors[label] = err
    return PredictionErrors(errors["on"], errors["off"], np.arange(u))


def _predict(bundle: LoadedBundle, obs: np.ndarray, act: np.ndarray, z: np.ndarray, states: list[Any] | None
             ) -> np.ndarray:
    """``(M, o)`` ensemble-mean next observations of ``M`` rows; ``states``: each row's model
    (:attr:`ShadowPass.model_states`), stepped one row at a time; None: the meta-trained model, all rows at once."""
    tile = lambda x: np.ascontiguousarray(np.broadcast_to(x, (bundle.ensemble_size, *x.shape)),  # noqa: E731
                                          dtype=np.float32)
    if states is None:
        return bundle.step(tile(obs), tile(act), tile(z)).mean(axis=0).astype(np.float64)
    return np.concatenate([bundle.step(tile(obs[i:i + 1]), tile(act[i:i + 1]), tile(z[i:i + 1]), s).mean(axis=0)
                           for i, s in enumerate(states)]).astype(np.float64)


def settling(shadow: ShadowPass, usable: np.ndarray, fraction: float) -> tuple[int | None, np.ndarray]:
    """(adapter steps until the context stays within ``fraction`` of its final value, relative distances)."""
    z = shadow.context[usable]
    if z.shape[0] == 0:
        return None, np.zeros(0)
    final = z[-1]
    moved = float(np.linalg.norm(final - shadow.context_empty))
    distance = np.linalg.norm(z - final, axis=1) / max(moved, 1e-12)
    outside = np.flatnonzero(distance > fraction)
    return (0 if outside.size == 0 else int(outside[-1]) + 1), distance


def compare(shadow: ShadowPass, episode: Episode, candidate: bool) -> Counterfactual:
    """A pass's actions against the logged adapter actions and commands."""
    ran = episode.adapted
    from_adapter = usable_frames(episode) & (episode.command_source == "adapter")

    def stat(mask: np.ndarray, other: np.ndarray, reduce: Any) -> float:
        diff = np.abs(shadow.actions[mask] - other[mask])
        return float(reduce(diff)) if diff.size else math.nan

    logged_sha = None if episode.bundle is None else episode.bundle.get("sha256")
    same = None if logged_sha is None else logged_sha == shadow.bundle_sha256
    max_adapter = stat(ran, episode.adapter_action, np.max)
    return Counterfactual(
        shadow.bundle_name, shadow.bundle_sha256, same, max_adapter, stat(from_adapter, episode.command, np.max),
        stat(from_adapter, episode.command, np.mean), int(ran.sum()),
        None if candidate or not ran.any() else bool(max_adapter <= REPRODUCTION_TOLERANCE))


# ---- link health ----------------------------------------------------------------------------------------
def link_health(episode: Episode) -> LinkHealth:
    """Loop period and jitter, dropped/stale/unusable frames, degraded periods and safety events."""
    n, seq, dt = episode.num_steps, episode.state_seq, episode.robot.ctrl_dt
    frames = usable_frames(episode)
    usable = np.flatnonzero(frames & (episode.command_source != "none"))
    periods = np.zeros(0)
    if usable.size > 1:
        consecutive = seq[usable[1:]] == seq[usable[:-1]] + 1
        periods = (np.diff(episode.time_ns[usable]) / 1e6)[consecutive]
    if periods.size:
        median = float(np.median(periods))
        period = {"period_ms_median": median, "period_ms_max": float(periods.max()),
                  "jitter_ms_std": float(periods.std()),
                  "jitter_ms_p99": float(np.percentile(np.abs(periods - median), 99))}
    else:
        period = dict.fromkeys(("period_ms_median", "period_ms_max", "jitter_ms_std", "jitter_ms_p99"), math.nan)

    new_frame = np.ones(n, dtype=bool)
    new_frame[1:] = seq[1:] != seq[:-1]
    gaps = []
    last = None
    for k in np.flatnonzero(new_frame):
        if last is not None and seq[k] > last + 1:
            gaps.append((int(k), int(seq[k] - last - 1)))
        last = int(seq[k]) if last is None else max(last, int(seq[k]))
    degraded_mask = (episode.command_source != "adapter") | ~np.isin(episode.safety_state, ["OK", ""])
    runs = []
    k = 0
    while k < n:
        if not degraded_mask[k]:
            k += 1
            continue
        start = k
        while k + 1 < n and degraded_mask[k + 1]:
            k += 1
        span = slice(start, k + 1)
        seconds = (episode.time_ns[k] - episode.time_ns[start]) / 1e9 + dt
        runs.append({"start_step": start, "end_step": k, "seconds": round(float(seconds), 6),
                     "sources": sorted(set(episode.command_source[span].tolist())),
                     "states": sorted(set(episode.safety_state[span].tolist()) - {""})})
        k += 1
    events = [{"step": e.step, "kind": e.kind, "level": e.level, "action": e.action, "message": e.message}
              for e in episode.safety_events]
    sources, counts = np.unique(episode.command_source, return_counts=True)
    states, state_counts = np.unique(episode.safety_state, return_counts=True)
    return LinkHealth(
        command_lag=command_lag(episode), **compute_times(episode),
        **period, nominal_period_ms=dt * 1e3, frames_seen=int(np.unique(seq).size),
        frames_dropped=int(sum(g for _, g in gaps)), seq_gaps=gaps, stale_steps=int((~new_frame).sum()),
        unusable_frames=int((new_frame & ~frames).sum()),
        steps_by_source={str(s): int(c) for s, c in zip(sources, counts, strict=True)},
        steps_by_state={(str(s) or "unknown"): int(c) for s, c in zip(states, state_counts, strict=True)},
        degraded_periods=runs, safety_events=events,
        fallbacks=int((episode.command_source == "fallback_controller").sum()))


def compute_times(episodes: Episode | list[Episode]) -> dict[str, Any]:
    """:class:`LinkHealth`'s compute-time fields over the adapter steps (of all ``episodes``) whose log holds both
    compute times; NaN percentiles where none does."""
    episodes = [episodes] if isinstance(episodes, Episode) else episodes
    columns: dict[str, list[np.ndarray]] = {"adapter_compute": [], "node_compute": [], "node_overhead": []}
    for ep in episodes:
        # A tick without a frame is timed too, but is no adapter step: pairing needs both times.
        timed = (ep.adapter_compute_ns >= 0) & (ep.node_compute_ns >= 0)
        for name, values in (("adapter_compute", ep.adapter_compute_ns), ("node_compute", ep.node_compute_ns),
                             ("node_overhead", ep.node_overhead_ns)):
            columns[name].append(values[timed] / 1e6)
    out: dict[str, Any] = {"compute_timed_steps": int(sum(c.size for c in columns["adapter_compute"]))}
    for name, parts in columns.items():
        ms = np.concatenate(parts) if parts else np.zeros(0)
        for q in (50, 99):
            out[f"{name}_ms_p{q}"] = float(np.percentile(ms, q)) if ms.size else math.nan
    return out


def distribution_verdict(episode: Episode, bundle: LoadedBundle, link: LinkHealth,
                         levels: Mapping[str, Any] | None) -> Verdict:
    """Compare the log's own online prediction errors (what the adapter logged, step by step) with ``levels``, the
    ``levels`` of a ``metarl calibrate-safety`` report for this bundle: the highest per-episode median error of the
    bundle's in-distribution sim episodes, overall and per field. Above it, the episode is outside what the bundle
    was trained on, and the fields say where."""
    lag = max(link.command_lag, key=link.command_lag.get) if link.command_lag else None
    tail = []
    if lag:
        tail.append(f"commands ran {lag} period(s) after their frame")
    if link.frames_dropped or link.degraded_periods:
        tail.append(f"link: {link.frames_dropped} dropped frame(s), {len(link.degraded_periods)} degraded period(s)")
    logged = episode.adaptation.get("prediction_error")
    if not bundle.has_dynamics_model or logged is None:
        return Verdict(None, None, None, {}, [], lag, "; ".join(["no dynamics model: no prediction error to judge the "
                                                                "distribution by", *tail]))
    adapted = np.flatnonzero(episode.adapted)
    after = int(levels.get("after_steps", 0)) if levels else getattr(bundle, "context_window", 0) + 1
    errors = np.asarray(logged, dtype=np.float64)[adapted, 0][after:]
    median = float(np.nanmedian(errors)) if np.isfinite(errors).any() else None
    field_errors = _field_errors(episode, adapted, after)
    if not levels or median is None:
        why = ("no calibrated level: run metarl calibrate-safety on the bundle and pass its safety_calibration.json "
               "as --calibration" if not levels else "no graded prediction error in the log")
        return Verdict(None, median, None, {}, [], lag, "; ".join([why, *tail]))
    level = float(levels["prediction_error_median_max"])
    ratio = median / level
    field_levels = levels.get("field_error_median_max", {})
    field_ratios = {name: float(value / field_levels[name]) for name, value in field_errors.items()
                    if field_levels.get(name)}
    within = ratio <= 1.0
    above = [] if within else sorted((n for n, r in field_ratios.items() if r > 1.0), key=lambda n: -field_ratios[n])
    head = (f"{'within' if within else 'OUTSIDE'} the training distribution: one-step prediction error "
            f"{median:.3g} = {ratio:.2g}x the highest in-distribution episode's ({level:.3g})")
    if above:
        head += "; fields above their level: " + ", ".join(f"{n} {field_ratios[n]:.2g}x" for n in above)
    return Verdict(within, median, ratio, field_ratios, above, lag, "; ".join([head, *tail]))


def _field_errors(episode: Episode, adapted: np.ndarray, after: int) -> dict[str, float]:
    """Per field, the median over the predictions the logged ``prediction_error[after:]`` grades of the RMS error
    of the logged ``predicted_next_obs`` against the next usable frame, in scale units (consecutive frames only)."""
    predicted = episode.adaptation.get("predicted_next_obs")
    if predicted is None or adapted.size < 2:
        return {}
    seq = episode.state_seq[adapted]
    follows = np.flatnonzero(seq[1:] == seq[:-1] + 1)
    # Predictions made from adapter step after - 1 on: those the logged prediction_error[after:] grades.
    follows = follows[follows >= after - 1]
    err = (np.asarray(predicted, dtype=np.float64)[adapted[follows]] - episode.obs[adapted[follows + 1]])
    rms = episode.robot.field_rms(err / episode.robot.obs_scale)
    return {name: float(np.nanmedian(block)) for name, block in rms.items() if np.isfinite(block).any()}


def command_lag(episode: Episode) -> dict[int, int]:
    """:attr:`LinkHealth.command_lag`: per new frame naming a logged command, the periods it ran after the frame it
    answered (``state_seq - command_answers_seq - 1``), counted."""
    sent_at = {int(c): k for k, c in enumerate(episode.command_seq) if episode.command_source[k] != "none"}
    lags: dict[int, int] = {}
    seen: set[int] = set()
    for k, seq in enumerate(episode.state_seq):
        applied = int(episode.applied_command_seq[k])
        if int(seq) in seen or applied <= 0 or applied not in sent_at:
            continue
        seen.add(int(seq))
        lag = int(seq) - int(episode.command_answers_seq[sent_at[applied]]) - 1
        lags[lag] = lags.get(lag, 0) + 1
    return dict(sorted(lags.items()))


# ---- the whole replay -------------------------------------------------------------------------------------
def _check_robot(episode: Episode, bundle: LoadedBundle, option: str) -> None:
    if bundle.robot.interface_hash != episode.robot_interface_sha256:
        raise ReplayError(str(episode.path), option, f"bundle {bundle.name!r} is for robot {bundle.robot.name!r} "
                          f"(interface {bundle.robot.interface_hash[:12]}), the log is from robot "
                          f"{episode.robot.name!r} (interface {episode.robot_interface_sha256[:12]}): give a bundle "
                          "trained for the logged robot")


def replay_episode(episode: Episode | str | Path, bundle: LoadedBundle | str | Path, *,
                   candidate: LoadedBundle | str | Path | None = None, config: ReplayConfig | None = None,
                   levels: Mapping[str, Any] | None = None) -> EpisodeReplay:
    """Shadow-replay one episode through ``bundle`` (and ``candidate``), of either kind, and grade it (see the module
    docstring); ``levels``: the bundle's in-distribution error levels (:func:`distribution_verdict`)."""
    config = config or ReplayConfig()
    config.validate()
    episode = episode if isinstance(episode, Episode) else read_episode(episode)
    bundle = bundle if isinstance(bundle, LoadedBundle) else load_bundle(bundle)
    _check_robot(episode, bundle, "--bundle")
    notes = [f"log: {w}" for w in episode.warnings]
    usable = np.flatnonzero(usable_frames(episode))
    source = import_source(episode)
    if source is not None:
        notes.append(f"imported from {source.get('format')} ({source.get('path')}): no metarl adapter ran, so the "
                     "bundle's actions are a counterfactual against the logged controller's commands, not a "
                     "reproduction")
    if usable.size == 0:
        notes.append("the adapter never ran in this episode: nothing to replay (link health only)")
    elif not episode.task_params:
        notes.append("the log holds no task (reward) parameters: the bundle " + ("planned" if bundle.plans
                     else "computed its context's rewards") + " with its family's nominal ones")
    if not bundle.has_dynamics_model:
        notes.append(f"{bundle.kind} bundle: model prediction error {NO_DYNAMICS_MODEL}; graded instead: the replayed "
                     "actions against the logged ones, and the belief (context mean and variance)")
    extra = episode.extra
    adapt = bool(extra.get("adapt", True))
    seed = config.seed if config.seed is not None else int(extra.get("seed", 0))
    # Only a planner or a policy that samples its actions draws noise: a deterministic policy's seed and earlier
    # episodes (the node resets the adapter at every activation) cannot change its commands.
    noise = "planner noise" if bundle.plans else "action noise"
    if bundle.draws_noise() and config.seed is None and "seed" not in extra:
        notes.append(f"the log does not record the seed of the bundle's {noise}; replayed with seed 0 (commands "
                     "match only if the node used 0)")
    # A planner's noise runs on across a node's episodes; a sampling policy's is reseeded at every episode start
    # from the count its carried state logs (MetaPolicyAdapter), so any episode of it replays from its log.
    if bundle.plans and int(extra.get("episode", 1)) > 1:
        notes.append(f"this is episode {extra['episode']} of its node process: the node's {noise} continued "
                     "from earlier episodes, so its commands are not expected to be reproduced exactly")
    if episode.bundle is None:
        notes.append("the log does not record which bundle ran: the reproduction check cannot tell a mismatch")
    elif episode.bundle.get("sha256") != bundle.sha256:
        notes.append(f"the log was recorded with bundle {episode.bundle.get('name')!r} (bundle.yaml sha256 "
                     f"{str(episode.bundle.get('sha256'))[:12]}), --bundle is {bundle.name!r} "
                     f"({bundle.sha256[:12]}): its actions are a counterfactual, not a reproduction")
    applied = applied_actions(episode)
    logged = shadow_pass(episode, bundle, adapt, seed, applied, carried=episode.adapter_state)
    if episode.adapter_state:
        notes.append("the node's adapter carried what it fitted online in earlier episodes into this one "
                     f"({', '.join(sorted(episode.adapter_state))}); the replay starts from it, a candidate from "
                     "its prior")
    errors = prediction_errors(episode, bundle, logged, config.horizon, applied)
    settle_step, distance = settling(logged, usable, config.settle_fraction)
    result = EpisodeReplay(Path(episode.path), episode, config, logged, compare(logged, episode, candidate=False),
                           errors, usable, settle_step, distance, link_health(episode), notes=notes)
    if not adapt:
        notes.append("the node ran with adapt=false: the logged commands come from the unadapted " +
                     ("model" if bundle.has_dynamics_model else "policy (z held at the prior mean)"))
    if candidate is not None:
        candidate = candidate if isinstance(candidate, LoadedBundle) else load_bundle(candidate)
        _check_robot(episode, candidate, "--candidate")
        result.candidate = shadow_pass(episode, candidate, True, seed, applied)
        result.candidate_counterfactual = compare(result.candidate, episode, candidate=True)
        result.candidate_errors = prediction_errors(episode, candidate, result.candidate, config.horizon, applied)
    result.verdict = distribution_verdict(episode, bundle, result.link, levels)
    return result


def replay_episodes(paths: list[str | Path], bundle: LoadedBundle | str | Path, *,
                    candidate: LoadedBundle | str | Path | None = None, config: ReplayConfig | None = None,
                    levels: Mapping[str, Any] | None = None) -> list[EpisodeReplay]:
    """:func:`replay_episode` for each log, loading the bundles once. Every path is checked before any replay."""
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise ReplayError(", ".join(missing), "episodes", "file(s) not found")
    bundle = bundle if isinstance(bundle, LoadedBundle) else load_bundle(bundle)
    if candidate is not None and not isinstance(candidate, LoadedBundle):
        candidate = load_bundle(candidate)
    return [replay_episode(p, bundle, candidate=candidate, config=config, levels=levels) for p in paths]


__all__ = ["DEFAULT_HORIZON", "DEFAULT_SETTLE_FRACTION", "NO_DYNAMICS_MODEL", "REPRODUCTION_TOLERANCE",
           "Counterfactual", "EpisodeReplay", "LinkHealth", "PredictionErrors", "ReplayConfig", "ReplayError",
           "ShadowPass", "applied_actions", "belief_summary", "compare", "compute_times", "error_summary",
           "link_health", "prediction_errors", "replay_episode", "replay_episodes", "settling", "shadow_pass"]
