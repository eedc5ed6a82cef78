"""The ros2_control link's parts without a ROS graph: robot.yaml's observation read from a JointState (and the
robots it cannot be read for), sequence numbers derived from stamps, and JointState messages turned into the state
frames the safety layer judges (or rejected with a reason)."""

from __future__ import annotations

import math

import pytest
from metarl_robot_ros.robot_link import JointStateReader, StampSequencer

from metarl_robot.spec.robot import load_robot
from metarl_robot.spec.schema import SpecError
from metarl_robot.telemetry.protocol import DecodeStats

PERIOD_NS = 40_000_000


@pytest.fixture(scope="module")
def cartpole():
    return load_robot("cartpole")


def test_the_cartpole_observation_is_read_by_joint_name_in_any_order(cartpole):
    reader = JointStateReader.for_robot(cartpole)
    assert reader.joints == ("slider", "hinge")
    assert reader.sources == (("position", "slider"), ("position", "hinge"), ("velocity", "slider"),
                              ("velocity", "hinge"))
    obs, problem = reader.read(["hinge", "wheel", "slider"], [3.0, 9.0, 0.5], [-1.0, 9.0, 0.25])
    assert problem == "" and obs.tolist() == [0.5, 3.0, 0.25, -1.0]
    obs, problem = reader.read(["hinge"], [3.0], [1.0])
    assert obs is None and "joint 'slider' is not in the message" in problem
    obs, problem = reader.read(["slider", "hinge"], [0.5, 3.0], [0.25])
    assert obs is None and "no velocity for joint 'hinge'" in problem


def test_half_cheetah_is_readable_and_the_ant_is_refused_naming_the_field():
    assert JointStateReader.for_robot(load_robot("half_cheetah")).joints[:2] == ("rootz", "rooty")
    # The ant's torso position is components of a free joint, which a JointState (one value per joint) cannot carry.
    with pytest.raises(SpecError, match=r"^parameters: link: ros2_control cannot carry robot 'ant''s observation "
                                        r"field 'torso_xy': it reads components \[0, 1\] of joint\(s\) \['root'\]"):
        JointStateReader.for_robot(load_robot("ant"))


def test_sequence_numbers_follow_the_stamps(cartpole):
    seq = StampSequencer(PERIOD_NS)
    t0 = 1_000_000_000_000
    assert seq.advance(t0) == ("new", 1)
    assert seq.advance(t0 + PERIOD_NS + 3_000_000) == ("new", 2)  # jitter stays one period
    assert seq.advance(t0 + PERIOD_NS + 3_000_000) == ("duplicate", 2)  # the same stamp: frozen, not new
    assert seq.advance(t0 + PERIOD_NS + 13_000_000) == ("early", 2)  # a faster broadcaster: skipped
    assert seq.advance(t0 + 4 * PERIOD_NS) == ("new", 5)  # two periods never received: two lost frames
    assert seq.advance(t0) == ("regressed", 5)  # the publisher restarted
    seq.reset()
    assert seq.advance(t0) == ("new", 1)
    # A broadcaster at twice the control rate is taken every other message.
    seq.reset()
    taken = [s for k in range(20) if (s := seq.advance(t0 + k * PERIOD_NS // 2))[0] == "new"]
    assert [n for _, n in taken] == list(range(1, 11))


def test_a_link_with_its_own_reject_reasons_counts_them_in_the_zmq_decode_stats_shape():
    stats = DecodeStats(reasons=("a", "b"))
    stats.accepted += 3
    stats.reject("b")
    assert stats.as_dict() == {"accepted": 3, "total_rejected": 1, "rejected": {"b": 1}}
    with pytest.raises(ValueError, match="unknown reject reason 'c'"):
        stats.reject("c")


@pytest.mark.integration  # imports rclpy
def test_every_link_has_a_factory_and_configure_refuses_a_robot_ros2_control_cannot_carry():
    from metarl_robot_ros.adapt_node import LINK_FACTORIES
    from metarl_robot_ros.robot_link import LINKS

    assert set(LINK_FACTORIES) == set(LINKS)
    # What configure calls; its SpecError fails configure with this message (exit code 2 under autostart).
    with pytest.raises(SpecError, match=r"parameters: link: ros2_control cannot carry robot 'ant''s observation "
                                        r"field 'torso_xy'"):
        LINK_FACTORIES["ros2_control"](None, None, load_robot("ant"))


@pytest.mark.integration  # imports rclpy
def test_joint_state_messages_become_state_frames_or_are_rejected_with_a_reason(cartpole):
    from metarl_robot_ros.robot_link import NOT_REPORTED
    from metarl_robot_ros.ros2_control_link import Ros2ControlLink
    from sensor_msgs.msg import JointState

    link = Ros2ControlLink(node=None, robot=cartpole)  # no graph: messages are handed in as the executor would
    t0 = 5_000_000_000

    def message(stamp_ns: int, names=("hinge", "slider"), position=(3.0, 0.5), velocity=(-1.0, 0.25)) -> JointState:
        msg = JointState(name=list(names), position=list(position), velocity=list(velocity))
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
        return msg

    link._on_joint_state(message(t0))
    frame = link.receive_state(0.0)
    assert (frame.seq, frame.stamp_ns, frame.obs.tolist()) == (1, t0, [0.5, 3.0, 0.25, -1.0])
    assert frame.applied_action is None and frame.applied_command_seq == NOT_REPORTED
    link._on_joint_state(message(t0 + PERIOD_NS))
    link._on_joint_state(message(t0 + 2 * PERIOD_NS))  # latest-state: the newer one supersedes the other
    assert link.receive_state(0.0).seq == 3 and link.receive_state(0.01) is None
    for bad, reason in ((message(0), "unstamped"), (message(t0 + 3 * PERIOD_NS, names=("hinge",), position=(3.0,),
                                                             velocity=(1.0,)), "missing_joint")):
        link._on_joint_state(bad)
        assert link.receive_state(0.0) is None
        assert link.stats.rejected[reason] == 1, reason
    # NaN/Inf is the safety layer's to judge (OBS_NONFINITE at once), as over the telemetry protocol.
    link._on_joint_state(message(t0 + 3 * PERIOD_NS, position=(math.nan, 0.5)))
    frame = link.receive_state(0.0)
    assert frame.seq == 4 and math.isnan(frame.obs[1])
    assert link.stats.as_dict() == {"accepted": 3, "total_rejected": 2, "rejected": {"unstamped": 1,
                                                                                     "missing_joint": 1}}
    assert link.received == 6
    # A stamp that goes back: the publisher restarted; the session is over until a new handshake.
    link._handshaken = True
    link._on_joint_state(message(t0 + PERIOD_NS))
    assert link.receive_state(0.0) is None and link.session_lost and not link.armed
    assert link.stats.rejected["stamp_regressed"] == 1 and "publisher restarted" in link.last_problem


def test_the_zmq_link_refuses_a_plain_link_off_this_machine_unless_insecure_and_reports_it():
    from metarl_robot_ros.robot_link import ZmqLink

    from metarl_robot.telemetry.transport import Endpoints, InsecureEndpointError

    off_machine = Endpoints.from_port_base("192.0.2.7", 47100)  # TEST-NET-1: nothing answers, nothing connects
    with pytest.raises(InsecureEndpointError, match=r"192\.0\.2\.7"):
        ZmqLink(off_machine)
    link = ZmqLink(off_machine, insecure=True)
    try:
        values = link.diagnostic_values()
        assert "tcp://192.0.2.7:47100" in values["unprotected_endpoints"]
    finally:
        link.close()
    loopback = ZmqLink(Endpoints.from_port_base("127.0.0.1", 47100))
    try:
        assert loopback.diagnostic_values()["unprotected_endpoints"] == ""
    finally:
        loopback.close()
