"""The replay report: Markdown with PNG plots, JSON metrics for scripts, and a one-screen terminal summary.

One report covers any number of episodes: a section (table + plot) per episode and, for several, an
aggregate table and the mean prediction error against steps since reset over all of them. A bundle without a
dynamics model (kind ``context_policy``) has no prediction error: the report says "not applicable" there and
shows its belief (context mean and variance) instead. Written by
``metarl replay`` (:func:`run_cli`); the numbers come from :mod:`metarl_robot.replay.shadow`.
matplotlib is imported only when plots are drawn (never on a robot computer that only replays).
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from metarl_robot.replay.shadow import (
    NO_DYNAMICS_MODEL,
    REPRODUCTION_TOLERANCE,
    EpisodeReplay,
    LinkHealth,
    ReplayConfig,
    ReplayError,
    compute_times,
    replay_episodes,
)
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.runtime.manifest import LoadedBundle

REPORT_FILE = "report.md"
METRICS_FILE = "metrics.json"
AGGREGATE_PLOT = "prediction_error_all.png"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def _plot_name(index: int, replay: EpisodeReplay) -> str:
    return f"episode{index:02d}_{replay.path.stem}.png"


def _errors_cell(summary: dict[str, Any], digits: int = 3, ratio: bool = False) -> str:
    """``on / off`` (and their ratio) of one horizon's error summary; ``n/a`` where no dynamics model predicts."""
    if summary.get("applicable") is False:
        return "n/a"
    text = f"{_fmt(summary['on'], digits)} / {_fmt(summary['off'], digits)}"
    return text + (f" (ratio {_fmt(summary['on_over_off'], 3)})" if ratio else "")


def _compute_cell(times: LinkHealth | dict[str, Any]) -> str:
    """The per-step compute times (adapter, node, and node - adapter) p50 / p99, or why the log has none."""
    get = times.get if isinstance(times, dict) else lambda key: getattr(times, key)
    if not get("compute_timed_steps"):
        return "not timed (a version-1 log, an import or a sim recording)"
    return (f"adapter {_fmt(get('adapter_compute_ms_p50'), 3)} / {_fmt(get('adapter_compute_ms_p99'), 3)} ms, "
            f"node {_fmt(get('node_compute_ms_p50'), 3)} / {_fmt(get('node_compute_ms_p99'), 3)} ms, "
            f"overhead {_fmt(get('node_overhead_ms_p50'), 3)} / {_fmt(get('node_overhead_ms_p99'), 3)} ms "
            f"({get('compute_timed_steps')} steps)")


def _with_errors(replays: list[EpisodeReplay]) -> list[EpisodeReplay]:
    """The replays whose bundle has a dynamics model (prediction errors)."""
    return [r for r in replays if r.errors is not None]


def aggregate(replays: list[EpisodeReplay]) -> dict[str, Any]:
    """Totals and means over episodes (errors averaged over all frames of all episodes that have them)."""
    h = replays[0].config.horizon if replays else 1
    out: dict[str, Any] = {"episodes": len(replays), "steps": int(sum(r.episode.num_steps for r in replays))}
    graded = _with_errors(replays)
    for label, col in (("one_step", 1), (f"{h}_step", h)):
        if replays and not graded:
            out[f"prediction_error_{label}"] = {"applicable": False, "reason": NO_DYNAMICS_MODEL}
            continue
        on = np.concatenate([r.errors.on[:, col - 1] for r in graded]) if graded else np.zeros(0)
        off = np.concatenate([r.errors.off[:, col - 1] for r in graded]) if graded else np.zeros(0)
        both = np.isfinite(on) & np.isfinite(off)
        mean_on = float(on[both].mean()) if both.any() else math.nan
        mean_off = float(off[both].mean()) if both.any() else math.nan
        out[f"prediction_error_{label}"] = {"on": mean_on, "off": mean_off,
                                            "on_over_off": mean_on / mean_off if mean_off > 0 else math.nan}
    cf = [r.counterfactual for r in replays]
    out["reproduced"] = f"{sum(bool(c.reproduced) for c in cf)}/{len(cf)}"
    diffs = [c.max_abs_diff_adapter for c in cf if not math.isnan(c.max_abs_diff_adapter)]
    out["max_abs_diff_adapter"] = max(diffs) if diffs else math.nan
    out["frames_dropped"] = int(sum(r.link.frames_dropped for r in replays))
    out["stale_steps"] = int(sum(r.link.stale_steps for r in replays))
    out["degraded_periods"] = int(sum(len(r.link.degraded_periods) for r in replays))
    out["safety_events"] = int(sum(len(r.link.safety_events) for r in replays))
    out["fallbacks"] = int(sum(r.link.fallbacks for r in replays))
    settle = [r.settle_step for r in replays if r.settle_step is not None]
    out["settle_step_median"] = float(np.median(settle)) if settle else None
    out["compute_ms"] = compute_times([r.episode for r in replays])  # pooled steps, not a mean of percentiles
    return out


def plot_episode(replay: EpisodeReplay, path: Path) -> None:
    """Four panels: prediction error on/off (or "not applicable"), context and its settling, actions vs commands,
    loop period + faults."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep, h = replay.episode, replay.config.horizon
    fig, axes = plt.subplots(4, 1, figsize=(10, 13), constrained_layout=True)
    ax = axes[0]
    steps = np.arange(replay.usable_steps.size)
    if replay.errors is None:
        ax.text(0.5, 0.5, f"prediction error {NO_DYNAMICS_MODEL}", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        for label, err, style in (("on", replay.errors.on, "-"), ("off", replay.errors.off, "--")):
            ax.plot(steps, err[:, 0], style, color="C0", label=f"1-step, adaptation {label}")
            ax.plot(steps, err[:, h - 1], style, color="C1", label=f"{h}-step, adaptation {label}")
        ax.set_yscale("log")
        ax.set_xlabel("adapter steps since reset")
        ax.set_ylabel("RMS error (scale units)")
        ax.legend(fontsize=8)
    ax.set_title(f"{ep.path.name}: prediction error of {replay.logged.bundle_name}")

    ax = axes[1]
    z = replay.logged.context[replay.usable_steps]
    ax.plot(steps, z, linewidth=0.8)
    if replay.logged.context_var is not None:  # a belief: its mean ± one standard deviation per dimension
        sd = np.sqrt(replay.logged.context_var[replay.usable_steps])
        for i in range(z.shape[1]):
            ax.fill_between(steps, z[:, i] - sd[:, i], z[:, i] + sd[:, i], color=f"C{i}", alpha=0.15)
    if replay.settle_step is not None:
        ax.axvline(replay.settle_step, color="k", linestyle=":",
                   label=f"settled (within {replay.config.settle_fraction:.0%}) at step {replay.settle_step}")
        ax.legend(fontsize=8)
    ax.set_xlabel("adapter steps since reset")
    ax.set_ylabel("context z")
    ax.set_title("inferred context" if replay.logged.context_var is None else "belief over z: mean ± 1 sd")

    ax = axes[2]
    k = np.arange(ep.num_steps)
    for i in range(ep.robot.action_dim):
        ax.plot(k, ep.command[:, i], color="k", linewidth=1.5, label="logged command" if i == 0 else None)
        ax.plot(k, replay.logged.actions[:, i], color="C2", linestyle="--", label="replay" if i == 0 else None)
        if replay.candidate is not None:
            ax.plot(k, replay.candidate.actions[:, i], color="C3", linewidth=0.8,
                    label=f"candidate {replay.candidate.bundle_name}" if i == 0 else None)
    ax.set_xlabel("logged step")
    ax.set_ylabel("action")
    ax.set_title(f"counterfactual actions (max |replay - logged| = "
                 f"{_fmt(replay.counterfactual.max_abs_diff_adapter, 3)})")
    ax.legend(fontsize=8)

    ax = axes[3]
    if ep.num_steps > 1:
        ax.plot(k[1:], np.diff(ep.time_ns) / 1e6, color="C0", linewidth=0.8, label="time between steps")
    ax.axhline(ep.robot.ctrl_dt * 1e3, color="k", linestyle=":", label="control period")
    for run in replay.link.degraded_periods:
        ax.axvspan(run["start_step"] - 0.5, run["end_step"] + 0.5, color="C3", alpha=0.2)
    for event in replay.link.safety_events:
        ax.axvline(event["step"], color="C3" if event["level"] != "OK" else "C2", linewidth=0.8)
    ax.set_xlabel("logged step (red bands: not commanded by the adapter / not OK; lines: safety events)")
    ax.set_ylabel("ms")
    ax.set_title("link health")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_aggregate(replays: list[EpisodeReplay], path: Path) -> None:
    """Mean 1-step and H-step error against steps since reset over every episode that has them, adaptation on vs
    off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    replays = _with_errors(replays)
    h = replays[0].config.horizon
    length = max(r.errors.on.shape[0] for r in replays)
    fig, ax = plt.subplots(figsize=(9, 4.5), constrained_layout=True)
    for label, style in (("on", "-"), ("off", "--")):
        for col, color in ((1, "C0"), (h, "C1")):
            stack = np.full((len(replays), length), np.nan)
            for i, r in enumerate(replays):
                err = getattr(r.errors, label)[:, col - 1]
                stack[i, :err.size] = err
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # steps no episode reached: NaN, not a warning
                mean = np.nanmean(stack, axis=0)
            ax.plot(np.arange(length), mean, style, color=color, label=f"{col}-step, adaptation {label}")
    ax.set_yscale("log")
    ax.set_xlabel("adapter steps since reset")
    ax.set_ylabel("mean RMS error (scale units)")
    ax.set_title(f"prediction error over {len(replays)} episodes")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _episode_section(index: int, r: EpisodeReplay) -> list[str]:
    ep, h, m = r.episode, r.config.horizon, r.metrics()
    cf, link = r.counterfactual, r.link
    pe = m["prediction_error"]
    lines = [f"## Episode {index}: `{ep.path.name}`", ""]
    lines += [f"robot `{ep.robot.name}`, {ep.num_steps} steps ({r.usable_steps.size} adapter steps), "
              f"{'complete' if ep.complete else 'NOT closed (crash?)'}, end: {ep.end_reason or '-'}; "
              f"task: {json.dumps(ep.task) if ep.task else 'not recorded'}", ""]
    if r.verdict is not None:
        lines += [f"**Verdict:** {r.verdict.line}", ""]
    if r.notes:
        lines += ["Notes:", *[f"- {n}" for n in r.notes], ""]
    lines += [f"bundle kind: `{r.logged.kind}`", "", "| metric | value |", "|---|---|"]
    if r.errors is None:
        rows = [("model prediction error", NO_DYNAMICS_MODEL)]
    else:
        rows = [("1-step prediction error, adaptation on / off", _errors_cell(pe["one_step"], 4, ratio=True)),
                (f"{h}-step prediction error, adaptation on / off", _errors_cell(pe[f"{h}_step"], 4, ratio=True))]
    belief = m["context"]
    if "final_var_mean" in belief:
        rows.append(("belief at the last adapter step: mean of var(z) / transitions observed",
                     f"{_fmt(belief['final_var_mean'])} / {belief['transitions_observed']}"))
    rows += [
        (f"context settles (within {r.config.settle_fraction:.0%})",
         "-" if r.settle_step is None else f"after {r.settle_step} adapter steps "
         f"({r.settle_step * ep.robot.ctrl_dt:.2f} s)"),
        (f"replay of `{cf.bundle_name}` vs logged adapter actions (max abs diff)",
         f"{_fmt(cf.max_abs_diff_adapter, 3)} -> "
         + ("reproduced" if cf.reproduced else "nothing to reproduce" if cf.reproduced is None
            else f"NOT reproduced (tolerance {REPRODUCTION_TOLERANCE:g})")
         + ("" if cf.same_bundle_as_log is not False else " (another bundle than the log's)")),
        ("replay vs logged commands from the adapter (max / mean abs diff)",
         f"{_fmt(cf.max_abs_diff_command, 3)} / {_fmt(cf.mean_abs_diff_command, 3)}"),
    ]
    if r.candidate_counterfactual is not None:
        cc = r.candidate_counterfactual
        cpe = m["candidate"]["prediction_error"]
        rows += [(f"candidate `{cc.bundle_name}` vs logged commands (max / mean abs diff)",
                  f"{_fmt(cc.max_abs_diff_command, 3)} / {_fmt(cc.mean_abs_diff_command, 3)}"),
                 ("candidate 1-step / {h}-step error (adaptation on)".replace("{h}", str(h)),
                  NO_DYNAMICS_MODEL if cpe.get("applicable") is False
                  else f"{_fmt(cpe['one_step']['on'])} / {_fmt(cpe[f'{h}_step']['on'])}")]
    rows += [
        ("loop period median / max (nominal)", f"{_fmt(link.period_ms_median)} / {_fmt(link.period_ms_max)} ms "
         f"({_fmt(link.nominal_period_ms)} ms)"),
        ("jitter std / p99 |period - median|", f"{_fmt(link.jitter_ms_std)} / {_fmt(link.jitter_ms_p99)} ms"),
        ("frames seen / dropped (seq gaps)", f"{link.frames_seen} / {link.frames_dropped} ({len(link.seq_gaps)})"),
        ("applied-command lag (periods after its frame: frames)",
         ", ".join(f"{lag}: {n}" for lag, n in link.command_lag.items()) or "not logged"),
        ("stale steps (no new frame) / unusable frames", f"{link.stale_steps} / {link.unusable_frames}"),
        ("steps by command source", ", ".join(f"{k}: {v}" for k, v in link.steps_by_source.items())),
        ("steps by safety state", ", ".join(f"{k}: {v}" for k, v in link.steps_by_state.items())),
        ("degraded periods / safety events / fallback steps",
         f"{len(link.degraded_periods)} / {len(link.safety_events)} / {link.fallbacks}"),
        ("compute per adapter step p50 / p99 (node: frame received -> command sent)", _compute_cell(link)),
    ]
    lines += [f"| {a} | {b} |" for a, b in rows]
    lines.append("")
    if link.degraded_periods:
        lines += ["Degraded periods (command not from the adapter, or safety state not OK):", "",
                  "| steps | seconds | sources | states |", "|---|---|---|---|"]
        lines += [f"| {p['start_step']}-{p['end_step']} | {p['seconds']:.3f} | {', '.join(p['sources'])} | "
                  f"{', '.join(p['states']) or '-'} |" for p in link.degraded_periods]
        lines.append("")
    if link.safety_events:
        lines += ["Safety events:", "", "| step | kind | level | action | message |", "|---|---|---|---|---|"]
        lines += [f"| {e['step']} | {e['kind']} | {e['level']} | {e['action'] or '-'} | "
                  f"{e['message'].replace('|', '/')} |" for e in link.safety_events]
        lines.append("")
    lines += [f"![episode {index}]({_plot_name(index, r)})", ""]
    return lines


def write_report(replays: list[EpisodeReplay], out: str | Path) -> dict[str, Path]:
    """Write report.md, one PNG per episode (+ an aggregate one for several) and metrics.json into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"report": out / REPORT_FILE, "metrics": out / METRICS_FILE}
    for i, r in enumerate(replays):
        paths[f"plot{i}"] = out / _plot_name(i, r)
        plot_episode(r, paths[f"plot{i}"])
    agg = aggregate(replays)
    lines = ["# Shadow replay report", ""]
    if replays:
        cfg = replays[0].config
        lines += [f"Bundle `{replays[0].logged.bundle_name}` (bundle.yaml sha256 "
                  f"`{replays[0].logged.bundle_sha256[:12]}`), horizon {cfg.horizon}, settling band "
                  f"{cfg.settle_fraction:.0%}. Definitions: docs/replay.md.", ""]
    if len(replays) > 1:
        if _with_errors(replays):
            paths["aggregate_plot"] = out / AGGREGATE_PLOT
            plot_aggregate(replays, paths["aggregate_plot"])
        h = replays[0].config.horizon
        lines += ["## All episodes", "", "| metric | value |", "|---|---|"]
        for key, value in agg.items():
            shown = (_compute_cell(value) if key == "compute_ms"
                     else ", ".join(f"{k} {_fmt(v)}" for k, v in value.items()) if isinstance(value, dict)
                     else _fmt(value))
            lines.append(f"| {key} | {shown} |")
        lines += ["", "| episode | steps | 1-step on/off | " + f"{h}-step on/off | reproduced | dropped | degraded "
                  "| events |", "|---|---|---|---|---|---|---|---|"]
        for i, r in enumerate(replays):
            m = r.metrics()["prediction_error"]
            one, multi = (("n/a", "n/a") if m.get("applicable") is False
                          else (_errors_cell(m["one_step"]), _errors_cell(m[f"{h}_step"])))
            lines.append(f"| {i}: `{r.path.name}` | {r.episode.num_steps} | {one} | {multi} | "
                         f"{r.counterfactual.reproduced} | {r.link.frames_dropped} | {len(r.link.degraded_periods)} | "
                         f"{len(r.link.safety_events)} |")
        lines += ["", f"![all episodes]({AGGREGATE_PLOT})" if "aggregate_plot" in paths
                  else f"Prediction error over all episodes: {NO_DYNAMICS_MODEL}.", ""]
    for i, r in enumerate(replays):
        lines += _episode_section(i, r)
    paths["report"].write_text("\n".join(lines))
    metrics = {"aggregate": agg, "episodes": [r.metrics() for r in replays]}
    paths["metrics"].write_text(json.dumps(metrics, indent=1, default=_json_default, allow_nan=True))
    return paths


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def terminal_summary(replays: list[EpisodeReplay], paths: dict[str, Path]) -> str:
    """One screen: a line per episode (up to 12), the aggregate, the notes and where the report is."""
    if not replays:
        return "no episodes"
    h = replays[0].config.horizon
    lines = [f"{'episode':<32}{'steps':>6}{'1-step on/off':>18}{f'{h}-step on/off':>18}{'repro':>8}{'diff':>10}"
             f"{'drop':>6}{'degr':>6}{'events':>7}"]
    for r in replays[:12]:
        pe = r.metrics()["prediction_error"]
        one, multi = ("n/a", "n/a") if pe.get("applicable") is False else (
            _fmt(pe["one_step"]["on"], 3) + "/" + _fmt(pe["one_step"]["off"], 3),
            _fmt(pe[f"{h}_step"]["on"], 3) + "/" + _fmt(pe[f"{h}_step"]["off"], 3))
        name = r.path.name if len(r.path.name) <= 31 else "..." + r.path.name[-28:]
        lines.append(f"{name:<32}{r.episode.num_steps:>6}{one:>18}{multi:>18}"
                     f"{ {True: 'yes', False: 'NO', None: '-'}[r.counterfactual.reproduced]:>8}"
                     f"{_fmt(r.counterfactual.max_abs_diff_adapter, 2):>10}"
                     f"{r.link.frames_dropped:>6}{len(r.link.degraded_periods):>6}{len(r.link.safety_events):>7}")
    if len(replays) > 12:
        lines.append(f"... and {len(replays) - 12} more (see the report)")
    agg = aggregate(replays)
    one, multi = agg["prediction_error_one_step"], agg[f"prediction_error_{h}_step"]
    errors = (f"prediction error {NO_DYNAMICS_MODEL}" if one.get("applicable") is False else
              f"error on/off 1-step {_fmt(one['on_over_off'], 3)}x, {h}-step {_fmt(multi['on_over_off'], 3)}x")
    lines.append(f"all {agg['episodes']} episode(s): {errors}; reproduced {agg['reproduced']}; "
                 f"{agg['safety_events']} safety event(s), {agg['frames_dropped']} dropped frame(s)")
    if agg["compute_ms"]["compute_timed_steps"]:
        lines.append(f"compute per adapter step p50 / p99: {_compute_cell(agg['compute_ms'])}")
    for r in replays:
        if r.candidate_counterfactual is not None:
            cc = r.candidate_counterfactual
            lines.append(f"candidate {cc.bundle_name} on {r.path.name}: max |diff| vs logged commands "
                         f"{_fmt(cc.max_abs_diff_command, 3)}")
    verdicts = [f"{r.path.name}: {r.verdict.line}" for r in replays if r.verdict is not None]
    lines += [f"verdict {v}" for v in verdicts[:12]]
    notes = [f"{r.path.name}: {n}" for r in replays for n in r.notes]
    lines += [f"note: {n}" for n in notes[:6]]
    if len(notes) > 6:
        lines.append(f"... {len(notes) - 6} more note(s) in the report")
    lines.append(f"report: {paths['report']}  metrics: {paths['metrics']}")
    return "\n".join(lines)


def calibrated_levels(path: str | Path, bundle: LoadedBundle) -> dict[str, Any]:
    """The in-distribution error levels of ``bundle`` from a ``metarl calibrate-safety`` report (``--calibration``),
    or a :class:`ReplayError` naming what is wrong with the file."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ReplayError(str(path), "--calibration", f"cannot read it as the JSON of metarl calibrate-safety: "
                          f"{exc}") from None
    if not isinstance(report, dict) or not isinstance(report.get("levels"), dict):
        raise ReplayError(str(path), "--calibration", "holds no 'levels' (written by an older metarl "
                          "calibrate-safety?): run metarl calibrate-safety on the bundle again")
    if report.get("bundle_sha256") != bundle.sha256:
        raise ReplayError(str(path), "--calibration", f"was calibrated for bundle sha256 "
                          f"{str(report.get('bundle_sha256'))[:12]}, --bundle is {bundle.name!r} "
                          f"({bundle.sha256[:12]}): calibrate this bundle (metarl calibrate-safety)")
    return report["levels"]


def run_cli(args: argparse.Namespace) -> int:
    """``metarl replay``: replay, write the report, print the summary."""
    config = ReplayConfig(horizon=args.horizon, settle_fraction=args.settle / 100.0, seed=args.seed)
    config.validate()
    bundle = load_bundle(args.bundle)
    levels = None if args.calibration is None else calibrated_levels(args.calibration, bundle)
    replays = replay_episodes(args.episodes, bundle, candidate=args.candidate, config=config, levels=levels)
    paths = write_report(replays, args.out)
    print(terminal_summary(replays, paths))
    return 0


__all__ = ["METRICS_FILE", "REPORT_FILE", "aggregate", "calibrated_levels", "plot_aggregate", "plot_episode", "run_cli",
           "terminal_summary", "write_report"]
