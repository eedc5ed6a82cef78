"""RobotClient ⇄ ControllerLink over real ZeroMQ sockets on loopback: handshake, latest state, commands, watchdog."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

from metarl_robot.runtime.safety import CommandSource, EventCode, SafetyConfig, SafetyLayer, SafetyState
from metarl_robot.spec.robot import load_robot
from metarl_robot.telemetry.controller import ControllerLink, HandshakeError
from metarl_robot.telemetry.protocol import (
    CommandFrame,
    Hello,
    MsgType,
    StateFrame,
    Welcome,
    decode,
    encode,
    encode_command,
    encode_state,
    reseal,
)
from metarl_robot.telemetry.robot_client import RobotClient
from metarl_robot.telemetry.transport import Endpoints
from tests.conftest import edit_yaml
from tests.telemetry.conftest import ANY_PORT, DEADLINE_S, first_state, handshake_with, serve_while

pytestmark = pytest.mark.integration

OBS = np.array([0.0, np.pi, 0.0, 0.0])


def test_handshake_arms_and_commands_flow_both_ways(robot_client, link, cartpole):
    welcome = handshake_with(robot_client, link, cartpole)
    assert welcome.accepted and welcome.session == robot_client.session != 0
    assert (welcome.robot_name, welcome.interface_hash) == ("cartpole", cartpole.interface_hash)
    assert (welcome.obs_dim, welcome.action_dim, welcome.ctrl_dt, welcome.watchdog_ms) == (4, 1, 0.04, 150)
    assert link.armed and robot_client.armed

    robot_client.current_action()  # no command yet: the safe command, and the state says so
    state = first_state(robot_client, link, OBS)
    assert state.session == welcome.session and state.safe and state.applied_command_seq == 0
    np.testing.assert_array_equal(state.obs, OBS)
    np.testing.assert_array_equal(state.applied_action, cartpole.safe_action)

    sent = link.send_command([0.4], answers=state)
    assert sent.seq == 1 and sent.answers_seq == state.seq
    assert sent.expires_ns == state.stamp_ns + round(3 * 0.04 * 1e9)
    serve_while(robot_client, lambda: robot_client.counters.commands.accepted == 1)
    decision = robot_client.current_action()
    assert not decision.safe and decision.reason == "command"
    assert (decision.command_seq, decision.answers_seq) == (1, state.seq)
    np.testing.assert_array_equal(decision.action, [0.4])

    robot_client.publish_state(OBS + 1)
    after = link.receive_state(5.0)
    assert after is not None and after.seq > state.seq and not after.safe
    assert after.applied_command_seq == 1
    np.testing.assert_array_equal(after.applied_action, [0.4])
    assert link.stats.total_rejected == 0


def test_interface_mismatch_refuses_to_arm_naming_both_hashes(robot_client, link, cartpole, sim_copy):
    path = edit_yaml(sim_copy / "robots" / "cartpole" / "robot.yaml",
                     lambda d: d["observation"][0].update(scale=2.0))
    other = load_robot(path)
    assert other.interface_hash != cartpole.interface_hash
    with pytest.raises(HandshakeError) as info:
        handshake_with(robot_client, link, other)
    message = str(info.value)
    assert other.interface_hash in message and cartpole.interface_hash in message
    assert "refused to arm" in message and "same robot.yaml" in message
    assert info.value.welcome is not None and not info.value.welcome.accepted
    assert robot_client.counters.handshakes_refused == 1 and not robot_client.armed and not link.armed
    robot_client.current_action()
    state_like = first_state(robot_client, link, OBS)
    with pytest.raises(HandshakeError, match="not armed"):
        link.send_command([0.0], answers=state_like)


def test_protocol_version_mismatch_is_refused_with_both_versions(robot_client, cartpole):
    context = zmq.Context.instance()
    req = context.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(robot_client.endpoints.handshake)
    hello = bytearray(encode(Hello("cartpole", cartpole.interface_hash, 4, 1, 0.04)))
    hello[4] = 2
    req.send(reseal(bytes(hello)))
    serve_while(robot_client, lambda: req.poll(0))
    reply = decode(req.recv(), expect=MsgType.WELCOME)
    req.close()
    assert not reply.accepted and reply.session == 0
    assert "protocol version mismatch" in reply.message and "v2" in reply.message and "v1" in reply.message


def test_controller_reports_a_robot_of_another_version(cartpole):
    context = zmq.Context.instance()
    rep = context.socket(zmq.REP)
    rep.setsockopt(zmq.LINGER, 0)
    port = rep.bind_to_random_port("tcp://127.0.0.1")
    welcome = bytearray(encode(Welcome(True, 5, 200, 1, "cartpole", cartpole.interface_hash, 4, 1, 0.04)))
    welcome[4] = 3
    def answer():
        if rep.poll(10_000):
            rep.recv()
            rep.send(reseal(bytes(welcome)))

    thread = threading.Thread(target=answer)
    thread.start()
    endpoints = Endpoints("tcp://127.0.0.1:1", "tcp://127.0.0.1:2", f"tcp://127.0.0.1:{port}")
    with ControllerLink(endpoints) as link, pytest.raises(HandshakeError, match="protocol v3, this controller v1"):
        link.handshake(cartpole, timeout_s=10)
    thread.join()
    rep.close()


def test_handshake_times_out_with_what_to_check(cartpole):
    with ControllerLink(Endpoints.from_port_base("127.0.0.1", 9)) as link, \
            pytest.raises(HandshakeError, match=r"no WELCOME .* is the robot"):
        link.handshake(cartpole, timeout_s=0.2)


def test_send_command_guards(robot_client, link, cartpole):
    robot_client.current_action()
    before = first_state(robot_client, link, OBS)  # a state from before the handshake (session 0)
    with pytest.raises(HandshakeError, match="not armed"):
        link.send_command([0.0], answers=before)
    handshake_with(robot_client, link, cartpole)
    with pytest.raises(ValueError, match="session 0"):
        link.send_command([0.0], answers=before)
    serve_while(robot_client, lambda: robot_client.session != 0)
    ours = first_state(robot_client, link, OBS)
    with pytest.raises(ValueError, match="outside"):
        link.send_command([1.5], answers=ours)
    with pytest.raises(ValueError, match="NaN"):
        link.send_command([np.nan], answers=ours)
    with pytest.raises(ValueError, match="shape"):
        link.send_command([0.0, 0.0], answers=ours)
    assert link.commands_sent == 0


def test_slow_reader_gets_the_newest_state_and_no_backlog(robot_client, link, cartpole):
    handshake_with(robot_client, link, cartpole)
    first_state(robot_client, link, OBS)
    burst_end = None
    for i in range(200):  # the controller does not read while these go out
        burst_end = robot_client.publish_state(OBS + i)
    # The robot goes on publishing once per period, as a robot does. Depending on how much of the burst libzmq
    # queued, the controller either gets the burst's newest frame or drops the backlog (a new socket, see
    # HealingSub) and gets the next fresh one; never a stream of old frames.
    received = []
    end = time.monotonic() + 10
    i = 200
    while (not received or received[-1].seq < burst_end.seq) and time.monotonic() < end:
        frame = link.receive_state(0.02)
        if frame is not None:
            received.append(frame)
        else:
            robot_client.publish_state(OBS + i)
            i += 1
    assert received and received[-1].seq >= burst_end.seq, [f.seq for f in received]
    np.testing.assert_array_equal(received[-1].obs, OBS + (received[-1].seq - burst_end.seq + 199))
    old = [f.seq for f in received if f.seq < burst_end.seq]
    assert len(old) <= 3, old  # a backlog would deliver ~200 frames
    assert link.receive_state(0.2) is None


def _bind_when_free(cartpole, endpoints: Endpoints) -> RobotClient:
    end = time.monotonic() + 10
    while True:
        client = RobotClient(cartpole, endpoints, watchdog_ms=150)
        try:
            client.start()
            return client
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def test_restarted_robot_delivers_no_stale_backlog_and_the_link_knows(cartpole):
    first = RobotClient(cartpole, ANY_PORT, watchdog_ms=150)
    endpoints = first.start()
    link = ControllerLink(endpoints)
    link.connect()
    second = None
    try:
        handshake_with(first, link, cartpole)
        first_state(first, link, OBS)
        for i in range(50):
            old_last = first.publish_state(OBS + i)
        first.close()
        second = _bind_when_free(cartpole, endpoints)
        stale = []
        end = time.monotonic() + 10
        while not link.session_lost and time.monotonic() < end:
            second.publish_state(OBS - 1)
            frame = link.receive_state(0.02)
            if frame is not None:
                stale.append(frame)
        assert link.session_lost and not link.armed
        assert len(stale) <= 1 and all(f.seq <= old_last.seq for f in stale)  # at most the old robot's last one
        assert link.stats.rejected["foreign_session"] >= 1
        with pytest.raises(HandshakeError, match="handshake again"):
            link.send_command([0.0], answers=stale[0] if stale else old_last)
        handshake_with(second, link, cartpole)
        fresh = first_state(second, link, OBS - 1)
        assert fresh.session == second.session and link.armed
        np.testing.assert_array_equal(fresh.obs, OBS - 1)
    finally:
        link.close()
        first.close()
        if second is not None:
            second.close()


def _raw_pub(endpoint: str) -> zmq.Socket:
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(endpoint)
    return pub


def test_robot_rejects_and_counts_bad_commands(robot_client, link, cartpole):
    handshake_with(robot_client, link, cartpole)
    session, counters = robot_client.session, robot_client.counters.commands
    pub = _raw_pub(robot_client.endpoints.command)
    try:
        far = time.monotonic_ns() + 10**10
        seq = iter(range(1, 10**6))
        probe_seq = 0

        def probe():  # valid commands until the connection is up and one got through
            nonlocal probe_seq
            probe_seq = next(seq)
            pub.send(encode_command(CommandFrame(probe_seq, 1, far, session, np.array([0.1]))))

        serve_while(robot_client, lambda: counters.accepted >= 1, publish=probe)
        base_seq = probe_seq
        bad = {
            "foreign_session": encode_command(CommandFrame(base_seq + 100, 1, far, session ^ 1, np.array([0.1]))),
            # Seq 1, the first probe's: never newer than the accepted one. (The last probe sent may never be
            # processed: the robot's socket keeps only the newest frame, so under load the next frame can
            # replace it, and base_seq would then be newer than anything accepted.)
            "old_seq": encode_command(CommandFrame(1, 1, far, session, np.array([0.1]))),
            "expired": encode_command(CommandFrame(base_seq + 101, 1, 1, session, np.array([0.1]))),
            "out_of_range": encode_command(CommandFrame(base_seq + 102, 1, far, session, np.array([1.01]))),
            "crc": encode_command(CommandFrame(base_seq + 103, 1, far, session, np.array([0.1])))[:-1] + b"\x01",
            "dims": encode_command(CommandFrame(base_seq + 104, 1, far, session, np.array([0.1, 0.2]))),
            "unexpected_type": encode(Hello("cartpole", cartpole.interface_hash, 4, 1, 0.04)),
        }
        for reason, data in bad.items():
            before = counters.rejected[reason]
            pub.send(data)
            serve_while(robot_client, lambda r=reason, b=before: counters.rejected[r] > b)
        # Still a valid probe's command: none of the bad frames (sequence numbers base_seq + 100 and up, or the
        # stale seq 1 after a newer one) became current. Not necessarily base_seq itself: the robot keeps only the
        # newest frame, so under load the last probe can land after the first accepted one, or never.
        decision = robot_client.current_action()
        assert 1 <= decision.command_seq <= base_seq and np.allclose(decision.action, [0.1]), decision
        assert counters.accepted <= base_seq
    finally:
        pub.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 10**12

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: float) -> None:
        self.now += int(ms * 1e6)


def test_watchdog_and_expiry_engage_the_safe_command_on_the_robot_clock(cartpole):
    clock = FakeClock()
    robot = RobotClient(cartpole, ANY_PORT, watchdog_ms=100, clock=clock)
    robot.start()
    link = ControllerLink(robot.endpoints)
    link.connect()
    try:
        handshake_with(robot, link, cartpole)
        assert robot.current_action().reason == "no_command"
        state = first_state(robot, link, OBS)

        # watchdog: a long-lived command, then silence
        link.send_command([0.5], answers=state, valid_for_s=10.0)
        serve_while(robot, lambda: robot.counters.commands.accepted == 1)
        clock.advance(99)
        assert robot.current_action().reason == "command"
        clock.advance(2)
        decision = robot.current_action()
        assert decision.safe and decision.reason == "watchdog"
        np.testing.assert_array_equal(decision.action, cartpole.safe_action)
        assert robot.counters.watchdog_engagements == 1 and robot.counters.last_engagement_ns == clock.now

        # expiry: a short-lived command with a generous watchdog would be applied until it expires
        state = robot.publish_state(OBS)
        fresh = None
        while fresh is None or fresh.seq != state.seq:
            fresh = link.receive_state(5.0) or fresh
        link.send_command([-0.5], answers=fresh, valid_for_s=0.05)
        serve_while(robot, lambda: robot.counters.commands.accepted == 2)
        assert robot.current_action().reason == "command"
        clock.advance(50)
        assert robot.current_action().reason == "expired"
        assert robot.counters.watchdog_engagements == 2

        # a command that arrives already expired is rejected and counted
        link.send_command([0.5], answers=fresh, valid_for_s=0.01)
        serve_while(robot, lambda: robot.counters.commands.rejected["expired"] == 1)

        # a new handshake drops whatever the previous controller sent
        state = robot.publish_state(OBS)
        while fresh.seq != state.seq:
            fresh = link.receive_state(5.0) or fresh
        link.send_command([0.2], answers=fresh, valid_for_s=10.0)
        serve_while(robot, lambda: robot.counters.commands.accepted == 3)
        assert robot.current_action().reason == "command"
        handshake_with(robot, link, cartpole)
        assert robot.current_action().reason == "no_command"
        assert robot.counters.watchdog_engagements == 3
        assert robot.counters.periods_safe >= 4 and robot.counters.periods_commanded >= 3
    finally:
        link.close()
        robot.close()


def test_watchdog_engages_in_real_time_after_the_controller_goes_quiet(robot_client, link, cartpole):
    handshake_with(robot_client, link, cartpole)
    robot_client.current_action()
    state = first_state(robot_client, link, OBS)
    link.send_command([0.3], answers=state, valid_for_s=60.0)  # only the watchdog can stop it
    serve_while(robot_client, lambda: robot_client.counters.commands.accepted == 1)
    received = robot_client.last_command_received_ns
    decisions = []
    serve_while(robot_client, lambda: decisions.append(robot_client.current_action()) or decisions[-1].safe)
    assert decisions[-1].reason == "watchdog"
    assert decisions[-1].stamp_ns - received > 150e6  # never before the watchdog time has passed
    assert not any(d.safe for d in decisions[:-1])


def test_publish_state_checks_its_input_and_keeps_the_sequence(robot_client):
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        robot_client.publish_state(np.zeros(3))
    with pytest.raises(ValueError, match="NaN"):
        robot_client.publish_state(OBS, applied_action=[np.nan])
    assert robot_client.publish_state(OBS).seq == 1
    assert robot_client.publish_state(OBS, applied_action=[0.2]).seq == 2
    # A failed sensor is not an input error: the frame goes out, for the controller's safety layer.
    assert robot_client.publish_state(np.array([0.0, np.nan, 0.0, 0.0])).seq == 3


def _receive_seq(link: ControllerLink, seq: int):
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end:
        frame = link.receive_state(0.5)
        if frame is not None and frame.seq == seq:
            return frame
    raise AssertionError(f"state {seq} never arrived")


def test_a_nan_observation_reaches_the_safety_layer_which_stops_in_that_period_naming_the_field(
        robot_client, link, cartpole):
    handshake_with(robot_client, link, cartpole)
    layer = SafetyLayer(cartpole, SafetyConfig(stale_after_periods=50))  # a busy test machine must not go stale
    layer.on_handshake(True, time.monotonic())
    robot_client.current_action()
    good = first_state(robot_client, link, OBS)
    assert layer.on_frame(good.seq, good.stamp_ns, time.monotonic(), good.obs)
    decision = layer.filter(np.array([0.2]), None, time.monotonic())
    assert decision.source is CommandSource.ADAPTER
    link.send_command(decision.command, answers=good)

    # The pole encoder fails: the robot sends what it read, and the controller gets it in that period.
    sent = robot_client.publish_state(np.array([0.1, np.nan, 0.0, 0.0]))
    frame = _receive_seq(link, sent.seq)
    assert np.isnan(frame.obs[1]) and link.stats.rejected["non_finite"] == 0
    now = time.monotonic()
    assert not layer.on_frame(frame.seq, frame.stamp_ns, now, frame.obs)
    decision = layer.tick(now)
    assert decision.state is SafetyState.SAFE_STOP and decision.source is CommandSource.SAFE_COMMAND
    np.testing.assert_array_equal(decision.command, cartpole.safe_action)
    events = [e for e in decision.events if e.code is EventCode.OBS_NONFINITE]
    assert len(events) == 1 and "['pole_angle']" in events[0].message, decision.events

    # A NaN in what the robot says it applied is a malformed frame: dropped and counted, never handed on.
    spoiled = bytearray(encode_state(StateFrame(seq=sent.seq + 1, stamp_ns=sent.stamp_ns + 1, obs=OBS,
                                                applied_action=np.array([0.0]), session=sent.session)))
    spoiled[-8:] = np.array([np.nan]).tobytes()
    robot_client.publish_raw(reseal(bytes(spoiled)))
    end = time.monotonic() + DEADLINE_S
    while link.stats.rejected["non_finite"] == 0 and time.monotonic() < end:
        assert link.receive_state(0.05) is None
    assert link.stats.rejected["non_finite"] == 1


def test_multi_part_messages_are_refused_whole_and_the_loops_survive(robot_client, link, cartpole):
    hello = encode(Hello("cartpole", cartpole.interface_hash, 4, 1, 0.04))
    req = zmq.Context.instance().socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(robot_client.endpoints.handshake)
    try:
        req.send_multipart([hello, b"a second part"])  # a valid HELLO first: still not a frame
        serve_while(robot_client, lambda: req.poll(0))  # service() answered instead of raising
        reply = decode(req.recv(), expect=MsgType.WELCOME)
    finally:
        req.close()
    assert not reply.accepted and reply.message == ("malformed HELLO: a multi-part message (2 parts); a frame is "
                                                    "one single-part message")
    assert robot_client.counters.handshakes_refused == 1 and robot_client.session == 0

    welcome = handshake_with(robot_client, link, cartpole)
    robot_client.current_action()
    state = first_state(robot_client, link, OBS)
    pub = zmq.Context.instance().socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(robot_client.endpoints.command)
    try:
        command = encode_command(CommandFrame(10**6, state.seq, state.stamp_ns + 10**10, welcome.session,
                                              np.array([0.3])))
        serve_while(robot_client, lambda: robot_client.counters.commands.rejected["length"] > 0,
                    publish=lambda: pub.send_multipart([command, b""]))
    finally:
        pub.close()
    assert robot_client.counters.commands.accepted == 0 and robot_client.current_action().reason == "no_command"

    # And on the controller's state socket: the first part is a valid state, yet the message is not a frame.
    valid = encode_state(StateFrame(seq=1, stamp_ns=1, obs=OBS))
    rogue = zmq.Context.instance().socket(zmq.PUB)
    rogue.setsockopt(zmq.LINGER, 0)
    port = rogue.bind_to_random_port("tcp://127.0.0.1")
    endpoints = robot_client.endpoints
    rx = ControllerLink(Endpoints(f"tcp://127.0.0.1:{port}", endpoints.command, endpoints.handshake))
    rx.connect()
    try:
        end = time.monotonic() + DEADLINE_S
        while rx.stats.rejected["length"] == 0 and time.monotonic() < end:
            rogue.send_multipart([valid, b"x"])
            assert rx.receive_state(0.02) is None
        assert rx.stats.rejected["length"] > 0 and rx.stats.accepted == 0
        rogue.send(valid)  # the same bytes as one part: a frame
        assert rx.receive_state(DEADLINE_S).seq == 1
    finally:
        rx.close()
        rogue.close()


def test_clients_refuse_use_before_start():
    robot = RobotClient(load_robot("cartpole"))
    with pytest.raises(RuntimeError, match="not started"):
        robot.publish_state(OBS)
    with pytest.raises(RuntimeError, match="not connected"):
        ControllerLink(Endpoints.from_port_base()).receive_state()
    with pytest.raises(ValueError, match="watchdog_ms"):
        RobotClient(load_robot("cartpole"), watchdog_ms=0)


def test_robot_reports_a_busy_port(robot_client, cartpole):
    with pytest.raises(OSError, match="cannot bind telemetry endpoint"):
        RobotClient(cartpole, robot_client.endpoints).start()


def test_endpoint_parsing():
    assert Endpoints.from_port_base("10.0.0.2", 5000) == Endpoints("tcp://10.0.0.2:5000", "tcp://10.0.0.2:5001",
                                                                   "tcp://10.0.0.2:5002")
    named = Endpoints.parse("command=ipc:///tmp/c,state=ipc:///tmp/s,handshake=ipc:///tmp/h")
    assert named == Endpoints("ipc:///tmp/s", "ipc:///tmp/c", "ipc:///tmp/h")
    assert Endpoints.parse("tcp://a:1, tcp://a:2, tcp://a:3").handshake == "tcp://a:3"
    for bad in ("tcp://a:1,tcp://a:2", "a:1,a:2,a:3"):
        with pytest.raises(ValueError, match="endpoints"):
            Endpoints.parse(bad)
    with pytest.raises(ValueError, match="port_base"):
        Endpoints.from_port_base(port_base=70000)


def test_ipc_endpoints_work_too(tmp_path, cartpole):
    with RobotClient(cartpole, Endpoints.ipc(tmp_path), watchdog_ms=150) as robot, \
            ControllerLink(Endpoints.ipc(tmp_path)) as link:
        handshake_with(robot, link, cartpole)
        robot.current_action()
        assert first_state(robot, link, OBS).session == robot.session
