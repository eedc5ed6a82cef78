"""Real-to-sim identification (metarl_robot/real2sim/identify.py) on episode logs with KNOWN hidden parameters.

The fast tests record the shipped bundle policies/cartpole_mb driving the cart-pole in MuJoCo on a known
task (record_sim_episode: the real EpisodeLogWriter, read back from the MCAP file), and check that the
identified parameters are within the tolerance docs/identify.md states and that the reported 95 % intervals
cover the truth on a log with sensor noise. The slow test runs the installed ROS 2 node against the digital
twin (`metarl sim-robot --task ...`) and identifies the twin's hidden task from the node's own log.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import mujoco
import numpy as np
import pytest
import yaml

from metarl_robot.envs.meta_env import MetaMujocoEnv
from metarl_robot.envs.out_of_family import OutOfFamily
from metarl_robot.logs.reader import read_episode
from metarl_robot.logs.writer import EpisodeLogWriter
from metarl_robot.real2sim.identify import (
    FIT_ALPHA,
    IDENTIFIED_MAX_BOX_FRACTION,
    IdentifyConfig,
    chi2_survival,
    identify,
    load_task_file,
    parse_noise_std,
    write_task_file,
)
from metarl_robot.real2sim.sim_record import record_sim_episode
from metarl_robot.real2sim.twin import resolve_task
from metarl_robot.replay.shadow import command_lag
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.spec.family import load_family
from tests.conftest import edit_yaml
from tests.ros.conftest import colcon_install  # noqa: F401 -- the session fixture of the slow test

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "policies" / "cartpole_mb"
FAMILY = "cartpole_swingup"
TRUE_TASK = {"pole_mass_scale": 1.6, "pole_length": 0.8, "cart_friction": 0.3, "motor_gain_scale": 0.8,
             "target_x": 0.0}
"""A heavy, short pole on a sticky rail with a weak motor: every dynamics parameter away from its nominal."""
TOLERANCE = {"pole_mass_scale": 0.10, "pole_length": 0.03, "cart_friction": 0.06, "motor_gain_scale": 0.03}
"""Absolute tolerance per parameter at the test budget (set for CEM alone; the refinement now lands far inside)."""
TEST_BUDGET = IdentifyConfig(window=10, population=32, iterations=8, restarts=2, seed=0)
"""A small budget: ~1.5 s on one core for a 150-step log."""


NOISY_BUDGET = IdentifyConfig(window=5, population=32, iterations=10, restarts=2, seed=0, max_delay=0)
"""~3 s: the budget of the interval-coverage test (the answer is the cost's minimum whatever the budget, once
CEM lands in its basin: the refinement finds it). No delay tried: the segments start where the calibration of
docs/identify.md had them (trying delays starts each after the commands it needs)."""
SENSOR_NOISE = 0.01
"""Sensor noise of the coverage test's log, in robot.yaml scale units (1 cm on the cart, 0.01 rad on the pole)."""


def record(path: Path, task: dict[str, float], steps: int, seed: int = 1, **faults) -> Path:
    """The shipped bundle driving the cart-pole in MuJoCo with ``task``, logged as the node would."""
    return record_sim_episode(load_bundle(BUNDLE), task, path, steps, seed=seed, **faults)


@pytest.fixture(scope="module")
def sim_log(tmp_path_factory) -> Path:
    return record(tmp_path_factory.mktemp("identify") / "episode.mcap", TRUE_TASK, steps=150)


@pytest.fixture(scope="module")
def result(sim_log):
    return identify(sim_log, FAMILY, TEST_BUDGET)


def test_identified_parameters_are_within_the_stated_tolerance(result):
    by_name = {p.name: p for p in result.params}
    for name, tol in TOLERANCE.items():
        p = by_name[name]
        assert p.identified, f"{name} flagged unidentified: {p}"
        assert abs(p.value - TRUE_TASK[name]) <= tol, f"{name}: {p.value} vs true {TRUE_TASK[name]} (tol {tol})"
        assert p.true_value == pytest.approx(TRUE_TASK[name])  # the log recorded the task
        # The model is exact and the log noise-free: the refinement lands on the truth to round-off, and the
        # interval (sigma floored at NOISE_FLOOR, far above round-off) holds it.
        assert abs(p.value - TRUE_TASK[name]) < 1e-9, f"{name}: {p.value} vs true {TRUE_TASK[name]}"
        assert p.interval[0] <= TRUE_TASK[name] <= p.interval[1], (name, p.interval)
        assert 0 < p.std_error < 1e-6 and p.search_spread >= 0
    # The answer explains the log far better than the family's nominal physics, and better than CEM's own.
    assert result.cost < result.nominal_cost / 100 and result.cost <= result.search_cost
    assert result.transitions == 149 and result.segments == 14
    for p in result.params:  # one criterion for every searched parameter (with the box-face flag)
        if p.box_fraction is not None:
            assert p.identified == (p.box_fraction < IDENTIFIED_MAX_BOX_FRACTION and p.box_face is None), p


def test_lost_frames_and_safe_commands_are_handled_not_mistaken_for_physics(tmp_path):
    path = record(tmp_path / "faulty.mcap", TRUE_TASK, steps=100, lost_steps={30, 31, 60},
                  safe_steps={45, 46, 47, 70})
    ep = read_episode(path)
    assert ep.num_steps == 97
    res = identify(ep, FAMILY, TEST_BUDGET)
    # 96 pairs of logged steps; the two across the lost frames (29->32, 59->61) are skipped. The
    # safe-command periods are used with the safe command (the frame after says it was applied).
    assert res.transitions == 96 - 2, res.summary()
    by_name = {p.name: p for p in res.params}
    for name, tol in TOLERANCE.items():
        assert abs(by_name[name].value - TRUE_TASK[name]) <= tol, res.summary()


def test_reward_parameters_are_reported_as_not_identified(result):
    target = next(p for p in result.params if p.name == "target_x")
    assert not target.identified and "reward parameter" in target.note
    assert target.value == 0.0 and target.std_error is None and target.interval is None


def test_the_reported_uncertainty_holds_the_truth_on_a_noisy_log(tmp_path):
    """Sensor noise of 0.01 scale units on every logged observation: the estimates move off the truth, and the
    reported standard errors must account for it while staying informative.

    Criterion: for every dynamics parameter of this log, |estimate - true| <= 3 reported standard errors
    (search coordinates: log space for the log-uniform scales), and the interval spans under a quarter of the
    box. Why 3 and not the 95 % interval: four parameters from one log; with calibrated 95 % intervals, all
    four hold the truth on only ~81 % of logs, so a 95 % check would fail on one seed in five by chance
    (docs/identify.md, "Calibration": the 95 % intervals held 122 of 128 true values over 32 noisy logs, and
    this log is one where friction lies 2.7 standard errors off). 3 standard errors (99.7 % each) fails a
    calibrated estimate on ~1 % of logs. Ignoring the correlation inside a segment (the independent-residual
    standard errors alone) understates every standard error here by 30-50 %; over many logs that is what makes
    independent intervals miss (docs/identify.md, "Calibration"). Which single log shows it depends on the
    trajectory the planner drove, so the test checks the size of the correction, not a miss on this log."""
    path = record(tmp_path / "noisy.mcap", TRUE_TASK, steps=150, obs_noise=SENSOR_NOISE)
    res = identify(path, FAMILY, NOISY_BUDGET, noise_std=SENSOR_NOISE)
    assert res.noise_std == pytest.approx(SENSOR_NOISE, rel=0.6)  # the logged noise plus its spread over a segment
    # The family explains the log up to the noise it was told: the whitened residuals are as the noise makes them.
    assert res.fit.verdict == "explained" and res.fit.p_value >= FIT_ALPHA, res.fit.line()
    assert res.fit.chi2 / res.fit.dof == pytest.approx(1.0, abs=0.15) and res.fit.misfit_fields == []
    assert res.fit.noise_std["pole_angle"] == pytest.approx(SENSOR_NOISE * 3.14)  # scale units -> field units

    def z(p, std_error: float) -> float:
        """The error in standard errors, in search coordinates (the delta method's scale for log space)."""
        if p.name.endswith("_scale"):  # log_uniform in the family: searched and reported in log space
            return abs(np.log(p.value / p.true_value)) / (std_error / p.value)
        return abs(p.value - p.true_value) / std_error

    z_reported, z_independent = {}, {}
    for name in TOLERANCE:
        p = next(q for q in res.params if q.name == name)
        assert p.identified and p.box_fraction < 0.25, res.summary()  # informative: a quarter of its box at most
        assert p.value != pytest.approx(TRUE_TASK[name], abs=1e-6)  # the noise did move the estimate
        assert p.std_error >= p.std_error_independent > 0
        z_reported[name], z_independent[name] = z(p, p.std_error), z(p, p.std_error_independent)
    assert max(z_reported.values()) <= 3.0, f"{z_reported}\n{res.summary()}"
    ratios = {name: next(q for q in res.params if q.name == name).std_error / next(
        q for q in res.params if q.name == name).std_error_independent for name in TOLERANCE}
    assert min(ratios.values()) > 1.3, (ratios, z_independent)  # the segments' correlation matters, everywhere


def test_physics_outside_the_family_is_not_explained_and_gets_no_interval(tmp_path):
    # Hinge damping no family parameter models, under the same sensor noise: the best task of the family leaves a
    # misfit the noise cannot account for, largest in the pole's angular velocity, which the damping acts on (the
    # angle it integrates into may be flagged too, depending on the trajectory).
    damping = OutOfFamily.parse(["damping=hinge:0.02"])
    path = record(tmp_path / "damped.mcap", TRUE_TASK, steps=150, obs_noise=SENSOR_NOISE, effects=damping)
    res = identify(path, FAMILY, NOISY_BUDGET, noise_std=SENSOR_NOISE)
    assert res.fit.verdict == "not explained" and res.fit.p_value < 1e-6, res.fit.line()
    assert "pole_angvel" in res.fit.misfit_fields and set(res.fit.misfit_fields) <= {"pole_angle", "pole_angvel"}
    assert max(res.fit.field_ratio, key=res.fit.field_ratio.get) == "pole_angvel"
    assert res.fit.field_ratio["pole_angvel"] > 3.0
    for p in res.params:  # never an interval from a fit that failed
        assert not p.identified and p.interval is None and p.std_error is None
    assert "NOT EXPLAINED" in res.summary() and "no intervals" in res.summary()
    assert read_episode(path).extra["out_of_family"]["effects"]["joint_damping"] == {"hinge": 0.02}


@pytest.mark.parametrize("delay", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_delay_the_robot_does_not_report_is_estimated_exactly(tmp_path, delay):
    # The motors run each command `delay` periods late and the robot's frames do not say so (applied_command_seq
    # names the command just sent, as a motor driver's latency hides it): the fit with the right shift is the
    # closest, and with it the family explains the log and finds the task.
    path = record(tmp_path / "late.mcap", TRUE_TASK, steps=150, seed=3, obs_noise=SENSOR_NOISE,
                  effects=OutOfFamily(delay_periods=delay))
    res = identify(path, FAMILY, IdentifyConfig(window=5, population=32, iterations=10, restarts=2, seed=0),
                   noise_std=SENSOR_NOISE)
    assert res.delay == delay and sorted(res.delay_costs) == [0, 1, 2], res.summary()
    others = [cost for d, cost in res.delay_costs.items() if d != delay]
    assert res.delay_costs[delay] < 0.3 * min(others), res.delay_costs  # not a close call
    assert res.fit.verdict == "explained", res.fit.line()
    for name, tol in TOLERANCE.items():
        assert abs(res.task[name] - TRUE_TASK[name]) <= tol, res.summary()
    assert f"command-to-effect delay: {delay} period(s)" in res.summary()


def test_a_family_with_an_action_delay_parameter_gets_the_delay_found(tmp_path, sim_copy):
    # The same late motors, identified with a family that models the delay: its action_delay parameter takes the
    # delay found, as an identified value (a whole number of periods, chosen by comparing fits: no interval).
    path = record(tmp_path / "late.mcap", TRUE_TASK, steps=150, seed=3, effects=OutOfFamily(delay_periods=1))
    edit_yaml(sim_copy / "tasks" / "cartpole_swingup.yaml", lambda d: d["params"].update(command_delay={
        "kind": "dynamics", "effect": {"action_delay": True}, "sampling": "integer", "nominal": 0, "train": [0, 2],
        "test": [0, 3], "units": "control steps"}))
    res = identify(path, FAMILY, IdentifyConfig(window=5, population=32, iterations=6, restarts=1, seed=0))
    delay = next(p for p in res.params if p.name == "command_delay")
    assert res.delay == 1 and res.task["command_delay"] == 1.0 and delay.identified and delay.interval is None


def test_without_a_sensor_noise_the_fit_is_untested_and_robot_yaml_can_give_it(tmp_path, sim_copy):
    path = record(tmp_path / "noisy.mcap", TRUE_TASK, steps=60, obs_noise=SENSOR_NOISE)
    budget = IdentifyConfig(window=5, population=16, iterations=3, restarts=1, seed=0)
    res = identify(path, FAMILY, budget)
    assert res.fit.verdict == "untested" and res.fit.p_value is None and "UNTESTED" in res.summary()
    assert all(p.interval is not None for p in res.params if p.kind == "dynamics")  # as before: model taken as exact
    # The robot's calibration in its robot.yaml (field units), here the installed one's (the log's has none).
    spec_path = sim_copy / "robots" / "cartpole" / "robot.yaml"
    spec = yaml.safe_load(spec_path.read_text())
    for entry in spec["observation"]:
        entry["noise_std"] = SENSOR_NOISE * entry["scale"]
    spec_path.write_text(yaml.safe_dump(spec))
    res = identify(path, FAMILY, budget)
    assert res.fit.noise_source == "the installed robot.yaml" and res.fit.verdict in ("explained", "not explained")
    assert res.fit.noise_std["cart_vel"] == pytest.approx(SENSOR_NOISE * 2.0)


def test_noise_std_is_read_and_refused_naming_the_field():
    assert parse_noise_std(None) is None and parse_noise_std(["0.01"]) == 0.01
    assert parse_noise_std(["cart_pos=0.01", "pole_angle=0.002"]) == {"cart_pos": 0.01, "pole_angle": 0.002}
    with pytest.raises(ValueError, match="--noise-std pole_angle: expected a number, got 'x'"):
        parse_noise_std(["pole_angle=x"])
    with pytest.raises(ValueError, match="FIELD=STD"):
        parse_noise_std(["0.01", "0.02"])


def test_the_bad_noise_of_a_field_is_refused(sim_log):
    budget = IdentifyConfig(window=5, population=16, iterations=1, restarts=1, seed=0)
    with pytest.raises(ValueError, match="--noise-std wheel: not an observation field of cartpole"):
        identify(sim_log, FAMILY, budget, noise_std={"wheel": 0.1})
    with pytest.raises(ValueError, match="missing cart_vel, pole_angvel"):
        identify(sim_log, FAMILY, budget, noise_std={"cart_pos": 0.01, "pole_angle": 0.01})
    with pytest.raises(ValueError, match=r"--noise-std cart_pos: a standard deviation >= 0, got -0\.01"):
        identify(sim_log, FAMILY, budget, noise_std=-0.01)


def test_a_fit_whose_simulation_diverged_is_not_explained_and_says_why():
    from metarl_robot.real2sim.identify import FitTest

    fit = FitTest("not explained", 0.0, None, 100, FIT_ALPHA, {"cart_pos": 0.01}, "--noise-std")
    assert "diverged" in fit.line()


def test_the_chi_square_tail_matches_the_tables():
    # Upper 5 % and 1 % points of chi-square (standard tables): 124.342 and 135.807 for 100 degrees of freedom,
    # 1074.679 for 1000.
    assert chi2_survival(124.342, 100) == pytest.approx(0.05, rel=0.02)
    assert chi2_survival(135.807, 100) == pytest.approx(0.01, rel=0.05)
    assert chi2_survival(1074.679, 1000) == pytest.approx(0.05, rel=0.01)
    assert chi2_survival(0.0, 10) == 1.0


def test_a_log_whose_commands_never_change_is_refused_naming_what_to_record(tmp_path):
    # The cart never driven (zero force, at rest on the rail): friction and motor gain leave no trace in it.
    env = MetaMujocoEnv(FAMILY)
    obs, info = env.reset(seed=0, options={"task": TRUE_TASK})
    path = tmp_path / "still.mcap"
    with EpisodeLogWriter(path, env.robot, task=info["task"]) as log:
        for k in range(40):
            log.write_step(obs=obs, state_seq=k + 1, robot_stamp_ns=k + 1, receive_time_ns=k + 1,
                           applied_command_seq=k, command=np.zeros(1), command_seq=k + 1, time_ns=k + 1)
            obs, *_ = env.step(np.zeros(1))
    with pytest.raises(ValueError, match=r"every usable period ran the same command \(\[0.0\]\).*record an episode "
                       "in which the robot is driven"):
        identify(path, FAMILY, IdentifyConfig(population=16, iterations=3, restarts=1))


def test_a_direction_the_data_does_not_constrain_gets_an_unbounded_interval():
    # A residual Jacobian whose second column is zero (a parameter with no effect on this log): that parameter's
    # variance is infinite, the other's is the textbook sigma^2 / |J_1|^2.
    from metarl_robot.real2sim.identify import _covariance

    rng = np.random.default_rng(0)
    jac = np.stack([rng.standard_normal(200), np.zeros(200)], axis=1)
    resid = 0.01 * rng.standard_normal(200)
    reported, independent, noise_var = _covariance(jac, resid, segments=1)
    assert np.isinf(reported[1, 1]) and np.isinf(independent[1, 1])
    assert independent[0, 0] == pytest.approx(noise_var / (jac[:, 0] @ jac[:, 0]))


def test_the_task_file_is_accepted_by_sim_robot_and_reproduces_the_log(result, sim_log, tmp_path):
    path = write_task_file(result, tmp_path / "task.yaml")
    family = load_family(FAMILY)
    # The same reader `metarl sim-robot --task` uses, and the loader for scripts (`evaluate(tasks=[...])`).
    assert resolve_task(str(path), family, seed=0) == load_task_file(path, family) == family.validate(result.task)
    # Replaying the logged commands on the identified task tracks the log closely for a whole second.
    ep = read_episode(sim_log)
    env = MetaMujocoEnv(FAMILY, task=load_task_file(path, family))
    env.reset(seed=0)
    env.data.qpos[:] = ep.obs[20, :2]
    env.data.qvel[:] = ep.obs[20, 2:]
    mujoco.mj_forward(env.model, env.data)
    env._last_sent = ep.command[19].copy()
    for k in range(20, 45):
        obs, *_ = env.step(ep.command[k])
    assert np.abs((obs - ep.obs[45]) / env.robot.obs_scale).max() < 0.05


def test_cli_writes_the_task_file_and_the_json(sim_log, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "metarl_robot.cli", "identify", str(sim_log), "--family", FAMILY,
                           "--out", str(out), "--restarts", "1", "--iterations", "3", "--population", "16"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "motor_gain_scale" in proc.stdout and "95% interval" in proc.stdout
    # stderr is a pipe, not a terminal: no progress bar, one line per restart instead.
    assert "identify: delay 0, restart 1/1: best residual" in proc.stderr and "\r" not in proc.stderr, proc.stderr
    task = yaml.safe_load((out / "task.yaml").read_text())["task"]
    assert set(task) == set(TRUE_TASK)
    report = json.loads((out / "identify.json").read_text())
    assert report["family"] == FAMILY and len(report["params"]) == 5


def test_bad_input_is_refused_with_the_field_named(sim_log):
    with pytest.raises(ValueError, match="population x elite_frac"):
        identify(sim_log, FAMILY, IdentifyConfig(population=4))
    with pytest.raises(ValueError, match="iterations must be an integer >= 1"):
        identify(sim_log, FAMILY, IdentifyConfig(iterations=0))
    with pytest.raises(ValueError, match="is for robot 'half_cheetah'"):
        identify(sim_log, "half_cheetah_vel", TEST_BUDGET)
    with pytest.raises(ValueError, match=r"no run of 402 consecutive usable transitions \(149 usable of 149; a segment "
                       r"is --window 400 steps after the --max-delay 2 before it\)"):
        identify(sim_log, FAMILY, IdentifyConfig(window=400))
    proc = subprocess.run([sys.executable, "-m", "metarl_robot.cli", "identify", str(sim_log), "--family", FAMILY,
                           "--window", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "window must be an integer >= 1" in proc.stderr


# ---- through the real twin and the installed ROS 2 node ---------------------------------------------------
TWIN_TASK = {"pole_mass_scale": 1.4, "pole_length": 1.1, "cart_friction": 0.2, "motor_gain_scale": 1.2,
             "target_x": 0.0}
"""The twin's hidden task in the slow test (in the train box: the bundle swings it up, so the log is rich)."""
TWIN_TOLERANCE = {"pole_mass_scale": 0.08, "pole_length": 0.03, "cart_friction": 0.05, "motor_gain_scale": 0.03}
"""Wider than in sim: transitions the link lost or delayed are skipped, and the node's timing varies per run."""
TWIN_BUDGET = IdentifyConfig(window=5, population=48, iterations=20, restarts=2, seed=0)
"""The default budget with one restart less (~7 s): smaller budgets converged on some twin runs but not all."""


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("latency", ["on_arrival", "at_boundary"])
def test_identifies_the_twins_hidden_task_from_the_nodes_log(colcon_install, tmp_path, latency):  # noqa: F811
    """``at_boundary``: the twin applies each command at the next period boundary, one period after the frame it
    answers, and says so (``applied_command_seq``); each period must be simulated with the command that ran."""
    import random
    import shutil
    import signal
    import tempfile

    from tests.ros.conftest import DEADLINE_S, Proc, Twin, node_args, params_file, ros_env

    domain = random.Random(time.monotonic_ns()).randint(20, 100)
    sockets = Path(tempfile.mkdtemp(prefix="mrl-"))
    endpoints = f"state=ipc://{sockets}/state,command=ipc://{sockets}/command,handshake=ipc://{sockets}/handshake"
    values = {"bundle": str(BUNDLE), "endpoints": endpoints, "log_dir": str(tmp_path / "logs"),
              "handshake_timeout_s": DEADLINE_S, "safety.stale_after_periods": 7.0}
    procs = []
    try:
        node = Proc(colcon_install.command(*node_args([params_file(tmp_path / "node.yaml", values)])),
                    tmp_path / "node.log", ros_env(domain))
        procs.append(node)
        node.wait_for(lambda text: "handshaking with" in text, "node handshaking")
        boundary = ["--apply-at-boundary"] if latency == "at_boundary" else []
        twin = Twin(tmp_path, "--speed", "0.5", "--seed", "3", "--duration", "6", "--endpoints", endpoints,
                    "--task", json.dumps(TWIN_TASK), *boundary, env=ros_env(domain))
        procs.append(twin)
        summary = twin.summary(timeout_s=6 / 0.5 + DEADLINE_S)
        node.stop(signal.SIGINT)
    finally:
        for proc in procs:
            proc.kill()
        shutil.rmtree(sockets, ignore_errors=True)
    assert summary["task"] == pytest.approx(TWIN_TASK)
    logs = sorted((tmp_path / "logs").glob("*.mcap"))
    assert len(logs) == 1
    ep = read_episode(logs[0])
    assert ep.task is None  # the node never knows the twin's task: identification is the only way to it
    if latency == "at_boundary":  # most periods ran the command sent a period before (a safe one at the start)
        sent_before = np.isin(ep.applied_command_seq[2:], ep.command_seq[:-2])
        assert sent_before.mean() > 0.8, ep.applied_command_seq[:20]
    lags = command_lag(ep)  # what the replay's link health reports: one period more at the boundary
    assert max(lags, key=lags.get) == (1 if latency == "at_boundary" else 0), lags
    res = identify(ep, FAMILY, TWIN_BUDGET)
    print(res.summary())  # shown with -s: the numbers docs/identify.md quotes
    assert res.transitions > 60, res.summary()
    for name, tol in TWIN_TOLERANCE.items():
        value = res.task[name]
        assert abs(value - TWIN_TASK[name]) <= tol, f"{name}: {value} vs twin's {TWIN_TASK[name]}\n{res.summary()}"
