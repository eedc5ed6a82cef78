"""Real ZeroMQ links on loopback (free ports picked by the robot's bind) for the telemetry tests."""

from __future__ import annotations

import time

import pytest

from metarl_robot.spec.robot import load_robot
from metarl_robot.telemetry.controller import ControllerLink
from metarl_robot.telemetry.robot_client import RobotClient
from metarl_robot.telemetry.transport import Endpoints

ANY_PORT = Endpoints.from_port_base("127.0.0.1", 0)
DEADLINE_S = 10.0
"""Generous safety deadline for anything that waits on sockets (the test machine is busy)."""


@pytest.fixture
def cartpole():
    return load_robot("cartpole")


@pytest.fixture
def robot_client(cartpole):
    client = RobotClient(cartpole, ANY_PORT, watchdog_ms=150)
    client.start()
    yield client
    client.close()


@pytest.fixture
def link(robot_client):
    link = ControllerLink(robot_client.endpoints)
    link.connect()
    yield link
    link.close()


def serve_while(client: RobotClient, predicate, deadline_s: float = DEADLINE_S, publish=None) -> None:
    """Call ``client.service()`` (and ``publish()``, if given) until ``predicate()`` holds; fail at the deadline."""
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"condition not met within {deadline_s} s")
        client.service()
        if publish is not None:
            publish()
        time.sleep(0.002)


def handshake_with(client: RobotClient, link: ControllerLink, robot, **kwargs):
    """Run the controller's blocking handshake while the robot services its socket in this thread."""
    import threading

    result: dict = {}

    def run():
        try:
            result["welcome"] = link.handshake(robot, **kwargs)
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    serve_while(client, lambda: not thread.is_alive())
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["welcome"]


def first_state(client: RobotClient, link: ControllerLink, obs):
    """Publish until the controller receives a frame (PUB/SUB drops frames until the connection is up)."""
    got = []

    def publish():
        client.publish_state(obs)
        frame = link.receive_state(0.01)
        if frame is not None:
            got.append(frame)

    serve_while(client, lambda: bool(got), publish=publish)
    return got[0]
