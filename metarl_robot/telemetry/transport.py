"""ZeroMQ sockets of a telemetry link: endpoints, socket options, optional CURVE security.

Three sockets per link, all bound by the robot (it is the fixed address) and connected by the
controller:

============  ================  =====================  ==========================================
 endpoint      robot side        controller side        options (why)
============  ================  =====================  ==========================================
 state         PUB  (bind)       SUB (connect)          CONFLATE=1 on both: only the newest state is
                                                        ever queued (no stale backlog)
 command       SUB  (bind)       PUB (connect)          CONFLATE=1 on both: only the newest command;
                                                        never blocks the controller; dropped, never
                                                        queued, while the robot is away
 handshake     REP  (bind)       REQ (connect)          request/reply; the controller drops and
                                                        rebuilds its REQ after a timeout
============  ================  =====================  ==========================================

Every socket has LINGER=0 (nothing is sent late after close) and receiving sockets a
MAXMSGSIZE of :data:`RECV_MAX_BYTES`, so a runaway peer cannot make us buffer huge messages.
With CURVE, the robot is the CURVE server on all three sockets and authorises controllers by
their public keys (``zmq.auth.thread.ThreadAuthenticator``); see :mod:`metarl_robot.telemetry.keys`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from metarl_robot.telemetry.protocol import MAX_FRAME_BYTES

DEFAULT_HOST = "127.0.0.1"
"""Loopback: a link leaves the machine only when asked to (and then should use CURVE)."""
DEFAULT_PORT_BASE = 47100
"""state = base, command = base + 1, handshake = base + 2."""
RECV_MAX_BYTES = 4 * MAX_FRAME_BYTES
"""ZMQ_MAXMSGSIZE of receiving sockets: larger messages drop the connection; frames between
MAX_FRAME_BYTES and this are received and rejected (and counted) as ``too_long``."""

ROBOT_SECRET_FILE = "robot.key_secret"
ROBOT_PUBLIC_FILE = "robot.key"
CONTROLLER_SECRET_FILE = "controller.key_secret"
CONTROLLER_PUBLIC_FILE = "controller.key"
AUTHORIZED_DIR = "authorized_clients"
KEYGEN_HINT = "generate keys with `python -m metarl_robot.telemetry.keys <dir>` (see docs/telemetry.md)"


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


def latest_only_sub(context: zmq.Context) -> zmq.Socket:
    """A SUB that keeps only the newest message (CONFLATE) and subscribes to everything, so bad frames
    reach the decoder and are counted instead of being filtered out unseen."""
    sock = _socket(context, zmq.SUB, receives=True)
    sock.setsockopt(zmq.CONFLATE, 1)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    return sock


def latest_only_pub(context: zmq.Context) -> zmq.Socket:
    """A PUB whose send queue per peer holds only the newest message (CONFLATE): in a burst the newest frame
    replaces the queued one, where SNDHWM=1 alone would drop the newest. It never queues for an absent peer."""
    sock = _socket(context, zmq.PUB, receives=False)
    sock.setsockopt(zmq.SNDHWM, 1)  # ignored under CONFLATE; kept so a libzmq without PUB CONFLATE still bounds it
    sock.setsockopt(zmq.CONFLATE, 1)
    return sock


def robot_sockets(context: zmq.Context, endpoints: Endpoints,
                  curve: CurveServerKeys | None = None) -> tuple[zmq.Socket, zmq.Socket, zmq.Socket, Endpoints]:
    """Bind the robot's state PUB, command SUB and handshake REP; returns them and the bound endpoints."""
    state = latest_only_pub(context)
    command = latest_only_sub(context)
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


def controller_sockets(context: zmq.Context, endpoints: Endpoints,
                       curve: CurveClientKeys | None = None) -> tuple[zmq.Socket, zmq.Socket]:
    """Connect the controller's state SUB and command PUB (the REQ is made per handshake)."""
    state = latest_only_sub(context)
    command = latest_only_pub(context)
    for sock, address in ((state, endpoints.state), (command, endpoints.command)):
        if curve is not None:
            make_curve_client(sock, curve)
        sock.connect(address)
    return state, command


def handshake_socket(context: zmq.Context, endpoints: Endpoints, curve: CurveClientKeys | None = None) -> zmq.Socket:
    """A fresh REQ connected to the robot's handshake endpoint."""
    sock = _socket(context, zmq.REQ, receives=True)
    if curve is not None:
        make_curve_client(sock, curve)
    sock.connect(endpoints.handshake)
    return sock
