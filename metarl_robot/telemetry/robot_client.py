"""The robot side of a telemetry link, for a hardware integrator to wrap around a motor driver.

:class:`RobotClient` binds the three sockets, answers handshakes, publishes STATE frames, takes
in COMMAND frames and decides, every control period, what the motors get: the newest valid
command, or robot.yaml's safe command when there is none, when it expired, or when no fresh valid
command arrived for ``watchdog_ms`` (the robot-side command watchdog). Everything runs in the
caller's thread (no background threads): call :meth:`RobotClient.current_action` (or
:meth:`RobotClient.service`) at least once per control period. A typical driver loop::

    client = RobotClient(load_robot("cartpole"), Endpoints.from_port_base("0.0.0.0"), watchdog_ms=200,
                         curve=CurveServerKeys.from_dir("keys/"))   # off loopback: CURVE, or insecure=True
    client.start()
    while running:
        decision = client.current_action()        # newest valid command, or the safe command
        driver.write(decision.action)
        sleep_until_next_period()
        client.publish_state(driver.read())       # carries the action applied in the period that ended

numpy + pyzmq only: this module runs on a robot computer.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import zmq

from metarl_robot.spec.robot import RobotSpec
from metarl_robot.telemetry.protocol import (
    MAX_MESSAGE_BYTES,
    MAX_NAME_BYTES,
    PROTOCOL_VERSION,
    CommandFrame,
    DecodeStats,
    FrameDecoder,
    FrameError,
    Hello,
    MsgType,
    StateFrame,
    Welcome,
    check_text,
    decode,
    encode_state,
    encode_welcome,
    printable_ascii,
)
from metarl_robot.telemetry.transport import (
    CurveServerKeys,
    Endpoints,
    drain,
    robot_sockets,
    start_authenticator,
    unprotected_endpoints,
)

DEFAULT_WATCHDOG_PERIODS = 5
"""Default command watchdog, in control periods of the robot (200 ms for the 25 Hz cart-pole)."""


def default_watchdog_ms(robot: RobotSpec) -> float:
    return DEFAULT_WATCHDOG_PERIODS * robot.ctrl_dt * 1000.0


@dataclass(frozen=True)
class CommandDecision:
    """What the motors get for the coming period, and why."""

    action: np.ndarray
    """float64 action in robot.yaml order."""
    safe: bool
    """True when ``action`` is robot.yaml's safe command."""
    reason: str
    """``command`` (a valid controller command), or why the safe command: ``no_command`` (none since
    the last handshake), ``expired`` (past the command's expiry) or ``watchdog`` (none fresh for watchdog_ms)."""
    command_seq: int
    """seq of the applied COMMAND; 0 for the safe command."""
    answers_seq: int
    """The STATE seq the applied command answered; 0 for the safe command."""
    stamp_ns: int
    """Robot clock when decided."""


@dataclass
class RobotCounters:
    """What the robot side did, for diagnostics and tests."""

    commands: DecodeStats = field(default_factory=DecodeStats)
    """COMMAND frames: accepted, and rejected per reason (decode faults, foreign session, old seq, expired,
    out of range)."""
    handshakes_accepted: int = 0
    """HELLOs answered with an accepted WELCOME (each starts a new session)."""
    handshakes_refused: int = 0
    """HELLOs refused (version, interface hash or malformed)."""
    states_published: int = 0
    """STATE frames handed to the PUB socket by publish_state."""
    raw_frames_published: int = 0
    """Frames handed to the PUB socket by publish_raw (fault injection)."""
    periods_commanded: int = 0
    """Decisions that applied a controller command."""
    periods_safe: int = 0
    """Decisions that applied the safe command."""
    watchdog_engagements: int = 0
    """Switches from applying commands to the safe command (watchdog, expiry or a new handshake)."""
    last_engagement_ns: int | None = None
    """Robot clock of the latest such switch."""
    last_refusal: str = ""
    """The message of the latest refused handshake."""

    def as_dict(self) -> dict:
        return {"commands": self.commands.as_dict(), "handshakes_accepted": self.handshakes_accepted,
                "handshakes_refused": self.handshakes_refused, "states_published": self.states_published,
                "raw_frames_published": self.raw_frames_published, "periods_commanded": self.periods_commanded,
                "periods_safe": self.periods_safe, "watchdog_engagements": self.watchdog_engagements,
                "last_engagement_ns": self.last_engagement_ns, "last_refusal": self.last_refusal}


class RobotClient:
    """Robot end of a telemetry link: handshake server, state publisher, command receiver with a watchdog."""

    def __init__(self, robot: RobotSpec, endpoints: Endpoints | None = None, *, watchdog_ms: float | None = None,
                 curve: CurveServerKeys | None = None, clock: Callable[[], int] = time.monotonic_ns,
                 clock_rate: float = 1.0, insecure: bool = False) -> None:
        # Every WELCOME carries the name: refuse it now, by the encoder's own rule, not on the first handshake.
        check_text("robot name", robot.name, 1, MAX_NAME_BYTES)
        self.robot = robot
        """The robot's interface (robot.yaml)."""
        self.requested_endpoints = endpoints or Endpoints.from_port_base()
        """Addresses to bind (``tcp://host:*`` picks a free port)."""
        self.insecure = insecure
        """Allow binding a plain (no CURVE) endpoint that is not loopback; without it that raises
        :class:`~metarl_robot.telemetry.transport.InsecureEndpointError` here, before anything binds."""
        self.unprotected_endpoints = unprotected_endpoints(self.requested_endpoints, curve=curve is not None,
                                                           insecure=insecure)
        """The endpoints reachable from other machines without CURVE (only ever non-empty with ``insecure=True``)."""
        self.watchdog_ms = default_watchdog_ms(robot) if watchdog_ms is None else float(watchdog_ms)
        """No fresh valid command for this long (robot clock) → safe command."""
        if not (np.isfinite(self.watchdog_ms) and 0 < self.watchdog_ms < 2**32):
            raise ValueError(f"watchdog_ms must be > 0 and finite, got {watchdog_ms}")
        self.curve = curve
        """CURVE server keys, or None for a plain (loopback / trusted network) link."""
        self.clock = clock
        """Robot monotonic clock in ns: stamps, expiry and the watchdog all use it."""
        if not clock_rate > 0:
            raise ValueError(f"clock_rate must be > 0, got {clock_rate}")
        self.clock_rate = float(clock_rate)
        """Robot-clock seconds per wall-clock second (1 on hardware; the twin's --speed)."""
        self.counters = RobotCounters()
        """What happened so far."""
        self.session = 0
        """Session of the armed controller (0: none armed yet)."""
        self.endpoints: Endpoints | None = None
        """The bound addresses (after :meth:`start`)."""
        self._watchdog_ns = int(self.watchdog_ms * 1e6)
        self._decoder = FrameDecoder(MsgType.COMMAND, robot.obs_dim, robot.action_dim, self.counters.commands)
        self._low, self._high = robot.action_low, robot.action_high
        self._safe = robot.safe_action.astype(np.float64)
        self._latest: CommandFrame | None = None
        self._latest_received_ns = 0
        self._last_command_seq = 0
        self._accepted_total = 0
        self._state_seq = 0
        self._last_decision: CommandDecision | None = None
        self._context: zmq.Context | None = None
        self._auth = None
        self._state_sock = self._command_sock = self._handshake_sock = None
        self._poller: zmq.Poller | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Endpoints:
        """Bind the sockets (and start CURVE authentication); returns the bound endpoints."""
        if self._context is not None:
            raise RuntimeError("RobotClient already started")
        self._context = zmq.Context()
        try:
            if self.curve is not None:
                self._auth = start_authenticator(self._context, self.curve)
            self._state_sock, self._command_sock, self._handshake_sock, self.endpoints = robot_sockets(
                self._context, self.requested_endpoints, self.curve, insecure=self.insecure)
        except BaseException:
            self.close()
            raise
        self._poller = zmq.Poller()
        self._poller.register(self._command_sock, zmq.POLLIN)
        self._poller.register(self._handshake_sock, zmq.POLLIN)
        return self.endpoints

    def close(self) -> None:
        """Close the sockets; safe to call twice. (The motors' last word is the caller's business.)"""
        for sock in (self._state_sock, self._command_sock, self._handshake_sock):
            if sock is not None:
                sock.close(linger=0)
        self._state_sock = self._command_sock = self._handshake_sock = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._context is not None:
            self._context.term()
            self._context = None

    def __enter__(self) -> RobotClient:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def armed(self) -> bool:
        """True once a controller completed a handshake."""
        return self.session != 0

    @property
    def last_decision(self) -> CommandDecision | None:
        """The latest :meth:`current_action` result."""
        return self._last_decision

    @property
    def last_command_received_ns(self) -> int | None:
        """Robot clock when the newest valid command arrived (None: none since the last handshake)."""
        return self._latest_received_ns if self._latest is not None else None

    @property
    def state_seq(self) -> int:
        """seq of the newest STATE frame made (0: none yet)."""
        return self._state_seq

    # ---- the control period --------------------------------------------------------------------
    def service(self) -> None:
        """Answer pending handshakes and take in pending commands, without blocking.

        Every queued command is checked, oldest first, and each valid one replaces the held command, so the
        newest valid command wins and a bad frame never displaces a good one. (A controller whose command was
        over ZMQ_MAXMSGSIZE has its connection dropped by libzmq; its PUB reconnects by itself.)
        """
        self._require_started()
        while self._handshake_sock.poll(0):
            # Every part of a request must be read before REP may reply (libzmq refuses with EFSM otherwise); a
            # multi-part request is not a frame and gets a refusal.
            self._answer(self._handshake_sock.recv_multipart())
        drain(self._command_sock, self._take_command)

    def current_action(self) -> CommandDecision:
        """Service the sockets, then decide what the motors get now (the watchdog lives here)."""
        self.service()
        now = self.clock()
        latest = self._latest
        if latest is None:
            decision = self._safe_decision("no_command", now)
        elif now >= latest.expires_ns:
            decision = self._safe_decision("expired", now)
        elif now - self._latest_received_ns > self._watchdog_ns:
            decision = self._safe_decision("watchdog", now)
        else:
            decision = CommandDecision(latest.action.copy(), False, "command", latest.seq, latest.answers_seq, now)
        previous = self._last_decision
        if decision.safe:
            self.counters.periods_safe += 1
            if previous is not None and not previous.safe:
                self.counters.watchdog_engagements += 1
                self.counters.last_engagement_ns = now
        else:
            self.counters.periods_commanded += 1
        self._last_decision = decision
        return decision

    def wait_for_command(self, until_ns: int, answering_seq: int = 0) -> bool:
        """Block (servicing handshakes) until a new valid command answering state ``answering_seq`` or later
        arrives (True) or the robot clock reaches ``until_ns`` (False)."""
        accepted_before = self._accepted_total
        while True:
            self.service()
            latest = self._latest
            if self._accepted_total > accepted_before and latest is not None and latest.answers_seq >= answering_seq:
                return True
            if not self._poll_until(until_ns):
                return False

    def serve_until(self, until_ns: int) -> None:
        """Block until the robot clock reaches ``until_ns``, answering handshakes and taking in commands."""
        while True:
            self.service()
            if not self._poll_until(until_ns):
                return

    def make_state(self, obs, applied_action=None, *, stamp_ns: int | None = None) -> tuple[StateFrame, bytes]:
        """The next STATE frame and its bytes, without sending (for drivers that send frames themselves,
        and for fault injection); :meth:`publish_state` is this plus the send.

        ``applied_action`` defaults to the last decision's action (pass what the motors really got if the
        driver changed it); the frame also says whether that was the safe command and which command it
        was. Raises ValueError for a wrong-size observation or a non-finite applied action (no sequence number is
        used up). NaN or Inf in ``obs`` is sent as it is: a failed sensor, which the controller's safety layer
        answers with the safe command in that period (``OBS_NONFINITE``, naming the fields).
        """
        self._require_started()
        decision = self._last_decision
        if applied_action is None and decision is not None:
            applied_action = decision.action
        if applied_action is not None:
            applied_action = np.asarray(applied_action, dtype=np.float64)
            if applied_action.shape != (self.robot.action_dim,):
                raise ValueError(f"applied_action must have shape ({self.robot.action_dim},), "
                                 f"got {applied_action.shape}")
        obs = np.asarray(obs, dtype=np.float64)
        if obs.shape != (self.robot.obs_dim,):
            fields = [f.name for f in self.robot.measured_fields]
            raise ValueError(f"obs must have shape ({self.robot.obs_dim},) for fields {fields}, got {obs.shape}")
        safe = decision is not None and decision.safe and applied_action is not None
        frame = StateFrame(
            seq=self._state_seq + 1, stamp_ns=self.clock() if stamp_ns is None else stamp_ns, obs=obs,
            applied_action=applied_action, session=self.session, safe=safe,
            applied_command_seq=0 if decision is None or decision.safe else decision.command_seq)
        data = encode_state(frame)
        self._state_seq = frame.seq
        return frame, data

    def publish_state(self, obs, applied_action=None, *, stamp_ns: int | None = None) -> StateFrame:
        """Build (see :meth:`make_state`) and publish the next STATE frame."""
        frame, data = self.make_state(obs, applied_action, stamp_ns=stamp_ns)
        self._send(data)
        self.counters.states_published += 1
        return frame

    def publish_raw(self, data: bytes) -> None:
        """Send already-encoded bytes on the state socket (fault injection and tests only)."""
        self._require_started()
        self._send(data)
        self.counters.raw_frames_published += 1

    # ---- internals -----------------------------------------------------------------------------
    def _require_started(self) -> None:
        if self._state_sock is None:
            raise RuntimeError("RobotClient is not started (call start() first, or use it as a context manager)")

    def _send(self, data: bytes) -> None:
        # PUB drops at its high-water mark instead of raising; latest-state semantics want exactly that.
        with contextlib.suppress(zmq.Again):
            self._state_sock.send(data, zmq.NOBLOCK)

    def _poll_until(self, until_ns: int) -> bool:
        """Wait for socket activity until ``until_ns``; False once the deadline has passed."""
        remaining_ns = until_ns - self.clock()
        if remaining_ns <= 0:
            return False
        timeout_ms = max(1, min(50, int(remaining_ns / self.clock_rate / 1e6)))
        self._poller.poll(timeout_ms)
        return True

    def _safe_decision(self, reason: str, now: int) -> CommandDecision:
        return CommandDecision(self._safe.copy(), True, reason, 0, 0, now)

    def _take_command(self, data: bytes | list[bytes]) -> CommandFrame | None:
        return self._decoder.decode(data, check=self._check_command)

    def _check_command(self, command: CommandFrame) -> FrameError | None:
        if self.session == 0 or command.session != self.session:
            return FrameError("foreign_session", f"command session {command.session}, robot's is {self.session} "
                              "(the controller must complete a handshake first)")
        if command.seq <= self._last_command_seq:
            return FrameError("old_seq", f"command seq {command.seq} <= last accepted {self._last_command_seq}")
        now = self.clock()
        if now >= command.expires_ns:
            return FrameError("expired", f"command expired {(now - command.expires_ns) / 1e6:.1f} ms ago")
        outside = (command.action < self._low) | (command.action > self._high)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            a = self.robot.action[i]
            return FrameError("out_of_range", f"action {a.name} = {command.action[i]:g} outside "
                              f"[{a.low:g}, {a.high:g}]")
        self._latest = command
        self._latest_received_ns = now
        self._last_command_seq = command.seq
        self._accepted_total += 1
        return None

    def _answer(self, parts: list[bytes]) -> None:
        try:
            reply = self._welcome_for(decode(parts, expect=MsgType.HELLO))
        except FrameError as exc:
            if exc.reason == "version":
                message = (f"protocol version mismatch: the controller speaks v{exc.version}, this robot "
                           f"v{PROTOCOL_VERSION}; update one side")
            else:
                message = f"malformed HELLO: {exc.detail}"
            reply = self._refusal(message)
        if reply.accepted:
            self.counters.handshakes_accepted += 1
        else:
            self.counters.handshakes_refused += 1
            self.counters.last_refusal = reply.message
        self._handshake_sock.send(encode_welcome(reply))

    def _welcome_for(self, hello: Hello) -> Welcome:
        robot = self.robot
        if hello.interface_hash != robot.interface_hash:
            diffs = [f"{k}: controller {mine!r}, robot {theirs!r}" for k, mine, theirs in (
                ("name", hello.robot_name, robot.name), ("obs_dim", hello.obs_dim, robot.obs_dim),
                ("action_dim", hello.action_dim, robot.action_dim), ("ctrl_dt", hello.ctrl_dt, robot.ctrl_dt))
                if mine != theirs]
            return self._refusal(
                f"robot.yaml interface mismatch: the controller was built for {hello.robot_name!r} with interface "
                f"sha256 {hello.interface_hash}, this robot {robot.name!r} has sha256 {robot.interface_hash}"
                + (f" ({'; '.join(diffs)})" if diffs else "")
                + ". Both sides must load the same robot.yaml (field order, scales, limits, control period, safe "
                "command); `metarl robot <name>` prints the hash.")
        session = self.session
        while session in (0, self.session):
            session = secrets.randbits(32)
        self.session = session
        # A new controller starts from scratch: nothing the previous one sent may be applied.
        self._latest = None
        self._last_command_seq = 0
        return Welcome(accepted=True, session=session, watchdog_ms=round(self.watchdog_ms),
                       robot_stamp_ns=max(0, self.clock()), robot_name=robot.name,
                       interface_hash=robot.interface_hash, obs_dim=robot.obs_dim, action_dim=robot.action_dim,
                       ctrl_dt=robot.ctrl_dt)

    def _refusal(self, message: str) -> Welcome:
        robot = self.robot
        return Welcome(accepted=False, session=0, watchdog_ms=round(self.watchdog_ms),
                       robot_stamp_ns=max(0, self.clock()), robot_name=robot.name,
                       interface_hash=robot.interface_hash, obs_dim=robot.obs_dim, action_dim=robot.action_dim,
                       ctrl_dt=robot.ctrl_dt, message=_fit(message))


def _fit(message: str) -> str:
    """A refusal message the protocol can carry: printable ASCII (a decode error may quote what the peer sent) within
    the length limit (they are short; this guards odd input)."""
    message = printable_ascii(message)
    if len(message) <= MAX_MESSAGE_BYTES:
        return message
    return message[:MAX_MESSAGE_BYTES - 3] + "..."
