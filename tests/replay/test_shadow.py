"""Shadow replay: real MuJoCo episodes of the shipped bundle logged to MCAP, replayed through the bundle.

The same bundle reproduces the logged commands; adaptation lowers the dynamics model's error on an
off-nominal task; a candidate bundle and a wrong seed are counterfactuals, not reproductions; link faults
(dropped frames, stale telemetry, safe commands, safety events) appear in the report; the CLI writes the
report; bad inputs get clear errors. The fault-injected log of the whole stack (node + twin) is slow.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metarl_robot.logs.reader import read_episode
from metarl_robot.logs.writer import EpisodeLogWriter
from metarl_robot.paths import REPO_ROOT
from metarl_robot.real2sim.sim_record import record_sim_episode
from metarl_robot.replay.report import terminal_summary, write_report
from metarl_robot.replay.shadow import (
    REPRODUCTION_TOLERANCE,
    ReplayConfig,
    ReplayError,
    applied_actions,
    command_lag,
    replay_episode,
    replay_episodes,
)
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.runtime.kinds.model_based import ModelBasedBundle
from metarl_robot.spec.robot import load_robot
from tests.ros.conftest import colcon_install  # noqa: F401  (its session fixture: one colcon build for all)

BUNDLE = REPO_ROOT / "policies" / "cartpole_mb"
OFF_NOMINAL = {"pole_mass_scale": 2.5, "pole_length": 1.4, "motor_gain_scale": 0.65}
"""A heavy, long pole on a weak motor: far from the nominal cart-pole (inside the family's test box)."""
STEPS = 60
SEED = 3


@pytest.fixture(scope="module")
def bundle() -> ModelBasedBundle:
    return load_bundle(BUNDLE)


@pytest.fixture(scope="module")
def logged(bundle: ModelBasedBundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    task = {**bundle.family.nominal(), **OFF_NOMINAL}
    return record_sim_episode(bundle, task, tmp_path_factory.mktemp("logs") / "off_nominal.mcap", STEPS, seed=SEED)


@pytest.fixture(scope="module")
def replay(logged: Path, bundle: ModelBasedBundle):
    return replay_episode(logged, bundle)


def test_the_recorder_writes_a_real_episode_with_its_task_and_seed(logged: Path, bundle: ModelBasedBundle) -> None:
    ep = read_episode(logged)
    assert ep.num_steps == STEPS and ep.complete and ep.warnings == []
    assert ep.bundle["sha256"] == bundle.sha256 and ep.extra["seed"] == SEED
    assert {k: ep.task[k] for k in OFF_NOMINAL} == OFF_NOMINAL
    assert ep.adapted.all() and (ep.command_source == "adapter").all()
    assert np.ptp(ep.obs[:, 1]) > 0.5, "the pole moved: the adapter drove a real rollout"


def test_what_the_adapter_was_fed_the_robots_report_or_the_command_sent(logged: Path) -> None:
    ep = read_episode(logged)
    sent = applied_actions(ep, sent=True)
    np.testing.assert_array_equal(sent[0], ep.robot.safe_action)  # nothing sent before the first frame
    np.testing.assert_array_equal(sent[1:], ep.command[:-1])  # then the command answering the frame before
    # The recorder's robot applies each command at once and reports it: the report is the command sent.
    np.testing.assert_array_equal(applied_actions(ep)[1:], sent[1:])
    assert command_lag(ep) == {0: ep.num_steps - 1}  # each ran in the period right after the frame it answered


def test_the_same_bundle_reproduces_the_logged_commands(replay, logged: Path) -> None:
    ep = read_episode(logged)
    cf = replay.counterfactual
    assert cf.same_bundle_as_log is True and cf.steps_compared == STEPS
    assert cf.reproduced and cf.max_abs_diff_adapter <= REPRODUCTION_TOLERANCE
    assert cf.max_abs_diff_command <= REPRODUCTION_TOLERANCE
    np.testing.assert_allclose(replay.logged.context, ep.adaptation["context"], rtol=0, atol=1e-6)
    assert replay.notes == []
    # The replay's 1-step error "on" is the adapter's own prediction_error one step later (the logged command
    # was applied, so the prediction for the planned action is the prediction for the applied one).
    np.testing.assert_allclose(replay.errors.on[:-1, 0], ep.adaptation["prediction_error"][1:, 0], rtol=1e-4,
                               atol=1e-6)


def test_another_seed_is_a_counterfactual_not_a_reproduction(logged: Path, bundle: ModelBasedBundle) -> None:
    other = replay_episode(logged, bundle, config=ReplayConfig(horizon=2, seed=SEED + 1))
    assert not other.counterfactual.reproduced and other.counterfactual.max_abs_diff_adapter > 1e-3


def test_adaptation_lowers_the_prediction_error_off_nominal(replay) -> None:
    """Measured on the shipped bundle: the gain is real but small (about 1%: its context moves the dynamics
    little; docs/replay.md). Open-loop error grows with the horizon."""
    for h in (1, replay.config.horizon):
        summary = replay.errors.summary(h)
        assert summary["count"] > STEPS - h - 2
        assert summary["on"] < summary["off"], (h, summary)
    one, ten = replay.errors.summary(1), replay.errors.summary(10)
    assert ten["on"] > 3 * one["on"]
    assert replay.settle_step is not None and 0 <= replay.settle_step < STEPS


@pytest.mark.slow
def test_a_candidate_bundle_is_compared_with_the_logged_commands(logged: Path, bundle: ModelBasedBundle,
                                                                  tmp_path: Path) -> None:
    candidate_dir = tmp_path / "cartpole_mb_wide"
    shutil.copytree(BUNDLE, candidate_dir, ignore=shutil.ignore_patterns("eval"))
    manifest = candidate_dir / "bundle.yaml"
    text = manifest.read_text()
    assert "  noise_std: 0.6\n" in text
    manifest.write_text(text.replace("  noise_std: 0.6\n", "  noise_std: 0.3\n", 1))
    candidate = load_bundle(candidate_dir)
    result = replay_episode(logged, bundle, candidate=candidate, config=ReplayConfig(horizon=2))
    cc = result.candidate_counterfactual
    assert cc.same_bundle_as_log is False and cc.reproduced is None
    assert cc.max_abs_diff_command > 1e-3 and result.counterfactual.reproduced
    assert result.candidate_errors.on.shape == result.errors.on.shape

    # Replaying with the candidate as --bundle says the log came from another bundle.
    swapped = replay_episode(logged, candidate, config=ReplayConfig(horizon=2))
    assert swapped.counterfactual.same_bundle_as_log is False and not swapped.counterfactual.reproduced
    assert any("recorded with bundle 'cartpole_mb'" in n for n in swapped.notes)


def write_faulty_log(path: Path, bundle: ModelBasedBundle) -> Path:
    """A link fault logged as the node logs one, on the states of a clean sim episode: frames 21-23 lost (a
    seq gap), so 3 steps decide on the old frame with the safe command (SAFE_STOP) after a TELEMETRY_STALE
    event; LINK_RECOVERED, then the adapter again. The adapter is driven as the node drives it (observe only
    across consecutive frames, the previous command as the applied action)."""
    clean = path.with_name("clean_" + path.name)
    record_sim_episode(bundle, bundle.family.nominal(), clean, 40, seed=1)
    ep = read_episode(clean)
    robot = ep.robot
    adapter = bundle.make_adapter(seed=ep.extra["seed"])
    prev = None
    last_command = robot.safe_action
    with EpisodeLogWriter(path, robot, bundle=bundle, task=ep.task, extra_metadata=ep.extra) as log:
        for k in range(ep.num_steps):
            lost = 21 <= k <= 23
            frame = 20 if lost else k  # stale: the node decides on the newest frame it has
            if k == 21:
                log.write_safety_event("TELEMETRY_STALE", "no fresh frame", level="ERROR", action="safe_command",
                                       state_seq=int(ep.state_seq[20]), time_ns=int(ep.time_ns[k]) - 1)
            if k == 24:
                log.write_safety_event("LINK_RECOVERED", "fresh frames again", level="OK",
                                       state_seq=int(ep.state_seq[k]), time_ns=int(ep.time_ns[k]) - 1)
            params = {n: v[k] for n, v in ep.task_params.items()}
            common = dict(obs=ep.obs[frame], state_seq=int(ep.state_seq[frame]),
                          robot_stamp_ns=int(ep.robot_stamp_ns[frame]), receive_time_ns=int(ep.receive_time_ns[frame]),
                          applied_command_seq=int(ep.applied_command_seq[frame]), command_seq=int(ep.command_seq[k]),
                          task_params=params, time_ns=int(ep.time_ns[k]))
            if lost:
                last_command = robot.safe_action
                log.write_step(**common, command=last_command, command_source="safe_command",
                               safety_state="SAFE_STOP")
                continue
            if prev is not None and ep.state_seq[k] == ep.state_seq[prev] + 1:
                adapter.observe(ep.obs[prev][None], last_command[None], ep.obs[k][None])
            prev = k
            action, diagnostics = adapter.act(ep.obs[k][None], params)
            last_command = action[0]
            # Compute times as the node logs them (made up, to check the report's arithmetic): 0.3 ms of overhead.
            log.write_step(**common, command=last_command, command_source="adapter", safety_state="OK",
                           adapter_action=action, adaptation=diagnostics, adapter_compute_ns=2_000_000 + 1000 * k,
                           node_compute_ns=2_300_000 + 1000 * k)
    return path


@pytest.mark.slow
def test_link_faults_show_in_the_report(bundle: ModelBasedBundle, tmp_path: Path) -> None:
    path = write_faulty_log(tmp_path / "faulty.mcap", bundle)
    result = replay_episode(path, bundle, config=ReplayConfig(horizon=3))
    link = result.link
    assert link.frames_dropped == 3 and link.seq_gaps == [(24, 3)]
    assert link.stale_steps == 3 and link.unusable_frames == 0
    assert link.steps_by_source == {"adapter": 37, "safe_command": 3}
    assert link.degraded_periods == [{"start_step": 21, "end_step": 23, "seconds": pytest.approx(0.12),
                                      "sources": ["safe_command"], "states": ["SAFE_STOP"]}]
    assert [(e["kind"], e["step"]) for e in link.safety_events] == [("TELEMETRY_STALE", 21), ("LINK_RECOVERED", 24)]
    assert link.period_ms_median == pytest.approx(40.0)
    # The adapter skipped the gap (no transition observed across it): still reproduced, as the node decided.
    assert result.counterfactual.reproduced
    assert not result.logged.observed[24] and result.logged.observed[25]
    paths = write_report([result], tmp_path / "report")
    report = paths["report"].read_text()
    assert "| 21-23 | 0.120 | safe_command | SAFE_STOP |" in report
    assert "| 21 | TELEMETRY_STALE | ERROR | safe_command | no fresh frame |" in report
    assert "frames seen / dropped (seq gaps) | 37 / 3 (1)" in report
    # The node's compute times, paired per step from the log (the safe-command steps did not run the adapter).
    assert link.compute_timed_steps == 37 and link.node_overhead_ms_p50 == link.node_overhead_ms_p99 == 0.3
    assert link.adapter_compute_ms_p50 == pytest.approx(2.0 + 0.001 * np.median([k for k in range(40)
                                                                                 if not 21 <= k <= 23]))
    assert ("| compute per adapter step p50 / p99 (node: frame received -> command sent) | adapter 2.02 / 2.04 ms, "
            "node 2.32 / 2.34 ms, overhead 0.3 / 0.3 ms (37 steps) |") in report


@pytest.mark.slow
def test_several_episodes_make_one_report_with_aggregates(logged: Path, replay, bundle: ModelBasedBundle,
                                                          tmp_path: Path) -> None:
    faulty = replay_episode(write_faulty_log(tmp_path / "faulty.mcap", bundle), bundle)
    paths = write_report([replay, faulty], tmp_path / "out")
    metrics = json.loads(paths["metrics"].read_text())
    assert [Path(e["path"]).name for e in metrics["episodes"]] == ["off_nominal.mcap", "faulty.mcap"]
    agg = metrics["aggregate"]
    assert agg["episodes"] == 2 and agg["steps"] == STEPS + 40 and agg["reproduced"] == "2/2"
    assert agg["frames_dropped"] == 3 and agg["safety_events"] == 2
    report = paths["report"].read_text()
    assert report.count("## Episode ") == 2 and "## All episodes" in report
    for key in ("plot0", "plot1", "aggregate_plot"):
        png = paths[key].read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    summary = terminal_summary([replay, faulty], paths)
    assert len(summary.splitlines()) <= 24 and "reproduced 2/2" in summary and str(paths["report"]) in summary
    # Only the faulty log is timed (a sim recording is not): the aggregate pools its steps alone.
    assert agg["compute_ms"]["compute_timed_steps"] == 37 and agg["compute_ms"]["node_overhead_ms_p99"] == 0.3
    assert "compute per adapter step p50 / p99: adapter 2.02 / 2.04 ms" in summary
    assert "not timed (a version-1 log, an import or a sim recording)" in report


def test_link_health_counts_every_kind_of_fault(bundle: ModelBasedBundle, tmp_path: Path) -> None:
    """A log of a node that never got to run its adapter: only the link and the safety layer to report."""
    robot = load_robot("cartpole")
    path = tmp_path / "link.mcap"
    period = 40_000_000
    # (state_seq, command_source, safety_state, time offset in ns): a seq gap of 2 before step 3, a repeated
    # frame at step 5 (stale), a late step 6, fallback commands, a step where nothing was sent.
    steps = [(1, "safe_command", "DISARMED", 0), (2, "safe_command", "DISARMED", 0), (5, "fallback_controller",
             "FALLBACK", 0), (6, "fallback_controller", "FALLBACK", 0), (7, "safe_command", "SAFE_STOP", 0),
             (7, "none", "SAFE_STOP", 0), (8, "safe_command", "SAFE_STOP", 25_000_000)]
    with EpisodeLogWriter(path, robot, bundle=bundle) as log:
        log.write_safety_event("PREDICTION_ERROR", "model error above threshold", level="WARN", action="fallback",
                               time_ns=period)
        for k, (seq, source, state, late) in enumerate(steps):
            sent = source != "none"
            log.write_step(obs=np.full(4, 0.1 * k), state_seq=seq, robot_stamp_ns=seq * period,
                           receive_time_ns=(k + 1) * period, command=robot.safe_action if sent else None,
                           command_seq=k + 1 if sent else None, command_source=source, safety_state=state,
                           time_ns=(k + 1) * period + late + 1)
    result = replay_episode(path, bundle, config=ReplayConfig(horizon=2))
    link = result.link
    assert (link.frames_seen, link.frames_dropped, link.seq_gaps) == (6, 2, [(2, 2)])
    assert (link.stale_steps, link.unusable_frames, link.fallbacks) == (1, 6, 2)
    assert link.steps_by_source == {"fallback_controller": 2, "none": 1, "safe_command": 4}
    assert link.steps_by_state == {"DISARMED": 2, "FALLBACK": 2, "SAFE_STOP": 3}
    assert [(p["start_step"], p["end_step"]) for p in link.degraded_periods] == [(0, 6)]
    assert link.safety_events[0]["kind"] == "PREDICTION_ERROR" and link.safety_events[0]["action"] == "fallback"
    assert np.isnan(link.period_ms_median), "no consecutive adapter commands: no loop period to measure"
    assert result.counterfactual.reproduced is None and result.settle_step is None
    assert any("the adapter never ran" in n for n in result.notes)
    report = write_report([result], tmp_path / "report")["report"].read_text()
    assert "nothing to reproduce" in report and "| 0-6 |" in report and "PREDICTION_ERROR" in report
    assert link.compute_timed_steps == 0 and np.isnan(link.node_overhead_ms_p99)
    assert "| compute per adapter step p50 / p99 (node: frame received -> command sent) | not timed" in report


def test_a_version_1_log_has_link_health_without_compute_times() -> None:
    """Logs from before the compute times (tests/logs/episode_log_v1.mcap) still get their link health."""
    from metarl_robot.replay.shadow import link_health

    link = link_health(read_episode(REPO_ROOT / "tests" / "logs" / "episode_log_v1.mcap"))
    assert link.frames_seen == 4 and link.steps_by_source == {"adapter": 2, "none": 1, "safe_command": 1}
    assert link.compute_timed_steps == 0
    assert np.isnan(link.adapter_compute_ms_p50) and np.isnan(link.node_overhead_ms_p99)


def test_bad_inputs_get_clear_errors(tmp_path: Path, bundle: ModelBasedBundle) -> None:
    with pytest.raises(ReplayError, match=r"missing.mcap: episodes: file\(s\) not found"):
        replay_episodes([tmp_path / "missing.mcap"], bundle)
    cheetah = tmp_path / "cheetah.mcap"
    robot = load_robot("half_cheetah")
    with EpisodeLogWriter(cheetah, robot) as log:
        log.write_step(obs=np.zeros(robot.obs_dim), state_seq=1, robot_stamp_ns=1, receive_time_ns=1,
                       command=np.zeros(robot.action_dim), command_seq=1, time_ns=2)
    with pytest.raises(ReplayError, match=r"--bundle: bundle 'cartpole_mb' is for robot 'cartpole'.*the log is "
                       r"from robot 'half_cheetah'"):
        replay_episode(cheetah, bundle)
    with pytest.raises(ValueError, match="horizon: must be an integer >= 1"):
        replay_episode(cheetah, bundle, config=ReplayConfig(horizon=0))


@pytest.mark.integration
@pytest.mark.slow
def test_cli_writes_the_report_and_a_summary(logged: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "metarl_robot.cli", "replay", str(logged), "--bundle", str(BUNDLE), "--out",
           str(out), "--horizon", "3"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert "reproduced 1/1" in result.stdout and f"report: {out / 'report.md'}" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["episodes"][0]["counterfactual"]["reproduced"] is True
    assert "3_step" in metrics["episodes"][0]["prediction_error"]

    bad = subprocess.run([*cmd[:4], str(tmp_path / "nope.mcap"), *cmd[5:]], capture_output=True, text=True,
                         timeout=300, cwd=REPO_ROOT)
    assert bad.returncode == 2 and "metarl replay: error:" in bad.stderr and "not found" in bad.stderr


# ---- the whole stack: node + twin with a telemetry freeze -----------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow
def test_a_fault_injected_node_episode_shows_its_faults(tmp_path: Path, bundle: ModelBasedBundle,
                                                        colcon_install) -> None:  # noqa: F811
    import tests.ros.test_faults as faults

    run = faults.run_scenario(colcon_install, tmp_path, faults=[f"freeze={faults.FREEZE_AT}:{faults.FREEZE_FOR}"],
                              duration=faults.FREEZE_AT + faults.FREEZE_FOR + 2.0)
    path = run.episode.path
    result = replay_episode(path, bundle, config=ReplayConfig(horizon=3))
    link = result.link
    kinds = [e["kind"] for e in link.safety_events]
    assert "TELEMETRY_FROZEN" in kinds and "LINK_RECOVERED" in kinds
    assert link.stale_steps > 0 and link.steps_by_source.get("safe_command", 0) > 0
    frozen = next(e for e in link.safety_events if e["kind"] == "TELEMETRY_FROZEN")
    assert any(p["start_step"] <= frozen["step"] + 2 <= p["end_step"] + 2 and "safe_command" in p["sources"]
               for p in link.degraded_periods), link.degraded_periods
    # The node ran its first episode with the shipped bundle: the replay reproduces its adapter actions.
    assert result.counterfactual.same_bundle_as_log is True
    assert result.counterfactual.reproduced, (result.counterfactual, result.notes)
    report = write_report([result], tmp_path / "report")["report"].read_text()
    assert "TELEMETRY_FROZEN" in report and "safe_command" in report



def test_an_imported_log_is_replayed_as_a_counterfactual(tmp_path):
    # A log from another controller (CSV import): no adapter ran, so every finite frame is a usable one.
    from metarl_robot.replay.importers import import_log
    from metarl_robot.replay.shadow import replay_episode, usable_frames
    from metarl_robot.spec.robot import load_robot

    robot = load_robot("cartpole")
    rng = np.random.default_rng(0)
    n = 40
    t = np.arange(n) * robot.ctrl_dt
    obs = np.cumsum(rng.normal(0, 0.01, (n, 4)), axis=0) + np.array([0.0, np.pi, 0.0, 0.0])
    rows = ["t,x,theta,xd,thetad,u"] + [",".join(f"{v:.9g}" for v in (t[i], *obs[i], 0.1)) for i in range(n)]
    (tmp_path / "log.csv").write_text("\n".join(rows) + "\n")
    mapping = {"time": {"column": "t", "units": "s"},
               "observation": {"cart_pos": "x", "pole_angle": "theta", "cart_vel": "xd", "pole_angvel": "thetad"},
               "action": {"motor": "u"}}
    import_log(tmp_path / "log.csv", robot, tmp_path / "log.mcap", mapping=mapping)
    result = replay_episode(tmp_path / "log.mcap", BUNDLE)
    assert usable_frames(result.episode).sum() == n and not result.episode.adapted.any()
    assert any("imported from csv" in note for note in result.notes)
    assert result.counterfactual.reproduced is None  # nothing of ours ran: no reproduction to check
    assert np.isfinite(result.logged.actions).all()  # but the bundle acted on every frame
    assert np.isfinite(result.errors.on[:, 0][:-1]).all()


def test_the_verdict_compares_the_logs_own_errors_with_the_calibrated_level(logged: Path, bundle) -> None:
    from metarl_robot.replay.shadow import distribution_verdict, link_health

    ep = read_episode(logged)
    link = link_health(ep)
    untested = distribution_verdict(ep, bundle, link, None)
    assert untested.within is None and "no calibrated level" in untested.line and untested.error_median > 0
    fields = [f.name for f in ep.robot.measured_fields]
    high = {"after_steps": 9, "prediction_error_median_max": 10 * untested.error_median,
            "field_error_median_max": dict.fromkeys(fields, 1.0)}
    within = distribution_verdict(ep, bundle, link, high)
    assert within.within is True and within.error_ratio == pytest.approx(0.1) and within.fields == []
    assert within.line.startswith("within the training distribution")
    low = {"after_steps": 9, "prediction_error_median_max": 0.5 * untested.error_median,
           "field_error_median_max": {**dict.fromkeys(fields, 1.0), "pole_angvel": 1e-9}}
    outside = distribution_verdict(ep, bundle, link, low)
    assert outside.within is False and outside.error_ratio == pytest.approx(2.0) and outside.fields == ["pole_angvel"]
    assert "OUTSIDE the training distribution" in outside.line and "pole_angvel" in outside.line


def test_a_calibration_of_another_bundle_is_refused(tmp_path: Path, bundle) -> None:
    from metarl_robot.replay.report import calibrated_levels

    path = tmp_path / "safety_calibration.json"
    path.write_text(json.dumps({"bundle_sha256": "0" * 64, "levels": {"prediction_error_median_max": 0.01}}))
    with pytest.raises(ReplayError, match="was calibrated for bundle sha256 000000000000"):
        calibrated_levels(path, bundle)
    path.write_text(json.dumps({"bundle_sha256": bundle.sha256}))
    with pytest.raises(ReplayError, match="holds no 'levels'"):
        calibrated_levels(path, bundle)
    path.write_text(json.dumps({"bundle_sha256": bundle.sha256, "levels": {"prediction_error_median_max": 0.01}}))
    assert calibrated_levels(path, bundle) == {"prediction_error_median_max": 0.01}


def test_an_online_bundle_is_graded_with_the_last_layer_it_had_fitted(tmp_path: Path) -> None:
    """The shipped online bundle on an out-of-distribution task: the replay's *on* column predicts from each frame
    with the context and the last layer the adapter had there, so its one-step error is the adapter's own logged
    prediction_error one step later, and far below the meta-trained model's (*off*)."""
    online = load_bundle(REPO_ROOT / "policies" / "cartpole_online")
    task = online.family.sample(np.random.default_rng(3), "test", 1)[0]
    path = record_sim_episode(online, task, tmp_path / "online.mcap", 120, seed=2)
    ep = read_episode(path)
    result = replay_episode(path, online, config=ReplayConfig(horizon=5))
    assert result.counterfactual.reproduced and result.logged.model_states is not None
    np.testing.assert_allclose(result.errors.on[:-1, 0], ep.adaptation["prediction_error"][1:, 0], rtol=1e-4,
                               atol=1e-6)
    late = slice(60, None)  # after the last layer has rested on 60 transitions
    on, off = np.nanmean(result.errors.on[late, 0]), np.nanmean(result.errors.off[late, 0])
    assert on < 0.7 * off, (on, off)
