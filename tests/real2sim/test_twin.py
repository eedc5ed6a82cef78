"""The digital twin: task and fault parsing, in-process runs against a real ControllerLink, and the CLI."""

from __future__ import annotations

import itertools
import json
import signal
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml
import zmq

from metarl_robot.envs.out_of_family import OutOfFamily
from metarl_robot.paths import REPO_ROOT
from metarl_robot.real2sim.twin import DigitalTwin, FaultConfig, TwinConfig, resolve_family, resolve_task
from metarl_robot.spec.family import load_family
from metarl_robot.spec.robot import load_robot
from metarl_robot.spec.schema import SpecError
from metarl_robot.telemetry.controller import ControllerLink
from metarl_robot.telemetry.protocol import MsgType, decode, encode
from tests.telemetry.conftest import ANY_PORT, DEADLINE_S

CARTPOLE = load_robot("cartpole")
FAMILY = load_family("cartpole_swingup")


# ---- parsing (no sockets) ----------------------------------------------------------------------
def test_task_specs_resolve_to_validated_tasks(tmp_path):
    assert resolve_task("nominal", FAMILY, 0) == FAMILY.nominal()
    drawn = resolve_task("test", FAMILY, 3)
    assert drawn == resolve_task("cartpole_swingup:test", FAMILY, 3) == FAMILY.sample(np.random.default_rng(3),
                                                                                        "test", 1)[0]
    assert drawn != resolve_task("test", FAMILY, 4)
    row = {"task": {"pole_length": 1.2}, "ood": False}  # a row of `metarl tasks --json`
    (tmp_path / "row.json").write_text(json.dumps(row))
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump({"pole_length": 1.2}))
    for spec in (str(tmp_path / "row.json"), str(tmp_path / "plain.yaml"), '{"pole_length": 1.2}',
                 {"pole_length": 1.2}):
        assert resolve_task(spec, FAMILY, 0) == {**FAMILY.nominal(), "pole_length": 1.2}


@pytest.mark.parametrize("spec, error, match", [
    ("half_cheetah_vel:test", ValueError, "not the simulated family"),
    ("no/such/file.yaml", ValueError, "no such file"),
    ('{"pole_length": ', ValueError, "does not parse"),
    ('{"pole_length": 5.0}', SpecError, "out of bounds"),
    ('{"mass": 1.0}', SpecError, "unknown parameter"),
])
def test_bad_task_specs_say_what_is_allowed(spec, error, match):
    with pytest.raises(error, match=match):
        resolve_task(spec, FAMILY, 0)


def test_task_file_must_hold_one_task(tmp_path):
    (tmp_path / "many.json").write_text(json.dumps([{"pole_length": 1.0}, {"pole_length": 1.1}]))
    with pytest.raises(ValueError, match="one mapping"):
        resolve_task(str(tmp_path / "many.json"), FAMILY, 0)


def test_family_resolution():
    assert resolve_family("cartpole", None).name == "cartpole_swingup"
    with pytest.raises(SpecError, match="is for robot 'half_cheetah'"):
        resolve_family("cartpole", "half_cheetah_vel")
    with pytest.raises(ValueError, match="name one with --family"):
        resolve_family("ant", None)


def test_fault_parsing():
    faults = FaultConfig.parse(["drop=0.1", "burst=2:0.5", "burst=4:1", "freeze=3:1", "delay=20", "corrupt=0.05",
                                "nan=0.01", "oversize=0.02", "stop=6"])
    assert faults == FaultConfig(drop=0.1, bursts=((2.0, 0.5), (4.0, 1.0)), freezes=((3.0, 1.0),), delay_ms=20.0,
                                 corrupt=0.05, nan=0.01, oversize=0.02, stop_after_s=6.0)
    for bad, match in (("drop=1.5", "probability"), ("burst=2", "start_s:duration_s"), ("freeze=1:0", "duration"),
                       ("delay=-1", "ms >= 0"), ("jitter=3", "KIND one of"), ("drop", "KIND=VALUE")):
        with pytest.raises(ValueError, match=match):
            FaultConfig.parse([bad])


# ---- in-process runs ---------------------------------------------------------------------------
class Controller(threading.Thread):
    """A real ControllerLink in a thread: handshake, then answer every state with a cart-centring command."""

    def __init__(self, endpoints, valid_for_s: float | None = None, stop_after_s: float | None = None) -> None:
        super().__init__(daemon=True)
        self.link = ControllerLink(endpoints)
        self.valid_for_s = valid_for_s
        self.stop_after_s = stop_after_s
        self.welcome = None
        self.states: list = []
        self.sent = 0
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            self.link.connect()
            self.welcome = self.link.handshake(CARTPOLE, timeout_s=DEADLINE_S)
            start = time.monotonic()
            while not self.done.is_set():
                if self.stop_after_s is not None and time.monotonic() - start > self.stop_after_s:
                    break  # "killed": no more commands
                state = self.link.receive_state(0.05)
                if state is None:
                    continue
                self.states.append(state)
                if not np.isfinite(state.obs).all():
                    continue  # a failed sensor (the nan fault): a controller's safety layer sends nothing for it
                action = np.clip([-0.5 * state.obs[0] - 0.3 * state.obs[2]], -1, 1)
                self.link.send_command(action, answers=state, valid_for_s=self.valid_for_s)
                self.sent += 1
            self.done.wait()
        except BaseException as exc:
            self.error = exc
        finally:
            self.link.close()

    def finish(self) -> None:
        self.done.set()
        self.join(DEADLINE_S)
        if self.error is not None:
            raise self.error


def run_twin(config: TwinConfig, **controller_kwargs) -> tuple[dict, Controller]:
    twin = DigitalTwin(config)
    endpoints = twin.start()
    controller = Controller(endpoints, **controller_kwargs)
    controller.start()
    finished = twin.wait(DEADLINE_S + config.duration_s / config.speed)
    controller.finish()
    summary = twin.stop()
    assert finished, "the twin did not stop at its duration"
    return summary, controller


@pytest.mark.integration
def test_twin_serves_a_controller_and_keeps_the_task_hidden(tmp_path):
    config = TwinConfig(task="test", seed=5, speed=4.0, duration_s=2.0, endpoints=ANY_PORT,
                        summary_path=tmp_path / "summary.json", trace_path=tmp_path / "trace.npz")
    twin = DigitalTwin(config)
    task = twin.task
    assert task == resolve_task("test", FAMILY, 5)
    endpoints = twin.start()

    # Everything a controller can ever see: the WELCOME and the raw STATE stream.
    context = zmq.Context.instance()
    spy = context.socket(zmq.SUB)
    spy.setsockopt(zmq.SUBSCRIBE, b"")
    spy.setsockopt(zmq.LINGER, 0)
    spy.connect(endpoints.state)
    controller = Controller(endpoints)
    controller.start()
    seen = []
    deadline = time.monotonic() + DEADLINE_S + 2.0
    while not twin.wait(0) and time.monotonic() < deadline:
        if spy.poll(20):
            seen.append(spy.recv())
    controller.finish()
    summary = twin.stop()
    spy.close()
    assert seen and all(decode(f, expect=MsgType.STATE) for f in seen)
    seen.append(encode(controller.welcome))  # decoded frames re-encode to the exact bytes that were sent
    for value in task.values():
        packed = struct.pack("<d", value)
        assert not any(packed in frame for frame in seen), f"task value {value} was sent to the controller"

    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert summary["task"] == task and summary["task_ood"] == FAMILY.is_ood(task)
    assert summary["periods"] == 50 and summary["robot_time_s"] == pytest.approx(2.0)
    assert summary["handshakes"] == {"accepted": 1, "refused": 0, "last_refusal": ""}
    assert summary["commands"]["accepted"] > 10 and summary["periods_commanded"] > 10
    assert summary["periods_commanded"] + summary["periods_safe"] == 50
    assert summary["safe_periods"][0]["reason"] == "no_command" and summary["safe_periods"][0]["start_s"] == 0.0
    assert set(summary["final"]["obs"]) == {"cart_pos", "pole_angle", "cart_vel", "pole_angvel"}
    assert summary["final"]["upright"] is False  # nobody swung it up
    trace = np.load(tmp_path / "trace.npz")
    assert trace["obs"].shape == (50, 4) and trace["applied"].shape == (50, 1)
    assert int((~trace["safe"]).sum()) == summary["periods_commanded"]
    # what the motors got is what the controller asked for (inside the rate limit), never outside the limits
    assert np.all(np.abs(trace["applied"]) <= 1.0)
    applied_seqs = {s.applied_command_seq for s in controller.states} - {0}
    assert applied_seqs and max(applied_seqs) <= controller.sent


@pytest.mark.integration
def test_injected_faults_reach_the_controller_as_counted_rejections():
    faults = FaultConfig(drop=0.2, corrupt=0.2, nan=0.2, oversize=0.1, freezes=((1.0, 0.4),), bursts=((2.0, 0.4),))
    summary, controller = run_twin(TwinConfig(speed=4.0, duration_s=3.0, endpoints=ANY_PORT, faults=faults, seed=1))
    counts, rejected = summary["fault_counts"], controller.link.stats.rejected
    assert all(counts[k] > 0 for k in ("dropped", "corrupted", "nan", "oversize", "frozen", "burst_dropped"))
    # NaN observations are delivered (the safety layer's to judge), the other spoiled frames rejected and counted.
    nan_states = sum(not np.isfinite(s.obs).all() for s in controller.states)
    assert 0 < nan_states <= counts["nan"] and rejected["non_finite"] == 0 and rejected["too_long"] > 0
    corrupt_reasons = ("crc", "magic", "version", "type", "unexpected_type", "length", "flags")
    assert sum(rejected[r] for r in corrupt_reasons) > 0
    assert rejected["too_long"] <= counts["oversize"]
    seqs = [s.seq for s in controller.states]
    assert any(a == b for a, b in itertools.pairwise(seqs)), "a freeze repeats the same frame"
    gaps = [b - a for a, b in itertools.pairwise(seqs)]
    assert max(gaps) >= 0.4 / 0.04, "a 0.4 s burst leaves a gap of at least 10 frames"
    # commands answering frozen or missing states expire: the twin went safe, and says why
    assert summary["watchdog"]["engagements"] >= 1
    assert {p["reason"] for p in summary["safe_periods"]} & {"expired", "watchdog"}


@pytest.mark.integration
def test_watchdog_engages_at_the_twin_when_the_controller_dies():
    config = TwinConfig(speed=2.0, duration_s=2.0, endpoints=ANY_PORT, watchdog_ms=100,
                        faults=FaultConfig(delay_ms=30))
    summary, controller = run_twin(config, valid_for_s=30.0, stop_after_s=0.4)  # 0.4 s wall = 0.8 s robot
    assert controller.sent > 5 and summary["fault_counts"]["delayed"] > 0
    events = summary["watchdog"]["events"]
    assert events, summary
    last = events[-1]
    assert last["reason"] == "watchdog"  # the commands were valid for 30 s: only the watchdog can stop them
    assert 100 <= last["ms_since_last_command"] <= 100 + 40 + 500  # lower bound exact; upper is a safety margin
    assert summary["safe_periods"][-1]["reason"] == "watchdog"
    assert summary["safe_periods"][-1]["end_s"] == pytest.approx(2.0)


# ---- the command line --------------------------------------------------------------------------
def _start_cli(*args: str) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-m", "metarl_robot.cli", "sim-robot", *args], cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(60)
    if not line or not line[0]:
        proc.kill()
        raise AssertionError(f"no ready line from sim-robot: {proc.stderr.read()}")
    ready = json.loads(line[0])
    assert ready["event"] == "ready" and ready["interface_sha256"] == CARTPOLE.interface_hash
    assert "task" not in ready
    return proc, ready


@pytest.mark.integration
@pytest.mark.slow
def test_cli_twin_runs_for_its_duration_against_a_controller(tmp_path):
    summary_path = tmp_path / "twin.json"
    proc, ready = _start_cli("--robot", "cartpole", "--task", "cartpole_swingup:test", "--port-base", "0",
                             "--duration", "1", "--summary", str(summary_path))
    from metarl_robot.telemetry.transport import Endpoints

    controller = Controller(Endpoints(**ready["endpoints"]))
    controller.start()
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        controller.finish()
    assert proc.returncode == 0, err
    done = json.loads(out.strip().splitlines()[-1])
    assert done["event"] == "done" and done["periods"] == 25
    summary = json.loads(summary_path.read_text())
    assert summary["task"] == resolve_task("test", FAMILY, 0)
    assert summary["handshakes"]["accepted"] == 1 and summary["commands"]["accepted"] > 0
    assert controller.sent > 0 and summary["periods_commanded"] > 0


@pytest.mark.integration
@pytest.mark.slow
def test_cli_twin_stops_cleanly_on_sigterm_and_writes_its_summary(tmp_path):
    summary_path = tmp_path / "twin.json"
    proc, _ = _start_cli("--port-base", "0", "--speed", "4", "--summary", str(summary_path))
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    summary = json.loads(summary_path.read_text())
    assert summary["periods"] > 0 and summary["periods_safe"] == summary["periods"]  # nobody commanded it
    assert summary["safe_periods"] == [{"start_s": 0.0, "end_s": pytest.approx(summary["robot_time_s"]),
                                        "reason": "no_command"}]


def test_cli_rejects_bad_arguments_naming_them():
    result = subprocess.run([sys.executable, "-m", "metarl_robot.cli", "sim-robot", "--fault", "drop=2"],
                            capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 2 and "drop is a probability in [0, 1]" in result.stderr


# ---- out-of-family effects ---------------------------------------------------------------------
@pytest.mark.integration
def test_twin_with_effects_delays_the_motors_biases_the_sensor_and_records_them(tmp_path):
    # The test controller centres the cart: a 0.5 m bias on cart_pos makes it push (-0.25) from the start.
    effects = OutOfFamily(delay_periods=2, sensor_bias={"cart_pos": 0.5})
    config = TwinConfig(speed=4.0, duration_s=2.0, endpoints=ANY_PORT, effects=effects,
                        summary_path=tmp_path / "summary.json", trace_path=tmp_path / "trace.npz")
    summary, controller = run_twin(config)
    assert summary["out_of_family"] == {"effects": effects.as_dict(), "label": "delay=2 bias=cart_pos:0.5"}
    assert json.loads((tmp_path / "summary.json").read_text())["out_of_family"] == summary["out_of_family"]
    trace = np.load(tmp_path / "trace.npz")
    assert summary["periods_commanded"] > 10 and np.abs(trace["sent"]).max() > 0.1  # the controller drove it
    assert len(np.unique(trace["sent"])) > 10
    # The motors got every command exactly two periods after the twin took it, the safe command before.
    assert np.array_equal(trace["applied"][:2], np.zeros((2, 1)))
    assert np.array_equal(trace["applied"][2:], trace["sent"][:-2])
    # What the twin published is its true state with the cart-position sensor 0.5 m off; nothing else.
    offset = np.array([0.5, 0.0, 0.0, 0.0])
    assert np.array_equal(trace["obs"], trace["true_obs"] + offset)
    # STATE seq 1 is the reset state; seq k + 2 the state after period k: the controller saw the biased one.
    received = [s for s in controller.states if s.seq > 1]
    assert len(received) > 10
    assert all(np.array_equal(s.obs, trace["obs"][s.seq - 2]) for s in received)


def test_plain_twin_records_no_effects_and_keeps_its_trace():
    twin = DigitalTwin(TwinConfig(endpoints=ANY_PORT))
    assert twin.env.effects is None
    assert twin._make_summary(0, 0.0)["out_of_family"] is None


def test_cli_effect_options_reach_the_twin_config(tmp_path):
    from metarl_robot.cli import build_parser
    from metarl_robot.real2sim.twin import config_from_args

    (tmp_path / "effects.yaml").write_text("joint_damping: {hinge: 0.05}\nobs_noise: 0.01\n")
    args = build_parser().parse_args(["sim-robot", "--effects", str(tmp_path / "effects.yaml"), "--effect", "delay=2",
                                      "--effect", "obs_noise=0.02"])
    assert config_from_args(args).effects == OutOfFamily(delay_periods=2, joint_damping={"hinge": 0.05},
                                                         obs_noise=0.02)
    assert config_from_args(build_parser().parse_args(["sim-robot"])).effects is None
    launch_default = build_parser().parse_args(["sim-robot", "--effects", ""])  # sim_robot.launch.py: effects:=""
    assert config_from_args(launch_default).effects is None


def test_cli_help_explains_every_effect_and_bad_effects_exit_2():
    from metarl_robot.envs.out_of_family import CLI_KINDS

    for command in ("sim-robot", "eval"):
        result = subprocess.run([sys.executable, "-m", "metarl_robot.cli", command, "--help"], capture_output=True,
                                text=True, timeout=120, cwd=REPO_ROOT)
        text = " ".join(result.stdout.split())
        assert result.returncode == 0 and "--effect KIND=VALUE" in text and "--effects FILE" in text
        assert all(f"{kind}=" in text for kind in CLI_KINDS), text
    for bad, message in ((["--effect", "delay=-1"], "delay is a whole number of control periods >= 0"),
                         (["--effect", "integrator=Verlet"], "'Euler', 'RK4', 'implicit', 'implicitfast'"),
                         (["--effect", "friction=slider:0.1", "--duration", "0.1", "--port-base", "0"],
                          "'cart_friction'")):
        result = subprocess.run([sys.executable, "-m", "metarl_robot.cli", "sim-robot", *bad], capture_output=True,
                                text=True, timeout=120, cwd=REPO_ROOT)
        assert result.returncode == 2 and "metarl sim-robot: error:" in result.stderr, result.stderr
        assert message in " ".join(result.stderr.split()), result.stderr


def test_a_broken_task_file_is_a_spec_error_naming_the_file_and_line(tmp_path):
    (tmp_path / "broken.yaml").write_text("pole_length: [1.2\n")
    (tmp_path / "twice.yaml").write_text("pole_length: 1.2\npole_length: 1.3\n")
    with pytest.raises(SpecError, match=r"broken.yaml: not valid YAML"):
        resolve_task(str(tmp_path / "broken.yaml"), FAMILY, 0)
    with pytest.raises(SpecError, match=r"duplicate key 'pole_length' \(first on line 1\)"):
        resolve_task(str(tmp_path / "twice.yaml"), FAMILY, 0)
