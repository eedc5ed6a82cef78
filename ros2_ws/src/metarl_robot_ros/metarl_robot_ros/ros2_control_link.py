"""The ``ros2_control`` robot link: the node talks to a ros2_control robot through its standard topics.

- state: ``sensor_msgs/JointState`` on ``joint_states`` (what joint_state_broadcaster publishes; relative, so a
  node in a robot's namespace reads that namespace's), mapped by joint name onto robot.yaml's observation;
- commands: ``std_msgs/Float64MultiArray`` on ``/forward_command_controller/commands`` (what a
  forward_command_controller, e.g. an effort_controllers/JointGroupEffortController, subscribes to), one value
  per robot.yaml action field in its order, in robot.yaml's action units.

Both names are remappable (``--ros-args -r joint_states:=/robot/joint_states -r
/forward_command_controller/commands:=/effort_controller/commands``; the launch file's ``state_topic`` and
``command_topic`` arguments). The subscription has its own callback group, so it is served while a lifecycle
transition waits in the handshake (the node spins a multi-threaded executor).

The handshake has no robot to ask: it waits for a JointState that names every joint the observation reads and
for a subscriber on the command topic (the controller loaded), then starts a new session. Frames get sequence
numbers derived from their stamps (:class:`~metarl_robot_ros.robot_link.StampSequencer`), so the safety layer's
checks (lost, frozen, stale frames) work as on the ZeroMQ link. A stamp that goes back ends the session (the
publisher restarted): the safe command is published once and the control loop handshakes again.

Unlike the telemetry protocol, a forward_command_controller holds the last command it got, with no expiry and no
watchdog: the node's safety layer is the only guard while it runs, and it sends the safe command when it stops
(docs/ros2_node.md, "The ros2_control link").
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import QoSProfile
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64MultiArray

from metarl_robot.spec.robot import RobotSpec
from metarl_robot.telemetry.controller import HandshakeError, build_command
from metarl_robot.telemetry.protocol import CommandFrame, DecodeStats, StateFrame
from metarl_robot_ros.robot_link import (
    LINK_ROS2_CONTROL,
    NOT_REPORTED,
    JointStateReader,
    StampSequencer,
)

STATE_TOPIC = "joint_states"
"""Where joint_state_broadcaster publishes (remappable)."""
COMMAND_TOPIC = "/forward_command_controller/commands"
"""Where a forward_command_controller named ``forward_command_controller`` listens (remappable)."""
STATE_QOS = QoSProfile(depth=5)
"""Reliable, keep last 5: as ros2_control's system-default QoS; the link keeps only the newest message anyway."""
COMMAND_QOS = QoSProfile(depth=10)
"""Reliable, keep last 10: the system-default QoS a forward_command_controller subscribes with."""
REJECT_REASONS = ("missing_joint", "unstamped", "stamp_regressed")
"""Why a JointState is not handed to the control loop (counted as ``rejected_<reason>`` in ``/diagnostics``)."""
HANDSHAKE_POLL_S = 0.05


class Ros2ControlLink:
    """A robot link over ros2_control's joint_states and forward_command_controller topics (module docstring).

    Created at configure (it refuses a robot whose observation a JointState cannot carry, naming the field), on
    the node whose topics it uses; :meth:`connect` creates the subscription and the publisher.
    """

    kind = LINK_ROS2_CONTROL

    def __init__(self, node: Node, robot: RobotSpec) -> None:
        self.node = node
        self.robot = robot
        self.reader = JointStateReader.for_robot(robot)
        """robot.yaml's observation from a JointState (raises SpecError at construction if it cannot)."""
        self.stats = DecodeStats(reasons=REJECT_REASONS)
        """State messages handed to the loop, and rejected per reason."""
        self.received = 0
        """JointState messages received."""
        self.skipped_early = 0
        """Messages stamped less than 0.75 control periods after the last frame (a faster broadcaster)."""
        self.commands_sent = 0
        self.session_lost = False
        self.last_problem = ""
        """Why the last message was rejected."""
        self._session = 0
        self._handshaken = False
        self._command_seq = 0
        self._sequencer = StampSequencer(round(robot.ctrl_dt * 1e9))
        self._group = MutuallyExclusiveCallbackGroup()
        self._cond = threading.Condition()
        self._pending: JointState | None = None
        self._sub: Any = None
        self._pub: Any = None

    # ---- lifecycle ------------------------------------------------------------------------------------
    def connect(self) -> None:
        self._sub = self.node.create_subscription(JointState, STATE_TOPIC, self._on_joint_state, STATE_QOS,
                                                  callback_group=self._group)
        self._pub = self.node.create_publisher(Float64MultiArray, COMMAND_TOPIC, COMMAND_QOS)

    def close(self) -> None:
        self._handshaken = False
        if self._sub is not None:
            self.node.destroy_subscription(self._sub)
        if self._pub is not None:
            self.node.destroy_publisher(self._pub)
        self._sub = self._pub = None

    @property
    def armed(self) -> bool:
        return self._handshaken and not self.session_lost and self._pub is not None

    @property
    def session(self) -> int:
        return self._session

    # ---- what the node reports ----------------------------------------------------------------------------
    def _topics(self) -> tuple[str, str]:
        state = self._sub.topic_name if self._sub is not None else STATE_TOPIC
        command = self._pub.topic_name if self._pub is not None else COMMAND_TOPIC
        return state, command

    def target(self) -> str:
        state, command = self._topics()
        return f"ros2_control: state {state}, commands {command}"

    def describe(self) -> dict[str, str]:
        state, command = self._topics()
        return {"link": self.kind, "state_topic": state, "command_topic": command}

    def diagnostic_values(self) -> dict[str, str]:
        state, command = self._topics()
        return {"state_topic": state, "command_topic": command,
                "state_publishers": str(self._sub.get_publisher_count() if self._sub is not None else 0),
                "command_subscribers": str(self._pub.get_subscription_count() if self._pub is not None else 0),
                "messages_received": str(self.received), "messages_skipped_early": str(self.skipped_early),
                "last_problem": self.last_problem}

    def session_summary(self) -> str:
        state, command = self._topics()
        return (f"ros2_control session {self._session}: joints {list(self.reader.joints)} on {state} "
                f"({self._sub.get_publisher_count()} publisher(s)), commands to {command} "
                f"({self._pub.get_subscription_count()} subscriber(s)); the controller holds the last command "
                "(no robot-side watchdog)")

    def security_warnings(self) -> list[str]:
        return []  # its topics have no security setting of their own to warn about

    # ---- the link ---------------------------------------------------------------------------------------------
    def _on_joint_state(self, msg: JointState) -> None:
        """Executor thread: keep only the newest message (latest-state semantics, as the ZeroMQ link's)."""
        with self._cond:
            self.received += 1
            self._pending = msg
            self._cond.notify_all()

    def _take(self, timeout_s: float) -> JointState | None:
        with self._cond:
            if self._pending is None and timeout_s > 0:
                self._cond.wait(timeout_s)
            msg, self._pending = self._pending, None
        return msg

    def handshake(self, robot: RobotSpec, timeout_s: float = 3.0) -> int:
        """Wait up to ``timeout_s`` for a JointState naming every observed joint and a subscriber on the command
        topic, then start a new session (returned). Raises HandshakeError saying which was missing."""
        if robot.interface_hash != self.robot.interface_hash:
            raise HandshakeError(f"this link was built for robot {self.robot.name!r}, not {robot.name!r}")
        if self._sub is None:
            raise RuntimeError("Ros2ControlLink is not connected (call connect() first)")
        self._handshaken = False
        state, command = self._topics()
        deadline = time.monotonic() + timeout_s
        usable = False
        problem = "no message"
        self._take(0.0)  # what came before the handshake is not this session's
        while True:
            msg = self._take(min(HANDSHAKE_POLL_S, max(0.0, deadline - time.monotonic())))
            if msg is not None:
                obs, problem = self.reader.read(msg.name, msg.position, msg.velocity)
                usable = usable or obs is not None
            if usable and self._pub.get_subscription_count() > 0:
                break
            if time.monotonic() >= deadline:
                if not usable:
                    raise HandshakeError(f"no usable sensor_msgs/JointState on {state} within {timeout_s:g} s "
                                         f"({problem}): is joint_state_broadcaster running, is the topic remapped "
                                         f"right, and does it publish robot.yaml's joints {list(self.reader.joints)}?")
                raise HandshakeError(f"nothing subscribes to {command} within {timeout_s:g} s: is the "
                                     "forward_command_controller loaded and active, and is the topic remapped right?")
        self._session += 1
        self._command_seq = 0
        self._sequencer.reset()
        self.session_lost = False
        self._handshaken = True
        return self._session

    def receive_state(self, timeout_s: float = 0.0) -> StateFrame | None:
        """The newest JointState within ``timeout_s`` as a state frame, or None. Rejected messages are counted and
        skipped; messages stamped less than 0.75 control periods after the last frame are skipped."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            msg = self._take(max(0.0, deadline - time.monotonic()))
            if msg is not None:
                frame = self._frame(msg)
                if frame is not None:
                    return frame
            if time.monotonic() >= deadline:
                return None

    def _frame(self, msg: JointState) -> StateFrame | None:
        stamp_ns = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        if stamp_ns <= 0:
            return self._reject("unstamped", "header.stamp is 0: the publisher does not stamp its messages")
        obs, problem = self.reader.read(msg.name, msg.position, msg.velocity)
        if obs is None:
            return self._reject("missing_joint", problem)
        # NaN/Inf is handed on, as the telemetry decoder hands it on: a failed sensor stops the robot in that very
        # period (the safety layer's OBS_NONFINITE, naming the fields) instead of at the stale deadline.
        verdict, seq = self._sequencer.advance(stamp_ns)
        if verdict == StampSequencer.EARLY:
            self.skipped_early += 1
            return None
        if verdict == StampSequencer.REGRESSED:
            # The publisher restarted (e.g. a simulation reset its clock): a new session, as a restarted robot on the
            # ZeroMQ link. No robot-side watchdog will stop the last command meanwhile, so send the safe one now.
            self.session_lost = True
            self._publish(self.robot.safe_action)
            return self._reject("stamp_regressed", f"stamp {stamp_ns} ns is before the last frame's "
                                f"{self._sequencer.stamp_ns} ns: the publisher restarted; handshaking again")
        self.stats.accepted += 1
        return StateFrame(seq=seq, stamp_ns=stamp_ns, obs=obs, applied_action=None,
                          applied_command_seq=NOT_REPORTED, session=self._session)

    def _reject(self, reason: str, problem: str) -> None:
        self.stats.reject(reason)
        self.last_problem = problem
        return None

    def send_command(self, action: Any, answers: StateFrame, *, valid_for_s: float | None = None) -> CommandFrame:
        """Publish ``action`` (robot.yaml order and units) answering ``answers``. The returned frame's expiry is what
        the ZeroMQ link would have given (for the episode log); a forward_command_controller does not enforce it."""
        frame = build_command(self.robot, action, answers, armed=self.armed, session=self._session,
                              seq=self._command_seq + 1, valid_for_s=valid_for_s,
                              session_ended="the publisher restarted" if self.session_lost else "")
        self._publish(frame.action)
        self._command_seq = frame.seq
        self.commands_sent += 1
        return frame

    def _publish(self, action: np.ndarray) -> None:
        if self._pub is not None:
            self._pub.publish(Float64MultiArray(data=[float(x) for x in action]))
