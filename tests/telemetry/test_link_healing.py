"""Links that heal, over real ZeroMQ sockets on loopback: a frame over ZMQ_MAXMSGSIZE cuts the connection but
not the link, and garbage between valid frames never costs the newest valid one (validate, then keep newest)."""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest
import zmq

from metarl_robot.telemetry.controller import ControllerLink
from metarl_robot.telemetry.protocol import (
    MAX_FRAME_BYTES,
    CommandFrame,
    Hello,
    StateFrame,
    encode,
    encode_command,
    encode_state,
    reseal,
)
from metarl_robot.telemetry.robot_client import RobotClient
from metarl_robot.telemetry.transport import RECV_MAX_BYTES, RECV_QUEUE_FRAMES, Endpoints
from tests.telemetry.conftest import DEADLINE_S, first_state, handshake_with, serve_while

pytestmark = pytest.mark.integration

OBS = np.array([0.0, np.pi, 0.0, 0.0])
OVERSIZED = bytes(RECV_MAX_BYTES + 1)
"""One byte over the receiving sockets' ZMQ_MAXMSGSIZE: libzmq drops the connection instead of delivering it."""
MAX_BURST = 20
"""Frames sent between two reads in the fuzz tests: within the receive queue, so nothing may be lost."""
assert MAX_BURST < RECV_QUEUE_FRAMES - 1


# ---- helpers -------------------------------------------------------------------------------------------------
def _spoil(rng: np.random.Generator, good: bytes, wrong_type: bytes, wrong_dims: bytes) -> bytes:
    """A frame the decoder must reject, made from a valid one (or not)."""
    kind = rng.integers(8)
    if kind == 0:
        return rng.bytes(int(rng.integers(0, 120)))  # noise (or an empty message)
    if kind == 1:
        spoiled = bytearray(good)
        spoiled[int(rng.integers(16, len(good)))] ^= 0x5A  # one flipped payload byte: the CRC catches it
        return bytes(spoiled)
    if kind == 2:
        return good[:int(rng.integers(1, len(good)))]
    if kind == 3:
        return bytes(MAX_FRAME_BYTES + 64)  # over the frame limit, under MAXMSGSIZE: delivered and rejected
    if kind == 4:
        spoiled = bytearray(good)
        # NaN in the last float (a command's action, a state's applied action; a state's *observation* may be NaN),
        # with a valid CRC.
        spoiled[-8:] = struct.pack("<d", float("nan"))
        return reseal(bytes(spoiled))
    if kind == 5:
        return wrong_type
    if kind == 6:
        return wrong_dims
    spoiled = bytearray(good)
    spoiled[0:4] = b"MRLX"
    return bytes(spoiled)


def _burst(rng: np.random.Generator, valid: list[bytes], make_garbage) -> list[bytes]:
    """The valid frames, in order, with garbage before, between and (often: the case that used to lose the valid
    frame) after them; at most MAX_BURST frames."""
    frames: list[bytes] = []
    room = MAX_BURST - len(valid)
    for data in valid:
        frames += [make_garbage() for _ in range(int(rng.integers(0, room // (len(valid) + 1) + 1)))]
        frames.append(data)
    frames += [make_garbage() for _ in range(int(rng.integers(0, MAX_BURST - len(frames) + 1)))]
    return frames


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def state_pub(context):
    """A plain PUB (no CONFLATE, default queue) standing in for a robot's state socket: every frame the test sends
    reaches the controller's queue, so any loss is the controller's."""
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind("tcp://127.0.0.1:*")
    return pub


@pytest.fixture
def fuzzed_link(robot_client, state_pub, cartpole):
    """A controller armed by ``robot_client`` whose STATE frames come from ``state_pub``."""
    endpoints = Endpoints(state_pub.getsockopt_string(zmq.LAST_ENDPOINT), robot_client.endpoints.command,
                          robot_client.endpoints.handshake)
    link = ControllerLink(endpoints)
    link.connect()
    handshake_with(robot_client, link, cartpole)
    yield link
    link.close()


class StateSource:
    """Valid STATE frames of the armed session, seq counting up, obs[0] = seq (so a returned frame is checkable)."""

    def __init__(self, session: int) -> None:
        self.session = session
        self.seq = 0

    def next(self) -> tuple[int, bytes]:
        self.seq += 1
        obs = np.array([float(self.seq), 0.0, 0.0, 0.0])
        return self.seq, encode_state(StateFrame(seq=self.seq, stamp_ns=time.monotonic_ns(), obs=obs,
                                                 applied_action=np.zeros(1), session=self.session))


def _connect_pub(pub: zmq.Socket, link: ControllerLink, source: StateSource) -> int:
    """Send valid states until the controller gets one (PUB/SUB drops frames until the connection is up)."""
    end = time.monotonic() + DEADLINE_S
    while True:
        pub.send(source.next()[1])
        frame = link.receive_state(0.01)
        if frame is not None:
            return frame.seq
        assert time.monotonic() < end, "the controller never received a probe"


def _read_until(link: ControllerLink, seq: int) -> list[StateFrame]:
    """Read until the frame ``seq`` is returned; every frame returned on the way is returned too."""
    got: list[StateFrame] = []
    end = time.monotonic() + DEADLINE_S
    while not got or got[-1].seq < seq:
        assert time.monotonic() < end, (f"state {seq} never returned (got {[f.seq for f in got]}); "
                                        f"rejected {link.stats.as_dict()}")
        frame = link.receive_state(0.05)
        if frame is not None:
            got.append(frame)
    return got


# ---- the controller's state socket ---------------------------------------------------------------------------
def test_an_oversized_state_mid_traffic_is_counted_and_the_link_heals_without_a_handshake(robot_client, link,
                                                                                           cartpole):
    handshake_with(robot_client, link, cartpole)
    first_state(robot_client, link, OBS)
    session = link.session
    robot_client.publish_raw(OVERSIZED)
    # Nothing else is published until the controller noticed (or a second passed): the robot's PUB keeps only its
    # newest frame, so a state sent now could replace the oversized one before it left. The controller only reads.
    end = time.monotonic() + 1.0
    while link.stats.rejected.get("oversized", 0) == 0 and time.monotonic() < end:
        assert link.receive_state(0.01) is None
    before = robot_client.state_seq
    fresh = first_state(robot_client, link, OBS + 1)  # valid traffic resumes, with no handshake
    assert fresh.seq > before and fresh.session == session and link.armed and not link.session_lost
    np.testing.assert_array_equal(fresh.obs, OBS + 1)
    assert link.stats.rejected["oversized"] == 1 and link.link_resets == 1
    assert link.stats.total_rejected == 1  # nothing else was taken for a bad frame
    for i in range(5):  # and it keeps flowing
        sent = robot_client.publish_state(OBS + i)
        assert _read_until(link, sent.seq)[-1].seq == sent.seq


def test_a_handshake_heals_the_link_before_any_read(robot_client, link, cartpole):
    handshake_with(robot_client, link, cartpole)
    first_state(robot_client, link, OBS)
    robot_client.publish_raw(OVERSIZED)
    time.sleep(0.5)  # the connection is dropped meanwhile; the controller reads nothing, so nothing has healed yet
    handshake_with(robot_client, link, cartpole)
    fresh = first_state(robot_client, link, OBS + 2)
    assert fresh.session == robot_client.session == link.session
    np.testing.assert_array_equal(fresh.obs, OBS + 2)
    # The handshake rebuilds the socket anyway; the drop it found on the old one is still counted.
    assert link.stats.rejected["oversized"] == 1 and link.link_resets == 1


def test_a_restarted_robot_is_not_taken_for_a_dropped_frame(cartpole):
    """libzmq reconnects by itself after a peer went away: no rebuild, nothing counted as oversized."""
    first = RobotClient(cartpole, Endpoints.from_port_base("127.0.0.1", 0), watchdog_ms=150)
    endpoints = first.start()
    second = None
    link = ControllerLink(endpoints)
    link.connect()
    try:
        handshake_with(first, link, cartpole)
        first_state(first, link, OBS)
        first.close()
        end = time.monotonic() + DEADLINE_S
        while True:
            try:
                second = RobotClient(cartpole, endpoints, watchdog_ms=150)
                second.start()
                break
            except OSError:
                second = None
                assert time.monotonic() < end
                time.sleep(0.05)
        serve_while(second, lambda: link.session_lost, publish=lambda: (second.publish_state(OBS),
                                                                         link.receive_state(0.02)))
        assert link.link_resets == 0 and link.stats.rejected["oversized"] == 0
    finally:
        link.close()
        first.close()
        if second is not None:
            second.close()


def test_garbage_between_valid_states_never_costs_the_newest_valid_one(fuzzed_link, state_pub, robot_client):
    link = fuzzed_link
    source = StateSource(robot_client.session)
    _connect_pub(state_pub, link, source)
    rng = np.random.default_rng(17)
    wrong_type = encode_command(CommandFrame(1, 1, 1, robot_client.session, np.zeros(1)))
    wrong_dims = encode_state(StateFrame(seq=1, stamp_ns=1, obs=np.zeros(5), session=robot_client.session))
    accepted_before = link.stats.accepted
    garbage = 0
    returned: list[StateFrame] = []
    for _ in range(150):
        valid = [source.next() for _ in range(int(rng.integers(1, 4)))]
        frames = _burst(rng, [data for _, data in valid],
                        lambda template=valid[-1][1]: _spoil(rng, template, wrong_type, wrong_dims))
        garbage += len(frames) - len(valid)
        for data in frames:
            state_pub.send(data)
        got = _read_until(link, valid[-1][0])
        # Only valid frames come back, in order, and the newest valid one sent before the read is among them.
        assert [f.seq for f in got] == sorted({f.seq for f in got}) and got[-1].seq == valid[-1][0]
        assert all(f.obs[0] == f.seq for f in got)
        returned += got
    # Every bad frame reached the decoder and was counted; none was mistaken for a state.
    end = time.monotonic() + DEADLINE_S
    while link.stats.total_rejected < garbage and time.monotonic() < end:
        assert link.receive_state(0.05) is None
    assert link.stats.total_rejected == garbage, link.stats.as_dict()
    assert link.stats.accepted - accepted_before == len(returned)
    assert link.link_resets == 0 and link.stats.rejected["oversized"] == 0
    for reason in ("crc", "too_long", "non_finite", "unexpected_type", "dims", "magic"):
        assert link.stats.rejected[reason] > 0, (reason, link.stats.as_dict())


def test_a_reader_a_full_queue_behind_gets_a_fresh_state_not_the_backlog(fuzzed_link, state_pub, robot_client):
    link = fuzzed_link
    source = StateSource(robot_client.session)
    _connect_pub(state_pub, link, source)
    backlog_end = 0
    for _ in range(5 * RECV_QUEUE_FRAMES):  # the controller does not read while these go out
        backlog_end, data = source.next()
        state_pub.send(data)
    time.sleep(0.2)
    got = []
    end = time.monotonic() + DEADLINE_S
    while not got:
        assert time.monotonic() < end, "no state after the backlog"
        got.append(link.receive_state(0.01))
        if got[-1] is None:
            got.pop()
            state_pub.send(source.next()[1])
    # The newest backlog state (or a later one), never an older one: a plain drain of the bounded queue would
    # stop where libzmq's queue was full and hand out a state RECV_QUEUE_FRAMES periods old.
    assert got[0].seq >= backlog_end, f"an old state from the backlog came back: {got[0].seq} < {backlog_end}"
    assert link.link_resets == 1  # the backlog was dropped with the socket


# ---- the robot's command socket ------------------------------------------------------------------------------
@pytest.fixture
def command_pub(context, robot_client, link, cartpole):
    """A plain PUB (no CONFLATE) connected to the armed robot's command socket, standing in for a controller."""
    handshake_with(robot_client, link, cartpole)
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.connect(robot_client.endpoints.command)
    return pub


class CommandSource:
    """Valid commands of the armed session, seq counting up, far from expiry, action = seq / 1000."""

    def __init__(self, session: int) -> None:
        self.session = session
        self.seq = 0

    def next(self) -> tuple[int, bytes]:
        self.seq += 1
        return self.seq, encode_command(CommandFrame(self.seq, 1, time.monotonic_ns() + 10**10, self.session,
                                                     np.array([self.seq / 1000])))


def _applied(robot_client: RobotClient, seq: int) -> None:
    """Service the robot until the command ``seq`` is the one it applies (or fail at the deadline)."""
    serve_while(robot_client, lambda: robot_client.current_action().command_seq >= seq)
    decision = robot_client.current_action()
    assert decision.command_seq == seq and not decision.safe, decision
    np.testing.assert_allclose(decision.action, [seq / 1000])


def test_garbage_between_valid_commands_never_costs_the_newest_valid_one(command_pub, robot_client, cartpole):
    source = CommandSource(robot_client.session)
    counters = robot_client.counters.commands
    serve_while(robot_client, lambda: counters.accepted >= 1, publish=lambda: command_pub.send(source.next()[1]))
    last_probe = source.seq  # connected now: the probes still in flight all arrive, the last one last
    _applied(robot_client, last_probe)
    accepted_before = counters.accepted
    rng = np.random.default_rng(23)
    wrong_type = encode(Hello("cartpole", cartpole.interface_hash, 4, 1, 0.04))
    wrong_dims = encode_command(CommandFrame(1, 1, 1, robot_client.session, np.zeros(2)))
    replay = encode_command(CommandFrame(last_probe, 1, time.monotonic_ns() + 10**10, robot_client.session,
                                         np.array([0.0])))  # well-formed, but not newer than what was applied
    garbage = 0
    for _ in range(150):
        valid = [source.next() for _ in range(int(rng.integers(1, 4)))]
        template = valid[-1][1]

        def make_garbage(template=template):
            return replay if rng.random() < 0.15 else _spoil(rng, template, wrong_type, wrong_dims)
        frames = _burst(rng, [data for _, data in valid], make_garbage)
        garbage += len(frames) - len(valid)
        for data in frames:
            command_pub.send(data)
        _applied(robot_client, valid[-1][0])
    end = time.monotonic() + DEADLINE_S
    while counters.total_rejected < garbage and time.monotonic() < end:
        robot_client.service()
        time.sleep(0.002)
    assert counters.total_rejected == garbage, counters.as_dict()
    assert counters.accepted - accepted_before == source.seq - last_probe  # every valid command, in order
    for reason in ("crc", "too_long", "non_finite", "unexpected_type", "dims", "magic", "old_seq"):
        assert counters.rejected[reason] > 0, (reason, counters.as_dict())


def test_an_oversized_command_mid_traffic_does_not_cut_the_robot_off(command_pub, robot_client):
    source = CommandSource(robot_client.session)
    counters = robot_client.counters.commands
    serve_while(robot_client, lambda: counters.accepted >= 1, publish=lambda: command_pub.send(source.next()[1]))
    command_pub.send(OVERSIZED)  # the robot's SUB drops this controller's connection; its PUB reconnects by itself
    after = source.seq
    serve_while(robot_client, lambda: robot_client.current_action().command_seq > after,
                publish=lambda: (command_pub.send(source.next()[1]), time.sleep(0.01)))
    decision = robot_client.current_action()
    assert not decision.safe and decision.command_seq > after
