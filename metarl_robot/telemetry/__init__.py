"""ZeroMQ telemetry between a robot (or its digital twin) and the controller; see docs/telemetry.md.

- :mod:`~metarl_robot.telemetry.protocol`: the binary frames (numpy only).
- :mod:`~metarl_robot.telemetry.transport`: endpoints, socket options, CURVE keys.
- :mod:`~metarl_robot.telemetry.robot_client`: :class:`RobotClient`, the robot side with its command watchdog.
- :mod:`~metarl_robot.telemetry.controller`: :class:`ControllerLink`, the controller side.
- :mod:`~metarl_robot.telemetry.keys`: CURVE key generation (``python -m metarl_robot.telemetry.keys DIR``).
Everything here runs on a robot computer (numpy + pyzmq). The MuJoCo digital twin that serves the robot side
of this protocol (``metarl sim-robot``) imports MuJoCo, so it lives on the sim side: :mod:`metarl_robot.real2sim.twin`.
"""

from __future__ import annotations

from metarl_robot.telemetry.controller import ControllerLink, HandshakeError
from metarl_robot.telemetry.protocol import (
    PROTOCOL_VERSION,
    CommandFrame,
    DecodeStats,
    FrameDecoder,
    FrameError,
    Hello,
    MsgType,
    StateFrame,
    Welcome,
    decode,
    encode,
)
from metarl_robot.telemetry.robot_client import CommandDecision, RobotClient, RobotCounters
from metarl_robot.telemetry.transport import CurveClientKeys, CurveServerKeys, Endpoints, InsecureEndpointError

__all__ = [
    "PROTOCOL_VERSION", "CommandDecision", "CommandFrame", "ControllerLink", "CurveClientKeys", "CurveServerKeys",
    "DecodeStats", "Endpoints", "FrameDecoder", "FrameError", "HandshakeError", "Hello", "InsecureEndpointError",
    "MsgType", "RobotClient", "RobotCounters", "StateFrame", "Welcome", "decode", "encode",
]
