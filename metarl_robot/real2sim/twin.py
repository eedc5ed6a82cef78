"""The digital-twin robot: a MuJoCo task-family env behind the real telemetry protocol.

``metarl sim-robot`` (or :class:`DigitalTwin` in-process) runs one robot of a task family in real
time, or ``speed`` times real time, and talks to a controller exactly as hardware would, through
:class:`~metarl_robot.telemetry.robot_client.RobotClient`: handshake, STATE frames every control
period, COMMAND frames in, robot-side watchdog to the safe command. The task's parameters (mass,
friction, ..., target) stay inside the twin, as a real robot's dynamics do; the controller has to
adapt to them. For tests it can inject faults into its telemetry (drop, bursts, freeze, delay,
corrupt, NaN, oversized frames, stop) and it records what it actually applied, so end-to-end tests
can assert safe outcomes measured at the robot: a summary JSON (commands applied, watchdog
engagements and their times, safe-command periods, final state, cart-pole upright) and optionally
a per-period trace (.npz).

Time: everything in the twin runs on its robot clock, which advances ``speed`` robot seconds per
wall second; STATE stamps, command expiry, the watchdog, fault windows and ``duration_s`` are all
robot-clock times. Physics and clock stay locked: period k covers robot time [k, k+1) * ctrl_dt.

Latency model: by default (``apply_on_arrival``) a command that answers the newest state and
arrives before the period ends is applied at once for the whole period — what the policy saw in
training; the link latency itself is not simulated inside the period. With
``apply_on_arrival=False`` the twin, like a fixed-rate motor driver, applies at each period boundary
whatever command is newest (one period of extra delay).

Out-of-family effects (``effects``, ``--effect KIND=VALUE``; docs/out_of_family.md) make the twin wrong in
ways no task of its family is: extra actuator delay, damping or friction on joints the family leaves alone,
observation noise, a sensor bias, another integrator. The controller sees only their consequences, as
with the task; the summary records them.
"""

from __future__ import annotations

import json
import math
import os
import signal
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metarl_robot.envs.out_of_family import OutOfFamily
from metarl_robot.envs.registry import make_env
from metarl_robot.paths import family_names
from metarl_robot.spec.family import SPLITS, TaskFamily, load_family
from metarl_robot.spec.schema import SpecError, parse_yaml
from metarl_robot.telemetry.protocol import HEADER_SIZE, MAX_FRAME_BYTES, STATE_FIXED, reseal
from metarl_robot.telemetry.robot_client import RobotClient
from metarl_robot.telemetry.transport import CurveServerKeys, Endpoints

UPRIGHT_RAD = 0.25
"""Cart-pole: the pole counts as upright within this angle of vertical (about 14 degrees)."""
UPRIGHT_WINDOW_S = 2.0
"""Cart-pole: the summary reports the upright fraction over this last stretch of the run."""


# ---- faults ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FaultConfig:
    """Faults the twin injects into its STATE frames (robot-clock seconds since the twin started)."""

    drop: float = 0.0
    """Probability that a frame is not sent."""
    bursts: tuple[tuple[float, float], ...] = ()
    """(start_s, duration_s) windows in which no frame is sent."""
    freezes: tuple[tuple[float, float], ...] = ()
    """(start_s, duration_s) windows in which the last frame sent before the window is sent again, byte for
    byte (same seq and stamp): a frozen sensor or driver."""
    delay_ms: float = 0.0
    """Every frame leaves this long (robot clock) after it was measured."""
    corrupt: float = 0.0
    """Probability that one byte of a frame is flipped (its CRC no longer matches)."""
    nan: float = 0.0
    """Probability that a frame carries NaN in its observation, correctly framed: a failed sensor. The frame passes the
    decoder (observations may be NaN on the wire) and the controller's safety layer stops on it (``OBS_NONFINITE``)."""
    oversize: float = 0.0
    """Probability that a frame is replaced by MAX_FRAME_BYTES + 64 bytes of noise."""
    stop_after_s: float | None = None
    """Stop publishing after this long; the robot keeps running and applying commands or its safe command."""

    KINDS = ("drop", "burst", "freeze", "delay", "corrupt", "nan", "oversize", "stop")

    @classmethod
    def parse(cls, items: list[str]) -> FaultConfig:
        """``["drop=0.1", "burst=2:0.5", "freeze=3:1", "delay=20", "corrupt=0.05", "nan=0.05",
        "oversize=0.05", "stop=4"]`` (burst/freeze as start_s:duration_s, delay in ms, stop in s)."""
        values: dict[str, Any] = {"bursts": [], "freezes": []}
        for item in items:
            kind, sep, text = item.partition("=")
            kind = kind.strip()
            if not sep or kind not in cls.KINDS:
                raise ValueError(f"--fault {item!r}: expected KIND=VALUE with KIND one of {', '.join(cls.KINDS)} "
                                 "(e.g. drop=0.1, burst=2:0.5, freeze=3:1, delay=20, stop=4)")
            try:
                if kind in ("burst", "freeze"):
                    start, _, duration = text.partition(":")
                    window = (float(start), float(duration))
                    if not (math.isfinite(window[0]) and math.isfinite(window[1]) and window[0] >= 0
                            and window[1] > 0):
                        raise ValueError
                    values["bursts" if kind == "burst" else "freezes"].append(window)
                    continue
                number = float(text)
            except ValueError:
                form = "start_s:duration_s with start >= 0, duration > 0" if kind in ("burst", "freeze") else "a number"
                raise ValueError(f"--fault {item!r}: {kind} needs {form}") from None
            if kind in ("drop", "corrupt", "nan", "oversize"):
                if not 0 <= number <= 1:
                    raise ValueError(f"--fault {item!r}: {kind} is a probability in [0, 1]")
                values[kind] = number
            elif kind == "delay":
                if not (math.isfinite(number) and number >= 0):
                    raise ValueError(f"--fault {item!r}: delay is a number of ms >= 0")
                values["delay_ms"] = number
            else:
                if not (math.isfinite(number) and number >= 0):
                    raise ValueError(f"--fault {item!r}: stop is a number of seconds >= 0")
                values["stop_after_s"] = number
        values["bursts"], values["freezes"] = tuple(values["bursts"]), tuple(values["freezes"])
        return cls(**values)

    def as_dict(self) -> dict:
        return {k: (list(map(list, v)) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def _in_window(t: float, windows: tuple[tuple[float, float], ...]) -> bool:
    return any(start <= t < start + duration for start, duration in windows)


class _FaultInjector:
    """Turns each STATE frame into what actually leaves the twin, counting every fault it applies."""

    def __init__(self, faults: FaultConfig, seed: int) -> None:
        self.faults = faults
        self.rng = np.random.default_rng([seed, 7])
        self.counts = dict.fromkeys(("dropped", "burst_dropped", "frozen", "delayed", "corrupted", "nan",
                                     "oversize", "stopped"), 0)
        self._last_sent: bytes | None = None
        self._last_clean: bytes | None = None  # the newest frame before any freeze window began

    def process(self, data: bytes, t_s: float) -> bytes | None:
        f = self.faults
        if f.stop_after_s is not None and t_s >= f.stop_after_s:
            self.counts["stopped"] += 1
            return None
        if _in_window(t_s, f.bursts):
            self.counts["burst_dropped"] += 1
            return None
        if _in_window(t_s, f.freezes):
            if self._last_clean is None:
                return None
            self.counts["frozen"] += 1
            return self._last_clean
        self._last_clean = data
        if f.drop and self.rng.random() < f.drop:
            self.counts["dropped"] += 1
            return None
        if f.nan and self.rng.random() < f.nan:
            self.counts["nan"] += 1
            patched = bytearray(data)
            offset = HEADER_SIZE + STATE_FIXED.size + 8 * int(self.rng.integers(0, _obs_dim(data)))
            patched[offset:offset + 8] = struct.pack("<d", float("nan"))
            data = reseal(bytes(patched))
        if f.corrupt and self.rng.random() < f.corrupt:
            self.counts["corrupted"] += 1
            patched = bytearray(data)
            patched[int(self.rng.integers(0, len(patched)))] ^= int(self.rng.integers(1, 256))
            data = bytes(patched)
        if f.oversize and self.rng.random() < f.oversize:
            self.counts["oversize"] += 1
            data = self.rng.bytes(MAX_FRAME_BYTES + 64)
        if f.delay_ms:
            self.counts["delayed"] += 1
        return data


def _obs_dim(state_frame: bytes) -> int:
    return struct.unpack_from("<H", state_frame, HEADER_SIZE + 28)[0]


# ---- tasks -------------------------------------------------------------------------------------
def resolve_family(robot: str, family: str | None) -> TaskFamily:
    """The family to simulate: ``family`` if given (it must be for ``robot``), else the only family of ``robot``."""
    if family is not None:
        loaded = load_family(family)
        if loaded.spec.robot != robot:
            raise SpecError(loaded.where, "robot", f"family {loaded.name!r} is for robot {loaded.spec.robot!r}, "
                            f"not --robot {robot!r}")
        return loaded
    candidates = [name for name in family_names() if load_family(name).spec.robot == robot]
    if len(candidates) != 1:
        raise ValueError(f"--family: robot {robot!r} has {len(candidates)} task families ({candidates}); "
                         "name one with --family")
    return load_family(candidates[0])


def resolve_task(task: str | Mapping[str, Any], family: TaskFamily, seed: int) -> dict[str, float]:
    """A validated task from: a mapping; ``nominal``; a split (``train``/``test``) or ``family:split``, drawn
    with ``seed``; inline JSON; or a YAML/JSON file holding the parameters (or ``{task: {...}}``, the
    row format of ``metarl tasks --json``)."""
    if isinstance(task, Mapping):
        return family.validate(task)
    text = str(task).strip()
    allowed = ("give a params YAML/JSON file, inline JSON, 'nominal', a split (train, test) or 'family:split' "
               f"(e.g. {family.name}:test)")
    if text == "nominal":
        return family.nominal()
    name, sep, split = text.rpartition(":")
    if split in SPLITS and (not sep or name == family.name):
        return family.sample(np.random.default_rng(seed), split, 1)[0]
    if sep and split in SPLITS and "/" not in name and not name.endswith((".yaml", ".yml", ".json")):
        raise ValueError(f"--task {text!r}: family {name!r} is not the simulated family {family.name!r}")
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--task: inline JSON does not parse: {exc}") from None
    else:
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"--task {text!r}: no such file; {allowed}")
        data = parse_yaml(path.read_text(), f"--task {text}")  # JSON is YAML
    if isinstance(data, Mapping) and set(data) >= {"task"} and isinstance(data["task"], Mapping):
        data = data["task"]
    if not isinstance(data, Mapping):
        raise ValueError(f"--task {text!r}: expected one mapping of parameter -> value, got {type(data).__name__}")
    return family.validate(data)


# ---- the twin ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TwinConfig:
    """How to run a digital twin."""

    robot: str = "cartpole"
    """Robot name (sim/robots/<robot>)."""
    task: str | Mapping[str, Any] = "nominal"
    """Task spec: see :func:`resolve_task`. Never sent to the controller."""
    family: str | None = None
    """Task family (default: the robot's only family)."""
    seed: int = 0
    """Seeds the task draw, the initial state and the fault injector."""
    speed: float = 1.0
    """Robot seconds per wall second (1 = real time)."""
    watchdog_ms: float | None = None
    """Robot-side command watchdog (robot-clock ms); None: 5 control periods."""
    endpoints: Endpoints = field(default_factory=Endpoints.from_port_base)
    """Addresses to bind (port ``*`` = any free port; see :attr:`DigitalTwin.endpoints`)."""
    faults: FaultConfig = field(default_factory=FaultConfig)
    """Telemetry faults to inject."""
    duration_s: float | None = None
    """Stop after this long (robot clock); None: until stopped."""
    apply_on_arrival: bool = True
    """Apply a command answering the newest state as soon as it arrives (see the module docstring)."""
    curve: CurveServerKeys | None = None
    """CURVE server keys, or None for a plain link."""
    insecure: bool = False
    """Allow a plain link on endpoints other machines can reach (without it, and without ``curve``, binding such an
    endpoint raises :class:`~metarl_robot.telemetry.transport.InsecureEndpointError`)."""
    summary_path: Path | None = None
    """Write the summary JSON here when the twin stops."""
    trace_path: Path | None = None
    """Write the per-period trace (.npz) here when the twin stops."""
    effects: OutOfFamily | None = None
    """Out-of-family effects the simulated robot has (None: none); never sent to the controller."""


class DigitalTwin:
    """A simulated robot speaking the telemetry protocol; use :meth:`run` (blocking) or :meth:`start`/:meth:`stop`."""

    def __init__(self, config: TwinConfig) -> None:
        if not (math.isfinite(config.speed) and config.speed > 0):
            raise ValueError(f"speed must be > 0 (robot seconds per wall second), got {config.speed}")
        if config.duration_s is not None and not config.duration_s > 0:
            raise ValueError(f"duration_s must be > 0 seconds, got {config.duration_s}")
        self.config = config
        """What was asked for."""
        self.family = resolve_family(config.robot, config.family)
        """The simulated task family."""
        self.task = resolve_task(config.task, self.family, config.seed)
        """The hidden task (ground truth for tests; never sent)."""
        self.env = make_env(self.family, **({"effects": config.effects} if config.effects else {})).unwrapped
        """The MuJoCo env (unwrapped: the twin runs one endless episode, not gymnasium's)."""
        self.robot = self.env.robot
        """The robot's interface."""
        self.client = RobotClient(self.robot, config.endpoints, watchdog_ms=config.watchdog_ms, curve=config.curve,
                                  clock=self._clock, clock_rate=config.speed, insecure=config.insecure)
        """The robot side of the link (its counters are part of the summary)."""
        self.endpoints: Endpoints | None = None
        """The bound addresses, once started."""
        self._wall0 = time.monotonic_ns()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._summary: dict | None = None
        self._faults = _FaultInjector(config.faults, config.seed)
        self._trace: dict[str, list] = {k: [] for k in ("t", "obs", "true_obs", "applied", "sent", "safe",
                                                        "command_seq", "reward")}
        self._engagements: list[dict] = []
        self._safe_runs: list[dict] = []
        self._physics_resets = 0
        self._overruns = 0
        self._first_command_s: float | None = None

    def _clock(self) -> int:
        """Robot clock (ns): the wall monotonic clock, running ``speed`` times as fast from the twin's creation."""
        now = time.monotonic_ns()
        return self._wall0 + int((now - self._wall0) * self.config.speed)

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self, timeout_s: float = 30.0) -> Endpoints:
        """Run in a background thread; returns the bound endpoints once the twin is ready."""
        if self._thread is not None:
            raise RuntimeError("DigitalTwin already started")
        self._thread = threading.Thread(target=self._run_guarded, name="metarl-twin", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"digital twin not ready after {timeout_s} s")
        if self._error is not None:
            raise self._error
        return self.endpoints

    def stop(self, timeout_s: float = 30.0) -> dict:
        """Stop (if running), wait for the loop to end and return the summary."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                raise TimeoutError(f"digital twin did not stop within {timeout_s} s")
        if self._error is not None:
            raise self._error
        return self._summary if self._summary is not None else {}

    def request_stop(self) -> None:
        """Ask the loop to end after the current period (signal-handler safe)."""
        self._stop.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for a started twin to finish on its own (duration); True if it did."""
        if self._thread is None:
            return True
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def _run_guarded(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # surfaced by start()/stop() in the caller's thread
            self._error = exc
            self._ready.set()

    # ---- the loop ------------------------------------------------------------------------------
    def run(self, on_ready: Callable[[Endpoints], None] | None = None) -> dict:
        """Bind, then simulate until ``duration_s`` or :meth:`request_stop`; returns the summary."""
        cfg, env, client = self.config, self.env, self.client
        period_ns = round(self.robot.ctrl_dt * 1e9)
        self.endpoints = client.start()
        wall_start = time.monotonic()
        k = 0
        try:
            obs, _ = env.reset(seed=cfg.seed, options={"task": self.task})
            t0 = self._clock()
            self._ready.set()
            if on_ready is not None:
                on_ready(self.endpoints)
            pending: deque[tuple[int, bytes]] = deque()
            self._publish(obs, None, t0, t0, pending)
            while not self._stop.is_set():
                if cfg.duration_s is not None and (k + 1) * self.robot.ctrl_dt > cfg.duration_s + 1e-9:
                    break
                period_end = t0 + (k + 1) * period_ns
                if self._clock() > period_end:
                    self._overruns += 1
                if cfg.apply_on_arrival:
                    self._wait(period_end, pending, answering=client.state_seq)
                decision = client.current_action()
                obs, reward, diverged, _, info = env.step(decision.action)
                self._record(k, decision, info, obs, reward)
                if diverged:
                    self._physics_resets += 1
                    obs, _ = env.reset(options={"task": self.task})
                self._wait(period_end, pending)
                k += 1
                self._publish(obs, self._trace["applied"][-1], t0, self._clock(), pending)
        finally:
            client.close()
            self._summary = self._make_summary(k, time.monotonic() - wall_start)
            self._write_outputs()
        return self._summary

    def _publish(self, obs, applied, t0: int, now: int, pending: deque) -> None:
        if not np.isfinite(obs).all():
            return  # the env reports divergence; the next period publishes the reset state
        _, data = self.client.make_state(obs, applied, stamp_ns=now)
        out = self._faults.process(data, (now - t0) / 1e9)
        if out is None:
            return
        due = now + int(self.config.faults.delay_ms * 1e6)
        pending.append((due, out))
        self._flush_due(pending)

    def _flush_due(self, pending: deque) -> None:
        now = self._clock()
        while pending and pending[0][0] <= now:
            self.client.publish_raw(pending.popleft()[1])

    def _wait(self, until_ns: int, pending: deque, answering: int | None = None) -> None:
        """Serve the sockets until ``until_ns`` (or, with ``answering``, until a command answers that
        state), sending delayed frames when they fall due."""
        while not self._stop.is_set():
            self._flush_due(pending)
            wake = min(until_ns, pending[0][0]) if pending else until_ns
            if answering is not None:
                if self.client.wait_for_command(wake, answering_seq=answering):
                    return
            else:
                self.client.serve_until(wake)
            if self._clock() >= until_ns:
                return

    # ---- records -------------------------------------------------------------------------------
    def _record(self, k: int, decision, info: dict, obs: np.ndarray, reward: float) -> None:
        t_s = k * self.robot.ctrl_dt
        tr = self._trace
        was_safe = tr["safe"][-1] if tr["safe"] else None
        tr["t"].append(t_s)
        tr["obs"].append(np.asarray(obs, dtype=np.float64))  # what is published
        tr["true_obs"].append(np.asarray(info.get("true_obs", obs), dtype=np.float64))  # the robot's true state
        tr["applied"].append(np.asarray(info["applied_action"], dtype=np.float64))
        tr["sent"].append(np.asarray(info["sent_action"], dtype=np.float64))
        tr["safe"].append(decision.safe)
        tr["command_seq"].append(decision.command_seq)
        tr["reward"].append(float(reward))
        if not decision.safe and self._first_command_s is None:
            self._first_command_s = t_s
        if decision.safe and was_safe is False:
            received = self.client.last_command_received_ns
            gap = None if received is None else (decision.stamp_ns - received) / 1e6
            self._engagements.append({"t_s": t_s, "reason": decision.reason, "ms_since_last_command": gap})
        if decision.safe and (was_safe is not True or self._safe_runs[-1]["reason"] != decision.reason):
            self._safe_runs.append({"start_s": t_s, "end_s": t_s + self.robot.ctrl_dt, "reason": decision.reason})
        elif decision.safe:
            self._safe_runs[-1]["end_s"] = t_s + self.robot.ctrl_dt

    def _make_summary(self, periods: int, wall_s: float) -> dict:
        robot, tr = self.robot, self._trace
        counters = self.client.counters
        final_obs = tr["true_obs"][-1] if tr["true_obs"] else None
        final: dict[str, Any] = {"obs": None, "upright": None, "upright_fraction_last_2s": None}
        if final_obs is not None:
            final["obs"] = {f.name: final_obs[s].tolist() if f.size > 1 else float(final_obs[s][0])
                            for f, s in ((f, robot.obs_slices[f.name]) for f in robot.measured_fields)}
            if "pole_angle" in robot.obs_slices:
                angles = np.array([o[robot.obs_slices["pole_angle"]][0] for o in tr["true_obs"]])
                upright = np.cos(angles) > math.cos(UPRIGHT_RAD)
                last = max(1, round(UPRIGHT_WINDOW_S / robot.ctrl_dt))
                final["upright"] = bool(upright[-1])
                final["upright_fraction_last_2s"] = float(upright[-last:].mean())
        return {
            "robot": robot.name, "family": self.family.name, "task": self.task,
            "task_ood": self.family.is_ood(self.task), "seed": self.config.seed, "speed": self.config.speed,
            "watchdog_ms": self.client.watchdog_ms, "apply_on_arrival": self.config.apply_on_arrival,
            "endpoints": self.endpoints.as_dict() if self.endpoints else None,
            "faults": self.config.faults.as_dict(), "fault_counts": dict(self._faults.counts),
            "out_of_family": None if self.config.effects is None else self.config.effects.record(),
            "periods": periods, "robot_time_s": periods * robot.ctrl_dt, "wall_time_s": round(wall_s, 3),
            "overruns": self._overruns,
            "states_made": self.client.state_seq, "frames_sent": counters.raw_frames_published,
            "commands": counters.commands.as_dict(),
            "handshakes": {"accepted": counters.handshakes_accepted, "refused": counters.handshakes_refused,
                           "last_refusal": counters.last_refusal},
            "periods_commanded": int(sum(not s for s in tr["safe"])), "periods_safe": int(sum(tr["safe"])),
            "first_command_s": self._first_command_s,
            "watchdog": {"engagements": len(self._engagements), "events": self._engagements},
            "safe_periods": self._safe_runs,
            "return": float(sum(tr["reward"])), "physics_resets": self._physics_resets, "final": final,
        }

    def _write_outputs(self) -> None:
        cfg = self.config
        if cfg.summary_path is not None:
            path = Path(cfg.summary_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(self._summary, indent=1) + "\n")
            os.replace(tmp, path)
        if cfg.trace_path is not None:
            tr = self._trace
            dims = (self.robot.obs_dim, self.robot.action_dim)
            path = Path(cfg.trace_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, t=np.array(tr["t"]), obs=np.array(tr["obs"]).reshape(-1, dims[0]),
                     true_obs=np.array(tr["true_obs"]).reshape(-1, dims[0]),
                     applied=np.array(tr["applied"]).reshape(-1, dims[1]),
                     sent=np.array(tr["sent"]).reshape(-1, dims[1]), safe=np.array(tr["safe"], dtype=bool),
                     command_seq=np.array(tr["command_seq"], dtype=np.uint64), reward=np.array(tr["reward"]))


# ---- command line ------------------------------------------------------------------------------
def config_from_args(args) -> TwinConfig:
    """The ``metarl sim-robot`` arguments → a :class:`TwinConfig` (errors name the option)."""
    if args.endpoints and args.port_base is not None:
        raise ValueError("give --endpoints or --port-base, not both")
    if args.endpoints:
        endpoints = Endpoints.parse(args.endpoints)
    else:
        port_base = 47100 if args.port_base is None else args.port_base
        endpoints = Endpoints.from_port_base(args.host, port_base)
    return TwinConfig(
        robot=args.robot, task=args.task, family=args.family, seed=args.seed, speed=args.speed,
        watchdog_ms=args.watchdog_ms, endpoints=endpoints, faults=FaultConfig.parse(args.fault),
        duration_s=args.duration, apply_on_arrival=not args.apply_at_boundary,
        curve=CurveServerKeys.from_dir(args.curve_keys) if args.curve_keys else None, insecure=args.insecure,
        summary_path=Path(args.summary) if args.summary else None, trace_path=Path(args.trace) if args.trace else None,
        effects=OutOfFamily.from_cli(args.effect, args.effects))  # argparse defaults: [] and None


def run_cli(args) -> int:
    """``metarl sim-robot``: run until --duration or SIGINT/SIGTERM, then write the summary.

    Prints one JSON line ``{"event": "ready", "endpoints": {...}, ...}`` on stdout once bound, so a
    parent process can connect to ports picked with ``--port-base 0``; and one ``{"event": "done", ...}``
    line with the outcome at the end. The task stays out of stdout (it is in the summary file).
    """
    twin = DigitalTwin(config_from_args(args))
    if twin.client.unprotected_endpoints:
        print(f"sim-robot: WARNING: --insecure: {', '.join(twin.client.unprotected_endpoints)} can be reached from "
              "other machines without CURVE (unencrypted, and anyone who reaches them can command this robot); use "
              "--curve-keys on a network you do not control", file=sys.stderr, flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: twin.request_stop())

    def ready(endpoints: Endpoints) -> None:
        print(json.dumps({"event": "ready", "endpoints": endpoints.as_dict(), "robot": twin.robot.name,
                          "family": twin.family.name, "interface_sha256": twin.robot.interface_hash,
                          "watchdog_ms": twin.client.watchdog_ms, "speed": twin.config.speed}), flush=True)

    summary = twin.run(on_ready=ready)
    done = {"event": "done", "periods": summary["periods"], "periods_commanded": summary["periods_commanded"],
            "watchdog_engagements": summary["watchdog"]["engagements"], "upright": summary["final"]["upright"],
            "summary": str(twin.config.summary_path) if twin.config.summary_path else None}
    print(json.dumps(done), flush=True)
    print(f"sim-robot: {summary['periods']} periods ({summary['robot_time_s']:.2f} s robot time), "
          f"{summary['periods_commanded']} commanded, {summary['periods_safe']} safe, "
          f"{summary['watchdog']['engagements']} watchdog engagement(s)", file=sys.stderr)
    return 0
