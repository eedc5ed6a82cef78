"""Helpers for the ROS 2 node tests: a colcon build in a temporary folder, the digital twin and the node as
real subprocesses, and a real rclpy client, each test on its own random ROS_DOMAIN_ID with DDS discovery
kept on this machine (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from metarl_robot.demo import colcon_build as demo_colcon_build
from metarl_robot.demo import ros_env
from metarl_robot.paths import REPO_ROOT

PKG = "metarl_robot_ros"
PKG_SRC = REPO_ROOT / "ros2_ws" / "src" / PKG
if str(PKG_SRC) not in sys.path:
    sys.path.insert(0, str(PKG_SRC))  # the node's pure-Python modules (params, control_loop), without a build

BUNDLE = REPO_ROOT / "policies" / "cartpole_mb"
DEADLINE_S = 60.0
"""Generous deadline for anything a subprocess must do (start, handshake, exit) on a busy 2-core machine."""


# ---- environment -----------------------------------------------------------------------------------
@pytest.fixture
def domain_id(monkeypatch: pytest.MonkeyPatch) -> int:
    """A random ROS_DOMAIN_ID for this test (the test process's own rclpy uses it too)."""
    domain = random.Random(os.getpid() * 7919 + time.monotonic_ns()).randint(20, 100)
    for key, value in ros_env(domain).items():
        if key.startswith("ROS_"):
            monkeypatch.setenv(key, value)
    return domain


# ---- colcon ------------------------------------------------------------------------------------------
class ColconInstall:
    """A ``colcon build`` of ros2_ws into a temporary folder (the repository stays clean)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.install = root / "install"
        self.prefix = self.install / PKG
        self.share = self.prefix / "share" / PKG
        self.executable = self.prefix / "lib" / PKG / "adapt_node"

    def command(self, *args: str) -> list[str]:
        """Run the installed executable the way a user does: source the workspace's setup.bash, then run it."""
        script = 'source "$1/setup.bash" && exec "$2" "${@:3}"'
        return ["bash", "-c", script, "colcon-env", str(self.install), str(self.executable), *args]


def colcon_build(root: Path) -> tuple[ColconInstall, subprocess.CompletedProcess]:
    """The demo's :func:`~metarl_robot.demo.colcon_build` of this checkout's ros2_ws under ``root``."""
    return ColconInstall(root), demo_colcon_build(root, REPO_ROOT)


@pytest.fixture(scope="session")
def colcon_install(tmp_path_factory: pytest.TempPathFactory) -> ColconInstall:
    """One build per test session, shared by the tests that run the installed node."""
    install, result = colcon_build(tmp_path_factory.mktemp("colcon"))
    assert result.returncode == 0, f"colcon build failed:\n{result.stdout}\n{result.stderr}"
    return install


# ---- processes ---------------------------------------------------------------------------------------
class Proc:
    """A subprocess whose combined output goes to a file (never a pipe that could fill up and block it)."""

    def __init__(self, cmd: list[str], log: Path, env: Mapping[str, str], cwd: Path = REPO_ROOT) -> None:
        self.cmd, self.log = cmd, log
        self._file = open(log, "w")  # noqa: SIM115 -- closed in wait()/kill()
        self.proc = subprocess.Popen(cmd, stdout=self._file, stderr=subprocess.STDOUT, env=dict(env), cwd=cwd,
                                     start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, predicate: Callable[[str], bool], what: str, timeout_s: float = DEADLINE_S) -> str:
        """Wait until ``predicate(output)``; fail (with the output) at the deadline or if the process ends first."""
        end = time.monotonic() + timeout_s
        while True:
            text = self.output()
            if predicate(text):
                return text
            if self.proc.poll() is not None:
                raise AssertionError(f"{what}: process ended (rc {self.proc.returncode}) first:\n{text[-4000:]}")
            if time.monotonic() > end:
                raise AssertionError(f"{what}: not within {timeout_s} s:\n{text[-4000:]}")
            time.sleep(0.05)

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout_s: float = DEADLINE_S) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            self._file.close()

    def stop(self, sig: int = signal.SIGINT, timeout_s: float = DEADLINE_S) -> int:
        """Signal it, wait for it to exit, return its exit code."""
        self.send_signal(sig)
        return self.wait(timeout_s)

    def kill(self) -> None:
        """Last resort in fixture teardown: SIGKILL the process group this test started."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._file.close()


class Twin(Proc):
    """``metarl sim-robot`` as a subprocess; ``ready`` is its JSON ready line (bound endpoints)."""

    def __init__(self, tmp: Path, *args: str, env: Mapping[str, str] | None = None, name: str = "twin") -> None:
        self.summary_path = tmp / f"{name}_summary.json"
        self.trace_path = tmp / f"{name}_trace.npz"
        port = [] if "--endpoints" in args else ["--port-base", "0"]
        cmd = [sys.executable, "-m", "metarl_robot.cli", "sim-robot", *port,
               "--summary", str(self.summary_path), "--trace", str(self.trace_path), *args]
        super().__init__(cmd, tmp / f"{name}.log", env or os.environ)
        text = self.wait_for(lambda t: '"event": "ready"' in t, "twin ready line")
        line = next(line for line in text.splitlines() if '"event": "ready"' in line)
        self.ready: dict[str, Any] = json.loads(line)

    @property
    def endpoints(self) -> str:
        e = self.ready["endpoints"]
        return f"state={e['state']},command={e['command']},handshake={e['handshake']}"

    def summary(self, timeout_s: float = DEADLINE_S) -> dict[str, Any]:
        """Wait for the twin to end (its --duration, or after stop()) and read its summary JSON."""
        self.wait(timeout_s)
        return json.loads(self.summary_path.read_text())


def params_file(path: Path, params: Mapping[str, Any]) -> Path:
    """A ROS 2 parameter file for any node name (``/**``); dotted names become nested keys."""
    tree: dict[str, Any] = {}
    for name, value in params.items():
        node = tree
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump({"/**": {"ros__parameters": tree}}, sort_keys=False))
    return path


def node_args(params_files: list[Path], *extra: str) -> list[str]:
    args = ["--ros-args"]
    for p in params_files:
        args += ["--params-file", str(p)]
    return [*args, *extra]


# ---- a real rclpy client --------------------------------------------------------------------------------
class RosClient:
    """An rclpy node in the test process, spun in a background thread, recording what it receives."""

    def __init__(self, domain_id: int, name: str = "metarl_test_client") -> None:
        import rclpy
        from rclpy.executors import SingleThreadedExecutor

        self.rclpy = rclpy
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node(name, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.received: dict[str, list[tuple[float, Any]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        while not self._stop.is_set() and self.context.ok():
            self.executor.spin_once(timeout_sec=0.05)

    def subscribe(self, msg_type: Any, topic: str, depth: int = 200, latched: bool = False) -> None:
        """Record ``topic``'s messages; ``latched``: ask for transient local, so a publisher's kept messages from
        before the subscription matched arrive too (the node's ``~/context``)."""
        from rclpy.qos import DurabilityPolicy, QoSProfile

        self.received.setdefault(topic, [])

        def store(msg: Any) -> None:
            with self._lock:
                self.received[topic].append((time.monotonic(), msg))

        qos = QoSProfile(depth=depth, durability=DurabilityPolicy.TRANSIENT_LOCAL) if latched else depth
        self.node.create_subscription(msg_type, topic, store, qos)

    def messages(self, topic: str, since: float = -1.0) -> list[Any]:
        with self._lock:
            return [m for t, m in self.received.get(topic, []) if t >= since]

    def wait_for(self, predicate: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
        end = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > end:
                raise AssertionError(f"{what}: not within {timeout_s} s")
            time.sleep(0.05)

    def call(self, srv_type: Any, name: str, request: Any, timeout_s: float = DEADLINE_S) -> Any:
        client = self.node.create_client(srv_type, name)
        try:
            if not client.wait_for_service(timeout_sec=timeout_s):
                raise AssertionError(f"service {name} not available within {timeout_s} s")
            future = client.call_async(request)
            end = time.monotonic() + timeout_s
            while not future.done():
                if time.monotonic() > end:
                    raise AssertionError(f"service {name} did not answer within {timeout_s} s")
                time.sleep(0.02)
            return future.result()
        finally:
            self.node.destroy_client(client)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.executor.shutdown()
        self.node.destroy_node()
        self.rclpy.shutdown(context=self.context)


def diagnostic_values(status: Any) -> dict[str, str]:
    return {kv.key: kv.value for kv in status.values}


def find_status(array: Any, suffix: str) -> Any | None:
    """The status of a DiagnosticArray whose name ends with ``suffix`` (e.g. ``: telemetry``)."""
    return next((s for s in array.status if s.name.endswith(suffix)), None)


def level_of(status: Any) -> int:
    level = status.level
    return level[0] if isinstance(level, bytes) else int(level)
