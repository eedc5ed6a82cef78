"""One episode of what a robot computer runs, for tests/packaging/test_robot_install.py: it runs in a fresh venv that
holds only the metarl-robot wheel and its core dependencies (no torch, MuJoCo, gymnasium, matplotlib or tqdm).

It imports every robot-side module of the installed package, loads a bundle, handshakes with a robot (the test's
digital twin, started from the development venv) and runs the ROS 2 node's own control loop and episode recorder
(``ros2_ws/src/metarl_robot_ros``: pure Python, no rclpy) for ``--steps`` control steps, through the safety layer,
into an MCAP episode log that it reads back. It prints one JSON line: what it found and did.

Standard library and the installed package only: pytest and this checkout are not on this interpreter's path.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import pkgutil
import sys
import threading
import time
from pathlib import Path

NOT_ON_A_ROBOT = ("torch", "mujoco", "gymnasium", "matplotlib", "tqdm", "tensorboard", "onnxscript")
"""What the robot install must neither install nor import."""
ROBOT_SIDE = ("spec", "runtime", "telemetry", "logs", "replay")
"""Packages of metarl_robot that run on a robot computer (docs/architecture.md; replay: the offline tools)."""
ROBOT_SIDE_MODULES = ("paths", "machine", "provenance", "cli")


def import_robot_side() -> list[str]:
    """Import every robot-side module of the installed package (walked, so a new module is covered)."""
    names = [f"metarl_robot.{m}" for m in ROBOT_SIDE_MODULES]
    for package in ROBOT_SIDE:
        module = importlib.import_module(f"metarl_robot.{package}")
        names += [module.__name__, *(m.name for m in pkgutil.walk_packages(module.__path__, module.__name__ + "."))]
    for name in names:
        importlib.import_module(name)
    return names


def compile_all(folders: list[str]) -> list[str]:
    """Compile every .py file under ``folders`` (a SyntaxError this Python's grammar lacks fails the run)."""
    files = sorted(str(f) for folder in folders for f in Path(folder).rglob("*.py"))
    for file in files:
        compile(Path(file).read_text(encoding="utf-8"), file, "exec")
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--endpoints", required=True, help="the twin's endpoints, JSON (its ready line)")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--log", required=True, help="the episode log to write (.mcap)")
    parser.add_argument("--node-src", required=True, help="ros2_ws/src/metarl_robot_ros")
    parser.add_argument("--compile", action="append", default=[], metavar="DIR",
                        help="also compile every .py file under DIR with this Python (the node and the launch "
                        "files, which need rclpy or launch to import)")
    args = parser.parse_args()
    compiled = compile_all(args.compile)

    installed = [m for m in NOT_ON_A_ROBOT if importlib.util.find_spec(m) is not None]
    import metarl_robot

    modules = import_robot_side()
    sys.path.insert(0, args.node_src)
    from metarl_robot_ros import params  # noqa: F401  (the node's parameter checks: no rclpy either)
    from metarl_robot_ros.control_loop import ControlLoop, LoopStats
    from metarl_robot_ros.recorder import RecordWorker

    from metarl_robot.logs.reader import read_episode
    from metarl_robot.runtime.bundle import load_bundle
    from metarl_robot.runtime.safety import SafetyLayer
    from metarl_robot.telemetry.controller import ControllerLink
    from metarl_robot.telemetry.transport import Endpoints

    # As the node's configure and activate do (adapt_node.py), without rclpy.
    bundle = load_bundle(args.bundle)
    robot = bundle.robot
    safety = SafetyLayer(robot)
    adapter = bundle.make_adapter(batch=1, seed=0, **bundle.adapter_switches(True))
    lock, stats = threading.Lock(), LoopStats()
    link = ControllerLink(Endpoints(**json.loads(args.endpoints)))
    link.connect()
    link.handshake(robot, timeout_s=30.0)
    safety.on_handshake(True, time.monotonic())
    recorder = RecordWorker(robot)
    adapter.reset()
    recorder.open_episode(Path(args.log), bundle=bundle, adapter_state=adapter.carried_state(),
                          extra_metadata={"python": sys.version.split()[0], "test": "robot install"})
    loop = ControlLoop(robot=robot, link=link, safety=safety, adapter=adapter, task_params=bundle.family.validate({}),
                       recorder=recorder, lock=lock, stats=stats, episode_steps=args.steps)
    loop.start()
    # The robot's period times the steps, with room for a loaded machine; then the node's end sequence.
    finished = loop.join(args.steps * robot.ctrl_dt * 4 + 30.0)
    if not finished:
        loop.request_stop("test timeout", final=True)
        loop.join(10.0)
    recorder.stop()
    link.close()
    outcome = loop.outcome
    episode = read_episode(args.log)
    print(json.dumps({
        "python": list(sys.version_info[:2]),
        "package_file": metarl_robot.__file__,
        "installed_not_on_a_robot": installed,
        "imported_not_on_a_robot": sorted(m for m in NOT_ON_A_ROBOT if m in sys.modules),
        "robot_side_modules": len(modules),
        "compiled": len(compiled),
        "bundle_kind": bundle.kind,
        "finished": finished,
        "steps": loop.steps,
        "outcome": outcome.reason if outcome else None,
        "error": outcome.traceback if outcome and outcome.error else "",
        "commands_sent": stats.commands_sent,
        "log_steps": episode.num_steps,
        "log_adapted": int(episode.adapted.sum()),
        "log_complete": episode.complete,
        "log_error": recorder.log_error,
        "safety_states": sorted(set(episode.safety_state.tolist())),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
