"""CURVE on loopback: the authorised controller talks; a wrong key, a wrong server key or no CURVE gets nothing."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

from metarl_robot.telemetry.controller import ControllerLink, HandshakeError
from metarl_robot.telemetry.keys import generate_keys
from metarl_robot.telemetry.robot_client import RobotClient
from metarl_robot.telemetry.transport import CurveClientKeys, CurveServerKeys
from tests.telemetry.conftest import ANY_PORT, first_state, handshake_with, serve_while

pytestmark = pytest.mark.integration

OBS = np.zeros(4)


@pytest.fixture
def keys(tmp_path):
    generate_keys(tmp_path / "keys")
    generate_keys(tmp_path / "stranger")  # a second, unauthorised controller (and robot) key pair
    return tmp_path


@pytest.fixture
def curve_robot(cartpole, keys):
    client = RobotClient(cartpole, ANY_PORT, watchdog_ms=150, curve=CurveServerKeys.from_dir(keys / "keys"))
    client.start()
    yield client
    client.close()


def test_authorised_controller_handshakes_and_exchanges_frames(curve_robot, cartpole, keys):
    with ControllerLink(curve_robot.endpoints, curve=CurveClientKeys.from_dir(keys / "keys")) as link:
        welcome = handshake_with(curve_robot, link, cartpole)
        assert welcome.accepted
        curve_robot.current_action()
        state = first_state(curve_robot, link, OBS)
        link.send_command([0.25], answers=state)
        serve_while(curve_robot, lambda: curve_robot.counters.commands.accepted == 1)


def _gets_nothing(robot: RobotClient, link: ControllerLink, cartpole) -> None:
    with pytest.raises(HandshakeError, match="no WELCOME"):
        handshake_with(robot, link, cartpole, timeout_s=0.5)
    received = []
    for _ in range(25):  # half a second of publishing: none may arrive
        robot.publish_state(OBS)
        frame = link.receive_state(0.02)
        if frame is not None:
            received.append(frame)
    assert received == []
    assert robot.counters.handshakes_accepted == 0


def test_unauthorised_controller_key_gets_nothing(curve_robot, cartpole, keys):
    wrong = CurveClientKeys(keys / "stranger" / "controller.key_secret", keys / "keys" / "robot.key")
    with ControllerLink(curve_robot.endpoints, curve=wrong) as link:
        _gets_nothing(curve_robot, link, cartpole)


def test_wrong_robot_public_key_gets_nothing(curve_robot, cartpole, keys):
    wrong = CurveClientKeys(keys / "keys" / "controller.key_secret", keys / "stranger" / "robot.key")
    with ControllerLink(curve_robot.endpoints, curve=wrong) as link:
        _gets_nothing(curve_robot, link, cartpole)


def test_plain_controller_gets_nothing_from_a_curve_robot(curve_robot, cartpole):
    with ControllerLink(curve_robot.endpoints) as link:
        _gets_nothing(curve_robot, link, cartpole)


def test_key_files_are_checked_with_a_clear_error(cartpole, keys, tmp_path):
    missing = CurveServerKeys(tmp_path / "nope.key_secret", keys / "keys" / "authorized_clients")
    with pytest.raises(FileNotFoundError, match=r"telemetry\.keys"):
        RobotClient(cartpole, ANY_PORT, curve=missing).start()
    public_only = CurveServerKeys(keys / "keys" / "robot.key", keys / "keys" / "authorized_clients")
    with pytest.raises(ValueError, match="no secret key"):
        RobotClient(cartpole, ANY_PORT, curve=public_only).start()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="authorised-clients"):
        RobotClient(cartpole, ANY_PORT, curve=CurveServerKeys(keys / "keys" / "robot.key_secret", empty)).start()


def test_keygen_command_writes_the_layout_and_never_overwrites(tmp_path):
    run = [sys.executable, "-m", "metarl_robot.telemetry.keys"]
    result = subprocess.run([*run, str(tmp_path / "k")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for name in ("robot.key", "robot.key_secret", "controller.key", "controller.key_secret",
                 "authorized_clients/controller.key"):
        assert (tmp_path / "k" / name).is_file(), name
    for secret in ("robot.key_secret", "controller.key_secret"):
        assert stat.S_IMODE((tmp_path / "k" / secret).stat().st_mode) == 0o600
    before = (tmp_path / "k" / "robot.key_secret").read_text()
    again = subprocess.run([*run, str(tmp_path / "k")], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "--force" in again.stderr
    assert (tmp_path / "k" / "robot.key_secret").read_text() == before
    forced = subprocess.run([*run, str(tmp_path / "k"), "--force"], capture_output=True, text=True, timeout=60)
    assert forced.returncode == 0 and (tmp_path / "k" / "robot.key_secret").read_text() != before
    shutil.rmtree(tmp_path / "k")
