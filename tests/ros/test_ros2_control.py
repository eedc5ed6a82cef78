"""The installed node with ``link: ros2_control`` against a fake ros2_control robot (tests/ros/fake_ros2_control.py:
the MuJoCo cart-pole behind joint_state_broadcaster's and a forward_command_controller's topics), both real
subprocesses on their own ROS_DOMAIN_ID, observed through a real rclpy client and judged at the fake hardware (every
state it published, every command it received) and in the episode log.

The fake runs at half speed, as the twin in test_node.py (one adapter step takes ~20 ms on an idle core, more on this
busy machine); its stamps are robot time, so the node's derived sequence numbers advance one per frame, and the
node's ``stale_after_periods`` (wall-clock periods) is doubled to keep the design's deadline in robot periods.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from metarl_robot.logs import read_episode
from metarl_robot.replay.shadow import replay_episode
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.runtime.safety import SafetyConfig
from tests.ros.conftest import (
    BUNDLE,
    DEADLINE_S,
    ColconInstall,
    Proc,
    RosClient,
    diagnostic_values,
    find_status,
    level_of,
    node_args,
    params_file,
    ros_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAKE = Path(__file__).with_name("fake_ros2_control.py")
SPEED = 0.5
PERIOD = 0.04
NODE = "metarl_adapt"
STALE_NODE_PERIODS = SafetyConfig().stale_after_periods / SPEED
"""The design's stale deadline (3.5 robot periods) in the node's wall-clock periods."""


class FakeHardware(Proc):
    """The fake ros2_control robot as a subprocess; :meth:`summary` once it ended."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str]) -> None:
        self.summary_path = tmp / "fake_summary.json"
        super().__init__([sys.executable, str(FAKE), "--speed", str(SPEED), "--summary", str(self.summary_path),
                          *args], tmp / "fake.log", env)
        self.wait_for(lambda t: '"event": "ready"' in t, "fake ros2_control robot ready")

    def summary(self) -> dict[str, Any]:
        self.wait()
        return json.loads(self.summary_path.read_text())


def start_node(install: ColconInstall, tmp: Path, domain: int, *ros_args: str, **params: Any) -> Proc:
    values = {"bundle": str(BUNDLE), "link": "ros2_control", "log_dir": str(tmp / "logs"), "diagnostics_rate_hz": 4.0,
              "handshake_timeout_s": DEADLINE_S, "safety.stale_after_periods": STALE_NODE_PERIODS, **params}
    return Proc(install.command(*node_args([params_file(tmp / "node_params.yaml", values)], *ros_args)),
                tmp / "node.log", ros_env(domain))


@pytest.fixture
def cleanup():
    procs: list[Proc] = []
    clients: list[RosClient] = []
    yield procs, clients
    for client in clients:
        client.close()
    for proc in procs:
        proc.kill()


def test_an_episode_over_ros2_control_topics_is_commanded_and_logged_as_over_zeromq(colcon_install, tmp_path,
                                                                                    domain_id, cleanup):
    from diagnostic_msgs.msg import DiagnosticArray

    procs, clients = cleanup
    steps = 40
    fake = FakeHardware(tmp_path, env=ros_env(domain_id))
    procs.append(fake)
    client = RosClient(domain_id)
    clients.append(client)
    client.subscribe(DiagnosticArray, "/diagnostics")
    node = start_node(colcon_install, tmp_path, domain_id, episode_steps=steps)
    procs.append(node)
    node.wait_for(lambda t: f"finished: episode_steps reached ({steps}); deactivating" in t, "episode end")
    assert "handshake ok: ros2_control session 1: joints ['slider', 'hinge'] on /joint_states" in node.output()

    def inactive_telemetry() -> dict[str, str] | None:
        arrays = client.messages("/diagnostics")
        loop = find_status(arrays[-1], ": control loop") if arrays else None
        if loop is None or diagnostic_values(loop)["lifecycle_state"] != "inactive":
            return None
        return diagnostic_values(find_status(arrays[-1], ": telemetry"))

    client.wait_for(lambda: inactive_telemetry() is not None, "the node reports itself inactive")
    telemetry = inactive_telemetry()
    assert node.stop(signal.SIGINT) == 0, node.output()[-3000:]
    fake.send_signal(signal.SIGINT)
    hardware = fake.summary()

    # The telemetry status names the link and its (resolved) topics.
    assert telemetry["link"] == "ros2_control" and telemetry["state_topic"] == "/joint_states"
    assert telemetry["command_topic"] == "/forward_command_controller/commands"
    assert int(telemetry["frames_accepted"]) >= steps and telemetry["frames_rejected"] == "0"

    (log,) = (tmp_path / "logs").glob("*.mcap")
    episode = read_episode(log)
    bundle = load_bundle(BUNDLE)
    assert episode.complete and episode.end_reason == f"episode_steps reached ({steps})"
    assert episode.adapted.sum() == steps and episode.bundle["sha256"] == bundle.sha256
    assert episode.extra["link"] == {"link": "ros2_control", "state_topic": "/joint_states",
                                     "command_topic": "/forward_command_controller/commands"}
    assert [e.kind for e in episode.safety_events][:2] == ["HANDSHAKE_OK", "ARMED"]

    # States consumed: every logged frame is a state the hardware published at that stamp, read by joint name (the
    # hardware lists hinge, slider and a third joint; robot.yaml's observation is slider, hinge positions then
    # velocities), and its sequence number counts control periods from the first frame of the session.
    published = {s["stamp_ns"]: s for s in hardware["states"]}
    at = {name: i for i, name in enumerate(hardware["joints"])}
    for k in range(episode.num_steps):
        state = published[int(episode.robot_stamp_ns[k])]
        expected = [state["position"][at["slider"]], state["position"][at["hinge"]],
                    state["velocity"][at["slider"]], state["velocity"][at["hinge"]]]
        assert episode.obs[k].tolist() == expected, k
    periods = (episode.robot_stamp_ns - episode.robot_stamp_ns[0]) / (PERIOD * 1e9)
    np.testing.assert_array_equal(episode.state_seq, 1 + np.round(periods).astype(np.int64))

    # Commands arrive: the hardware received exactly the commands the log says were sent, in order, the last ones
    # the safe command of the deactivation.
    sent = episode.command[episode.command_source != "none"]
    received = np.array([c["data"] for c in hardware["commands"]])
    assert hardware["bad_commands"] == 0
    np.testing.assert_array_equal(received, sent)
    assert (episode.command_source[-5:] == "safe_command").all() and (received[-5:] == 0.0).all()
    assert np.count_nonzero(received[:steps]) > 0.9 * steps

    # The same content as over ZeroMQ: the shadow replay reproduces every adapter action from the log.
    replay = replay_episode(episode.path, bundle)
    assert replay.counterfactual.reproduced, replay.counterfactual


def test_stale_joint_states_trip_the_safe_command_at_the_hardware_on_remapped_topics(colcon_install, tmp_path,
                                                                                     domain_id, cleanup):
    from diagnostic_msgs.msg import DiagnosticArray
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64MultiArray

    procs, clients = cleanup
    state_topic, command_topic = "/cartpole/joint_states", "/cartpole/effort_controller/commands"
    fake = FakeHardware(tmp_path, "--state-topic", state_topic, "--command-topic", command_topic,
                        env=ros_env(domain_id))
    procs.append(fake)
    client = RosClient(domain_id)
    clients.append(client)
    for msg_type, topic in ((DiagnosticArray, "/diagnostics"), (Float64MultiArray, f"/{NODE}/command"),
                            (JointState, f"/{NODE}/joint_states"), (JointState, "/joint_states")):
        client.subscribe(msg_type, topic)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the log folder should be")
    node = start_node(colcon_install, tmp_path, domain_id, "-r", f"joint_states:={state_topic}",
                      "-r", f"/forward_command_controller/commands:={command_topic}", log_dir=str(blocker / "logs"))
    procs.append(node)
    client.wait_for(lambda: len(client.messages(f"/{NODE}/command")) > 20, "commands flowing")
    client.wait_for(lambda: len(client.messages(f"/{NODE}/joint_states")) > 5, "the node's measured joint states")
    # The node's own joint states are private: nothing it publishes lands on a broadcaster's /joint_states.
    assert client.messages("/joint_states") == []
    assert list(client.messages(f"/{NODE}/joint_states")[-1].name) == ["slider", "hinge"]

    fake.send_signal(signal.SIGUSR1)  # the broadcaster dies; the hardware runs on and keeps taking commands
    muted_at = time.monotonic()

    def statuses() -> dict[str, Any]:
        arrays = client.messages("/diagnostics", since=muted_at)
        return {s.name.split(": ", 1)[1]: s for s in arrays[-1].status} if arrays else {}

    def stale_reported() -> bool:
        s = statuses()
        return bool(s) and level_of(s["telemetry"]) == 2 and diagnostic_values(s["safety"])["state"] == "SAFE_STOP"

    client.wait_for(stale_reported, "stale joint states reported as ERROR with SAFE_STOP")
    s = statuses()
    assert "TELEMETRY_STALE" in s["telemetry"].message
    telemetry = diagnostic_values(s["telemetry"])
    assert telemetry["state_topic"] == state_topic and telemetry["command_topic"] == command_topic
    # The log folder cannot be written: the episode runs on without a log, and its own status says so as a WARN.
    log = s["episode log"]
    assert level_of(log) == 1 and log.message.startswith(f"cannot open episode log {blocker / 'logs'}")
    time.sleep(1.0)
    assert node.stop(signal.SIGTERM) == 0, node.output()[-3000:]
    fake.send_signal(signal.SIGINT)
    hardware = fake.summary()

    # At the hardware: from one period past the deadline after its last state on, only the safe command, arriving
    # every period until the node exits (nothing else would stop a forward_command_controller's last command).
    last_state_t = hardware["states"][-1]["k"] * PERIOD
    deadline = SafetyConfig().stale_after_periods * PERIOD  # robot seconds
    t = np.array([c["t"] for c in hardware["commands"]])
    data = np.array([c["data"] for c in hardware["commands"]])[:, 0]
    after = t > last_state_t + deadline + 2 * PERIOD
    assert after.sum() > 10 and (data[after] == 0.0).all(), data[after]
    assert np.count_nonzero(data[t < last_state_t]) > 10, "the adapter commanded before the states stopped"
    assert np.diff(t[after]).max() < 3 * PERIOD, "a safe command every period"
    assert not (tmp_path / "blocker" / "logs").exists()
