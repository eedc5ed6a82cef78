"""ZeroMQ sockets of a telemetry link: endpoints, socket options, optional CURVE security, link healing.

Three sockets per link, all bound by the robot (it is the fixed address) and connected by the
controller:

============  ================  =====================  ==========================================
 endpoint      robot side        controller side        options (why)
============  ================  =====================  ==========================================
 state         PUB  (bind)       SUB (connect)          PUB: CONFLATE=1, only its newest state is
                                                        queued. SUB: a bounded queue (RCVHWM), every
                                                        frame validated, the newest valid one kept
 command       SUB  (bind)       PUB (connect)          the same, the other way round; the PUB never
                                                        blocks the controller and drops, never
                                                        queues, while the robot is away
 handshake     REP  (bind)       REQ (connect)          request/reply; the controller drops and
                                                        rebuilds its REQ after a timeout
============  ================  =====================  ==========================================

Every socket has LINGER=0 (nothing is sent late after close) and receiving sockets a
MAXMSGSIZE of :data:`RECV_MAX_BYTES`, so a runaway peer cannot make us buffer huge messages.
The receiving SUBs do not CONFLATE: libzmq would keep the newest frame before anything validated it,
so one garbage frame could displace a valid one. They queue at most :data:`RECV_QUEUE_FRAMES` frames
instead, and :func:`drain` hands every queued frame to the decoder so the newest *valid* one is kept.
:class:`HealingSub` is the controller's state SUB: a socket monitor notices the connection that libzmq
drops for good on a protocol error (a message over MAXMSGSIZE) and the socket is rebuilt.
With CURVE, the robot is the CURVE server on all three sockets and authorises controllers by
their public keys (``zmq.auth.thread.ThreadAuthenticator``); see :mod:`metarl_robot.telemetry.keys`.

Secure by default: binding or connecting a ``tcp://`` endpoint whose host is not loopback (127.0.0.0/8, ::1,
``localhost``) without CURVE keys raises :class:`InsecureEndpointError`, unless the caller passes
``insecure=True`` (then a warning is logged once per endpoint). ``ipc://`` and ``inproc://`` never leave the machine.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from metarl_robot.telemetry.protocol import MAX_FRAME_BYTES

DEFAULT_HOST = "127.0.0.1"
"""Loopback: a link leaves the machine only when asked to (and then should use CURVE)."""
DEFAULT_PORT_BASE = 47100
"""state = base, command = base + 1, handshake = base + 2."""
RECV_MAX_BYTES = 4 * MAX_FRAME_BYTES
"""ZMQ_MAXMSGSIZE of receiving sockets: larger messages drop the connection (the controller counts it as
``oversized`` and rebuilds its state socket); frames between MAX_FRAME_BYTES and this are received and
rejected (and counted) as ``too_long``."""
RECV_QUEUE_FRAMES = 64
"""ZMQ_RCVHWM of the receiving SUBs: frames libzmq queues for a reader that has not read them yet. Up to this
many, every frame is validated and the newest valid one is kept, so garbage never displaces a valid frame. When
the queue is full, libzmq holds newer frames back in TCP buffers behind it; the controller then drops the
backlog (rebuilds its SUB) rather than hand out old states (:class:`HealingSub`)."""
HEAL_GRACE_S = 0.02
"""A dropped connection that libzmq does not start reconnecting within this time is taken for one it gave up on
(a protocol error: in practice a message over MAXMSGSIZE) and the SUB is rebuilt. libzmq reports its own reconnect
attempt within microseconds of the drop; the margin is for a busy machine."""
HANDSHAKE_RETRY_S = 1.0
"""After a failed ZeroMQ/CURVE handshake (libzmq does not retry those either), rebuild the SUB this much later:
often enough that a robot whose keys were fixed is found again, seldom enough not to hammer it."""

ROBOT_SECRET_FILE = "robot.key_secret"
ROBOT_PUBLIC_FILE = "robot.key"
CONTROLLER_SECRET_FILE = "controller.key_secret"
CONTROLLER_PUBLIC_FILE = "controller.key"
AUTHORIZED_DIR = "authorized_clients"
KEYGEN_HINT = "generate keys with `python -m metarl_robot.telemetry.keys <dir>` (see docs/telemetry.md)"
LOCAL_TRANSPORTS = ("ipc", "inproc")
"""ZeroMQ transports that never leave the machine."""
LOOPBACK_NAMES = ("localhost",)
"""Host names taken for loopback without resolving them (besides the addresses in 127.0.0.0/8 and ::1)."""

_log = logging.getLogger(__name__)
_warned_insecure: set[str] = set()


@dataclass(frozen=True)
class Endpoints:
    """ZeroMQ addresses of one link's three sockets (the robot binds them, the controller connects)."""

    state: str
    """STATE frames, robot PUB → controller SUB, e.g. ``tcp://127.0.0.1:47100``."""
    command: str
    """COMMAND frames, controller PUB → robot SUB."""
    handshake: str
    """HELLO/WELCOME, controller REQ → robot REP."""

    @classmethod
    def from_port_base(cls, host: str = DEFAULT_HOST, port_base: int = DEFAULT_PORT_BASE) -> Endpoints:
        """``tcp://host:base``, ``base+1``, ``base+2``; ``port_base=0`` lets the robot pick free ports
        (read the bound ones back from ``RobotClient.endpoints``)."""
        if port_base == 0:
            return cls(*(f"tcp://{host}:*" for _ in range(3)))
        if not 1 <= port_base <= 65533:
            raise ValueError(f"port_base must be 0 (any free ports) or 1..65533, got {port_base}")
        return cls(*(f"tcp://{host}:{port_base + i}" for i in range(3)))

    @classmethod
    def ipc(cls, directory: str | Path) -> Endpoints:
        """Unix-domain sockets in ``directory`` (same machine only; no ports to pick)."""
        d = Path(directory)
        return cls(f"ipc://{d / 'state'}", f"ipc://{d / 'command'}", f"ipc://{d / 'handshake'}")

    @classmethod
    def parse(cls, text: str) -> Endpoints:
        """``state=URL,command=URL,handshake=URL`` (any order) or three URLs in that order, comma-separated."""
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if len(parts) != 3:
            raise ValueError(f"endpoints: expected three comma-separated addresses (state, command, handshake), "
                             f"got {text!r}")
        if all("=" in p and p.split("=", 1)[0] in ("state", "command", "handshake") for p in parts):
            named = dict(p.split("=", 1) for p in parts)
            if len(named) != 3:
                raise ValueError(f"endpoints: each of state, command, handshake exactly once, got {text!r}")
            return cls(**named)
        for p in parts:
            if "://" not in p:
                raise ValueError(f"endpoints: {p!r} is not a ZeroMQ address like tcp://127.0.0.1:47100")
        return cls(*parts)

    def as_dict(self) -> dict[str, str]:
        return {"state": self.state, "command": self.command, "handshake": self.handshake}


# ---- secure by default ----------------------------------------------------------------------------
class InsecureEndpointError(ValueError):
    """A telemetry endpoint that leaves the machine, without CURVE keys and without an explicit ``insecure=True``."""


def _tcp_host(address: str) -> str:
    rest = address.split("://", 1)[1]
    rest = rest.rsplit(";", 1)[-1]  # a connect address may name a source first: tcp://SOURCE;DESTINATION
    host = rest.rpartition(":")[0] if ":" in rest else rest
    return host.strip("[]")


def leaves_machine(address: str) -> bool:
    """True unless ``address`` is ``ipc://``, ``inproc://`` or ``tcp://`` to a loopback host (127.0.0.0/8, ::1,
    ``localhost``). Anything unrecognised (a wildcard ``*``, an interface name, another transport) counts as
    leaving: the check errs on the side of asking for CURVE."""
    transport = address.split("://", 1)[0].lower() if "://" in address else ""
    if transport in LOCAL_TRANSPORTS:
        return False
    if transport != "tcp":
        return True
    host = _tcp_host(address)
    if host.lower() in LOOPBACK_NAMES:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return True  # a host name, an interface name or '*': may face a network
    ip = getattr(ip, "ipv4_mapped", None) or ip  # ::ffff:127.0.0.1 is loopback too
    return not ip.is_loopback


def check_endpoint_security(address: str, *, curve: bool, insecure: bool, action: str = "use") -> bool:
    """Refuse (:class:`InsecureEndpointError`) a plain link that leaves the machine unless ``insecure``; returns True
    when ``address`` is used unprotected off the machine (``insecure`` given), which is then logged once as a
    warning. ``action`` ("bind", "connect") is for the message."""
    if curve or not leaves_machine(address):
        return False
    if not insecure:
        raise InsecureEndpointError(
            f"refusing to {action} telemetry endpoint {address} without CURVE: it is not loopback (127.0.0.0/8, ::1, "
            "localhost) or ipc://, so commands and states would cross the network unencrypted and anyone who can "
            "reach it could command the robot. Either give CURVE keys (robot: --curve-keys DIR / CurveServerKeys; "
            "controller: CurveClientKeys; docs/telemetry.md, section 'CURVE: authentication and encryption'; "
            f"{KEYGEN_HINT}), or, on a network you trust, say so explicitly: insecure=True "
            "(`metarl sim-robot --insecure`)")
    if address not in _warned_insecure:
        _warned_insecure.add(address)
        _log.warning("telemetry endpoint %s leaves this machine without CURVE (insecure=True): unencrypted and "
                     "unauthenticated", address)
    return True


def unprotected_endpoints(endpoints: Endpoints, *, curve: bool, insecure: bool, action: str = "use") -> list[str]:
    """The endpoints of ``endpoints`` that leave the machine without CURVE (for a warning in diagnostics); raises
    :class:`InsecureEndpointError` for the first one unless ``insecure`` (``action`` as for
    :func:`check_endpoint_security`)."""
    return [a for a in endpoints.as_dict().values()
            if check_endpoint_security(a, curve=curve, insecure=insecure, action=action)]


# ---- CURVE -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CurveServerKeys:
    """Robot side of CURVE: its secret key and the public keys of the controllers it accepts."""

    secret_key_file: Path
    """zmq certificate with the robot's secret key (``robot.key_secret``)."""
    authorized_clients_dir: Path
    """Folder of controller public-key certificates (``*.key``) allowed to connect."""

    @classmethod
    def from_dir(cls, key_dir: str | Path) -> CurveServerKeys:
        """The layout written by :func:`metarl_robot.telemetry.keys.generate_keys`."""
        d = Path(key_dir)
        return cls(d / ROBOT_SECRET_FILE, d / AUTHORIZED_DIR)


@dataclass(frozen=True)
class CurveClientKeys:
    """Controller side of CURVE: its own secret key and the robot's public key."""

    secret_key_file: Path
    """zmq certificate with the controller's secret key (``controller.key_secret``)."""
    server_public_key_file: Path
    """zmq certificate with the robot's public key (``robot.key``)."""

    @classmethod
    def from_dir(cls, key_dir: str | Path) -> CurveClientKeys:
        d = Path(key_dir)
        return cls(d / CONTROLLER_SECRET_FILE, d / ROBOT_PUBLIC_FILE)


def _load(path: Path, need_secret: bool) -> tuple[bytes, bytes | None]:
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq was built without CURVE support (zmq.has('curve') is False)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"CURVE key file {path} not found; {KEYGEN_HINT}")
    try:
        public, secret = zmq.auth.load_certificate(os.fspath(path))
    except (ValueError, OSError) as exc:
        raise ValueError(f"CURVE key file {path} is not a zmq certificate: {exc}") from exc
    if need_secret and not secret:
        raise ValueError(f"CURVE key file {path} holds no secret key (give the *.key_secret file); {KEYGEN_HINT}")
    return public, secret


def check_server_keys(keys: CurveServerKeys) -> None:
    """Fail early, naming the file, if the robot's keys are unusable."""
    _load(keys.secret_key_file, need_secret=True)
    folder = Path(keys.authorized_clients_dir)
    if not folder.is_dir() or not any(folder.glob("*.key")):
        raise FileNotFoundError(f"CURVE authorised-clients folder {folder} is missing or holds no *.key "
                                f"(copy each controller's public .key there); {KEYGEN_HINT}")


def start_authenticator(context: zmq.Context, keys: CurveServerKeys) -> ThreadAuthenticator:
    """Start the ZAP handler of ``context``: only controllers whose public key is authorised may connect."""
    check_server_keys(keys)
    auth = ThreadAuthenticator(context)
    auth.start()
    auth.configure_curve(domain="*", location=os.fspath(keys.authorized_clients_dir))
    return auth


def make_curve_server(sock: zmq.Socket, keys: CurveServerKeys) -> None:
    public, secret = _load(keys.secret_key_file, need_secret=True)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def make_curve_client(sock: zmq.Socket, keys: CurveClientKeys) -> None:
    public, secret = _load(keys.secret_key_file, need_secret=True)
    server_public, _ = _load(keys.server_public_key_file, need_secret=False)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public


# ---- sockets -----------------------------------------------------------------------------------
def _socket(context: zmq.Context, kind: int, *, receives: bool) -> zmq.Socket:
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if receives:
        sock.setsockopt(zmq.MAXMSGSIZE, RECV_MAX_BYTES)
    return sock


def bounded_sub(context: zmq.Context) -> zmq.Socket:
    """A SUB that queues at most :data:`RECV_QUEUE_FRAMES` frames and subscribes to everything, so bad frames
    reach the decoder and are counted instead of being filtered out unseen. No CONFLATE: libzmq would keep the
    newest frame before anything validated it (read it with :func:`drain`, which keeps the newest valid one)."""
    sock = _socket(context, zmq.SUB, receives=True)
    sock.setsockopt(zmq.RCVHWM, RECV_QUEUE_FRAMES)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    return sock


def latest_only_pub(context: zmq.Context) -> zmq.Socket:
    """A PUB whose send queue per peer holds only the newest message (CONFLATE): in a burst the newest frame
    replaces the queued one, where SNDHWM=1 alone would drop the newest. It never queues for an absent peer."""
    sock = _socket(context, zmq.PUB, receives=False)
    sock.setsockopt(zmq.SNDHWM, 1)  # ignored under CONFLATE; kept so a libzmq without PUB CONFLATE still bounds it
    sock.setsockopt(zmq.CONFLATE, 1)
    return sock


T = TypeVar("T")


def drain(sock: zmq.Socket, take: Callable[[bytes | list[bytes]], T | None],
          limit: int | None = None) -> tuple[T | None, int]:
    """Hand every message waiting on ``sock`` to ``take`` (which validates and counts it, and returns the message
    or None), oldest first, without blocking; stop after ``limit`` messages if given. Returns the newest message
    ``take`` returned and how many messages were read: validate first, then keep the newest.

    A single-part message is handed over as its bytes, a multi-part one as the list of its parts, whole: a frame is
    one single-part message, and reading parts one by one would take the first part of a multi-part message for a
    frame (the decoder rejects the list as ``length``)."""
    newest: T | None = None
    count = 0
    while limit is None or count < limit:
        try:
            parts = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            break
        count += 1
        message = take(parts[0] if len(parts) == 1 else parts)
        if message is not None:
            newest = message
    return newest, count


def _connected(sock: zmq.Socket, address: str, curve: CurveClientKeys | None, insecure: bool) -> zmq.Socket:
    try:
        check_endpoint_security(address, curve=curve is not None, insecure=insecure, action="connect")
        if curve is not None:
            make_curve_client(sock, curve)
        sock.connect(address)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def robot_sockets(context: zmq.Context, endpoints: Endpoints, curve: CurveServerKeys | None = None, *,
                  insecure: bool = False) -> tuple[zmq.Socket, zmq.Socket, zmq.Socket, Endpoints]:
    """Bind the robot's state PUB, command SUB and handshake REP; returns them and the bound endpoints. An endpoint
    that leaves the machine needs ``curve`` or ``insecure=True`` (:class:`InsecureEndpointError`, nothing bound)."""
    unprotected_endpoints(endpoints, curve=curve is not None, insecure=insecure, action="bind")
    state = latest_only_pub(context)
    command = bounded_sub(context)
    handshake = _socket(context, zmq.REP, receives=True)
    socks = (state, command, handshake)
    try:
        for sock, address in zip(socks, (endpoints.state, endpoints.command, endpoints.handshake), strict=True):
            if curve is not None:
                make_curve_server(sock, curve)
            try:
                sock.bind(address)
            except zmq.ZMQError as exc:
                raise OSError(f"cannot bind telemetry endpoint {address}: {exc} (is another robot or twin "
                              "running there? pick other ports with --port-base)") from exc
    except BaseException:
        for sock in socks:
            sock.close(linger=0)
        raise
    bound = Endpoints(*(s.getsockopt_string(zmq.LAST_ENDPOINT) for s in socks))
    return state, command, handshake, bound


def command_pub(context: zmq.Context, endpoints: Endpoints, curve: CurveClientKeys | None = None, *,
                insecure: bool = False) -> zmq.Socket:
    """The controller's command PUB, connected. (A robot's SUB that drops it on a protocol error leaves this
    connecting side with a closed connection, which libzmq reconnects by itself.)"""
    return _connected(latest_only_pub(context), endpoints.command, curve, insecure)


def controller_sockets(context: zmq.Context, endpoints: Endpoints, curve: CurveClientKeys | None = None, *,
                       insecure: bool = False) -> tuple[zmq.Socket, zmq.Socket]:
    """A plain connected state SUB and command PUB with the link's options (for tools that read frames raw;
    :class:`~metarl_robot.telemetry.controller.ControllerLink` reads its state through a :class:`HealingSub`)."""
    return (_connected(bounded_sub(context), endpoints.state, curve, insecure),
            command_pub(context, endpoints, curve, insecure=insecure))


def handshake_socket(context: zmq.Context, endpoints: Endpoints, curve: CurveClientKeys | None = None, *,
                     insecure: bool = False) -> zmq.Socket:
    """A fresh REQ connected to the robot's handshake endpoint."""
    return _connected(_socket(context, zmq.REQ, receives=True), endpoints.handshake, curve, insecure)


# ---- link healing ------------------------------------------------------------------------------
_HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | \
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
_RECONNECTING = zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_DELAYED | zmq.EVENT_CONNECT_RETRIED
_MONITORED = zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | _HANDSHAKE_FAILED | _RECONNECTING
_MONITOR_IDS = itertools.count(1)
"""Unique inproc names for monitors (pyzmq's default names them by file descriptor, which a rebuilt socket reuses
while the closed one's monitor may still hold the name)."""

RESET_OVERSIZED = "oversized"
"""libzmq dropped the connection after the handshake and gave up on it: a protocol error, in practice a message
over MAXMSGSIZE (the only one a libzmq peer produces)."""
RESET_HANDSHAKE_FAILED = "handshake_failed"
"""The ZeroMQ (CURVE) handshake failed and libzmq gave up (wrong keys, or CURVE on one side only)."""
RESET_BACKLOG = "backlog"
"""The reader fell :data:`RECV_QUEUE_FRAMES` frames behind; the queued and TCP-buffered frames are dropped."""


class HealingSub:
    """The controller's state SUB: a bounded queue read with :func:`drain` (validate, then keep the newest), on a
    connection that heals.

    libzmq drops a connection for good on a protocol error (a message over MAXMSGSIZE): a connecting SUB then
    never reconnects, and the link stays silent however often the robot publishes. A socket monitor sees the drop
    (``DISCONNECTED``); when libzmq does not follow it with its own reconnect attempt within :data:`HEAL_GRACE_S`,
    the socket is closed (linger 0) and a new one connects. A reader that fell :data:`RECV_QUEUE_FRAMES` frames
    behind gets a new socket too, instead of the backlog. :meth:`reset` rebuilds on demand (the controller does
    it on every handshake). ``on_reset(cause)`` hears of every rebuild the link decided itself (``RESET_*``).
    """

    def __init__(self, context: zmq.Context, endpoint: str, *, curve: CurveClientKeys | None = None,
                 on_reset: Callable[[str], None] | None = None, insecure: bool = False) -> None:
        self.endpoint = endpoint
        """The robot's state address."""
        self.curve = curve
        """CURVE client keys, or None for a plain link."""
        self.insecure = insecure
        """Allow a plain link off this machine (see :func:`check_endpoint_security`)."""
        self.on_reset = on_reset
        """Called with the cause of each rebuild the link decided itself (not for :meth:`reset`)."""
        self._context = context
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._poller = zmq.Poller()
        self._dropped_at: float | None = None
        self._drop_cause = RESET_OVERSIZED
        self._handshake_failed = False
        self._build()

    @property
    def socket(self) -> zmq.Socket:
        """The current SUB (it changes when the link heals)."""
        if self._sock is None:
            raise RuntimeError("HealingSub is closed")
        return self._sock

    def receive(self, take: Callable[[bytes | list[bytes]], T | None], timeout_s: float = 0.0) -> T | None:
        """Wait up to ``timeout_s`` for frames; every one goes through ``take`` (oldest first) and the newest one
        ``take`` accepted is returned, or None. Heals the connection on the way (see the class)."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            self._watch()
            newest, count = drain(self.socket, take, limit=RECV_QUEUE_FRAMES - 1)
            if count >= RECV_QUEUE_FRAMES - 1:
                # The queue was full, so libzmq holds newer frames back in TCP buffers behind it: what was read is
                # old, and so would be the next frames. A new connection drops the backlog; the robot's next frame
                # is fresh.
                self._rebuild(RESET_BACKLOG)
                newest = None
            if newest is not None:
                return newest
            now = time.monotonic()
            wait = deadline - now
            if wait <= 0:
                return None
            if self._dropped_at is not None:
                wait = min(wait, max(0.0, self._heal_at() - now))
            self._poller.poll(math.ceil(wait * 1000))

    def reset(self) -> None:
        """Rebuild the socket now (nothing queued survives). A drop still being judged is judged first (waiting
        at most :data:`HEAL_GRACE_S`) so that it is counted."""
        if self._watch():
            return
        while self._dropped_at is not None and self._drop_cause == RESET_OVERSIZED:
            self._monitor.poll(max(0, math.ceil((self._heal_at() - time.monotonic()) * 1000)))
            if self._watch():
                return
        self._rebuild(self._drop_cause if self._dropped_at is not None else None)

    def close(self) -> None:
        """Close the socket and its monitor; safe to call twice."""
        if self._sock is not None:
            self._poller.unregister(self._sock)
            self._poller.unregister(self._monitor)
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._sock.close(linger=0)
        self._sock = self._monitor = None

    # ---- internals -----------------------------------------------------------------------------
    def _build(self) -> None:
        sock = bounded_sub(self._context)
        try:
            # Watch before connecting, so no event of the new connection is missed.
            monitor = sock.get_monitor_socket(_MONITORED, addr=f"inproc://metarl-telemetry-monitor-"
                                                                f"{os.getpid()}-{next(_MONITOR_IDS)}")
        except BaseException:
            sock.close(linger=0)
            raise
        try:
            _connected(sock, self.endpoint, self.curve, self.insecure)
        except BaseException:
            monitor.close(linger=0)
            raise
        self._sock, self._monitor = sock, monitor
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(monitor, zmq.POLLIN)
        self._dropped_at, self._handshake_failed = None, False

    def _rebuild(self, cause: str | None) -> None:
        self.close()
        self._build()
        if cause is not None and self.on_reset is not None:
            self.on_reset(cause)

    def _heal_at(self) -> float:
        delay = HANDSHAKE_RETRY_S if self._drop_cause == RESET_HANDSHAKE_FAILED else HEAL_GRACE_S
        return self._dropped_at + delay

    def _watch(self) -> bool:
        """Read the monitor's events; rebuild (and return True) when a drop has gone without libzmq's own
        reconnect for too long."""
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                break
            if event == zmq.EVENT_DISCONNECTED:
                self._dropped_at = time.monotonic()
                self._drop_cause = RESET_HANDSHAKE_FAILED if self._handshake_failed else RESET_OVERSIZED
            elif event & _RECONNECTING:
                self._dropped_at = None  # libzmq reconnects by itself (e.g. the robot restarted): nothing to heal
                if event == zmq.EVENT_CONNECTED:
                    self._handshake_failed = False  # a new connection; its handshake is still to come
            elif event & _HANDSHAKE_FAILED:
                self._handshake_failed = True
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshake_failed = False
        if self._dropped_at is not None and time.monotonic() >= self._heal_at():
            self._rebuild(self._drop_cause)
            return True
        return False
