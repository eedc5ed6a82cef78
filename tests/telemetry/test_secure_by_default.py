"""Secure by default: a plain (no CURVE) telemetry endpoint that other machines can reach is refused unless the caller
says ``insecure``; loopback and ipc:// need nothing; CURVE or the flag let a non-loopback endpoint work."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import zmq

from metarl_robot.paths import REPO_ROOT
from metarl_robot.telemetry.controller import ControllerLink
from metarl_robot.telemetry.keys import generate_keys
from metarl_robot.telemetry.robot_client import RobotClient
from metarl_robot.telemetry.transport import (
    CurveServerKeys,
    Endpoints,
    InsecureEndpointError,
    check_endpoint_security,
    controller_sockets,
    handshake_socket,
    leaves_machine,
    robot_sockets,
)
from tests.telemetry.conftest import ANY_PORT, first_state, handshake_with

OBS = np.zeros(4)
ALL_INTERFACES = Endpoints.from_port_base("0.0.0.0", 0)


@pytest.mark.parametrize("address, leaves", [
    ("ipc:///tmp/metarl/state", False), ("inproc://state", False),
    ("tcp://127.0.0.1:47100", False), ("tcp://127.8.9.10:1", False), ("tcp://localhost:47100", False),
    ("tcp://LocalHost:*", False), ("tcp://[::1]:47100", False), ("tcp://[::ffff:127.0.0.1]:5", False),
    ("tcp://10.0.0.2:1;127.0.0.1:47100", False),  # connect from a source address to a loopback destination
    ("tcp://0.0.0.0:47100", True), ("tcp://*:47100", True), ("tcp://[::]:47100", True), ("tcp://eth0:47100", True),
    ("tcp://192.168.1.20:47100", True), ("tcp://robot.local:47100", True), ("tcp://127.0.0.1:1;10.0.0.2:5", True),
    ("udp://127.0.0.1:5", True), ("no-transport", True),
])
def test_which_endpoints_leave_the_machine(address, leaves):
    assert leaves_machine(address) is leaves


def test_the_refusal_names_the_endpoint_and_both_ways_out():
    with pytest.raises(InsecureEndpointError) as info:
        check_endpoint_security("tcp://0.0.0.0:47100", curve=False, insecure=False, action="bind")
    message = str(info.value)
    assert "bind telemetry endpoint tcp://0.0.0.0:47100 without CURVE" in message
    assert "--curve-keys" in message and "CurveClientKeys" in message and "docs/telemetry.md" in message
    assert "insecure=True" in message and "metarl sim-robot --insecure" in message
    assert isinstance(info.value, ValueError)  # the CLI turns it into a one-line error, exit 2
    assert not check_endpoint_security("tcp://0.0.0.0:47100", curve=True, insecure=False)
    assert not check_endpoint_security("tcp://127.0.0.1:47100", curve=False, insecure=False)


def test_both_ends_refuse_a_plain_non_loopback_endpoint_before_touching_a_socket(cartpole):
    with pytest.raises(InsecureEndpointError, match=r"tcp://0\.0\.0\.0:\*"):
        RobotClient(cartpole, ALL_INTERFACES)
    with pytest.raises(InsecureEndpointError, match=r"tcp://10\.0\.0\.2:47100"):
        ControllerLink(Endpoints.from_port_base("10.0.0.2"))


def test_the_transport_layer_itself_refuses(cartpole):
    """Code that builds sockets without RobotClient/ControllerLink gets the same rule."""
    context = zmq.Context()
    try:
        with pytest.raises(InsecureEndpointError, match="bind"):
            robot_sockets(context, ALL_INTERFACES)
        remote = Endpoints.from_port_base("192.168.1.20")
        with pytest.raises(InsecureEndpointError, match="connect"):
            controller_sockets(context, remote)
        with pytest.raises(InsecureEndpointError, match="connect"):
            handshake_socket(context, remote)
        handshake_socket(context, remote, insecure=True).close(linger=0)
    finally:
        context.term()


@pytest.mark.integration
def test_with_the_flag_a_robot_on_all_interfaces_serves_a_controller(cartpole, caplog):
    with caplog.at_level(logging.WARNING, logger="metarl_robot.telemetry.transport"):
        robot = RobotClient(cartpole, ALL_INTERFACES, watchdog_ms=150, insecure=True)
    assert robot.unprotected_endpoints == list(ALL_INTERFACES.as_dict().values())
    with robot:
        assert all(e.startswith("tcp://0.0.0.0:") for e in robot.endpoints.as_dict().values())
        # A controller on this machine connects through loopback: no flag needed, nothing unprotected.
        local = Endpoints(*(e.replace("0.0.0.0", "127.0.0.1") for e in robot.endpoints.as_dict().values()))
        with ControllerLink(local) as link:
            assert link.unprotected_endpoints == []
            handshake_with(robot, link, cartpole)
            robot.current_action()
            assert first_state(robot, link, OBS).session == robot.session
        # The controller side of the flag: an address that is not loopback (0.0.0.0 reaches this machine on Linux).
        with ControllerLink(robot.endpoints, insecure=True) as link:
            assert link.unprotected_endpoints == list(robot.endpoints.as_dict().values())
            handshake_with(robot, link, cartpole)
            assert first_state(robot, link, OBS).session == robot.session
    assert any("leaves this machine without CURVE" in r.getMessage() for r in caplog.records)


@pytest.mark.integration
def test_curve_keys_make_a_non_loopback_endpoint_acceptable_without_the_flag(cartpole, tmp_path):
    generate_keys(tmp_path / "keys")
    with RobotClient(cartpole, ALL_INTERFACES, curve=CurveServerKeys.from_dir(tmp_path / "keys")) as robot:
        assert robot.unprotected_endpoints == [] and robot.endpoints.state.startswith("tcp://0.0.0.0:")


@pytest.mark.integration
def test_loopback_and_ipc_need_no_flag(cartpole, tmp_path):
    for endpoints in (ANY_PORT, Endpoints.ipc(tmp_path)):
        with RobotClient(cartpole, endpoints, watchdog_ms=150) as robot, ControllerLink(robot.endpoints) as link:
            assert robot.unprotected_endpoints == link.unprotected_endpoints == []
            handshake_with(robot, link, cartpole)


# ---- metarl sim-robot ---------------------------------------------------------------------------------------
def _sim_robot(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metarl_robot.cli", "sim-robot", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO_ROOT)


@pytest.mark.integration
def test_sim_robot_on_all_interfaces_needs_curve_keys_or_insecure():
    refused = _sim_robot("--host", "0.0.0.0", "--port-base", "0", "--duration", "0.1")
    assert refused.returncode == 2 and "metarl sim-robot: error:" in refused.stderr
    assert "tcp://0.0.0.0:*" in refused.stderr and "--curve-keys" in refused.stderr
    assert "--insecure" in refused.stderr and refused.stdout == ""

    ran = _sim_robot("--host", "0.0.0.0", "--port-base", "0", "--duration", "0.2", "--speed", "4", "--insecure")
    assert ran.returncode == 0, ran.stderr
    ready = json.loads(ran.stdout.splitlines()[0])
    assert ready["event"] == "ready" and ready["endpoints"]["state"].startswith("tcp://0.0.0.0:")
    assert "WARNING: --insecure" in ran.stderr and "without CURVE" in ran.stderr

    help_text = " ".join(_sim_robot("--help").stdout.split())
    assert "--insecure" in help_text and "needs --curve-keys or --insecure" in help_text
