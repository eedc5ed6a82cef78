"""The node's connection to the robot: what the control loop needs from a link, and its two implementations' shared
parts (docs/ros2_node.md, "Robot links").

A *robot link* delivers state frames and takes commands. The control loop (:mod:`.control_loop`) and the safety
layer judge :class:`~metarl_robot.telemetry.protocol.StateFrame` objects (sequence number, robot stamp,
observation) and send :class:`~metarl_robot.telemetry.protocol.CommandFrame` objects, whatever carries them, so
both links share one loop and one safety layer:

- ``zmq`` (:class:`ZmqLink`): the telemetry protocol over ZeroMQ (:class:`~metarl_robot.telemetry.controller.
  ControllerLink`), with its handshake, sessions, expiring commands and the robot's own watchdog;
- ``ros2_control`` (:class:`~metarl_robot_ros.ros2_control_link.Ros2ControlLink`): the standard ros2_control
  topics, ``sensor_msgs/JointState`` in (joint_state_broadcaster) and ``std_msgs/Float64MultiArray`` out
  (forward_command_controller). A JointState has names and a stamp but no sequence number, so
  :class:`StampSequencer` derives one from the stamps, and :class:`JointStateReader` maps it onto robot.yaml's
  observation (refusing, at configure, a robot whose observation a JointState cannot carry).

Nothing here imports rclpy (the packaging test runs the control loop without ROS).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from metarl_robot.logs.writer import joint_state_kind
from metarl_robot.spec.robot import RobotSpec
from metarl_robot.spec.schema import SpecError
from metarl_robot.telemetry.controller import ControllerLink
from metarl_robot.telemetry.protocol import CommandFrame, StateFrame

LINK_ZMQ = "zmq"
LINK_ROS2_CONTROL = "ros2_control"
LINKS = (LINK_ZMQ, LINK_ROS2_CONTROL)
"""The values of the ``link`` parameter."""
MIN_ADVANCE_PERIODS = 0.75
"""A JointState stamped less than this many control periods after the last one delivered is skipped (a broadcaster
publishing at a multiple of the control rate): the bundle's model predicts exactly one control period ahead."""
NOT_REPORTED = -1
"""``applied_command_seq`` of a frame whose robot does not say which command it applied (a JointState): the episode
log and the shadow replay then take the last command sent, as the control loop does."""


class RobotLink(Protocol):
    """What the control loop needs from a link (a plain :class:`ControllerLink` is one)."""

    session_lost: bool
    """True once the robot's session ended under the link (it restarted): handshake again before sending."""

    @property
    def armed(self) -> bool:
        """True after a successful handshake whose session still holds: commands may be sent."""

    def handshake(self, robot: RobotSpec, timeout_s: float = 3.0) -> Any:
        """Arm the link for ``robot``; raises :class:`~metarl_robot.telemetry.controller.HandshakeError`."""

    def receive_state(self, timeout_s: float = 0.0) -> StateFrame | None:
        """The newest state frame within ``timeout_s``, or None; freshness is the safety layer's to judge."""

    def send_command(self, action: np.ndarray, answers: StateFrame, *,
                     valid_for_s: float | None = None) -> CommandFrame:
        """Send ``action`` as the answer to ``answers`` (raises HandshakeError when not armed)."""


class NodeLink(RobotLink, Protocol):
    """What the node needs besides: connecting, counters for ``/diagnostics`` and words for its log."""

    kind: str
    """One of :data:`LINKS`."""
    stats: Any
    """``as_dict()`` → ``{"accepted", "total_rejected", "rejected": {reason: count}}`` (state frames)."""
    commands_sent: int
    """Commands sent since the link was created."""

    @property
    def session(self) -> int:
        """The current session (0 before the first handshake)."""

    def connect(self) -> None: ...

    def close(self) -> None: ...

    def target(self) -> str:
        """Where the link handshakes with, for the node's log."""

    def describe(self) -> dict[str, str]:
        """What the link is connected to (episode log metadata and ``/diagnostics``)."""

    def diagnostic_values(self) -> dict[str, str]:
        """Link-specific values of the ``<node>: telemetry`` status."""

    def session_summary(self) -> str:
        """One line on the session just armed, for the node's log."""

    def security_warnings(self) -> list[str]:
        """What the operator allowed that weakens the link's security, one line each (empty: nothing); the
        diagnostics warn about it in every report."""


class ZmqLink(ControllerLink):
    """The telemetry protocol over ZeroMQ (docs/telemetry.md), with what the node reports about it."""

    kind = LINK_ZMQ

    def target(self) -> str:
        return self.endpoints.handshake

    def describe(self) -> dict[str, str]:
        return {"link": self.kind, "endpoints": json.dumps(self.endpoints.as_dict())}

    def diagnostic_values(self) -> dict[str, str]:
        return {"endpoints": json.dumps(self.endpoints.as_dict()), "link_resets": str(self.link_resets),
                "unprotected_endpoints": ",".join(self.unprotected_endpoints)}

    def session_summary(self) -> str:
        w = self.welcome
        return f"robot {w.robot_name!r}, session {w.session}, robot watchdog {w.watchdog_ms} ms"

    def security_warnings(self) -> list[str]:
        if not self.unprotected_endpoints:
            return []
        return [f"plain link off this machine (insecure: true, no CURVE): {','.join(self.unprotected_endpoints)}"]


# ---- the ros2_control link's pure parts ----------------------------------------------------------------------
@dataclass(frozen=True)
class JointStateReader:
    """robot.yaml's measured observation read from a ``sensor_msgs/JointState``: each field is the position or the
    velocity of named single-value joints (hinge, slide), in the field's joint order, matched by name (the message
    may list any joints, in any order)."""

    joints: tuple[str, ...]
    """The joints the observation reads."""
    sources: tuple[tuple[str, str], ...]
    """Per observation component: (``position`` or ``velocity``, joint name)."""

    @classmethod
    def for_robot(cls, robot: RobotSpec) -> JointStateReader:
        """Raises SpecError (``parameters: link: ...``) naming the first measured field a JointState cannot carry."""
        sources: list[tuple[str, str]] = []
        for f in robot.measured_fields:
            src = f.source
            kind = joint_state_kind(f)
            if kind is None:
                where = f"robot {robot.name!r}'s observation field {f.name!r}"
                # Named as a parameter error: the robot is fine, the link chosen for it is not.
                if src.kind == "sensor":
                    raise SpecError("parameters", "link", f"ros2_control cannot carry {where}: it reads MJCF "
                                    f"{src.kind} {src.names}, and a sensor_msgs/JointState holds only joint positions, "
                                    "velocities and efforts; use link: zmq for this robot")
                raise SpecError("parameters", "link", f"ros2_control cannot carry {where}: it reads components "
                                f"{src.index} of joint(s) {src.names} ({f.size} values), and a sensor_msgs/JointState "
                                "holds one position and one velocity per joint (hinge and slide joints only); use "
                                "link: zmq for this robot")
            sources.extend((kind, joint) for joint in src.names)
        joints = tuple(dict.fromkeys(joint for _, joint in sources))
        return cls(joints=joints, sources=tuple(sources))

    def read(self, names: Sequence[str], position: Sequence[float],
             velocity: Sequence[float]) -> tuple[np.ndarray | None, str]:
        """The observation, or None and why (a joint missing from the message, or its value not sent)."""
        index = {name: i for i, name in enumerate(names)}
        arrays = {"position": position, "velocity": velocity}
        obs = np.empty(len(self.sources))
        for k, (kind, joint) in enumerate(self.sources):
            i = index.get(joint)
            if i is None:
                return None, f"joint {joint!r} is not in the message (it names {list(names)})"
            values = arrays[kind]
            if i >= len(values):
                return None, f"the message has no {kind} for joint {joint!r} ({len(values)} {kind} values)"
            obs[k] = values[i]
        return obs, ""


class StampSequencer:
    """Sequence numbers from robot stamps, for the safety layer's seq/stamp checks (a JointState has no seq).

    The first frame after :meth:`reset` is 1; a later stamp ``d`` nanoseconds after the last delivered one is
    ``round(d / period)`` frames further (at least 1), so a message the link never got shows as a lost frame,
    as on the ZeroMQ link; a stamp less than :data:`MIN_ADVANCE_PERIODS` after it is skipped; the same stamp
    again keeps the number (the safety layer then sees a frame that does not advance: frozen); an earlier stamp
    is a regression (the publisher restarted, e.g. a simulation reset its clock).
    """

    NEW, DUPLICATE, EARLY, REGRESSED = "new", "duplicate", "early", "regressed"

    def __init__(self, period_ns: int, min_advance_periods: float = MIN_ADVANCE_PERIODS) -> None:
        if period_ns <= 0:
            raise ValueError(f"period_ns must be > 0, got {period_ns}")
        self.period_ns = period_ns
        self.min_advance_ns = min_advance_periods * period_ns
        self.seq = 0
        """The last sequence number given."""
        self.stamp_ns: int | None = None
        """The stamp of the last frame delivered."""

    def reset(self) -> None:
        self.seq, self.stamp_ns = 0, None

    def advance(self, stamp_ns: int) -> tuple[str, int]:
        """``(verdict, seq)``: :attr:`NEW` and :attr:`DUPLICATE` frames are delivered with ``seq``; :attr:`EARLY`
        and :attr:`REGRESSED` ones are not (``seq`` is then the last one given)."""
        if self.stamp_ns is None:
            self.seq, self.stamp_ns = 1, stamp_ns
            return self.NEW, self.seq
        delta = stamp_ns - self.stamp_ns
        if delta < 0:
            return self.REGRESSED, self.seq
        if delta == 0:
            return self.DUPLICATE, self.seq
        if delta < self.min_advance_ns:
            return self.EARLY, self.seq
        self.seq += max(1, math.floor(delta / self.period_ns + 0.5))
        self.stamp_ns = stamp_ns
        return self.NEW, self.seq

