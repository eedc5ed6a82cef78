"""``adapt_node``: the ROS 2 lifecycle node that runs a metarl-robot bundle on a robot (docs/ros2_node.md).

Lifecycle:

- **configure**: read and check the parameters, load and fully validate the bundle (any registered kind: its
  ``kind`` picks the adapter, e.g. ``model_based`` planning or ``context_policy`` acting), build the safety
  layer and the adapter, connect to the robot through the ``link`` parameter's robot link (ZeroMQ telemetry, or
  ros2_control's topics: :mod:`metarl_robot_ros.robot_link`) and handshake (a robot.yaml mismatch is refused with
  both interface hashes in the message; for ros2_control, a robot whose observation a JointState cannot carry,
  naming the field), create the publishers and services.
- **activate**: start an episode: a new MCAP episode log, the adapter reset, the control loop thread.
- **deactivate**: the safe command for ``safety.shutdown_periods`` periods, then the loop stops and the
  log is closed.
- **cleanup** / **shutdown**: stop everything (shutdown sends the final safe commands first) and disconnect.

With ``autostart`` (the default) the node configures and activates itself, so ``ros2 run`` and
``ros2 launch`` need no lifecycle manager. SIGINT and SIGTERM end the process after the final safe
commands and the log close; so does an exception in the control loop (exit code 1).

The control loop runs in its own thread (:mod:`metarl_robot_ros.control_loop`); the executor only
serves the services, the lifecycle transitions, the diagnostics timer and the ros2_control link's joint_states
subscription. It is multi-threaded and spun in a thread of its own from the start, so that subscription is
served while a lifecycle transition waits in a handshake (its callback group is the link's own).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.qos import DurabilityPolicy, QoSProfile
from rclpy.signals import SignalHandlerOptions
from sensor_msgs.msg import JointState
from std_msgs.msg import Float64, Float64MultiArray, MultiArrayDimension
from std_srvs.srv import SetBool, Trigger

from metarl_robot.logs.writer import joint_state_map
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.runtime.manifest import NO_DYNAMICS_MODEL
from metarl_robot.runtime.safety import SafetyLayer
from metarl_robot.spec.robot import RobotSpec
from metarl_robot.spec.schema import SpecError
from metarl_robot.telemetry.controller import HandshakeError
from metarl_robot.telemetry.transport import CurveClientKeys
from metarl_robot_ros.control_loop import ControlLoop, LoopOutcome, LoopStats, judge_loop
from metarl_robot_ros.params import PARAMETERS, NodeConfig, ParameterError, parse_parameters
from metarl_robot_ros.recorder import RecordWorker, StepRecord
from metarl_robot_ros.robot_link import LINK_ROS2_CONTROL, LINK_ZMQ, NodeLink, ZmqLink
from metarl_robot_ros.ros2_control_link import Ros2ControlLink

NODE_NAME = "metarl_adapt"
"""Default node name (``__node:=`` remaps it)."""
EXIT_CONFIGURE_FAILED = 2
"""Exit code when ``autostart`` could not configure (bad parameters, bundle, robot not answering, mismatch)."""
EXIT_LOOP_FAILED = 1
"""Exit code when the control loop ended with an exception (after its safe commands)."""
CONTEXT_QOS = QoSProfile(depth=10, durability=DurabilityPolicy.TRANSIENT_LOCAL)
"""``~/context``: the last 10 beliefs are kept for late subscribers (which must ask for transient local too)."""
EXECUTOR_THREADS = 2
"""One for the node's callbacks (one group: lifecycle, services, timer), one for the ros2_control link's."""


def _zmq_link(node: LifecycleNode, cfg: NodeConfig, robot: RobotSpec) -> NodeLink:
    curve = CurveClientKeys.from_dir(cfg.curve_keys) if cfg.curve_keys is not None else None
    return ZmqLink(cfg.endpoints, curve=curve, insecure=cfg.insecure)


def _ros2_control_link(node: LifecycleNode, cfg: NodeConfig, robot: RobotSpec) -> NodeLink:
    return Ros2ControlLink(node, robot)  # refuses (SpecError) a robot whose observation a JointState cannot carry


LINK_FACTORIES: dict[str, Callable[[LifecycleNode, NodeConfig, RobotSpec], NodeLink]] = {
    LINK_ZMQ: _zmq_link, LINK_ROS2_CONTROL: _ros2_control_link}
"""``link`` parameter → the robot link (:mod:`metarl_robot_ros.robot_link`); the rest of the node is the same."""
_LEVEL_BYTES = {0: DiagnosticStatus.OK, 1: DiagnosticStatus.WARN, 2: DiagnosticStatus.ERROR,
                3: DiagnosticStatus.STALE}


def _level_value(level: Any) -> int:
    return level[0] if isinstance(level, bytes) else int(level)


def _array(labels_sizes: list[tuple[str, int]], data: np.ndarray) -> Float64MultiArray:
    """A Float64MultiArray whose ``layout.dim`` names each block (label, size, offset), like the episode log."""
    msg = Float64MultiArray()
    offset = 0
    for label, size in labels_sizes:
        msg.layout.dim.append(MultiArrayDimension(label=label, size=size, stride=offset))
        offset += size
    msg.data = [float(x) for x in np.asarray(data, dtype=np.float64).ravel()]
    return msg


class AdaptNode(LifecycleNode):
    """Runs a bundle's adapter at the robot's control rate behind the safety layer (see the module docstring)."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, automatically_declare_parameters_from_overrides=True, **kwargs)
        dynamic = ParameterDescriptor(dynamic_typing=True)
        for spec in PARAMETERS:
            if not self.has_parameter(spec.name):
                self.declare_parameter(spec.name, spec.default, dynamic)
        self.config: NodeConfig | None = None
        """The validated configuration (after configure)."""
        self.bundle = None
        self.robot = None
        self.link: NodeLink | None = None
        self.safety: SafetyLayer | None = None
        self.adapter = None
        self.recorder: RecordWorker | None = None
        self.loop: ControlLoop | None = None
        self.stats = LoopStats()
        self.lock = threading.Lock()
        """Guards the safety layer, the adapter and the stats (shared with the control loop thread)."""
        self.episode = 0
        """Episodes started (activations)."""
        self.configure_error = ""
        """Why the last configure failed."""
        self.exit_code: int | None = None
        """Set when the process should end (autostart failure, loop exception)."""
        self.exit_requested = threading.Event()
        self._operator_enabled = True
        self._last_outcome: LoopOutcome | None = None
        self._last_bad_frames = 0
        self._last_overruns = 0
        self._ros_entities: list[Any] = []
        self._diag_pub = self._joint_pub = self._command_pub = self._context_pub = None
        self._error_pub = self._events_pub = self._diag_timer = None
        self._joint_names: list[str] = []
        self._joint_pos_index: list[int] = []
        self._joint_vel_index: list[int] = []
        self._teardown_lock = threading.Lock()
        self._finished_gc = self.create_guard_condition(self._on_loop_finished)
        self._lifecycle_label = "unconfigured"

    # ---- parameters ------------------------------------------------------------------------------
    def parameter_values(self) -> dict[str, Any]:
        """Every parameter of this node (declared or given as an override) → its value."""
        names = self.list_parameters([], 0).names
        return {p.name: p.value for p in self.get_parameters(names)}

    def read_config(self) -> NodeConfig:
        """Parse and check the parameters (bundle-independent part)."""
        return parse_parameters(self.parameter_values())

    # ---- lifecycle -------------------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._lifecycle_label = "configuring"
        try:
            self._configure()
        except Exception as exc:  # every refusal ends here with its message; the node stays unconfigured
            known = isinstance(exc, ParameterError | SpecError | HandshakeError | OSError | ValueError)
            self.configure_error = str(exc) if known else f"{type(exc).__name__}: {exc}"
            self.get_logger().error(f"configure failed: {self.configure_error}")
            self._teardown()
            self.config = None
            self._lifecycle_label = "unconfigured"
            return TransitionCallbackReturn.FAILURE
        self.configure_error = ""
        self._lifecycle_label = "inactive"
        return TransitionCallbackReturn.SUCCESS

    def _configure(self) -> None:
        cfg = self.read_config()
        bundle = load_bundle(cfg.bundle)
        cfg = cfg.with_bundle(bundle)
        for name, value in cfg.task.items():
            if not self.has_parameter(f"task.{name}"):
                self.declare_parameter(f"task.{name}", value, ParameterDescriptor(dynamic_typing=True))
        robot = bundle.robot
        self.config, self.bundle, self.robot = cfg, bundle, robot
        self.safety = SafetyLayer(robot, cfg.safety)
        self.stats.period_s = cfg.control_period_s
        self.adapter = bundle.make_adapter(batch=1, seed=cfg.seed, **bundle.adapter_switches(cfg.adapt))
        self.link = LINK_FACTORIES[cfg.link](self, cfg, robot)
        self.link.connect()
        self.get_logger().info(f"{bundle.kind} bundle {bundle.name!r} ({bundle.sha256[:12]}) for robot "
                               f"{robot.name!r} at {cfg.control_rate_hz:g} Hz, adapt={cfg.adapt}, task={cfg.task}; "
                               f"handshaking with {self.link.target()}")
        self._handshake()
        # The recorder before the entities: the diagnostics timer (another executor thread) reads it.
        self.recorder = RecordWorker(robot, publish_step=self._publish_step,
                                     on_error=lambda msg: self.get_logger().error(msg))
        self._create_ros_entities()

    def _handshake(self) -> None:
        """Handshake with the robot; tell the safety layer either way. Raises HandshakeError on a refusal."""
        try:
            self.link.handshake(self.robot, timeout_s=self.config.handshake_timeout_s)
        except HandshakeError as exc:
            with self.lock:
                self.safety.on_handshake(False, time.monotonic(), str(exc))
            raise
        with self.lock:
            self.safety.on_handshake(True, time.monotonic())
            self.stats.break_period()
        self.get_logger().info(f"handshake ok: {self.link.session_summary()}; no command before a fresh frame")

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            if self.episode > 0 or self.link.session_lost:
                self._handshake()  # a new episode starts on a fresh session: no stale deadline from the pause
        except HandshakeError as exc:
            self.get_logger().error(f"activate failed: {exc}")
            return TransitionCallbackReturn.FAILURE
        cfg, robot = self.config, self.robot
        self.episode += 1
        with self.lock:
            self.adapter.reset()  # a new episode; what an online model fitted to this robot is kept
            carried = self.adapter.carried_state()
            self.safety.set_enabled(self._operator_enabled, time.monotonic())
            self.stats.break_period()
        path = None
        if cfg.log_dir is not None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = cfg.log_dir / f"{robot.name}_{self.bundle.name}_{stamp}_ep{self.episode:04d}.mcap"
        self.recorder.open_episode(path, bundle=self.bundle, adapter_state=carried, extra_metadata={
            "node": self.get_fully_qualified_name(), "episode": self.episode, "adapt": cfg.adapt, "seed": cfg.seed,
            "control_rate_hz": cfg.control_rate_hz, "task_params": cfg.task, "link": self.link.describe(),
            "safety": cfg.safety.to_dict(), "parameters": _jsonable(self.parameter_values())})
        self.loop = ControlLoop(robot=robot, link=self.link, safety=self.safety, adapter=self.adapter,
                                task_params=cfg.task, recorder=self.recorder, lock=self.lock, stats=self.stats,
                                episode_steps=cfg.episode_steps, handshake_timeout_s=min(1.0, cfg.handshake_timeout_s),
                                on_finished=self._loop_finished_threadsafe)
        self.loop.start()
        self._lifecycle_label = "active"
        self.get_logger().info(f"episode {self.episode} started" + (f", log {path}" if path else ", no log"))
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_loop("deactivated", final=False)
        self._lifecycle_label = "inactive"
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_loop("cleanup", final=False)
        self._teardown()
        self._lifecycle_label = "unconfigured"
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.shutdown_safely("lifecycle shutdown")
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.shutdown_safely("lifecycle error")
        return TransitionCallbackReturn.SUCCESS

    def shutdown_safely(self, reason: str) -> None:
        """The process is ending: final safe commands (if armed), log closed, link closed. Idempotent."""
        self._stop_loop(reason, final=True)
        self._teardown()
        self._lifecycle_label = "finalized"

    def _stop_loop(self, reason: str, final: bool) -> None:
        loop = self.loop
        if loop is None:
            return
        loop.request_stop(reason, final)
        periods = self.safety.config.shutdown_periods if self.safety is not None else 5
        if not loop.join(periods * self.robot.ctrl_dt + 10.0):
            self.get_logger().error("control loop did not finish its end sequence in time")
        self.loop = None

    def _teardown(self) -> None:
        # The diagnostics timer may be running in another executor thread (shutdown runs in the main thread).
        with self._teardown_lock:
            if self.recorder is not None:  # first: it publishes through the entities destroyed below
                self.recorder.stop()
                self.recorder = None
            for entity in self._ros_entities:
                if entity is self._diag_timer:
                    self.destroy_timer(entity)
                elif hasattr(entity, "srv_type"):
                    self.destroy_service(entity)
                else:
                    self.destroy_publisher(entity)
            self._ros_entities = []
            self._diag_timer = None
            if self.link is not None:
                self.link.close()
                self.link = None

    # ---- the loop ending by itself ------------------------------------------------------------------
    def _loop_finished_threadsafe(self, outcome: LoopOutcome) -> None:
        self._last_outcome = outcome
        self._finished_gc.trigger()  # handled in the executor thread: no lifecycle call from the loop thread

    def _on_loop_finished(self) -> None:
        outcome = self._last_outcome
        if outcome is None or self.loop is None or self.loop.running:
            return
        if outcome.error is not None:
            self.get_logger().error(f"control loop failed, safe command sent {outcome.safe_commands_sent} times: "
                                    f"{outcome.reason}\n{outcome.traceback}")
            self.exit_code = EXIT_LOOP_FAILED
            self.exit_requested.set()
        elif outcome.reason.startswith("episode_steps"):
            self.get_logger().info(f"episode {self.episode} finished: {outcome.reason}; deactivating")
            self.trigger_deactivate()

    # ---- ROS entities ---------------------------------------------------------------------------------
    def _create_ros_entities(self) -> None:
        self._joint_names, self._joint_pos_index, self._joint_vel_index = joint_state_map(self.robot)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        # Private: a global joint_states would mix with joint_state_broadcaster's (the ros2_control link reads it).
        self._joint_pub = self.create_publisher(JointState, "~/joint_states", 10)
        self._command_pub = self.create_publisher(Float64MultiArray, "~/command", 10)
        # Latched (transient local): a monitor that connects late, or after the episode, still gets the latest
        # beliefs; the belief is state, not an event stream.
        self._context_pub = self.create_publisher(Float64MultiArray, "~/context", CONTEXT_QOS)
        self._error_pub = self.create_publisher(Float64, "~/prediction_error", 10)
        self._events_pub = self.create_publisher(DiagnosticArray, "~/safety_events", 50)
        services = [self.create_service(Trigger, "~/reset_adaptation", self._srv_reset),
                    self.create_service(SetBool, "~/set_enabled", self._srv_set_enabled)]
        self._diag_timer = self.create_timer(1.0 / self.config.diagnostics_rate_hz, self._publish_diagnostics)
        self._ros_entities = [self._diag_pub, self._joint_pub, self._command_pub, self._context_pub,
                              self._error_pub, self._events_pub, *services, self._diag_timer]

    def _publish_step(self, r: StepRecord) -> None:
        """Called in the recorder thread for every step (never in the control loop thread)."""
        stamp = self.get_clock().now().to_msg()
        if self._joint_names:
            js = JointState()
            js.header.stamp = stamp
            js.name = list(self._joint_names)
            obs = r.frame.obs
            js.position = [float(obs[i]) if i >= 0 else math.nan for i in self._joint_pos_index]
            js.velocity = [float(obs[i]) if i >= 0 else math.nan for i in self._joint_vel_index]
            self._joint_pub.publish(js)
        if r.command is not None:
            self._command_pub.publish(_array([(a.name, 1) for a in self.robot.action], r.command.action))
        if r.adaptation is not None:
            # The kind's belief, each diagnostic a labelled block (e.g. the context of a model_based bundle; the
            # mean and the variance of the belief over z of a context_policy one; none for an unadapted one).
            labels = [key for key in self.bundle.belief_diagnostics if key in r.adaptation]
            blocks = [np.asarray(r.adaptation[key], dtype=np.float64).ravel() for key in labels]
            context = np.concatenate(blocks) if blocks else np.zeros(0)
            self._context_pub.publish(_array([(k, b.size) for k, b in zip(labels, blocks, strict=True)], context))
            error = r.adaptation.get("prediction_error")
            if error is not None:
                self._error_pub.publish(Float64(data=float(np.asarray(error, dtype=np.float64).ravel()[0])))
        if r.events:
            array = DiagnosticArray()
            array.header.stamp = stamp
            for event in r.events:
                array.status.append(DiagnosticStatus(
                    level=_LEVEL_BYTES[int(event.level)], name=f"{self.get_name()}: safety/{event.code.value}",
                    message=event.message, hardware_id=self.robot.name,
                    values=[KeyValue(key="state", value=r.decision.state.value),
                            KeyValue(key="command_source", value=r.decision.source.value),
                            KeyValue(key="state_seq", value=str(r.frame.seq))]))
            self._events_pub.publish(array)

    # ---- services -----------------------------------------------------------------------------------
    def _srv_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        with self.lock:
            cleared = [f for f in self.safety.active_faults
                       if f in ("ADAPTER_NONFINITE", "PREDICTION_ERROR_FALLBACK", "FALLBACK_FAILED")]
            self.adapter.forget()
            self.safety.reset(time.monotonic())
            state = self.safety.state.value
        response.success = True
        response.message = (f"adapter reset (context emptied, anything fitted online forgotten); latched faults "
                            f"cleared: {cleared or 'none'}; "
                            f"safety state {state}")
        self.get_logger().info(response.message)
        return response

    def _srv_set_enabled(self, request: SetBool.Request, response: SetBool.Response) -> SetBool.Response:
        with self.lock:
            self._operator_enabled = bool(request.data)
            self.safety.set_enabled(bool(request.data), time.monotonic())
            state = self.safety.state.value
        response.success = True
        response.message = (("enabled" if request.data else "disabled: safe command every period")
                            + f"; safety state {state}")
        self.get_logger().info(response.message)
        return response

    # ---- diagnostics --------------------------------------------------------------------------------
    def diagnostics(self) -> list[DiagnosticStatus]:
        """The statuses of one /diagnostics message (also written to the episode log)."""
        now_ns = time.monotonic_ns()
        name, hw, cfg = self.get_name(), self.robot.name, self.config
        with self.lock:
            status = self.safety.status()
            loop = self.stats.snapshot(now_ns)
            link_stats = self.link.stats.as_dict()
            commands_sent = self.link.commands_sent
            session = self.link.session
            link_values = self.link.diagnostic_values()
            security_warnings = self.link.security_warnings()
            faults = list(self.safety.active_faults)
        outcome = self._last_outcome
        running = self.loop is not None and self.loop.running

        # Overruns and bad frames are graded per report (the window's statistics would repeat an old one for 20 s).
        overruns = int(loop["overruns"])
        new_overruns, self._last_overruns = overruns - self._last_overruns, overruns
        if outcome is not None and outcome.error is not None:
            loop_level, loop_message = 2, f"control loop failed: {outcome.reason}"
        elif not running:
            loop_level, loop_message = 1, f"not running ({self._lifecycle_label})"
        else:
            loop_level, problems = judge_loop(loop, cfg.control_rate_hz, cfg.loop_thresholds, new_overruns)
            loop_message = (f"{loop['loop_rate_hz']:.1f} Hz, latency p99 {loop['latency_ms_p99']:.2f} ms, jitter p99 "
                            f"{loop['jitter_ms_p99']:.2f} ms" + (": " + "; ".join(problems) if problems else ""))
        loop_values = {k: f"{v:.6g}" for k, v in loop.items()}
        loop_values.update(lifecycle_state=self._lifecycle_label, episode=str(self.episode),
                           episode_steps=str(self.loop.steps if self.loop is not None else 0),
                           expected_rate_hz=f"{cfg.control_rate_hz:.6g}", new_overruns=str(new_overruns))

        link_faults = [f for f in faults if f in ("TELEMETRY_STALE", "TELEMETRY_FROZEN", "LOSS_BURST",
                                                  "SEQUENCE_REGRESSED", "OBS_NONFINITE")]
        bad = link_stats["total_rejected"]
        new_bad = bad - self._last_bad_frames
        self._last_bad_frames = bad
        if link_faults:
            tel_level, tel_message = 2, f"{', '.join(link_faults)}: last frame {loop['last_frame_age_s']:.3f} s ago"
        elif new_bad > 0:
            tel_level, tel_message = 1, f"{new_bad} bad frame(s) rejected since the last report"
        elif security_warnings:  # the operator allowed it (insecure); say so every report
            tel_level, tel_message = 1, "; ".join(security_warnings)
        else:
            tel_level, tel_message = 0, f"ok, last frame {loop['last_frame_age_s'] * 1e3:.1f} ms ago"
        tel_values = {"link": cfg.link, "frames_accepted": str(link_stats["accepted"]), "frames_rejected": str(bad),
                      "commands_sent": str(commands_sent), "session": str(session),
                      "last_frame_age_s": f"{loop['last_frame_age_s']:.6g}",
                      "stale": str("TELEMETRY_STALE" in faults), "frozen": str("TELEMETRY_FROZEN" in faults),
                      "stale_trips": status.values.get("stale_trips", "0"),
                      "frozen_trips": status.values.get("frozen_trips", "0"),
                      "frames_lost": status.values.get("frames_lost", "0"), **link_values}
        tel_values.update({f"rejected_{k}": str(v) for k, v in link_stats["rejected"].items()})

        log_level, log_message, log_values = self.recorder.status(running, logging=cfg.log_dir is not None)
        statuses = [
            _status(loop_level, f"{name}: control loop", loop_message, hw, loop_values),
            _status(tel_level, f"{name}: telemetry", tel_message, hw, tel_values),
            _status(int(status.level), f"{name}: safety", status.message, hw, status.values),
            _status(0, f"{name}: adaptation", f"{self.bundle.kind}, adapt={cfg.adapt}, prediction error "
                    + (status.values.get("prediction_error_last", "nan") if self.bundle.has_dynamics_model
                       else NO_DYNAMICS_MODEL), hw,
                    {"adapt": str(cfg.adapt), "bundle": self.bundle.name, "bundle_sha256": self.bundle.sha256,
                     "bundle_kind": self.bundle.kind,
                     "task_params": json.dumps(cfg.task), "seed": str(cfg.seed),
                     "prediction_error_last": status.values.get("prediction_error_last", "nan")}),
            _status(log_level, f"{name}: episode log", log_message, hw, log_values),
        ]
        return statuses

    def _publish_diagnostics(self) -> None:
        with self._teardown_lock:
            if self.safety is None or self.link is None or self.recorder is None:
                return
            statuses = self.diagnostics()
            array = DiagnosticArray()
            array.header.stamp = self.get_clock().now().to_msg()
            array.status = statuses
            self._diag_pub.publish(array)
            if self.loop is not None and self.loop.running:
                self.recorder.diagnostics(statuses, time.monotonic_ns())


def _status(level: int, name: str, message: str, hardware_id: str, values: Mapping[str, str]) -> DiagnosticStatus:
    return DiagnosticStatus(level=_LEVEL_BYTES[level], name=name, message=message, hardware_id=hardware_id,
                            values=[KeyValue(key=str(k), value=str(v)) for k, v in values.items()])


def _jsonable(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, list | tuple | np.ndarray) else v) for k, v in values.items()}


def main(argv: list[str] | None = None) -> int:
    """``ros2 run metarl_robot_ros adapt_node --ros-args -p bundle:=PATH ...``; returns the exit code."""
    argv = sys.argv if argv is None else argv
    # Our own SIGINT/SIGTERM handling: the final safe commands must go out before rclpy shuts down.
    rclpy.init(args=argv, signal_handler_options=SignalHandlerOptions.NO)
    stop = threading.Event()
    stop_reason = ["signal"]

    def on_signal(signum: int, _frame: Any) -> None:
        stop_reason[0] = signal.Signals(signum).name
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    node = AdaptNode()
    executor = MultiThreadedExecutor(num_threads=EXECUTOR_THREADS)
    executor.add_node(node)
    spinner = _Spinner(executor)
    exit_code = 0
    try:
        autostart = node.get_parameter("autostart").value
        if autostart is True:
            node.trigger_configure()  # in this thread, while the spinner serves the ros2_control link's topics
            if node.config is None or node.link is None:
                print(f"adapt_node: configure failed: {node.configure_error}", file=sys.stderr, flush=True)
                return EXIT_CONFIGURE_FAILED
            if not stop.is_set():
                node.trigger_activate()
        while not stop.is_set() and not node.exit_requested.is_set() and spinner.failure is None:
            stop.wait(0.05)
        if spinner.failure is not None:
            raise spinner.failure
        exit_code = node.exit_code or 0
    except (KeyboardInterrupt, ExternalShutdownException):
        stop_reason[0] = "interrupted"
    except BaseException as exc:
        node.get_logger().error(f"node failed: {exc!r}; sending the safe command")
        stop_reason[0] = f"exception: {exc!r}"
        exit_code = EXIT_LOOP_FAILED
    finally:
        # Still spinning: the ros2_control link's end sequence reads joint_states through the executor.
        node.shutdown_safely(stop_reason[0] if stop.is_set() else "exit")
        spinner.stop()
        executor.remove_node(node)
        executor.shutdown(timeout_sec=5.0)
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return exit_code


class _Spinner:
    """Spins the executor in a thread of its own until :meth:`stop`; an exception from a callback ends it and is kept
    in :attr:`failure` for the main thread (which then sends the safe command and exits with code 1)."""

    def __init__(self, executor: MultiThreadedExecutor) -> None:
        self.executor = executor
        self.failure: BaseException | None = None
        """What ended the spinning, if anything did."""
        self._running = threading.Event()
        self._running.set()
        self._thread = threading.Thread(target=self._spin, name="metarl-executor", daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        try:
            while self._running.is_set():
                self.executor.spin_once(timeout_sec=0.05)
        except BaseException as exc:
            self.failure = exc

    def stop(self, timeout_s: float = 5.0) -> None:
        self._running.clear()
        self._thread.join(timeout_s)


def _entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    _entry()
