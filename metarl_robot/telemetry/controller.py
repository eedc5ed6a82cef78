"""The controller side of a telemetry link (used by the ROS 2 node, the bench and the tests).

:class:`ControllerLink` connects to a robot (or its digital twin), checks in a handshake that both
ends load the same robot.yaml, then receives the newest valid STATE frame and sends COMMAND frames that
answer it. It never blocks longer than the timeout it is given, counts every frame it rejects,
refuses to send a command before a successful handshake or for a state from before it, and heals
its state connection when libzmq drops it for good (an oversized frame; see
:class:`~metarl_robot.telemetry.transport.HealingSub`)::

    link = ControllerLink(Endpoints.from_port_base("127.0.0.1"))
    link.connect()
    link.handshake(load_robot("cartpole"))          # raises HandshakeError on any mismatch
    while running:
        state = link.receive_state(timeout_s=0.1)   # newest frame of this session, or None
        if state is not None:
            link.send_command(action_for(state.obs), answers=state)
        if link.session_lost:                        # the robot restarted or another controller took over
            link.handshake(robot)
    link.close()

numpy + pyzmq only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zmq

from metarl_robot.spec.robot import RobotSpec
from metarl_robot.telemetry.protocol import (
    PROTOCOL_VERSION,
    CommandFrame,
    DecodeStats,
    FrameDecoder,
    FrameError,
    Hello,
    MsgType,
    StateFrame,
    Welcome,
    decode,
    encode_command,
    encode_hello,
)
from metarl_robot.telemetry.transport import (
    RESET_OVERSIZED,
    CurveClientKeys,
    Endpoints,
    HealingSub,
    command_pub,
    handshake_socket,
    unprotected_endpoints,
)

DEFAULT_VALIDITY_PERIODS = 3
"""Default command validity, in robot control periods counted from the answered state's stamp."""


class HandshakeError(RuntimeError):
    """The link cannot be armed: no answer, another protocol version, or another robot.yaml interface."""

    def __init__(self, message: str, welcome: Welcome | None = None) -> None:
        super().__init__(message)
        self.welcome = welcome
        """The robot's reply, when there was one."""


class ControllerLink:
    """Controller end of a telemetry link: handshake client, latest-state receiver, command sender."""

    def __init__(self, endpoints: Endpoints, *, curve: CurveClientKeys | None = None,
                 command_validity_s: float | None = None, insecure: bool = False) -> None:
        self.endpoints = endpoints
        """The robot's addresses."""
        self.curve = curve
        """CURVE client keys, or None for a plain link."""
        self.insecure = insecure
        """Allow a plain (no CURVE) link to a robot that is not on this machine. Without it, an endpoint off
        loopback and without ``curve`` raises :class:`~metarl_robot.telemetry.transport.InsecureEndpointError`
        here, before anything connects."""
        self.unprotected_endpoints = unprotected_endpoints(endpoints, curve=curve is not None, insecure=insecure)
        """The endpoints that leave this machine without CURVE (only ever non-empty with ``insecure=True``): what a
        diagnostics report should warn about."""
        if command_validity_s is not None and not (np.isfinite(command_validity_s) and command_validity_s > 0):
            raise ValueError(f"command_validity_s must be > 0 seconds, got {command_validity_s}")
        self.command_validity_s = command_validity_s
        """Default lifetime of a command after the stamp of the state it answers (None: 3 control periods)."""
        self.stats = DecodeStats()
        """STATE frames: accepted (returned by :meth:`receive_state`), and rejected per reason (decode faults,
        foreign session, ``oversized``: a frame over ZMQ_MAXMSGSIZE that made libzmq drop the connection)."""
        self.link_resets = 0
        """Times the state socket was rebuilt because the link broke or backed up: libzmq gave up on the connection
        (an oversized frame, a failed CURVE handshake) or this reader fell a full queue behind. The rebuild that
        every handshake does is not counted. Survives :meth:`close`."""
        self.welcome: Welcome | None = None
        """The robot's reply to the last successful handshake."""
        self.robot: RobotSpec | None = None
        """The interface armed by the last successful handshake."""
        self.commands_sent = 0
        """COMMAND frames sent since the link was created."""
        self.session_lost = False
        """True once the robot's frames carry another session after our handshake (it restarted, or another
        controller armed it): stop sending (commands would be rejected anyway) and handshake again."""
        self.last_state: StateFrame | None = None
        """The newest accepted STATE frame."""
        self._decoder = FrameDecoder(MsgType.STATE, stats=self.stats)
        self._context: zmq.Context | None = None
        self._state_rx: HealingSub | None = None
        self._command_sock: zmq.Socket | None = None
        self._command_seq = 0
        self._seen_own_session = False

    # ---- lifecycle -----------------------------------------------------------------------------
    def connect(self) -> None:
        """Create and connect the sockets (ZeroMQ connects in the background; the robot may start later)."""
        if self._context is not None:
            raise RuntimeError("ControllerLink already connected (close() or reconnect() first)")
        self._context = zmq.Context()
        try:
            self._state_rx = HealingSub(self._context, self.endpoints.state, curve=self.curve,
                                        on_reset=self._link_reset, insecure=self.insecure)
            self._command_sock = command_pub(self._context, self.endpoints, self.curve, insecure=self.insecure)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the sockets and disarm; safe to call twice. Counters survive."""
        if self._state_rx is not None:
            self._state_rx.close()
        if self._command_sock is not None:
            self._command_sock.close(linger=0)
        self._state_rx = self._command_sock = None
        if self._context is not None:
            self._context.term()
            self._context = None
        self.welcome = None

    def reconnect(self) -> None:
        """Fresh sockets (nothing queued survives); call :meth:`handshake` again before sending."""
        self.close()
        self.connect()

    def __enter__(self) -> ControllerLink:
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def armed(self) -> bool:
        """True after a successful handshake whose session the robot still uses."""
        return self.welcome is not None and not self.session_lost

    @property
    def session(self) -> int:
        return self.welcome.session if self.welcome is not None else 0

    # ---- handshake -----------------------------------------------------------------------------
    def handshake(self, robot: RobotSpec, timeout_s: float = 3.0) -> Welcome:
        """Exchange HELLO/WELCOME; on success the link is armed for ``robot``. Raises :class:`HandshakeError`
        naming both interface hashes on a mismatch, or what to check when the robot does not answer."""
        self._require_connected()
        self.welcome = None
        # A new state socket for every handshake: whatever the old one queued or suffered (a connection libzmq
        # dropped for good) stays behind, and the new one connects while HELLO/WELCOME go back and forth.
        self._state_rx.reset()
        hello = Hello(robot.name, robot.interface_hash, robot.obs_dim, robot.action_dim, robot.ctrl_dt)
        sock = handshake_socket(self._context, self.endpoints, self.curve, insecure=self.insecure)
        try:
            sock.send(encode_hello(hello))
            if not sock.poll(int(timeout_s * 1000)):
                raise HandshakeError(
                    f"no WELCOME from the robot at {self.endpoints.handshake} within {timeout_s:g} s: is the robot "
                    "(or `metarl sim-robot`) running, are the endpoints right"
                    + (", and is this controller's public key in the robot's authorized_clients/ and robot.key the "
                       "robot's public key (CURVE)?" if self.curve is not None else
                       ", and does the robot expect CURVE (then give the controller its keys)?"))
            data = sock.recv()
        finally:
            sock.close(linger=0)  # a REQ that got no reply is stuck; always start the next try fresh
        try:
            welcome = decode(data, expect=MsgType.WELCOME)
        except FrameError as exc:
            if exc.reason == "version":
                raise HandshakeError(f"the robot speaks telemetry protocol v{exc.version}, this controller "
                                     f"v{PROTOCOL_VERSION}; update one side") from exc
            raise HandshakeError(f"the robot's WELCOME is malformed: {exc}") from exc
        if not welcome.accepted:
            raise HandshakeError(f"the robot {welcome.robot_name!r} refused to arm: {welcome.message} "
                                 f"[controller sha256 {robot.interface_hash}, robot sha256 {welcome.interface_hash}]",
                                 welcome)
        if welcome.interface_hash != robot.interface_hash:
            raise HandshakeError(f"the robot {welcome.robot_name!r} accepted but reports interface sha256 "
                                 f"{welcome.interface_hash}, this controller expects {robot.interface_hash} "
                                 f"({robot.name!r}); not arming — check both robot.yaml files", welcome)
        self.welcome = welcome
        self.robot = robot
        self.session_lost = False
        self._seen_own_session = False
        self._command_seq = 0
        self._decoder.obs_dim, self._decoder.action_dim = robot.obs_dim, robot.action_dim
        return welcome

    # ---- state and commands --------------------------------------------------------------------
    def receive_state(self, timeout_s: float = 0.0) -> StateFrame | None:
        """Wait up to ``timeout_s`` for a valid STATE frame; returns the newest one, or None.

        Every queued frame is validated, oldest first, and only then is the newest valid one kept: a
        bad frame never displaces a good one. Bad frames are counted in :attr:`stats` and skipped. After
        a handshake only frames of this link's session are returned; frames of another session are
        counted as ``foreign_session`` (and set :attr:`session_lost` once they must come from a restarted
        or re-armed robot). A frame is returned as sent: judging freshness (seq/stamp advancing) is the
        caller's job. The state connection heals on the way (:attr:`link_resets`).
        """
        self._require_connected()
        frame = self._state_rx.receive(self._validate_state, timeout_s)
        if frame is not None:
            self.stats.accepted += 1  # the frame used; older valid ones drained with it were superseded
            self.last_state = frame
        return frame

    def send_command(self, action, answers: StateFrame, *, valid_for_s: float | None = None) -> CommandFrame:
        """Send ``action`` as the answer to the state ``answers``; it expires on the robot's clock at
        ``answers.stamp_ns + valid_for_s`` (default :attr:`command_validity_s`, else 3 control periods).

        Raises HandshakeError when not armed, ValueError for a state from before the handshake or an
        action of the wrong size, non-finite or outside robot.yaml's limits (the robot would reject it).
        """
        self._require_connected()
        frame = build_command(self.robot, action, answers, armed=self.armed, session=self.session,
                              seq=self._command_seq + 1,
                              valid_for_s=self.command_validity_s if valid_for_s is None else valid_for_s,
                              session_ended="the robot's session changed" if self.session_lost else "")
        self._command_seq = frame.seq
        self._command_sock.send(encode_command(frame), zmq.NOBLOCK)
        self.commands_sent += 1
        return frame

    # ---- internals -----------------------------------------------------------------------------
    def _require_connected(self) -> None:
        if self._context is None:
            raise RuntimeError("ControllerLink is not connected (call connect() first)")

    def _validate_state(self, data: bytes) -> StateFrame | None:
        return self._decoder.validate(data, check=self._check_state)

    def _link_reset(self, cause: str) -> None:
        self.link_resets += 1
        if cause == RESET_OVERSIZED:
            self.stats.reject("oversized")  # libzmq dropped the frame and the connection; the decoder never saw it

    def _check_state(self, frame: StateFrame) -> FrameError | None:
        welcome = self.welcome
        if welcome is None:
            return None  # not armed: any robot's frames may be looked at, none answered
        if frame.session == welcome.session:
            self._seen_own_session = True
            return None
        # A frame of another session published before our WELCOME can still be in flight; one published
        # after it (a later stamp, or after frames of our own session) means the robot lost our session.
        if self._seen_own_session or frame.stamp_ns > welcome.robot_stamp_ns:
            self.session_lost = True
        return FrameError("foreign_session", f"STATE session {frame.session}, this link's is {welcome.session}")


def build_command(robot: RobotSpec | None, action: Any, answers: StateFrame, *, armed: bool, session: int, seq: int,
                  valid_for_s: float | None = None, session_ended: str = "") -> CommandFrame:
    """COMMAND number ``seq`` of a link armed for ``robot`` in ``session``: ``action`` answering the state ``answers``,
    expiring on the robot's clock at ``answers.stamp_ns + valid_for_s`` (default 3 control periods). Every link builds
    its commands here, so that what may be sent is decided in one place, whatever carries it (``robot`` may be None
    only while not armed).

    Raises HandshakeError when not ``armed`` (``session_ended`` says why the session ended, when it did), ValueError
    for a state of another session (from before the handshake), an action :func:`check_action` refuses or a
    validity that is not > 0 seconds.
    """
    if not armed:
        raise HandshakeError("not armed: no command may be sent before a successful handshake"
                             + (f" ({session_ended}: handshake again)" if session_ended else ""))
    if answers.session != session:
        raise ValueError(f"the state answered (seq {answers.seq}) is from session {answers.session}, not this "
                         f"link's {session}: answer only states received after the handshake")
    act = check_action(robot, action)
    if valid_for_s is None:
        # The handshake matched interface hashes, which cover the control period: the robot's period is this one.
        valid_for_s = DEFAULT_VALIDITY_PERIODS * robot.ctrl_dt
    if not (np.isfinite(valid_for_s) and valid_for_s > 0):
        raise ValueError(f"valid_for_s must be > 0 seconds, got {valid_for_s}")
    return CommandFrame(seq=seq, answers_seq=answers.seq, expires_ns=answers.stamp_ns + int(valid_for_s * 1e9),
                        session=session, action=act)


def check_action(robot: RobotSpec, action: Any) -> np.ndarray:
    """``action`` as float64 ``(a,)``; ValueError when its size is wrong, it is not finite or outside robot.yaml's
    limits (the safety layer clamps it first: such a command is a bug, never sent, whatever the link)."""
    act = np.asarray(action, dtype=np.float64)
    if act.shape != (robot.action_dim,):
        raise ValueError(f"action must have shape ({robot.action_dim},) for {[a.name for a in robot.action]}, "
                         f"got {act.shape}")
    if not np.isfinite(act).all():
        raise ValueError(f"action contains NaN or Inf: {act}")
    outside = np.flatnonzero((act < robot.action_low) | (act > robot.action_high))
    if outside.size:
        a = robot.action[int(outside[0])]
        raise ValueError(f"action {a.name} = {act[outside[0]]:g} is outside [{a.low:g}, {a.high:g}] "
                         "(clamp it in the safety layer first; the robot rejects it)")
    return act
