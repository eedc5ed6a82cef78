"""A fake ros2_control robot for the node's tests: the MuJoCo cart-pole behind the topics of ros2_control's
joint_state_broadcaster (``sensor_msgs/JointState`` on ``/joint_states``) and of a forward_command_controller
(``std_msgs/Float64MultiArray`` on ``/forward_command_controller/commands``), one rclpy node.

Like a ros2_control loop it reads, updates and writes once per control period: the newest command received
(held until another arrives, the safe command before any; as a forward_command_controller holds it) drives one
period of physics, then the joint states are published, stamped on the robot's clock. It reads the joints from
MuJoCo by name (not through robot.yaml's observation mapping, which is what the node must get right) and
publishes them in another order than robot.yaml's, with a joint the node does not read.

    python tests/ros/fake_ros2_control.py --speed 0.5 --summary out.json [--duration 6]

SIGUSR1 stops the joint states (the broadcaster dies) while the hardware runs on, recording the commands it
still gets. One JSON line ``{"event": "ready", ...}`` on stdout once it publishes;
the summary (every state published, every command received) is written when it ends (``--duration`` or
SIGINT/SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

EXTRA_JOINT = "unread_wheel"
"""A joint the hardware publishes that robot.yaml does not name (the node must pick its joints by name)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="cartpole_swingup")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed", type=float, default=1.0, help="robot seconds per wall second")
    parser.add_argument("--duration", type=float, default=None, help="robot seconds to run (default: until a signal)")
    parser.add_argument("--state-topic", default="/joint_states")
    parser.add_argument("--command-topic", default="/forward_command_controller/commands")
    parser.add_argument("--summary", type=Path, required=True)
    args = parser.parse_args(argv)

    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions
    from sensor_msgs.msg import JointState
    from std_msgs.msg import Float64MultiArray

    from metarl_robot.envs.registry import make_env

    env = make_env(args.family).unwrapped
    robot = env.robot
    env.reset(seed=args.seed)
    model, data = env.model, env.data
    published_joints = [*reversed(robot.joints), EXTRA_JOINT]
    qpos = {j: int(model.joint(j).qposadr[0]) for j in robot.joints}
    qvel = {j: int(model.joint(j).dofadr[0]) for j in robot.joints}

    stop, mute = threading.Event(), threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: mute.set())
    rclpy.init(args=None, signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node("fake_ros2_control")
    lock = threading.Lock()
    held = robot.safe_action.copy()
    commands: list[dict] = []
    bad_commands = 0
    period = robot.ctrl_dt
    t0_wall = time.monotonic()

    def robot_time() -> float:
        return (time.monotonic() - t0_wall) * args.speed

    def on_command(msg: Float64MultiArray) -> None:
        nonlocal held, bad_commands
        values = np.asarray(msg.data, dtype=np.float64)
        with lock:
            if values.shape != (robot.action_dim,):
                bad_commands += 1  # a forward_command_controller refuses a command of the wrong size too
                return
            held = values
            commands.append({"t": robot_time(), "data": values.tolist()})

    pub = node.create_publisher(JointState, args.state_topic, 10)
    node.create_subscription(Float64MultiArray, args.command_topic, on_command, 10)
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    spinner = threading.Thread(target=lambda: _spin(executor, stop), daemon=True)
    spinner.start()

    stamp0_ns = node.get_clock().now().nanoseconds  # the robot clock: ROS time at start, advancing `speed` x wall
    states: list[dict] = []

    def publish(k: int) -> None:
        stamp_ns = stamp0_ns + round(k * period * 1e9)
        msg = JointState()
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
        msg.name = published_joints
        msg.position = [float(data.qpos[qpos[j]]) if j in qpos else 0.0 for j in published_joints]
        msg.velocity = [float(data.qvel[qvel[j]]) if j in qvel else 0.0 for j in published_joints]
        msg.effort = [0.0] * len(published_joints)
        pub.publish(msg)
        states.append({"k": k, "stamp_ns": stamp_ns, "position": list(msg.position), "velocity": list(msg.velocity)})

    print(json.dumps({"event": "ready", "state_topic": pub.topic_name, "command_topic": args.command_topic,
                      "joints": published_joints}), flush=True)
    publishing_stopped_at = None
    k = 0
    try:
        publish(0)
        while not stop.is_set():
            if args.duration is not None and (k + 1) * period > args.duration + 1e-9:
                break
            until = t0_wall + (k + 1) * period / args.speed
            stop.wait(max(0.0, until - time.monotonic()))
            with lock:
                action = held.copy()
            env.step(action)  # the env clips and rate-limits as the robot's own limits would
            k += 1
            if mute.is_set():
                publishing_stopped_at = publishing_stopped_at or k * period
                continue
            publish(k)
    finally:
        stop.set()
        spinner.join(5)
        with lock:
            summary = {"periods": k, "period_s": period, "speed": args.speed, "joints": published_joints,
                       "states": states, "commands": commands, "bad_commands": bad_commands,
                       "publishing_stopped_at": publishing_stopped_at, "state_topic": pub.topic_name,
                       "command_topic": args.command_topic}
        args.summary.write_text(json.dumps(summary))
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown()
    return 0


def _spin(executor, stop: threading.Event) -> None:
    while not stop.is_set():
        executor.spin_once(timeout_sec=0.05)


if __name__ == "__main__":
    sys.exit(main())
