"""The C++ robot SDK (robot_sdk/cpp) against the Python controller and the ROS 2 node: one set of conformance tests
run against both robot sides, the Python reference ``RobotClient`` (in this process) and the C++ ``RobotClient``
(the ``metarl_robot_sdk_conformance`` driver, a subprocess taking one command per line on stdin and answering one
JSON line), over real ZeroMQ sockets on loopback; the C++ decoder checked against the Python one on mutated frames;
and the C++ example driver (a simulated cart-pole) driving the installed adapt_node through a full episode.

The C++ code is built with CMake into a temporary folder once per session (warnings are errors). Without libzmq's
headers the module is skipped, unless METARL_ROBOT_SDK_REQUIRED=1 (CI), where that is a failure.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from metarl_robot.logs import read_episode
from metarl_robot.paths import REPO_ROOT
from metarl_robot.spec.robot import RobotSpec, load_robot
from metarl_robot.telemetry.controller import ControllerLink, HandshakeError
from metarl_robot.telemetry.keys import generate_keys
from metarl_robot.telemetry.protocol import (
    PROTOCOL_VERSION,
    CommandFrame,
    FrameError,
    Hello,
    MsgType,
    StateFrame,
    Welcome,
    decode,
    encode,
    encode_command,
    reseal,
)
from metarl_robot.telemetry.robot_client import RobotClient
from metarl_robot.telemetry.transport import CurveClientKeys, CurveServerKeys, Endpoints
from tests.conftest import edit_yaml

pytestmark = pytest.mark.integration

SDK_SOURCE = REPO_ROOT / "robot_sdk" / "cpp"
ANY_PORT = Endpoints.from_port_base("127.0.0.1", 0)
DEADLINE_S = 20.0
"""Generous deadline for anything that waits on sockets or subprocesses (the test machine is busy)."""
OBS = np.array([0.0, np.pi, 0.0, 0.0])
SIDES = ["python", "cpp"]
FAKE_CLOCK_START_NS = 10**12


# ---- the C++ build ----------------------------------------------------------------------------------------------
def _libzmq_headers_found() -> bool:
    if shutil.which("pkg-config"):
        found = subprocess.run(["pkg-config", "--exists", "libzmq"], capture_output=True)
        if found.returncode == 0:
            return True
    return any(Path(d, "zmq.h").is_file() for d in ("/usr/include", "/usr/local/include"))


@pytest.fixture(scope="session")
def sdk_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """robot_sdk/cpp configured and built (Release, -Werror) in a temporary folder; returns the build folder."""
    if not _libzmq_headers_found():
        reason = "libzmq headers not found (apt-get install libzmq3-dev): the C++ robot SDK cannot be built"
        if os.environ.get("METARL_ROBOT_SDK_REQUIRED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    build = tmp_path_factory.mktemp("robot_sdk_build")
    for cmd in (["cmake", "-S", str(SDK_SOURCE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                 "-DMETARL_ROBOT_SDK_WERROR=ON"],
                ["cmake", "--build", str(build), "-j", "2"]):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    return build


# ---- the two robot sides, behind one interface -------------------------------------------------------------------
class PythonRobot:
    """The Python reference RobotClient, in this process."""

    def __init__(self, robot: RobotSpec, *, watchdog_ms: float, manual_clock: bool = False,
                 curve_dir: Path | None = None) -> None:
        self.now_ns = FAKE_CLOCK_START_NS
        self.client = RobotClient(robot, ANY_PORT, watchdog_ms=watchdog_ms,
                                  clock=(lambda: self.now_ns) if manual_clock else time.monotonic_ns,
                                  curve=CurveServerKeys.from_dir(curve_dir) if curve_dir else None)
        self.endpoints = self.client.start()

    def service(self) -> None:
        self.client.service()

    def decide(self) -> dict[str, Any]:
        d = self.client.current_action()
        return {"action": d.action.tolist(), "safe": d.safe, "reason": d.reason, "command_seq": d.command_seq,
                "answers_seq": d.answers_seq, "stamp_ns": d.stamp_ns}

    def publish(self, obs, applied=None) -> dict[str, Any]:
        f = self.client.publish_state(obs, applied)
        return {"seq": f.seq, "stamp_ns": f.stamp_ns, "session": f.session, "safe": f.safe,
                "applied_command_seq": f.applied_command_seq}

    def publish_raw(self, data: bytes) -> None:
        self.client.publish_raw(data)

    def advance(self, ms: float) -> None:
        self.now_ns += int(ms * 1e6)

    def status(self) -> dict[str, Any]:
        c = self.client
        return {"session": c.session, "armed": c.armed, "state_seq": c.state_seq, "now_ns": c.clock(),
                "last_command_received_ns": c.last_command_received_ns, "watchdog_ms": c.watchdog_ms}

    def counters(self) -> dict[str, Any]:
        return self.client.counters.as_dict()

    def close(self) -> None:
        self.client.close()


class CppRobot:
    """The C++ RobotClient in the conformance driver: each method is one line out and one JSON line back."""

    def __init__(self, build: Path, robot: RobotSpec, *, watchdog_ms: float, manual_clock: bool = False,
                 curve_dir: Path | None = None, log: Path) -> None:
        cmd = [str(build / "metarl_robot_sdk_conformance"), *interface_args(robot), "--watchdog-ms", repr(watchdog_ms)]
        if manual_clock:
            cmd += ["--manual-clock", str(FAKE_CLOCK_START_NS)]
        if curve_dir is not None:
            cmd += ["--curve-keys", str(curve_dir)]
        self.log = log
        self._stderr = open(log, "w")  # noqa: SIM115 -- closed in close()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True, bufsize=1)
        ready = self._read()
        assert ready.get("event") == "ready", ready
        self.endpoints = Endpoints(**ready["endpoints"])

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(5)
            raise AssertionError(f"the C++ driver ended (rc {self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
        return json.loads(line)

    def call(self, line: str) -> dict[str, Any]:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise ValueError(reply["error"])  # what the Python RobotClient raises for the same inputs
        return reply

    def service(self) -> None:
        self.call("service")

    def decide(self) -> dict[str, Any]:
        return self.call("decide")

    def publish(self, obs, applied=None) -> dict[str, Any]:
        line = "publish " + csv(obs)
        if applied is not None:
            line += " " + csv(applied)
        return self.call(line)

    def publish_raw(self, data: bytes) -> None:
        self.call("publish_raw " + data.hex())

    def advance(self, ms: float) -> None:
        self.call(f"advance {int(ms * 1e6)}")

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def counters(self) -> dict[str, Any]:
        return self.call("counters")

    def decode(self, data: bytes, expect: str = "any", obs_dim: int = 0, action_dim: int = 0) -> dict[str, Any]:
        return self.call(f"decode {expect} {obs_dim} {action_dim} {data.hex()}")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        self._stderr.close()


def csv(values) -> str:
    return ",".join(repr(float(v)) for v in np.asarray(values, dtype=np.float64).ravel())


def interface_args(robot: RobotSpec) -> list[str]:
    """The robot.yaml numbers the C++ side is given (a C++ robot hard-codes them; see the example driver)."""
    return ["--name", robot.name, "--interface-hash", robot.interface_hash, "--obs-dim", str(robot.obs_dim),
            "--action-dim", str(robot.action_dim), "--ctrl-dt", repr(robot.ctrl_dt), "--low", csv(robot.action_low),
            "--high", csv(robot.action_high), "--safe", csv(robot.safe_action),
            "--action-names", ",".join(a.name for a in robot.action)]


Robot = PythonRobot | CppRobot


@pytest.fixture
def cartpole() -> RobotSpec:
    return load_robot("cartpole")


@pytest.fixture(params=SIDES)
def make_robot(request, tmp_path, cartpole) -> Iterator[Callable[..., Robot]]:
    """A factory of robot sides of this test's kind (python or cpp); everything it made is closed afterwards."""
    made: list[Robot] = []

    def make(*, watchdog_ms: float = 150, manual_clock: bool = False, curve_dir: Path | None = None) -> Robot:
        if request.param == "python":
            robot = PythonRobot(cartpole, watchdog_ms=watchdog_ms, manual_clock=manual_clock, curve_dir=curve_dir)
        else:
            build = request.getfixturevalue("sdk_build")
            robot = CppRobot(build, cartpole, watchdog_ms=watchdog_ms, manual_clock=manual_clock, curve_dir=curve_dir,
                             log=tmp_path / f"cpp_robot_{len(made)}.log")
        made.append(robot)
        return robot

    make.side = request.param
    yield make
    for robot in made:
        robot.close()


@pytest.fixture
def link_to() -> Iterator[Callable[..., ControllerLink]]:
    links: list[ControllerLink] = []

    def connect(robot: Robot, curve: CurveClientKeys | None = None) -> ControllerLink:
        link = ControllerLink(robot.endpoints, curve=curve)
        link.connect()
        links.append(link)
        return link

    yield connect
    for link in links:
        link.close()


# ---- helpers (tests/telemetry/conftest.py's, for either robot side) ------------------------------------------------
def serve_while(robot: Robot, predicate: Callable[[], bool], publish: Callable[[], None] | None = None,
                deadline_s: float = DEADLINE_S) -> None:
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {deadline_s} s")
        robot.service()
        if publish is not None:
            publish()
        time.sleep(0.002)


def handshake_with(robot: Robot, link: ControllerLink, spec: RobotSpec, **kwargs) -> Welcome:
    """The controller's blocking handshake in a thread while the robot side services its sockets here."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["welcome"] = link.handshake(spec, **kwargs)
        except BaseException as exc:  # re-raised in the test's thread
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    serve_while(robot, lambda: not thread.is_alive())
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["welcome"]


def first_state(robot: Robot, link: ControllerLink, obs=OBS) -> StateFrame:
    """Publish until the controller receives a frame (PUB drops frames until the connection is up)."""
    got: list[StateFrame] = []

    def publish() -> None:
        robot.publish(obs)
        frame = link.receive_state(0.01)
        if frame is not None:
            got.append(frame)

    serve_while(robot, lambda: bool(got), publish=publish)
    return got[0]


def newest_state(robot: Robot, link: ControllerLink, obs=OBS) -> StateFrame:
    """Publish one frame and receive exactly it."""
    sent = robot.publish(obs)
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end:
        frame = link.receive_state(1.0)
        if frame is not None and frame.seq == sent["seq"]:
            return frame
    raise AssertionError(f"state {sent['seq']} never arrived")


def raw_request(endpoint: str, robot: Robot, data: bytes) -> Welcome:
    """One HELLO-like request on a raw REQ socket; returns the robot's decoded reply."""
    req = zmq.Context.instance().socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(endpoint)
    try:
        req.send(data)
        serve_while(robot, lambda: req.poll(0))
        return decode(req.recv(), expect=MsgType.WELCOME)
    finally:
        req.close()


def mismatch_message(controller_hash: str, robot_hash: str, diffs: str = "") -> str:
    """The refusal both robot sides must send for another interface hash (Python RobotClient's wording)."""
    return (f"robot.yaml interface mismatch: the controller was built for 'cartpole' with interface sha256 "
            f"{controller_hash}, this robot 'cartpole' has sha256 {robot_hash}{diffs}. Both sides must load the same "
            "robot.yaml (field order, scales, limits, control period, safe command); `metarl robot <name>` prints "
            "the hash.")


# ---- conformance: the same tests for both robot sides ------------------------------------------------------------
def test_handshake_arms_and_commands_reach_the_motors(make_robot, link_to, cartpole):
    robot = make_robot()
    link = link_to(robot)
    welcome = handshake_with(robot, link, cartpole)
    assert welcome.accepted and welcome.session == robot.status()["session"] != 0
    assert (welcome.robot_name, welcome.interface_hash) == ("cartpole", cartpole.interface_hash)
    assert (welcome.obs_dim, welcome.action_dim, welcome.ctrl_dt, welcome.watchdog_ms) == (4, 1, 0.04, 150)
    assert welcome.message == "" and link.armed and robot.status()["armed"]

    assert robot.decide()["reason"] == "no_command"  # no command yet: the safe command, and the state says so
    state = first_state(robot, link)
    assert state.session == welcome.session and state.safe and state.applied_command_seq == 0
    np.testing.assert_array_equal(state.obs, OBS)
    np.testing.assert_array_equal(state.applied_action, cartpole.safe_action)

    sent = link.send_command([0.4], answers=state)
    serve_while(robot, lambda: robot.counters()["commands"]["accepted"] == 1)
    decision = robot.decide()
    assert decision == {**decision, "safe": False, "reason": "command", "command_seq": 1, "answers_seq": state.seq,
                        "action": [0.4]}
    assert robot.status()["last_command_received_ns"] is not None

    after = newest_state(robot, link, OBS + 1)
    assert after.seq == state.seq + 1 and not after.safe and after.applied_command_seq == sent.seq
    np.testing.assert_array_equal(after.applied_action, [0.4])
    driver_says = robot.publish(OBS, [0.3])  # the driver limited the command: the frame carries what was applied
    assert driver_says["applied_command_seq"] == 1 and not driver_says["safe"]
    assert link.stats.total_rejected == 0
    counters = robot.counters()
    assert counters["handshakes_accepted"] == 1 and counters["handshakes_refused"] == 0
    assert counters["commands"] == {"accepted": 1, "total_rejected": 0, "rejected": {}}
    assert counters["periods_commanded"] == 1 and counters["periods_safe"] == 1


def test_another_interface_hash_is_refused_naming_both_hashes(make_robot, link_to, cartpole, sim_copy):
    other = load_robot(edit_yaml(sim_copy / "robots" / "cartpole" / "robot.yaml",
                                 lambda d: d["observation"][0].update(scale=2.0)))
    assert other.interface_hash != cartpole.interface_hash
    robot = make_robot()
    link = link_to(robot)
    with pytest.raises(HandshakeError) as info:
        handshake_with(robot, link, other)
    expected = mismatch_message(other.interface_hash, cartpole.interface_hash)
    assert info.value.welcome is not None and info.value.welcome.message == expected
    assert not info.value.welcome.accepted and info.value.welcome.session == 0
    assert "refused to arm" in str(info.value) and not link.armed
    counters, status = robot.counters(), robot.status()
    assert (counters["handshakes_accepted"], counters["handshakes_refused"]) == (0, 1)
    assert counters["last_refusal"] == expected and not status["armed"] and status["session"] == 0

    # The fields that differ are named too (a controller built for another period and observation size).
    hello = encode(Hello("cartpole", "ab" * 32, 5, 1, 0.05))
    reply = raw_request(robot.endpoints.handshake, robot, hello)
    assert reply.message == mismatch_message("ab" * 32, cartpole.interface_hash,
                                             " (obs_dim: controller 5, robot 4; ctrl_dt: controller 0.05, robot 0.04)")
    assert (reply.interface_hash, reply.obs_dim, reply.ctrl_dt) == (cartpole.interface_hash, 4, 0.04)


def test_other_protocol_versions_and_malformed_hellos_are_refused(make_robot, cartpole):
    robot = make_robot()
    hello = encode(Hello("cartpole", cartpole.interface_hash, 4, 1, 0.04))
    v2 = bytearray(hello)
    v2[4] = PROTOCOL_VERSION + 1
    reply = raw_request(robot.endpoints.handshake, robot, reseal(bytes(v2)))
    assert not reply.accepted and reply.session == 0
    assert reply.message == "protocol version mismatch: the controller speaks v2, this robot v1; update one side"
    for bad in (hello[:-1], hello[:20], hello[:-1] + b"\x00"):  # short name, a broken header, a CRC mismatch
        reply = raw_request(robot.endpoints.handshake, robot, bad)
        assert not reply.accepted and reply.message.startswith("malformed HELLO: "), reply.message
    counters = robot.counters()
    assert (counters["handshakes_accepted"], counters["handshakes_refused"]) == (0, 4)
    assert robot.status()["session"] == 0
    # Still answering: a good HELLO after the bad ones arms the robot.
    assert raw_request(robot.endpoints.handshake, robot, hello).accepted


def test_a_multi_part_hello_is_refused_and_the_handshake_socket_keeps_answering(make_robot, cartpole):
    robot = make_robot()
    hello = encode(Hello("cartpole", cartpole.interface_hash, 4, 1, 0.04))
    req = zmq.Context.instance().socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(robot.endpoints.handshake)
    try:
        req.send_multipart([hello, b"a second part"])  # every frame is one single-part message; this is not one
        serve_while(robot, lambda: req.poll(0))
        reply = decode(req.recv(), expect=MsgType.WELCOME)
    finally:
        req.close()
    assert not reply.accepted
    assert reply.message == "malformed HELLO: a multi-part message (2 parts); a frame is one single-part message"
    assert raw_request(robot.endpoints.handshake, robot, hello).accepted


def test_a_multi_part_command_is_rejected_whole_even_with_a_valid_first_part(make_robot, link_to, cartpole):
    robot = make_robot()
    link = link_to(robot)
    session = handshake_with(robot, link, cartpole).session
    robot.decide()
    state = first_state(robot, link)
    command = encode_command(CommandFrame(1, state.seq, state.stamp_ns + 60 * 10**9, session, np.array([0.3])))
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(robot.endpoints.command)
    try:
        serve_while(robot, lambda: robot.counters()["commands"]["rejected"].get("length", 0) > 0,
                    publish=lambda: pub.send_multipart([command, b"a second part"]))
        assert robot.counters()["commands"]["accepted"] == 0 and robot.decide()["reason"] == "no_command"
        serve_while(robot, lambda: robot.counters()["commands"]["accepted"] == 1, publish=lambda: pub.send(command))
        assert robot.decide()["action"] == [0.3]  # the same bytes as one single-part message: a command
    finally:
        pub.close()


def _bad_commands(session: int, far: int, base_seq: int, cartpole: RobotSpec) -> dict[str, bytes]:
    """One COMMAND-socket frame per rejection reason (the first rule each breaks is that reason)."""
    def cmd(seq: int, action=(0.1,), expires: int = far, sess: int = session) -> bytes:
        return encode_command(CommandFrame(seq, 1, expires, sess, np.array(action, dtype=np.float64)))

    good = cmd(base_seq + 200)

    def patched(offset: int, value: bytes, frame: bytes = good) -> bytes:
        data = bytearray(frame)
        data[offset:offset + len(value)] = value
        return reseal(bytes(data))

    return {
        "too_short": good[:15],
        "too_long": b"\x00" * 65_600,
        "magic": b"XRLT" + good[4:],
        "version": patched(4, bytes([PROTOCOL_VERSION + 1])),
        "type": patched(5, b"\x09"),
        "unexpected_type": encode(Hello("cartpole", cartpole.interface_hash, 4, 1, 0.04)),
        "length": reseal(good + b"\x00"),
        "crc": good[:-1] + bytes([good[-1] ^ 1]),
        "flags": patched(6, b"\x01\x00"),
        "reserved": patched(46, b"\x01\x00"),
        "dims": cmd(base_seq + 104, action=(0.1, 0.2)),
        "field": patched(16, b"\x00" * 8),  # seq 0
        "non_finite": patched(48, np.array([np.nan]).tobytes()),
        "foreign_session": cmd(base_seq + 100, sess=session ^ 1),
        # Seq 1, the first probe's: never newer than an accepted one, however many probes got through.
        "old_seq": cmd(1),
        "expired": cmd(base_seq + 101, expires=1),
        "out_of_range": cmd(base_seq + 102, action=(1.01,)),
    }


def test_bad_commands_are_counted_per_reason_and_the_link_survives(make_robot, link_to, cartpole):
    robot = make_robot()
    link = link_to(robot)
    session = handshake_with(robot, link, cartpole).session
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(robot.endpoints.command)
    try:
        far = robot.status()["now_ns"] + 60 * 10**9
        seqs = iter(range(1, 10**6))
        probe_seq = 0

        def probe() -> None:  # valid commands until the connection is up and one got through
            nonlocal probe_seq
            probe_seq = next(seqs)
            pub.send(encode_command(CommandFrame(probe_seq, 1, far, session, np.array([0.1]))))

        serve_while(robot, lambda: robot.counters()["commands"]["accepted"] >= 1, publish=probe)
        bad = _bad_commands(session, far, probe_seq, cartpole)
        for reason, data in bad.items():
            pub.send(data)
            serve_while(robot, lambda r=reason: robot.counters()["commands"]["rejected"].get(r, 0) == 1)
        commands = robot.counters()["commands"]
        assert commands["rejected"] == dict.fromkeys(bad, 1) and commands["total_rejected"] == len(bad)
        decision = robot.decide()  # still a probe's command: no bad frame became current
        assert decision["reason"] == "command" and 1 <= decision["command_seq"] <= probe_seq
        # The link survived: the next valid command is accepted and applied.
        pub.send(encode_command(CommandFrame(probe_seq + 300, 1, far, session, np.array([-0.2]))))
        serve_while(robot, lambda: robot.decide()["command_seq"] == probe_seq + 300)
        assert robot.decide()["action"] == [-0.2] and robot.counters()["commands"]["total_rejected"] == len(bad)
    finally:
        pub.close()


def test_watchdog_and_expiry_engage_the_safe_command_on_the_robot_clock(make_robot, link_to, cartpole):
    robot = make_robot(watchdog_ms=100, manual_clock=True)
    link = link_to(robot)
    handshake_with(robot, link, cartpole)
    assert robot.decide()["reason"] == "no_command"
    state = first_state(robot, link)

    # The watchdog: a long-lived command, then silence.
    link.send_command([0.5], answers=state, valid_for_s=10.0)
    serve_while(robot, lambda: robot.counters()["commands"]["accepted"] == 1)
    robot.advance(99)
    assert robot.decide()["reason"] == "command"
    robot.advance(2)
    decision = robot.decide()
    assert decision["safe"] and decision["reason"] == "watchdog" and decision["action"] == [0.0]
    counters = robot.counters()
    assert counters["watchdog_engagements"] == 1 and counters["last_engagement_ns"] == robot.status()["now_ns"]

    # Expiry: a short-lived command with a generous watchdog is applied until it expires.
    fresh = newest_state(robot, link)
    link.send_command([-0.5], answers=fresh, valid_for_s=0.05)
    serve_while(robot, lambda: robot.counters()["commands"]["accepted"] == 2)
    assert robot.decide()["reason"] == "command"
    robot.advance(50)
    assert robot.decide()["reason"] == "expired"
    assert robot.counters()["watchdog_engagements"] == 2

    # A command that arrives already expired is rejected and counted.
    link.send_command([0.5], answers=fresh, valid_for_s=0.01)
    serve_while(robot, lambda: robot.counters()["commands"]["rejected"].get("expired") == 1)

    # A new handshake drops whatever the previous controller sent.
    fresh = newest_state(robot, link)
    link.send_command([0.2], answers=fresh, valid_for_s=10.0)
    serve_while(robot, lambda: robot.counters()["commands"]["accepted"] == 3)
    assert robot.decide()["reason"] == "command"
    handshake_with(robot, link, cartpole)
    assert robot.decide()["reason"] == "no_command"
    counters = robot.counters()
    assert counters["watchdog_engagements"] == 3 and counters["handshakes_accepted"] == 2
    assert counters["periods_safe"] == 4 and counters["periods_commanded"] == 3


def test_watchdog_engages_in_real_time_when_the_controller_stops(make_robot, link_to, cartpole):
    robot = make_robot(watchdog_ms=150)
    link = link_to(robot)
    handshake_with(robot, link, cartpole)
    robot.decide()
    state = first_state(robot, link)
    link.send_command([0.3], answers=state, valid_for_s=60.0)  # only the watchdog can stop it
    serve_while(robot, lambda: robot.counters()["commands"]["accepted"] == 1)
    received = robot.status()["last_command_received_ns"]
    decisions: list[dict[str, Any]] = []
    serve_while(robot, lambda: decisions.append(robot.decide()) or decisions[-1]["safe"])
    assert decisions[-1]["reason"] == "watchdog" and decisions[-1]["action"] == [0.0]
    assert decisions[-1]["stamp_ns"] - received > 150e6  # never before the watchdog time has passed
    assert not any(d["safe"] for d in decisions[:-1])
    assert robot.counters()["watchdog_engagements"] == 1
    after = newest_state(robot, link)  # and the robot says so: the SAFE flag, no command seq
    assert after.safe and after.applied_command_seq == 0


def test_a_slow_reader_gets_the_newest_state_and_no_backlog(make_robot, link_to, cartpole):
    robot = make_robot()
    link = link_to(robot)
    handshake_with(robot, link, cartpole)
    first_state(robot, link)
    for i in range(50):  # the controller does not read while these go out (fewer than its 64-frame queue)
        last = robot.publish(OBS + i)
    received: list[StateFrame] = []
    end = time.monotonic() + DEADLINE_S
    while (not received or received[-1].seq != last["seq"]) and time.monotonic() < end:
        frame = link.receive_state(0.5)
        if frame is not None:
            received.append(frame)
    assert received and received[-1].seq == last["seq"]
    np.testing.assert_array_equal(received[-1].obs, OBS + 49)
    assert len(received) <= 3, [f.seq for f in received]  # a backlog would deliver ~50 frames


def test_bad_observations_are_refused_without_using_a_sequence_number(make_robot):
    robot = make_robot()
    with pytest.raises(ValueError):
        robot.publish(np.zeros(3))
    with pytest.raises(ValueError):
        robot.publish(OBS, [np.nan])  # what the motors got is finite, or the driver has a bug
    assert robot.publish(OBS)["seq"] == 1
    assert robot.publish(OBS, [0.2])["seq"] == 2


def test_a_failed_sensor_is_sent_for_the_controllers_safety_layer(make_robot, link_to, cartpole):
    robot = make_robot()
    link = link_to(robot)
    handshake_with(robot, link, cartpole)
    robot.decide()
    first_state(robot, link)
    frame = newest_state(robot, link, [0.1, np.nan, np.inf, -np.inf])
    assert frame.obs[0] == 0.1 and np.isnan(frame.obs[1]) and np.isposinf(frame.obs[2]) and np.isneginf(frame.obs[3])
    assert link.stats.total_rejected == 0


def test_curve_lets_only_the_authorised_controller_in(make_robot, link_to, cartpole, tmp_path):
    generate_keys(tmp_path / "keys")
    generate_keys(tmp_path / "stranger")
    robot = make_robot(curve_dir=tmp_path / "keys")
    authorised = link_to(robot, CurveClientKeys.from_dir(tmp_path / "keys"))
    assert handshake_with(robot, authorised, cartpole).accepted
    robot.decide()
    authorised.send_command([0.25], answers=first_state(robot, authorised))
    serve_while(robot, lambda: robot.counters()["commands"]["accepted"] == 1)

    for curve in (CurveClientKeys(tmp_path / "stranger" / "controller.key_secret", tmp_path / "keys" / "robot.key"),
                  CurveClientKeys(tmp_path / "keys" / "controller.key_secret", tmp_path / "stranger" / "robot.key"),
                  None):
        intruder = link_to(robot, curve)
        with pytest.raises(HandshakeError, match="no WELCOME"):
            handshake_with(robot, intruder, cartpole, timeout_s=0.5)
        for _ in range(10):
            robot.publish(OBS)
            assert intruder.receive_state(0.02) is None
    assert robot.counters()["handshakes_accepted"] == 1


# ---- the C++ decoder agrees with the Python one, frame by frame --------------------------------------------------
def _python_decode(data: bytes, expect: str, obs_dim: int, action_dim: int) -> dict[str, Any]:
    kinds = {"any": None, "hello": MsgType.HELLO, "welcome": MsgType.WELCOME, "state": MsgType.STATE,
             "command": MsgType.COMMAND}
    try:
        m = decode(data, expect=kinds[expect], obs_dim=obs_dim or None, action_dim=action_dim or None)
    except FrameError as exc:
        return {"ok": False, "reason": exc.reason}
    if isinstance(m, StateFrame):
        return {"ok": True, "type": "STATE", "seq": m.seq, "stamp_ns": m.stamp_ns,
                "applied_command_seq": m.applied_command_seq, "session": m.session, "safe": m.safe,
                "obs": m.obs.tolist(),
                "applied_action": None if m.applied_action is None else m.applied_action.tolist()}
    if isinstance(m, CommandFrame):
        return {"ok": True, "type": "COMMAND", "seq": m.seq, "answers_seq": m.answers_seq, "expires_ns": m.expires_ns,
                "session": m.session, "action": m.action.tolist()}
    ident = {"robot_name": m.robot_name, "interface_hash": m.interface_hash, "obs_dim": m.obs_dim,
             "action_dim": m.action_dim, "ctrl_dt": m.ctrl_dt}
    if isinstance(m, Hello):
        return {"ok": True, "type": "HELLO", **ident}
    return {"ok": True, "type": "WELCOME", "accepted": m.accepted, "session": m.session, "watchdog_ms": m.watchdog_ms,
            "robot_stamp_ns": m.robot_stamp_ns, **ident, "message": m.message}


def _comparable(verdict: dict[str, Any]) -> dict[str, Any]:
    """NaN != NaN: a NaN observation as a string, so two decoders that both read NaN agree (other values compare as
    numbers: the C++ side writes -0.0 as the JSON integer -0)."""
    if verdict.get("obs") is not None:
        verdict["obs"] = ["nan" if x != x else x for x in verdict["obs"]]
    return verdict


def test_cpp_decoder_gives_the_python_decoders_verdict_on_mutated_frames(sdk_build, cartpole, tmp_path):
    cpp = CppRobot(sdk_build, cartpole, watchdog_ms=150, log=tmp_path / "decoder.log")
    rng = random.Random(17)
    h = cartpole.interface_hash
    seeds = [
        encode(StateFrame(seq=42, stamp_ns=10**9, obs=np.array([0.5, 3.0, -0.25, 1.5]), applied_action=np.array([0.75]),
                          applied_command_seq=41, session=0x12345678)),
        encode(StateFrame(seq=7, stamp_ns=5, obs=OBS, applied_action=np.array([0.0]), session=9, safe=True)),
        encode(StateFrame(seq=1, stamp_ns=0, obs=OBS)),
        encode(CommandFrame(seq=43, answers_seq=42, expires_ns=1_120_000_000, session=0x12345678,
                            action=np.array([0.75]))),
        encode(Hello("cartpole", h, 4, 1, 0.04)),
        encode(Welcome(True, 77, 200, 123, "cartpole", h, 4, 1, 0.04)),
        encode(Welcome(False, 0, 200, 123, "cartpole", h, 4, 1, 0.04, message="refused: ASCII ~ only {}")),
        encode(StateFrame(seq=9, stamp_ns=7, obs=np.array([np.nan, np.inf, -np.inf, 0.5]),
                          applied_action=np.array([0.1]), session=3)),  # a failed sensor: valid
    ]
    seed_bytes = bytearray(seeds[-2])  # a refusal whose message is UTF-8, not ASCII: both must say `text`
    seed_bytes[-3:] = "ü".encode() + b"}"
    seeds.append(reseal(bytes(seed_bytes)))
    frames: list[bytes] = [*seeds, b"", b"MRLT", b"\x00" * 65_537]
    for seed in seeds:
        for _ in range(40):
            data = bytearray(seed)
            i = rng.randrange(len(data))
            data[i] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, data[i] ^ (1 << rng.randrange(8))])
            frames.append(bytes(data))
            frames.append(reseal(bytes(data)))  # past the CRC, into the field rules
        frames += [seed[:n] for n in (15, 16, 17, 47, len(seed) - 1)]
        frames += [reseal(seed[:n]) for n in (16, 40, 47, 64, len(seed) - 1)]
        frames += [seed + b"\x00", reseal(seed + b"\x00"), reseal(seed + b"\xff" * 8)]
    expectations = [("any", 0, 0), ("command", 4, 1), ("state", 4, 1), ("hello", 0, 0), ("welcome", 0, 0),
                    ("command", 4, 2), ("state", 5, 1)]
    disagreements = []
    try:
        for data in frames:
            for expect, obs_dim, action_dim in expectations:
                ours = _comparable(_python_decode(data, expect, obs_dim, action_dim))
                theirs = _comparable(cpp.decode(data, expect, obs_dim, action_dim))
                theirs.pop("detail", None)
                if ours != theirs:
                    disagreements.append((data[:64].hex(), expect, obs_dim, action_dim, ours, theirs))
    finally:
        cpp.close()
    assert not disagreements, disagreements[:5]
    assert len(frames) * len(expectations) > 2000


# ---- the C++ build's own checks, and the example driver's copy of robot.yaml -------------------------------------
def test_cpp_selftest_passes(sdk_build):
    result = subprocess.run(["ctest", "--test-dir", str(sdk_build), "--output-on-failure"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_example_driver_hard_codes_the_shipped_cartpole_interface(sdk_build, cartpole):
    out = subprocess.run([str(sdk_build / "metarl_cartpole_driver"), "--print-interface"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert json.loads(out) == {
        "name": cartpole.name, "interface_sha256": cartpole.interface_hash, "ctrl_dt": cartpole.ctrl_dt,
        "obs_dim": cartpole.obs_dim, "action_dim": cartpole.action_dim, "action_low": cartpole.action_low.tolist(),
        "action_high": cartpole.action_high.tolist(), "safe_command": cartpole.safe_action.tolist(),
    }, ("sim/robots/cartpole/robot.yaml changed: update cartpole_interface() in "
        "robot_sdk/cpp/examples/cartpole_driver.cpp (`metarl robot cartpole` prints the hash)")


# ---- a full episode of the ROS 2 node, driven by the C++ example driver ------------------------------------------
@pytest.fixture(scope="module")
def colcon_install(tmp_path_factory: pytest.TempPathFactory):
    from tests.ros.conftest import colcon_build

    install, result = colcon_build(tmp_path_factory.mktemp("colcon"))
    assert result.returncode == 0, f"colcon build failed:\n{result.stdout}\n{result.stderr}"
    return install


@pytest.mark.slow
def test_cpp_example_driver_drives_the_node_through_a_full_episode(sdk_build, colcon_install, tmp_path):
    from tests.ros.conftest import BUNDLE, Proc, node_args, params_file, ros_env

    steps = 30
    speed = 0.5  # as the twin in tests/ros: one adapter step takes ~20 ms on an idle core, more on this machine
    env = ros_env(random.Random(time.monotonic_ns()).randint(20, 100))
    driver = Proc([str(sdk_build / "metarl_cartpole_driver"), "--port-base", "0", "--speed", str(speed)],
                  tmp_path / "driver.log", env)
    node = None
    try:
        text = driver.wait_for(lambda t: '"event": "ready"' in t, "the C++ driver's ready line")
        ready = json.loads(next(line for line in text.splitlines() if '"event": "ready"' in line))
        e = ready["endpoints"]
        values = {"bundle": str(BUNDLE), "endpoints": f"state={e['state']},command={e['command']},"
                  f"handshake={e['handshake']}", "log_dir": str(tmp_path / "logs"), "episode_steps": steps,
                  "handshake_timeout_s": 30.0, "safety.stale_after_periods": 3.5 / speed}
        node = Proc(colcon_install.command(*node_args([params_file(tmp_path / "node_params.yaml", values)])),
                    tmp_path / "node.log", env)
        node.wait_for(lambda t: f"finished: episode_steps reached ({steps}); deactivating" in t, "the episode's end")
        assert node.stop(signal.SIGINT) == 0, node.output()[-3000:]
        assert driver.stop(signal.SIGINT) == 0, driver.output()[-3000:]
    finally:
        for proc in (node, driver):
            if proc is not None:
                proc.kill()
    summary = json.loads(next(line for line in driver.output().splitlines() if '"event": "summary"' in line))
    counters = summary["counters"]

    # At the robot: one handshake, the node's commands accepted and applied, nothing rejected.
    assert counters["handshakes_accepted"] == 1 and counters["handshakes_refused"] == 0
    assert counters["commands"]["total_rejected"] == 0, counters["commands"]
    assert counters["commands"]["accepted"] >= steps and counters["periods_commanded"] >= steps - 2

    # At the node: a complete episode of the C++ robot's frames, every step adapted, ended safely.
    logs = sorted((tmp_path / "logs").glob("*.mcap"))
    assert len(logs) == 1, logs
    episode = read_episode(logs[0])
    assert episode.complete and episode.end_reason == f"episode_steps reached ({steps})"
    assert episode.robot.interface_hash == ready["interface_sha256"] == load_robot("cartpole").interface_hash
    assert episode.adapted.sum() == steps and (episode.command_source[-5:] == "safe_command").all()
    kinds = [e.kind for e in episode.safety_events]
    assert kinds[:2] == ["HANDSHAKE_OK", "ARMED"], kinds
    seqs = episode.state_seq[episode.adapted]
    assert (np.diff(seqs) > 0).all(), seqs  # the robot's sequence numbers, strictly increasing
