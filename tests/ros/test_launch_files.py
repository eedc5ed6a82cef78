"""colcon builds ros2_ws from a clean environment, the install holds what the launch files name, and the
installed node accepts (and runs with) exactly the parameters the launch files pass.

``ros2 launch`` and the ``launch``/``launch_ros`` packages are not installable from PyPI, so the launch
files are read with :mod:`launch_ast` (an :mod:`ast` evaluation of their declarative subset, with
launch_ros's parameter typing) and their node and process are started here with the resolved command
lines and parameters, the way ``ros2 launch`` would start them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from metarl_robot_ros.params import parse_parameters

from metarl_robot.logs import read_episode
from metarl_robot.paths import REPO_ROOT
from metarl_robot.runtime.bundle import load_bundle
from tests.ros.conftest import (
    BUNDLE,
    PKG,
    PKG_SRC,
    ColconInstall,
    Proc,
    Twin,
    colcon_build,
    node_args,
    params_file,
    ros_env,
)
from tests.ros.launch_ast import LaunchFile, ResolvedLaunch

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LAUNCH_DIR = REPO_ROOT / "launch"
LAUNCH_FILES = ("adapt.launch.py", "sim_robot.launch.py")


def venv_path() -> str:
    """PATH with this Python's bin folder first: where ``metarl`` is installed next to the interpreter."""
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def resolve(install: ColconInstall, launch_file: str, **args: str) -> ResolvedLaunch:
    return LaunchFile(install.share / "launch" / launch_file).resolve({PKG: install.share}, args)


def free_port_base() -> int:
    """Three consecutive free loopback ports (bound and released; the twin binds them right after)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base > 65533:
            continue
        socks: list[socket.socket] = []
        try:
            for port in (base, base + 1, base + 2):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError("no three consecutive free ports on 127.0.0.1")


def node_parameters(node) -> dict:
    """What the node gets: its parameter files (``/**`` or its own name), then the launch file's dict."""
    values: dict = {}
    for path in node.parameter_files:
        data = yaml.safe_load(Path(path).read_text())
        for key in ("/**", node.name, f"/{node.name}"):
            section = (data.get(key) or {}).get("ros__parameters", {})
            values.update(_flatten(section))
    values.update(node.parameters)
    return values


def _flatten(tree: dict, prefix: str = "") -> dict:
    out: dict = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def test_colcon_build_from_a_clean_environment_installs_node_config_and_launch_files(tmp_path):
    before = sorted(p.name for p in (REPO_ROOT / "ros2_ws").iterdir())
    install, result = colcon_build(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in (REPO_ROOT / "ros2_ws").iterdir()) == before, "the build must stay in tmp"
    assert (install.install / "setup.bash").is_file()
    assert (install.prefix / "share" / "ament_index" / "resource_index" / "packages" / PKG).is_file()
    assert (install.share / "package.xml").read_text() == (PKG_SRC / "package.xml").read_text()
    assert (install.share / "config" / "adapt.yaml").read_text() == (PKG_SRC / "config" / "adapt.yaml").read_text()
    for name in LAUNCH_FILES:
        assert (install.share / "launch" / name).read_text() == (LAUNCH_DIR / name).read_text()
    assert os.access(install.executable, os.X_OK)
    # The console script runs with the Python that built it, the one that has metarl_robot and rclpy.
    assert install.executable.read_text().splitlines()[0] == f"#!{sys.executable}"
    # Sourcing the workspace puts the package on AMENT_PREFIX_PATH and its modules on PYTHONPATH.
    probe = subprocess.run(["bash", "-c", 'source "$1/setup.bash" && python -c "import metarl_robot_ros.adapt_node, '
                            'os; print(os.environ[\'AMENT_PREFIX_PATH\'])"', "x", str(install.install)],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "PATH": venv_path()})
    assert probe.returncode == 0, probe.stderr
    assert str(install.prefix) in probe.stdout.split(":")[0]


def test_launch_files_name_only_what_the_install_provides_and_parameters_the_node_accepts(colcon_install):
    bundle = load_bundle(BUNDLE)
    metarl = shutil.which("metarl", path=venv_path())
    assert metarl, "the launch files run `metarl sim-robot`; it must be on PATH"
    sim_help = subprocess.run([metarl, "sim-robot", "--help"], capture_output=True, text=True, timeout=120).stdout
    for launch_file in LAUNCH_FILES:
        parsed = LaunchFile(colcon_install.share / "launch" / launch_file)
        assert all(arg.description for arg in parsed.arguments.values()), "every launch argument is documented"
        with pytest.raises(ValueError, match="argument 'bundle' has no default"):
            parsed.resolve({PKG: colcon_install.share}, {})
        resolved = resolve(colcon_install, launch_file, bundle=str(BUNDLE))
        assert resolved.nodes, launch_file
        for node in resolved.nodes:
            assert (colcon_install.install / node.package / "share" / "ament_index" / "resource_index" / "packages"
                    / node.package).is_file(), f"{launch_file}: package {node.package} is not installed"
            exe = colcon_install.install / node.package / "lib" / node.package / node.executable
            assert os.access(exe, os.X_OK), f"{launch_file}: executable {exe} is not installed"
            for path in node.parameter_files:
                assert path.is_file() and path.is_relative_to(colcon_install.install), path
            config = parse_parameters(node_parameters(node)).with_bundle(bundle)  # refuses anything unknown
            assert config.bundle == BUNDLE
        for process in resolved.processes:
            assert process.cmd[:2] == ["metarl", "sim-robot"], process.cmd
            for option in (part for part in process.cmd if part.startswith("--")):
                assert f"{option} " in sim_help, f"{launch_file}: `metarl sim-robot` has no option {option}"
    # Argument values reach the node typed the way launch_ros types them.
    sim = resolve(colcon_install, "sim_robot.launch.py", bundle=str(BUNDLE), target_x="0.25", adapt="false",
                  port_base="47500")
    params = sim.nodes[0].parameters
    assert params["task.target_x"] == 0.25 and params["adapt"] is False and params["port_base"] == 47500
    assert sim.processes[0].cmd[sim.processes[0].cmd.index("--port-base") + 1] == "47500"
    config = parse_parameters(node_parameters(sim.nodes[0])).with_bundle(bundle)
    assert config.task == {"target_x": 0.25} and config.endpoints.state == "tcp://127.0.0.1:47500"
    # The ros2_control link: the link parameter, and its topics as remappings of the node's names.
    (node,) = resolve(colcon_install, "adapt.launch.py", bundle=str(BUNDLE), link="ros2_control",
                      state_topic="/cartpole/joint_states", command_topic="/cartpole/effort_controller/commands").nodes
    assert parse_parameters(node_parameters(node)).link == "ros2_control"
    assert node.remappings == [("joint_states", "/cartpole/joint_states"),
                               ("/forward_command_controller/commands", "/cartpole/effort_controller/commands")]
    (default,) = resolve(colcon_install, "adapt.launch.py", bundle=str(BUNDLE)).nodes
    assert parse_parameters(node_parameters(default)).link == "zmq"
    assert default.remappings == [("joint_states", "joint_states"),  # the node's names, unchanged
                                  ("/forward_command_controller/commands", "/forward_command_controller/commands")]


def test_installed_node_runs_with_the_parameters_adapt_launch_passes(colcon_install, tmp_path, domain_id):
    twin = Twin(tmp_path, "--speed", "0.5", env=ros_env(domain_id))
    node = None
    try:
        resolved = resolve(colcon_install, "adapt.launch.py", bundle=str(BUNDLE), endpoints=twin.endpoints,
                           log_dir=str(tmp_path / "logs"))
        launch_node = resolved.nodes[0]
        overrides = params_file(tmp_path / "launch_overrides.yaml", launch_node.parameters)
        node = Proc(colcon_install.command(*node_args([*launch_node.parameter_files, overrides],
                                                      "-r", f"__node:={launch_node.name}", *launch_node.remap_args())),
                    tmp_path / "node.log", ros_env(domain_id))
        node.wait_for(lambda t: "episode 1 started" in t, "node active")
        time.sleep(2.0)
        assert node.stop(signal.SIGINT) == 0, node.output()[-3000:]
        assert twin.stop(signal.SIGINT) == 0, twin.output()[-3000:]
        summary = json.loads(twin.summary_path.read_text())
    finally:
        twin.kill()
        if node is not None:
            node.kill()
    assert summary["commands"]["accepted"] > 5 and summary["handshakes"]["accepted"] == 1
    (log,) = (tmp_path / "logs").glob("*.mcap")
    episode = read_episode(log)
    assert episode.complete and episode.adapted.sum() > 5
    assert episode.extra["parameters"]["endpoints"] == twin.endpoints  # what the launch file passed


def test_sim_robot_launch_runs_the_twin_and_the_node_together(colcon_install, tmp_path, domain_id):
    port_base = free_port_base()
    resolved = resolve(colcon_install, "sim_robot.launch.py", bundle=str(BUNDLE), speed="0.5",
                       port_base=str(port_base), log_dir=str(tmp_path / "logs"))
    env = ros_env(domain_id, PATH=venv_path())
    (process,) = resolved.processes
    (launch_node,) = resolved.nodes
    twin = Proc(process.cmd, tmp_path / "twin.log", env)
    node = None
    try:
        overrides = params_file(tmp_path / "launch_overrides.yaml", launch_node.parameters)
        node = Proc(colcon_install.command(*node_args([*launch_node.parameter_files, overrides],
                                                      "-r", f"__node:={launch_node.name}", *launch_node.remap_args())),
                    tmp_path / "node.log", env)
        node.wait_for(lambda t: "episode 1 started" in t, "node active (it waits for the twin's handshake)")
        time.sleep(2.0)
        assert node.stop(signal.SIGINT) == 0, node.output()[-3000:]
        assert twin.stop(signal.SIGINT) == 0, twin.output()[-3000:]
    finally:
        twin.kill()
        if node is not None:
            node.kill()
    done = json.loads(next(line for line in twin.output().splitlines() if '"event": "done"' in line))
    assert done["periods_commanded"] > 5
    (log,) = (tmp_path / "logs").glob("*.mcap")
    assert read_episode(log).adapted.sum() > 5
