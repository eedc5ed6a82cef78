"""Deployment latency: the ROS 2 adaptation node end to end, against the bare adapter, a bare controller and
a raw pyzmq echo; loop jitter at 50 and 100 Hz.

Prints one JSON document (progress on stderr). Run from the repository root::

    .venv/bin/python bench/node_latency.py > docs/bench/node_latency.json
    .venv/bin/python bench/node_latency.py --table docs/bench/node_latency.json   # the BENCHMARKS.md table

Everything runs on this machine, in one run, over loopback TCP, and every time is CLOCK_MONOTONIC
(the robot's stamps, the node's log and this script share it, so durations across processes are exact):

- the robot is this script: a ``RobotClient`` (the robot-side library a hardware integrator wraps around
  a driver) stepping the cart-pole MuJoCo env (nominal task) once per control period. Each period it
  publishes one STATE frame, waits until the period ends for the COMMAND that answers it, records when
  that command arrived, and applies the newest command at once (like ``metarl sim-robot``);
- the controller is the installed ``adapt_node`` (a ``colcon build`` of ros2_ws into a temporary folder,
  or ``--install``), a real rclpy process on its own ROS domain, writing its MCAP episode log;
- the peers are measured in the same run: the same adapter (same bundle, seed and task) fed the same
  transitions the node saw, timed alone (``observe`` + ``act``, what the node times as its compute), paced
  at the same rate; a bare controller, the same adapter behind the same ZeroMQ link in a minimal Python
  process (``ControllerLink``, observe/act, send: no ROS, no safety layer, no log) against the same robot
  loop; and a raw pyzmq echo process that answers each state-sized frame with a command-sized one over
  sockets with the link's options (``transport.robot_sockets`` / ``controller_sockets``: a bounded receive
  queue drained to the newest valid frame, CONFLATE on the publishers, LINGER 0), paced at the same rate.

Rows (``runs``):

- ``shipped_25hz``: the shipped bundle (policies/cartpole_mb) at its robot's 25 Hz.
- ``cheap_50hz``, ``cheap_100hz``: a derived bundle with the same graphs, the robot's control period set to
  20 / 10 ms and a cheap planner (``CHEAP_PLANNER``): the shipped planner needs ~20 ms per step on one
  core, so it cannot run at 50 or 100 Hz here. These rows measure the loop's jitter and the overhead with
  a small compute time. The MuJoCo env still steps 40 ms of simulated time per period: the rows measure
  timing, not control quality.

Per run (``node`` and ``bare_controller``), over the control steps after ``--warmup`` on which the
controller's command came from the adapter:

- ``e2e``: state frame stamped and sent by the robot → the command that answers it received by the robot;
- ``adapter_alone``: the same adapter's ``observe`` + ``act`` on the node's steps, timed alone;
- ``overhead_over_adapter``: per step, ``e2e`` minus the adapter time of that step (the node plus both link
  hops: the target);
- ``internal``: frame received by the controller → command sent (the node's from its MCAP log; includes the
  adapter), and ``link``: ``e2e - internal`` (both ZeroMQ hops, to compare with the echo);
- node only, paired per step from its MCAP log without a replay (the log's compute times, docs/episode_log.md):
  ``compute_in_node``: the adapter's ``observe`` + ``act`` as the node timed it; ``node_compute_logged``: the
  node's whole decision (frame received → command sent); ``internal_over_adapter_in_node``: their difference, the
  node's own overhead; ``overhead_over_adapter_in_node``: ``e2e`` minus the node-timed adapter time (the node
  plus both link hops, free of the replay's noise; a slower adapter inside the node is not counted here);
- ``jitter``: the robot's publish period, the controller's command send period and the command arrival
  period at the robot, as deviations from the nominal period; ``deadline``: commands that arrived after
  their period ended, and states that never got one.

``summary`` holds the target of issue 4: node overhead p99 <= 1 ms beyond adapter compute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PKG = "metarl_robot_ros"
SHIPPED_BUNDLE = REPO_ROOT / "policies" / "cartpole_mb"
CHEAP_PLANNER = {"samples": 32, "horizon": 10, "iterations": 1}
"""Planner of the 50/100 Hz rows: ~2.5 ms per step on one core (the shipped one: 128 x 40 x 2, ~20 ms)."""
TARGET_OVERHEAD_P99_MS = 1.0
"""Issue 4: node overhead p99 <= 1 ms beyond adapter compute."""
DEFAULT_SECONDS = 30.0
QUICK_SECONDS = 1.6
DEFAULT_WARMUP = 25
QUICK_WARMUP = 10
START_TIMEOUT_S = 120.0
"""Node start-up (rclpy import, bundle load, handshake) on a busy 2-core machine."""

EPILOG = __doc__.split("\n\n", 1)[1] + """
options in practice
  The default run takes about 7 minutes: per rate, the node and the bare controller each run --seconds,
  and the node's steps are replayed twice at the same pace; plus the echo. --quick (1.6 s per run) is the
  smoke-test budget of tests/bench/test_node_latency.py; its numbers are not meaningful.
"""


# ---- statistics ---------------------------------------------------------------------------------------
def percentiles(values_s: np.ndarray | list[float]) -> dict[str, float]:
    """p50/p99/p99.9/max/mean in ms (NaN for no data); ``n`` the sample count."""
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    if ms.size == 0:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "p999_ms": float("nan"), "max_ms": float("nan"),
                "mean_ms": float("nan"), "n": 0}
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "p999_ms": float(np.percentile(ms, 99.9)), "max_ms": float(ms.max()), "mean_ms": float(ms.mean()),
            "n": int(ms.size)}


def period_stats(intervals_s: np.ndarray, period_s: float) -> dict[str, float]:
    """Intervals between consecutive events against the nominal period: mean, std, and |deviation| p99 and max, ms."""
    intervals = np.asarray(intervals_s, dtype=np.float64)
    if intervals.size == 0:
        return {"mean_ms": float("nan"), "std_ms": float("nan"), "p99_abs_dev_ms": float("nan"),
                "max_abs_dev_ms": float("nan"), "n": 0}
    dev = np.abs(intervals - period_s) * 1e3
    return {"mean_ms": float(intervals.mean() * 1e3), "std_ms": float(intervals.std() * 1e3),
            "p99_abs_dev_ms": float(np.percentile(dev, 99)), "max_abs_dev_ms": float(dev.max()), "n": int(dev.size)}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- the node: build, bundle, process ----------------------------------------------------------------------
def colcon_build(root: Path) -> Path:
    """``colcon build`` of ros2_ws into ``root`` from a clean environment; returns the install folder."""
    keep = ("HOME", "PATH", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    result = subprocess.run(
        [sys.executable, "-m", "colcon", "--log-base", str(root / "log"), "build", "--build-base", str(root / "build"),
         "--install-base", str(root / "install"), "--event-handlers", "console_direct-"],
        cwd=REPO_ROOT / "ros2_ws", env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"colcon build failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return root / "install"


def derived_bundle(src: Path, dst: Path, period_s: float, planner: dict[str, Any]) -> Path:
    """A copy of ``src`` whose robot runs at ``period_s`` and whose planner is ``planner`` (same graphs).

    The robot spec's control period is part of its interface hash, so the copy carries the new hash and
    the robot side of the bench must load the same spec (:func:`bundle_robot`).
    """
    from metarl_robot.spec.robot import robot_from_dict

    shutil.copytree(src, dst)
    manifest_path = dst / "bundle.yaml"
    manifest = yaml.safe_load(manifest_path.read_text())
    manifest["robot"]["control"]["period"] = period_s
    manifest["control_period"] = period_s
    manifest["robot_interface_sha256"] = robot_from_dict(manifest["robot"]).interface_hash
    manifest["planner"].update(planner)
    manifest["name"] = f"{manifest['name']}_{round(1 / period_s)}hz_cheap"
    manifest_path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return dst


class ControllerProcess:
    """A controller subprocess (the node, or the bare controller), its output in a file."""

    name = "controller"

    def __init__(self, cmd: list[str], workdir: Path, env: dict[str, str]) -> None:
        self.log_path = workdir / f"{self.name}.log"
        self._file = open(self.log_path, "w")  # noqa: SIM115 -- closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._file, stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                     start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited (rc {self.proc.returncode}):\n{self.output()[-3000:]}")

    def stop(self) -> int:
        """SIGINT (the node sends its final safe commands and closes its log; the bare controller just ends),
        then wait."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                return self.proc.wait(10)
        finally:
            self._file.close()


class NodeProcess(ControllerProcess):
    """The installed adapt_node, run the way a user runs it (setup.bash sourced), with a parameter file."""

    name = "adapt_node"

    def __init__(self, install: Path, bundle_path: Path, endpoints, workdir: Path, seed: int) -> None:
        self.log_dir = workdir / "logs"
        params = {"bundle": str(bundle_path), "log_dir": str(self.log_dir), "handshake_timeout_s": 60.0, "seed": seed,
                  "diagnostics_rate_hz": 1.0,
                  "endpoints": f"state={endpoints.state},command={endpoints.command},handshake={endpoints.handshake}"}
        params_path = workdir / "node_params.yaml"
        params_path.write_text(yaml.safe_dump({"/**": {"ros__parameters": params}}, sort_keys=False))
        executable = install / PKG / "lib" / PKG / "adapt_node"
        script = 'source "$1/setup.bash" && exec "$2" --ros-args --params-file "$3"'
        domain = random.Random(time.monotonic_ns()).randint(20, 100)
        env = dict(os.environ, ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
                   ROS_LOCALHOST_ONLY="1", PYTHONUNBUFFERED="1", RCUTILS_COLORIZED_OUTPUT="0")
        super().__init__(["bash", "-c", script, "node", str(install), str(executable), str(params_path)], workdir, env)

    def episode_log(self) -> Path:
        files = sorted(self.log_dir.glob("*.mcap"))
        if len(files) != 1:
            raise RuntimeError(f"expected one episode log in {self.log_dir}, found {files}")
        return files[0]


BARE_SCRIPT = """
import json, sys, time
import numpy as np
from metarl_robot.runtime.bundle import load_bundle
from metarl_robot.telemetry.controller import ControllerLink
from metarl_robot.telemetry.transport import Endpoints

endpoints, bundle_path, out, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
bundle = load_bundle(bundle_path)
robot, family = bundle.robot, bundle.family
nominal = family.validate({})
task = {name: float(nominal[name]) for name in family.reward_names}  # what the node uses by default
adapter = bundle.make_adapter(batch=1, adapt=True, seed=seed)
link = ControllerLink(Endpoints.parse(endpoints))
link.connect()
link.handshake(robot, timeout_s=60)
rows, prev = [], None
while True:
    frame = link.receive_state(timeout_s=2.0)
    if frame is None:
        break  # the robot stopped publishing: the run is over
    received = time.monotonic_ns()
    start = time.perf_counter_ns()
    if prev is not None and frame.seq == prev.seq + 1:
        adapter.observe(prev.obs[None], frame.applied_action[None], frame.obs[None])
    action, _ = adapter.act(frame.obs[None], task)
    compute = time.perf_counter_ns() - start
    link.send_command(np.clip(action[0], robot.action_low, robot.action_high), answers=frame)
    rows.append([frame.seq, received, time.monotonic_ns(), compute])
    prev = frame
with open(out, "w") as f:
    json.dump(rows, f)
"""


class BareController(ControllerProcess):
    """The peer: the same adapter behind the same ZeroMQ link in a minimal Python process (ControllerLink,
    observe/act, send), no ROS, no safety layer, no log. Writes seq, receive, send and compute per step."""

    name = "bare_controller"

    def __init__(self, bundle_path: Path, endpoints, workdir: Path, seed: int) -> None:
        self.out = workdir / "bare_steps.json"
        link = f"{endpoints.state},{endpoints.command},{endpoints.handshake}"
        super().__init__([sys.executable, "-c", BARE_SCRIPT, link, str(bundle_path), str(self.out), str(seed)],
                         workdir, dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1"))

    def stop(self) -> int:
        """It ends by itself once the robot stops publishing."""
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            return super().stop()
        finally:
            self._file.close()

    def steps(self) -> dict[int, tuple[int, int, int]]:
        """seq → (received_ns, sent_ns, compute_ns)."""
        return {int(seq): (int(r), int(t), int(c)) for seq, r, t, c in json.loads(self.out.read_text())}


# ---- the robot side ------------------------------------------------------------------------------------
@dataclass
class RobotRecord:
    """What the robot saw in one run, per STATE seq."""

    period_s: float
    stamp_ns: dict[int, int] = field(default_factory=dict)
    """seq → robot clock when the frame was stamped and sent."""
    obs: dict[int, np.ndarray] = field(default_factory=dict)
    """seq → the observation it carried."""
    applied: dict[int, np.ndarray] = field(default_factory=dict)
    """seq → the action applied in the period before it (carried in the frame)."""
    arrival_ns: dict[int, int] = field(default_factory=dict)
    """seq → when the first command answering it arrived (on time or late)."""
    command_seq: dict[int, int] = field(default_factory=dict)
    """seq → that command's seq."""


def run_robot(robot, label: str, workdir: Path, seconds: float, seed: int,
              start_controller) -> tuple[RobotRecord, ControllerProcess]:
    """One run: a controller (``start_controller(endpoints)``) against this process's RobotClient; returns the
    robot's record and the (stopped) controller."""
    from metarl_robot.envs.registry import make_env
    from metarl_robot.spec.family import load_family
    from metarl_robot.telemetry.robot_client import RobotClient
    from metarl_robot.telemetry.transport import Endpoints

    family = load_family("cartpole_swingup")
    env = make_env(family).unwrapped
    obs, _ = env.reset(seed=seed, options={"task": family.nominal()})
    period_ns = round(robot.ctrl_dt * 1e9)
    steps = max(1, round(seconds / robot.ctrl_dt))
    client = RobotClient(robot, Endpoints.from_port_base("127.0.0.1", 0))
    endpoints = client.start()
    record = RobotRecord(robot.ctrl_dt)
    controller: ControllerProcess | None = None
    try:
        controller = start_controller(endpoints)
        log(f"  {label}: waiting for the {controller.name}'s handshake ({endpoints.handshake})")
        deadline = time.monotonic() + START_TIMEOUT_S
        while not client.armed:
            controller.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"no handshake within {START_TIMEOUT_S} s:\n{controller.output()[-3000:]}")
            client.serve_until(client.clock() + 50_000_000)
        log(f"  {label}: armed; {steps} periods of {robot.ctrl_dt * 1e3:.0f} ms")
        applied = robot.safe_action.astype(np.float64)
        t0 = client.clock()
        for k in range(steps):
            frame = client.publish_state(obs, applied)
            s = frame.seq
            record.stamp_ns[s], record.obs[s], record.applied[s] = frame.stamp_ns, obs.copy(), applied.copy()
            period_end = t0 + (k + 1) * period_ns
            # Take in every command until the one answering this state (late answers to earlier states too).
            while client.wait_for_command(period_end, answering_seq=0):
                decision = client.current_action()
                record.arrival_ns.setdefault(decision.answers_seq, client.last_command_received_ns)
                record.command_seq.setdefault(decision.answers_seq, decision.command_seq)
                if decision.answers_seq >= s:
                    break
            decision = client.current_action()
            obs, _, diverged, _, info = env.step(decision.action)
            applied = np.asarray(info["applied_action"], dtype=np.float64)
            if diverged:
                obs, _ = env.reset(options={"task": family.nominal()})
            client.serve_until(period_end)
        controller.check_alive()
    finally:
        rc = controller.stop() if controller is not None else None
        client.close()
    if rc not in (0, None):
        raise RuntimeError(f"{controller.name} ended with rc {rc}:\n{controller.output()[-3000:]}")
    return record, controller


# ---- the peers -----------------------------------------------------------------------------------------
def replay_adapter(bundle, episode, record: RobotRecord, steps: list[int], seed: int) -> tuple[dict, dict]:
    """The same adapter, fed the transitions the node fed it, timed alone at the run's pace.

    Returns seq → seconds of ``observe`` + ``act`` for the seqs in ``steps``, and how its actions compare
    with the node's (identical work: the same seed, context and observations give the same plan).
    """
    adapter = bundle.make_adapter(batch=1, adapt=True, seed=seed)
    task = {name: float(values[0]) for name, values in episode.task_params.items()}
    adapted = np.flatnonzero(episode.adapted)
    wanted = set(steps)
    times: dict[int, float] = {}
    diffs = []
    prev_seq: int | None = None
    next_at = time.perf_counter()
    for i in adapted:
        seq = int(episode.state_seq[i])
        obs = record.obs[seq]
        next_at += record.period_s
        while (remaining := next_at - time.perf_counter()) > 0:
            time.sleep(remaining)
        t0 = time.perf_counter_ns()
        if prev_seq is not None and seq == prev_seq + 1:
            adapter.observe(record.obs[prev_seq][None], record.applied[seq][None], obs[None])
        action, _ = adapter.act(obs[None], task)
        elapsed = (time.perf_counter_ns() - t0) / 1e9
        prev_seq = seq
        if seq in wanted:
            times[seq] = elapsed
        diffs.append(float(np.abs(np.asarray(action, dtype=np.float64)[0] - episode.adapter_action[i]).max()))
    diffs_arr = np.asarray(diffs)
    return times, {"max_abs_action_diff": float(diffs_arr.max()) if diffs_arr.size else float("nan"),
                   "steps_compared": int(diffs_arr.size)}


ECHO_SCRIPT = """
import sys, zmq
from metarl_robot.telemetry.transport import Endpoints, controller_sockets
ctx = zmq.Context()
state, command = controller_sockets(ctx, Endpoints.parse(sys.argv[1]), None)
reply = bytes(int(sys.argv[2]))
print("ready", flush=True)
while True:
    data = state.recv()
    if len(data) == 1:
        break
    command.send(reply)
"""


def run_echo(robot, period_s: float, seconds: float) -> np.ndarray:
    """Raw pyzmq round trips (state-sized frame out, command-sized frame back) at the run's pace, in s."""
    import zmq

    from metarl_robot.telemetry.protocol import CommandFrame, StateFrame, encode_command, encode_state
    from metarl_robot.telemetry.transport import Endpoints, robot_sockets

    action = robot.safe_action.astype(np.float64)
    state_bytes = len(encode_state(StateFrame(seq=1, stamp_ns=1, obs=np.zeros(robot.obs_dim), applied_action=action,
                                              session=1)))
    command_bytes = len(encode_command(CommandFrame(seq=1, answers_seq=1, expires_ns=2, session=1, action=action)))
    ctx = zmq.Context()
    state, command, _handshake, endpoints = robot_sockets(ctx, Endpoints.from_port_base("127.0.0.1", 0), None)
    echo = subprocess.Popen([sys.executable, "-c", ECHO_SCRIPT, f"{endpoints.state},{endpoints.command},"
                             f"{endpoints.handshake}", str(command_bytes)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
    rtts: list[float] = []
    try:
        echo.stdout.readline()
        # Until the subscription is through (PUB drops frames before it), send until an answer comes.
        deadline = time.monotonic() + 30
        while not command.poll(20):
            state.send(bytes(state_bytes))
            if time.monotonic() > deadline:
                raise RuntimeError("the echo process never answered")
        time.sleep(0.2)
        while command.poll(0):  # answers to the probes, not to be taken for a measured one
            command.recv()
        steps = max(1, round(seconds / period_s))
        next_at = time.perf_counter() + period_s
        for _ in range(steps):
            while (remaining := next_at - time.perf_counter()) > 0:
                time.sleep(remaining)
            next_at += period_s
            payload = os.urandom(state_bytes)
            t0 = time.monotonic_ns()
            state.send(payload)
            if command.poll(int(period_s * 1000)):
                command.recv()
                rtts.append((time.monotonic_ns() - t0) / 1e9)
        state.send(b"x")
        echo.wait(10)
    finally:
        if echo.poll() is None:
            echo.kill()
            echo.wait(10)
        for sock in (state, command, _handshake):
            sock.close(linger=0)
        ctx.term()
    return np.asarray(rtts)


# ---- one run, analysed -------------------------------------------------------------------------------------
def measured_seqs(record: RobotRecord, warmup: int) -> list[int]:
    """The states of a run after the warm-up periods."""
    first = min(record.stamp_ns) if record.stamp_ns else 0
    return [s for s in sorted(record.stamp_ns) if s >= first + warmup]


def controller_timing(record: RobotRecord, measured: list[int], seqs: list[int], received_ns: dict[int, int],
                      sent_ns: dict[int, int], compute_s: dict[int, float]) -> dict[str, Any]:
    """End to end, the controller's share (receive → send), the link's share and the jitter, over ``seqs``
    (steps on which the controller's command answered the state); ``compute_s`` is the adapter time paired
    with each step."""
    period = record.period_s
    e2e = np.array([(record.arrival_ns[s] - record.stamp_ns[s]) / 1e9 for s in seqs])
    internal = np.array([(sent_ns[s] - received_ns[s]) / 1e9 for s in seqs])
    compute = np.array([compute_s[s] for s in seqs])
    stamps = np.array([record.stamp_ns[s] for s in measured], dtype=np.float64)
    arrivals = np.array([record.arrival_ns[s] for s in seqs], dtype=np.float64)
    sends = np.array([sent_ns[s] for s in seqs], dtype=np.float64)
    # Periods only between consecutive seqs: a step left out would count as a doubled period.
    consecutive = np.diff(np.array(seqs)) == 1 if len(seqs) > 1 else np.zeros(0, bool)
    deadline_ns = period * 1e9
    late = sum(1 for s in measured
               if s in record.arrival_ns and record.arrival_ns[s] > record.stamp_ns[s] + deadline_ns)
    return {
        "steps": len(seqs), "e2e": percentiles(e2e), "overhead_over_adapter": percentiles(e2e - compute),
        "internal": percentiles(internal), "internal_over_adapter": percentiles(internal - compute),
        "link": percentiles(e2e - internal),
        "jitter": {"robot_publish_period": period_stats(np.diff(stamps) / 1e9, period),
                   "command_send_period": period_stats(np.diff(sends)[consecutive] / 1e9, period),
                   "command_arrival_period": period_stats(np.diff(arrivals)[consecutive] / 1e9, period)},
        "deadline": {"late_commands": late, "states_without_command": sum(s not in record.arrival_ns for s in measured),
                     "states": len(measured)},
    }


def analyse_node(name: str, bundle, record: RobotRecord, log_path: Path, warmup: int, seed: int
                 ) -> tuple[dict[str, Any], dict[str, float]]:
    """The node's run, with the adapter replayed alone on its steps; returns (node block, adapter_alone)."""
    from metarl_robot.logs import read_episode

    episode = read_episode(log_path)
    measured = measured_seqs(record, warmup)
    row_of = {int(episode.state_seq[i]): i for i in np.flatnonzero(episode.adapted)}
    steps, not_adapter = [], 0
    for seq in measured:
        i = row_of.get(seq)
        if i is None or seq not in record.arrival_ns:
            continue
        if episode.command_source[i] != "adapter" or int(episode.command_seq[i]) != record.command_seq[seq]:
            not_adapter += 1  # a safe or corrected command answered it, or a later command than the adapter's
            continue
        steps.append(seq)
    log(f"  {name}: {len(steps)} adapter steps; replaying the adapter alone at the same pace")
    compute, parity = replay_adapter(bundle, episode, record, steps, seed)
    # A second replay of the same work: how far two timings of identical steps differ here (the noise that
    # pairing a step with its replay adds to the overhead's tail).
    log(f"  {name}: replaying again (repeatability)")
    again, _ = replay_adapter(bundle, episode, record, steps, seed)
    seqs = [s for s in steps if s in compute]
    parity["repeat_abs_diff"] = percentiles([abs(compute[s] - again[s]) for s in seqs])
    received = {s: int(episode.receive_time_ns[row_of[s]]) for s in seqs}
    sent = {s: int(episode.time_ns[row_of[s]]) for s in seqs}
    block = controller_timing(record, measured, seqs, received, sent, compute)
    block.update(logged_compute(episode, record, {s: row_of[s] for s in seqs}))
    alone = percentiles([compute[s] for s in seqs])
    reported = {}
    if episode.diagnostics:
        loop = next((s for s in episode.diagnostics[-1].statuses if s.name.endswith(": control loop")), None)
        if loop is not None:
            reported = {k: float(loop.values[k]) for k in ("latency_ms_p50", "latency_ms_p99", "compute_ms_p50",
                                                            "compute_ms_p99", "jitter_ms_p99", "loop_rate_hz")
                        if k in loop.values}
    block.update({
        "steps_not_from_the_adapter": not_adapter, "adapter_replay": parity,
        "self_reported_last_500_steps": reported,
        "compute_in_node_over_alone_ms": {
            q: reported[f"compute_ms_{q}"] - alone[f"{q}_ms"] for q in ("p50", "p99") if f"compute_ms_{q}" in reported},
        "safety_events": sorted({e.kind for e in episode.safety_events}),
    })
    return block, alone


def logged_compute(episode, record: RobotRecord, rows: dict[int, int]) -> dict[str, Any]:
    """The node's own per-step compute times from its log (seq → log row), paired without a replay; steps the log
    did not time (an older node's version-1 log) are left out, so ``n`` says how many were."""
    timed = {s: (int(episode.adapter_compute_ns[i]), int(episode.node_compute_ns[i])) for s, i in rows.items()}
    timed = {s: (a, n) for s, (a, n) in timed.items() if a >= 0 and n >= 0}
    return {
        "compute_in_node": percentiles([a / 1e9 for a, _ in timed.values()]),
        "node_compute_logged": percentiles([n / 1e9 for _, n in timed.values()]),
        "internal_over_adapter_in_node": percentiles([(n - a) / 1e9 for a, n in timed.values()]),
        "overhead_over_adapter_in_node": percentiles([(record.arrival_ns[s] - record.stamp_ns[s] - a) / 1e9
                                                      for s, (a, _) in timed.items()]),
    }


def analyse_bare(record: RobotRecord, steps: dict[int, tuple[int, int, int]], warmup: int,
                 alone: dict[str, float]) -> dict[str, Any]:
    """The bare controller's run: its own per-step compute is paired with each step."""
    measured = measured_seqs(record, warmup)
    seqs = [s for s in measured if s in steps and s in record.arrival_ns and record.command_seq.get(s)]
    received = {s: steps[s][0] for s in seqs}
    sent = {s: steps[s][1] for s in seqs}
    compute = {s: steps[s][2] / 1e9 for s in seqs}
    block = controller_timing(record, measured, seqs, received, sent, compute)
    own = percentiles(list(compute.values()))
    block.update({"compute_in_process": own,
                  "compute_in_process_over_alone_ms": {q: own[f"{q}_ms"] - alone[f"{q}_ms"] for q in ("p50", "p99")}})
    return block


# ---- table ------------------------------------------------------------------------------------------------
def table(doc: dict) -> str:
    """The BENCHMARKS.md table from a JSON document."""
    lines = ["| run | controller | adapter compute p50 / p99 | end to end p50 / p99 / p99.9 | overhead over adapter "
             "p50 / p99 / p99.9 | send period jitter p99 | late / states |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, run in doc["runs"].items():
        for who, label, compute in (("node", "adapt_node", run["adapter_alone"]),
                                    ("bare_controller", "bare (peer)", run["bare_controller"]["compute_in_process"])):
            r = run[who]
            e, o = r["e2e"], r["overhead_over_adapter"]
            lines.append(f"| `{name}` | {label} | {compute['p50_ms']:.2f} / {compute['p99_ms']:.2f} ms | "
                         f"{e['p50_ms']:.2f} / {e['p99_ms']:.2f} / {e['p999_ms']:.2f} ms | "
                         f"{o['p50_ms']:.2f} / {o['p99_ms']:.2f} / {o['p999_ms']:.2f} ms | "
                         f"{r['jitter']['command_send_period']['p99_abs_dev_ms']:.2f} ms | "
                         f"{r['deadline']['late_commands']} / {r['deadline']['states']} |")
    echo = doc["echo"]["rtt"]
    lines.append(f"| echo, {doc['echo']['rate_hz']:g} Hz | raw pyzmq (peer) | — | {echo['p50_ms']:.3f} / "
                 f"{echo['p99_ms']:.3f} / {echo['p999_ms']:.3f} ms | — | — | — |")
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=None,
                        help=f"length of each controller run, of each adapter replay and of the echo (default: "
                        f"{DEFAULT_SECONDS:g})")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"first control periods of each run left out (default: {DEFAULT_WARMUP})")
    parser.add_argument("--rates", default="50,100", help="rates of the cheap-bundle rows, Hz (default: %(default)s)")
    parser.add_argument("--install", help="an existing colcon install folder of ros2_ws (default: build one in a "
                        "temporary folder)")
    parser.add_argument("--seed", type=int, default=0, help="planner and env seed (default: 0)")
    parser.add_argument("--keep", metavar="DIR", help="keep the node logs and MCAP episode logs of every run in DIR")
    parser.add_argument("--quick", action="store_true", help=f"smoke-test budget: {QUICK_SECONDS:g} s per run")
    parser.add_argument("--table", metavar="JSON", help="print the BENCHMARKS.md table of a saved run and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    seconds = args.seconds or (QUICK_SECONDS if args.quick else DEFAULT_SECONDS)
    warmup = args.warmup if args.warmup is not None else (QUICK_WARMUP if args.quick else DEFAULT_WARMUP)
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        parser.error(f"--rates: expected comma-separated numbers of Hz, got {args.rates!r}")
    if not (seconds > 0 and warmup >= 0 and all(0 < r <= 500 for r in rates)):
        parser.error("--seconds must be > 0, --warmup >= 0, and every rate in (0, 500] Hz")

    from metarl_robot.runtime.bundle import load_bundle

    load_at_start = list(os.getloadavg())
    work = Path(tempfile.mkdtemp(prefix="metarl-node-latency-"))
    try:
        if args.install:
            install = Path(args.install)
        else:
            log("colcon build of ros2_ws")
            install = colcon_build(work / "colcon")
        shipped = load_bundle(SHIPPED_BUNDLE)
        plan = [("shipped_25hz", SHIPPED_BUNDLE)]
        for rate in rates:
            path = derived_bundle(SHIPPED_BUNDLE, work / "bundles" / f"cheap_{rate:g}hz", 1.0 / rate,
                                  CHEAP_PLANNER)
            plan.append((f"cheap_{rate:g}hz", path))

        log(f"raw pyzmq echo at {round(1 / shipped.robot.ctrl_dt)} Hz")
        echo = run_echo(shipped.robot, shipped.robot.ctrl_dt, seconds)
        echo_p = percentiles(echo[warmup:])
        runs = {}
        for name, path in plan:
            bundle = load_bundle(path)
            node_dir, bare_dir = work / name / "node", work / name / "bare"
            node_dir.mkdir(parents=True)
            bare_dir.mkdir(parents=True)
            log(f"{name}: adapt_node against the robot loop")
            record, node = run_robot(bundle.robot, name, node_dir, seconds, args.seed,
                                     lambda ep, p=path, d=node_dir: NodeProcess(install, p, ep, d, args.seed))
            node_block, alone = analyse_node(name, bundle, record, node.episode_log(), warmup, args.seed)
            log(f"{name}: the bare controller against the robot loop")
            record, bare = run_robot(bundle.robot, name, bare_dir, seconds, args.seed,
                                     lambda ep, p=path, d=bare_dir: BareController(p, ep, d, args.seed))
            bare_block = analyse_bare(record, bare.steps(), warmup, alone)
            runs[name] = {
                "bundle": (str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT)
                           else f"{bundle.name} (derived from {SHIPPED_BUNDLE.relative_to(REPO_ROOT)})"),
                "rate_hz": round(1 / bundle.robot.ctrl_dt, 3), "period_ms": bundle.robot.ctrl_dt * 1e3,
                "planner": {k: getattr(bundle.planner, k) for k in ("samples", "horizon", "iterations")},
                "periods": round(seconds / bundle.robot.ctrl_dt), "warmup_periods": warmup,
                "adapter_alone": alone, "node": node_block, "bare_controller": bare_block,
                "node_e2e_over_bare_e2e_ms": {q: node_block["e2e"][f"{q}_ms"] - bare_block["e2e"][f"{q}_ms"]
                                              for q in ("p50", "p99", "p999")},
            }
    finally:
        if args.keep:
            shutil.copytree(work, args.keep, dirs_exist_ok=True, ignore=shutil.ignore_patterns("colcon"))
        shutil.rmtree(work, ignore_errors=True)

    overhead_p99 = {name: r["node"]["overhead_over_adapter"]["p99_ms"] for name, r in runs.items()}
    summary = {
        "target": f"node overhead p99 <= {TARGET_OVERHEAD_P99_MS:g} ms beyond adapter compute",
        "node_overhead_over_adapter_p99_ms": overhead_p99,
        "met": all(v <= TARGET_OVERHEAD_P99_MS for v in overhead_p99.values()),
        "bare_controller_overhead_over_adapter_p99_ms": {
            name: r["bare_controller"]["overhead_over_adapter"]["p99_ms"] for name, r in runs.items()},
        "node_overhead_over_adapter_in_node_p99_ms": {
            name: r["node"]["overhead_over_adapter_in_node"]["p99_ms"] for name, r in runs.items()},
        "node_internal_over_adapter_in_node_p99_ms": {
            name: r["node"]["internal_over_adapter_in_node"]["p99_ms"] for name, r in runs.items()},
        "echo_rtt_p50_ms": echo_p["p50_ms"], "echo_rtt_p99_ms": echo_p["p99_ms"],
    }
    import onnxruntime
    import zmq

    doc = {
        "benchmark": "node_latency", "seconds_per_run": seconds, "warmup_periods": warmup, "seed": args.seed,
        "machine": {"cpus": os.cpu_count(), "affinity": sorted(os.sched_getaffinity(0)),
                    "loadavg_at_start": load_at_start, "loadavg_at_end": list(os.getloadavg()),
                    "platform": platform.platform(),
                    "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                    "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version()},
        "summary": summary, "runs": runs,
        "echo": {"rate_hz": round(1 / shipped.robot.ctrl_dt, 3), "rtt": echo_p,
                 "frames": "state-sized out, command-sized back, sockets with the link's options"},
        "notes": [
            "all times CLOCK_MONOTONIC: the robot's stamps, the node's MCAP log and this script share it",
            "nothing pinned: the node, the robot loop and the echo are scheduled by the OS on a shared machine",
            "node.overhead_over_adapter pairs each step's e2e with the same step's adapter replayed alone (same "
            "seed and inputs: node.adapter_replay.max_abs_action_diff 0 shows the work was identical), paced at "
            "the run's rate, after the run: a slower adapter inside the node counts as node overhead",
            "bare_controller.overhead_over_adapter pairs each step's e2e with the compute time the bare "
            "controller measured itself on that step (link + a minimal loop); compute_in_*_over_alone_ms say how "
            "much slower the adapter ran inside each controller than alone (same work: planner cost does not "
            "depend on the state)",
            "node.adapter_replay.repeat_abs_diff: |first - second| replay time of the same step, the noise floor "
            "of any per-step pairing on this machine",
            "node.*_in_node and node.node_compute_logged pair each step with the compute times the node logged for "
            "that step (no replay): internal_over_adapter_in_node is the node's own overhead (safety layer, "
            "command frame, bookkeeping), overhead_over_adapter_in_node adds both link hops",
            "node.self_reported_last_500_steps: the node's own /diagnostics (last message in its MCAP log)",
            "late_commands arrived after their period ended (the robot applied the previous command that period)",
            f"cheap_* rows: derived bundle with the shipped graphs, robot period 1/rate, planner {CHEAP_PLANNER}: the "
            "shipped planner (~20 ms per step) cannot run at 50 or 100 Hz; the MuJoCo env still steps 40 ms of "
            "simulated time per period (timing, not control quality)",
        ],
    }
    json.dump(doc, sys.stdout, indent=2, allow_nan=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
