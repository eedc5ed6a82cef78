"""The telemetry wire format: four single-part binary frames with a versioned, checksummed header.

Every frame between the robot (or its digital twin) and the controller is one ZeroMQ message:
a 16-byte header followed by a typed payload, all little-endian with fixed layouts, so a C++
robot driver can implement it from ``docs/telemetry.md`` with ``memcpy`` and ``crc32``.

- ``HELLO``   controller → robot: the controller's view of the interface (robot name, robot.yaml
  interface hash, dimensions, control period).
- ``WELCOME`` robot → controller: the robot's own view, accepted or refused (with a reason), and
  the session id that every later STATE and COMMAND of this link carries.
- ``STATE``   robot → controller: sequence number, robot monotonic stamp, the measured observation
  in robot.yaml field order, and what the motors applied during the period that just ended.
- ``COMMAND`` controller → robot: command sequence number, the state it answers, an expiry stamp
  on the robot's own clock, and the action in robot.yaml action order.

Decoding is strict: size, magic, version, type, payload length, CRC-32, flags, reserved bytes,
dimensions, field ranges, finite floats and printable-ASCII text are all checked, and any failure raises
:class:`FrameError` with a machine-readable ``reason`` (one of :data:`REJECT_REASONS`). Decoding
never raises anything else, whatever the bytes. :class:`DecodeStats` counts accepted frames and
rejections per reason; :class:`FrameDecoder` ties a decoder configuration to its counters.

One exception to "finite floats": a STATE's *observation* may hold NaN or Inf. A robot whose sensor fails
says so in that very period, and the controller's safety layer stops (``OBS_NONFINITE``, naming the
fields) instead of waiting for its stale-telemetry deadline; everything else in the frame (its applied
action, every COMMAND action, ``ctrl_dt``) must be finite.

This module needs only numpy and the standard library (it runs on a robot computer).
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

MAGIC = b"MRLT"
"""First four bytes of every frame (0x4D 0x52 0x4C 0x54)."""
PROTOCOL_VERSION = 1
"""The protocol version this code speaks; a frame with any other version is rejected."""
HEADER = struct.Struct("<4sBBHII")
"""magic, version (u8), type (u8), flags (u16), payload length (u32), CRC-32 (u32): 16 bytes."""
HEADER_SIZE = HEADER.size
MAX_FRAME_BYTES = 65536
"""Largest frame either side accepts (header included); anything longer is rejected unread."""
MAX_DIM = 1024
"""Largest observation or action dimension a frame may declare."""
MAX_NAME_BYTES = 64
"""Longest robot name (bytes) in HELLO/WELCOME."""
MAX_MESSAGE_BYTES = 1024
"""Longest refusal message (bytes) in WELCOME."""
TEXT_BYTES = (0x20, 0x7E)
"""Names and messages are printable ASCII: every byte from space (0x20) to tilde (0x7E). Exactly this, so that a
C++ robot checks the same rule as Python without Unicode tables (robot names are folder names, plain ASCII)."""

STATE_FIXED = struct.Struct("<QqQIHH")
"""seq, stamp_ns, applied_command_seq, session, obs_dim, action_dim: 32 bytes, then the float64s."""
COMMAND_FIXED = struct.Struct("<QQqIHH")
"""seq, answers_seq, expires_ns, session, action_dim, reserved: 32 bytes, then the float64s."""
IDENT_FIXED = struct.Struct("<32sdHHHH")
"""interface hash, ctrl_dt, obs_dim, action_dim, name_len, reserved: 48 bytes, then the name."""
WELCOME_FIXED = struct.Struct("<IIqBBHI")
"""session, watchdog_ms, robot_stamp_ns, accepted, reserved, message_len, reserved: 24 bytes."""

STATE_FLAG_SAFE = 0x0001
"""STATE flag bit 0: the applied action came from the robot's safe command, not from a COMMAND."""


class MsgType(enum.IntEnum):
    """The message type byte of the header."""

    HELLO = 1
    WELCOME = 2
    STATE = 3
    COMMAND = 4


ALLOWED_FLAGS = {MsgType.HELLO: 0, MsgType.WELCOME: 0, MsgType.STATE: STATE_FLAG_SAFE, MsgType.COMMAND: 0}
"""Flag bits each message type may set; any other bit is a decode error."""

FRAME_REASONS: tuple[str, ...] = (
    "too_short", "too_long", "magic", "version", "type", "unexpected_type", "length", "crc", "flags",
    "reserved", "dims", "field", "non_finite", "text",
)
"""Why the decoder rejects a frame (``FrameError.reason``), in the order it checks."""
LINK_REASONS: tuple[str, ...] = ("foreign_session", "old_seq", "expired", "out_of_range")
"""Why a well-formed frame is still not used: another link session, a sequence number that does not
advance, a command past its expiry, an action outside robot.yaml's limits."""
TRANSPORT_REASONS: tuple[str, ...] = ("oversized",)
"""Frames the decoder never saw: ``oversized``, a message over the receiving socket's ZMQ_MAXMSGSIZE, on which
libzmq drops the connection (counted once per dropped connection by the side that notices, the controller)."""
REJECT_REASONS: tuple[str, ...] = FRAME_REASONS + LINK_REASONS + TRANSPORT_REASONS
"""Every reason a :class:`DecodeStats` counts."""


class FrameError(ValueError):
    """A frame that does not decode; ``reason`` is one of :data:`FRAME_REASONS`."""

    def __init__(self, reason: str, detail: str, *, version: int | None = None) -> None:
        super().__init__(f"telemetry frame rejected ({reason}): {detail}")
        self.reason = reason
        """Machine-readable reason code, for counters."""
        self.detail = detail
        """What exactly was wrong, for people."""
        self.version = version
        """The protocol version the frame declared, when the header got that far (for handshake messages)."""


# ---- messages ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StateFrame:
    """One robot state sample (robot → controller)."""

    seq: int
    """Frame sequence number: 1 for the robot's first frame, +1 per frame (u64)."""
    stamp_ns: int
    """Robot monotonic clock when the observation was measured, nanoseconds (i64, >= 0)."""
    obs: np.ndarray
    """Measured observation, float64, robot.yaml ``observation`` order without privileged fields."""
    applied_action: np.ndarray | None = None
    """Action the motors applied during the period that ended at this sample (robot.yaml order), if sent."""
    applied_command_seq: int = 0
    """``seq`` of the COMMAND behind ``applied_action``; 0 when the robot applied its safe command."""
    session: int = 0
    """Link session of the controller that armed the robot (from WELCOME); 0 when none is armed."""
    safe: bool = False
    """True when ``applied_action`` was the robot's safe command (no command, watchdog or expiry)."""


@dataclass(frozen=True)
class CommandFrame:
    """One actuator command (controller → robot)."""

    seq: int
    """Command sequence number: strictly increasing within a session, starting at 1 (u64)."""
    answers_seq: int
    """``seq`` of the STATE this command was computed from (u64, >= 1)."""
    expires_ns: int
    """Robot-clock stamp after which the robot must not apply this command (i64)."""
    session: int
    """Link session from the WELCOME that armed this controller (u32, != 0)."""
    action: np.ndarray
    """float64 action in robot.yaml ``action`` order."""


@dataclass(frozen=True)
class Hello:
    """Handshake request (controller → robot): the interface the controller was built for."""

    robot_name: str
    """robot.yaml ``name``."""
    interface_hash: str
    """robot.yaml interface hash (``RobotSpec.interface_hash``), 64 hex digits."""
    obs_dim: int
    """Measured observation size."""
    action_dim: int
    """Action size."""
    ctrl_dt: float
    """Control period in seconds."""


@dataclass(frozen=True)
class Welcome:
    """Handshake reply (robot → controller): the robot's interface and its verdict."""

    accepted: bool
    """True when the robot armed this controller."""
    session: int
    """Link session id (nonzero) when accepted, 0 when refused."""
    watchdog_ms: int
    """The robot's command watchdog: no fresh valid command for this long → safe command."""
    robot_stamp_ns: int
    """Robot clock when it answered."""
    robot_name: str
    """The robot's robot.yaml ``name``."""
    interface_hash: str
    """The robot's robot.yaml interface hash, 64 hex digits."""
    obs_dim: int
    """The robot's observation size."""
    action_dim: int
    """The robot's action size."""
    ctrl_dt: float
    """The robot's control period in seconds."""
    message: str = ""
    """Why the robot refused (empty when accepted)."""


Message = StateFrame | CommandFrame | Hello | Welcome


# ---- counters ----------------------------------------------------------------------------------
@dataclass
class DecodeStats:
    """Accepted frames and rejections per reason (every reason of ``reasons``, by default the protocol's
    :data:`REJECT_REASONS`, starts at 0; another link, e.g. the node's ros2_control one, gives its own)."""

    accepted: int = 0
    """Frames decoded and used."""
    reasons: tuple[str, ...] = REJECT_REASONS
    """Every reason a frame can be rejected for."""
    rejected: dict[str, int] = field(default_factory=dict)
    """Reason → count."""

    def __post_init__(self) -> None:
        self.rejected = dict.fromkeys(self.reasons, 0) | self.rejected

    def reject(self, reason: str) -> None:
        if reason not in self.rejected:
            raise ValueError(f"unknown reject reason {reason!r}; known: {', '.join(self.reasons)}")
        self.rejected[reason] += 1

    @property
    def total_rejected(self) -> int:
        return sum(self.rejected.values())

    def as_dict(self) -> dict:
        """Plain data for logs and diagnostics: accepted, rejected (non-zero reasons only), total_rejected."""
        return {"accepted": self.accepted, "total_rejected": self.total_rejected,
                "rejected": {k: v for k, v in self.rejected.items() if v}}


# ---- encoding ----------------------------------------------------------------------------------
def _frame(msg_type: MsgType, flags: int, payload: bytes) -> bytes:
    head = struct.pack("<4sBBHI", MAGIC, PROTOCOL_VERSION, int(msg_type), flags, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + struct.pack("<I", crc) + payload


def _check_vector(name: str, values, *, finite: bool = True) -> np.ndarray:
    vec = np.ascontiguousarray(values, dtype="<f8")
    if vec.ndim != 1 or not 1 <= vec.size <= MAX_DIM:
        raise ValueError(f"{name} must be a 1-D vector of 1..{MAX_DIM} values, got shape {vec.shape}")
    if finite and not np.isfinite(vec).all():
        raise ValueError(f"{name} contains NaN or Inf: {vec}; the protocol carries finite values here")
    return vec


def _first_non_text(text: str | bytes) -> int | None:
    """Index of the first character (or byte) of ``text`` outside :data:`TEXT_BYTES`, or None when there is none."""
    lo, hi = TEXT_BYTES
    codes = text if isinstance(text, bytes) else map(ord, text)
    return next((i for i, code in enumerate(codes) if not lo <= code <= hi), None)


def is_protocol_text(text: str) -> bool:
    """True when ``text`` may be sent as a robot name or message: printable ASCII only (:data:`TEXT_BYTES`)."""
    return _first_non_text(text) is None


def printable_ascii(text: str) -> str:
    """``text`` with every character outside printable ASCII written as its Python escape (``\\n``, ``\\xe9``,
    ``\\u2713``): for messages assembled from content a peer sent, which must still encode."""
    return "".join(c if is_protocol_text(c) else ascii(c)[1:-1] for c in text)


def check_text(name: str, text: str, lo: int, hi: int) -> bytes:
    """``text`` as the bytes a frame carries; ValueError unless it is ``lo``..``hi`` printable ASCII characters."""
    if not isinstance(text, str) or not is_protocol_text(text):
        raise ValueError(f"{name} must be printable ASCII (bytes 0x20..0x7e), got {text!r}")
    if not lo <= len(text) <= hi:
        raise ValueError(f"{name} must be {lo}..{hi} bytes, got {len(text)}: {text!r}")
    return text.encode("ascii")


def _check_int(name: str, value: int, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


U32, U64, I64 = 2**32 - 1, 2**64 - 1, 2**63 - 1


def encode_state(frame: StateFrame) -> bytes:
    """A STATE frame; raises ValueError on values the decoder would reject (never emits a bad frame)."""
    obs = _check_vector("obs", frame.obs, finite=False)  # a failed sensor is reported, not hidden (module doc)
    act = None if frame.applied_action is None else _check_vector("applied_action", frame.applied_action)
    if frame.safe and (frame.applied_command_seq != 0 or act is None):
        raise ValueError(f"a SAFE state (the safe command was applied) needs applied_command_seq 0 and the applied "
                         f"action, got applied_command_seq {frame.applied_command_seq!r} and "
                         f"{'no' if act is None else 'an'} applied action")
    fixed = STATE_FIXED.pack(
        _check_int("seq", frame.seq, 1, U64), _check_int("stamp_ns", frame.stamp_ns, 0, I64),
        _check_int("applied_command_seq", frame.applied_command_seq, 0, U64),
        _check_int("session", frame.session, 0, U32), obs.size, 0 if act is None else act.size)
    payload = fixed + obs.tobytes() + (b"" if act is None else act.tobytes())
    return _frame(MsgType.STATE, STATE_FLAG_SAFE if frame.safe else 0, payload)


def encode_command(frame: CommandFrame) -> bytes:
    """A COMMAND frame; raises ValueError on values the decoder would reject."""
    act = _check_vector("action", frame.action)
    fixed = COMMAND_FIXED.pack(
        _check_int("seq", frame.seq, 1, U64), _check_int("answers_seq", frame.answers_seq, 1, U64),
        _check_int("expires_ns", frame.expires_ns, 0, I64), _check_int("session", frame.session, 1, U32),
        act.size, 0)
    return _frame(MsgType.COMMAND, 0, fixed + act.tobytes())


def _ident(name: str, interface_hash: str, obs_dim: int, action_dim: int, ctrl_dt: float) -> bytes:
    name_bytes = check_text("robot name", name, 1, MAX_NAME_BYTES)
    try:
        digest = bytes.fromhex(interface_hash)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise ValueError(f"interface_hash must be 64 hex digits (a sha256), got {interface_hash!r}")
    if not (np.isfinite(ctrl_dt) and ctrl_dt > 0):
        raise ValueError(f"ctrl_dt must be a finite number of seconds > 0, got {ctrl_dt!r}")
    fixed = IDENT_FIXED.pack(digest, float(ctrl_dt), _check_int("obs_dim", obs_dim, 1, MAX_DIM),
                             _check_int("action_dim", action_dim, 1, MAX_DIM), len(name_bytes), 0)
    return fixed + name_bytes


def encode_hello(hello: Hello) -> bytes:
    """A HELLO frame."""
    return _frame(MsgType.HELLO, 0, _ident(hello.robot_name, hello.interface_hash, hello.obs_dim,
                                          hello.action_dim, hello.ctrl_dt))


def encode_welcome(welcome: Welcome) -> bytes:
    """A WELCOME frame; an accepted one needs a nonzero session, a refused one session 0."""
    message = check_text("WELCOME message", welcome.message, 0, MAX_MESSAGE_BYTES)
    lo, hi = (1, U32) if welcome.accepted else (0, 0)
    fixed = WELCOME_FIXED.pack(
        _check_int("session", welcome.session, lo, hi), _check_int("watchdog_ms", welcome.watchdog_ms, 0, U32),
        _check_int("robot_stamp_ns", welcome.robot_stamp_ns, 0, I64), int(bool(welcome.accepted)), 0,
        len(message), 0)
    ident = _ident(welcome.robot_name, welcome.interface_hash, welcome.obs_dim, welcome.action_dim, welcome.ctrl_dt)
    return _frame(MsgType.WELCOME, 0, fixed + ident + message)


def reseal(frame: bytes) -> bytes:
    """``frame`` with its payload length and CRC-32 recomputed: for tests and fault injection that must
    produce frames which pass the checksum but break another rule (real senders never need it)."""
    head = bytearray(frame[:HEADER_SIZE].ljust(HEADER_SIZE, b"\0"))
    payload = bytes(frame[HEADER_SIZE:])
    struct.pack_into("<I", head, 8, len(payload))
    struct.pack_into("<I", head, 12, zlib.crc32(payload, zlib.crc32(bytes(head[:12]))))
    return bytes(head) + payload


def encode(message: Message) -> bytes:
    """Any message → its frame."""
    if isinstance(message, StateFrame):
        return encode_state(message)
    if isinstance(message, CommandFrame):
        return encode_command(message)
    if isinstance(message, Hello):
        return encode_hello(message)
    if isinstance(message, Welcome):
        return encode_welcome(message)
    raise TypeError(f"not a telemetry message: {type(message).__name__}")


# ---- decoding ----------------------------------------------------------------------------------
def peek_type(data: bytes) -> MsgType | None:
    """The declared message type of a frame with a valid magic and version, else None (no other checks)."""
    if len(data) < HEADER_SIZE or data[:4] != MAGIC or data[4] != PROTOCOL_VERSION:
        return None
    try:
        return MsgType(data[5])
    except ValueError:
        return None


def decode(data: bytes | list[bytes], *, expect: MsgType | None = None, obs_dim: int | None = None,
           action_dim: int | None = None) -> Message:
    """Decode one frame, checking everything; raises :class:`FrameError` (and nothing else) on any fault.

    ``data`` is a frame, or the parts of one ZeroMQ message as ``recv_multipart`` returns them: a frame is one
    single-part message, so more than one part is rejected (``length``) before anything else is looked at.

    ``expect`` rejects other message types (``unexpected_type``). ``obs_dim``/``action_dim``, when
    given, are the robot's dimensions: a STATE must carry exactly ``obs_dim`` observations and either
    no applied action or exactly ``action_dim``; a COMMAND exactly ``action_dim`` values.
    """
    try:
        return _decode(data, expect, obs_dim, action_dim)
    except FrameError:
        raise
    except Exception as exc:  # a bug in a check must still end as a counted rejection, never a crash
        raise FrameError("field", f"undecodable ({type(exc).__name__}: {exc})") from exc


def _decode(data: bytes | list[bytes], expect: MsgType | None, obs_dim: int | None,
            action_dim: int | None) -> Message:
    if isinstance(data, list | tuple):
        if len(data) != 1:
            raise FrameError("length", f"a multi-part message ({len(data)} parts); a frame is one single-part message")
        data = data[0]
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FrameError("field", f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    n = len(data)
    if n > MAX_FRAME_BYTES:
        raise FrameError("too_long", f"{n} bytes > the {MAX_FRAME_BYTES}-byte limit")
    if n < HEADER_SIZE:
        raise FrameError("too_short", f"{n} bytes < the {HEADER_SIZE}-byte header")
    magic, version, type_byte, flags, payload_len, crc = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FrameError("magic", f"starts with {magic!r}, expected {MAGIC!r}")
    if version != PROTOCOL_VERSION:
        raise FrameError("version", f"protocol version {version}, this side speaks {PROTOCOL_VERSION}",
                         version=version)
    try:
        msg_type = MsgType(type_byte)
    except ValueError:
        raise FrameError("type", f"unknown message type {type_byte}; known: "
                         + ", ".join(f"{t.value}={t.name}" for t in MsgType)) from None
    if expect is not None and msg_type != expect:
        raise FrameError("unexpected_type", f"got {msg_type.name}, this socket carries {expect.name}")
    if payload_len != n - HEADER_SIZE:
        raise FrameError("length", f"header says {payload_len} payload bytes, frame has {n - HEADER_SIZE}")
    payload = data[HEADER_SIZE:]
    actual_crc = zlib.crc32(payload, zlib.crc32(data[:12]))
    if crc != actual_crc:
        raise FrameError("crc", f"CRC-32 {crc:#010x} in header, {actual_crc:#010x} computed")
    if flags & ~ALLOWED_FLAGS[msg_type]:
        raise FrameError("flags", f"{msg_type.name} flags {flags:#06x} set unknown bits "
                         f"(allowed mask {ALLOWED_FLAGS[msg_type]:#06x})")
    if msg_type == MsgType.STATE:
        return _decode_state(payload, flags, obs_dim, action_dim)
    if msg_type == MsgType.COMMAND:
        return _decode_command(payload, action_dim)
    if msg_type == MsgType.HELLO:
        return _decode_hello(payload)
    return _decode_welcome(payload)


def _need(payload: bytes, size: int, what: str) -> None:
    if len(payload) < size:
        raise FrameError("length", f"{what} payload needs at least {size} bytes, got {len(payload)}")


def _floats(payload: bytes, offset: int, count: int, what: str, *, finite: bool = True) -> np.ndarray:
    values = np.frombuffer(payload, dtype="<f8", count=count, offset=offset).astype(np.float64)
    if finite and not np.isfinite(values).all():
        bad = np.flatnonzero(~np.isfinite(values)).tolist()
        raise FrameError("non_finite", f"{what} has NaN/Inf at index {bad}")
    return values


def _check_dim(name: str, got: int, expected: int | None, allow_zero: bool = False) -> None:
    if allow_zero and got == 0:
        return
    if not 1 <= got <= MAX_DIM:
        raise FrameError("dims", f"{name} {got} is outside 1..{MAX_DIM}")
    if expected is not None and got != expected:
        raise FrameError("dims", f"{name} is {got}, the robot's is {expected}"
                         + (" (or 0 for none)" if allow_zero else ""))


def _decode_state(payload: bytes, flags: int, obs_dim: int | None, action_dim: int | None) -> StateFrame:
    _need(payload, STATE_FIXED.size, "STATE")
    seq, stamp, applied_seq, session, n_obs, n_act = STATE_FIXED.unpack_from(payload)
    _check_dim("obs_dim", n_obs, obs_dim)
    _check_dim("action_dim", n_act, action_dim, allow_zero=True)
    expected = STATE_FIXED.size + 8 * (n_obs + n_act)
    if len(payload) != expected:
        raise FrameError("length", f"STATE with obs_dim={n_obs}, action_dim={n_act} needs {expected} payload bytes, "
                         f"got {len(payload)}")
    if seq == 0:
        raise FrameError("field", "STATE seq is 0 (sequence numbers start at 1)")
    if stamp < 0:
        raise FrameError("field", f"STATE stamp_ns {stamp} is negative")
    safe = bool(flags & STATE_FLAG_SAFE)
    if safe and applied_seq != 0:
        raise FrameError("field", f"STATE flags say the safe command was applied but applied_command_seq={applied_seq}")
    if safe and n_act == 0:
        raise FrameError("field", "STATE flags say the safe command was applied but carry no applied action")
    obs = _floats(payload, STATE_FIXED.size, n_obs, "obs", finite=False)  # the safety layer's to judge
    act = _floats(payload, STATE_FIXED.size + 8 * n_obs, n_act, "applied_action") if n_act else None
    return StateFrame(seq=seq, stamp_ns=stamp, obs=obs, applied_action=act, applied_command_seq=applied_seq,
                      session=session, safe=safe)


def _decode_command(payload: bytes, action_dim: int | None) -> CommandFrame:
    _need(payload, COMMAND_FIXED.size, "COMMAND")
    seq, answers, expires, session, n_act, reserved = COMMAND_FIXED.unpack_from(payload)
    if reserved:
        raise FrameError("reserved", f"COMMAND reserved field is {reserved}, must be 0")
    _check_dim("action_dim", n_act, action_dim)
    expected = COMMAND_FIXED.size + 8 * n_act
    if len(payload) != expected:
        raise FrameError("length", f"COMMAND with action_dim={n_act} needs {expected} payload bytes, "
                         f"got {len(payload)}")
    if seq == 0 or answers == 0:
        raise FrameError("field", f"COMMAND seq={seq}, answers_seq={answers}: both start at 1")
    if expires < 0:
        raise FrameError("field", f"COMMAND expires_ns {expires} is negative")
    if session == 0:
        raise FrameError("field", "COMMAND session is 0 (commands need the session of an accepted handshake)")
    return CommandFrame(seq=seq, answers_seq=answers, expires_ns=expires, session=session,
                        action=_floats(payload, COMMAND_FIXED.size, n_act, "action"))


def _text(raw: bytes, what: str) -> str:
    bad = _first_non_text(raw)
    if bad is not None:
        lo, hi = TEXT_BYTES
        raise FrameError("text", f"{what} has byte {raw[bad]:#04x} at offset {bad}; names and messages are printable "
                         f"ASCII ({lo:#04x}..{hi:#04x})")
    return raw.decode("ascii")


def _decode_ident(payload: bytes, offset: int, what: str) -> tuple[dict, int]:
    _need(payload, offset + IDENT_FIXED.size, what)
    digest, ctrl_dt, n_obs, n_act, name_len, reserved = IDENT_FIXED.unpack_from(payload, offset)
    if reserved:
        raise FrameError("reserved", f"{what} reserved field is {reserved}, must be 0")
    _check_dim("obs_dim", n_obs, None)
    _check_dim("action_dim", n_act, None)
    if not (np.isfinite(ctrl_dt)):
        raise FrameError("non_finite", f"{what} ctrl_dt is {ctrl_dt}")
    if ctrl_dt <= 0:
        raise FrameError("field", f"{what} ctrl_dt {ctrl_dt} must be > 0")
    if not 1 <= name_len <= MAX_NAME_BYTES:
        raise FrameError("text", f"{what} robot name length {name_len} is outside 1..{MAX_NAME_BYTES}")
    start = offset + IDENT_FIXED.size
    _need(payload, start + name_len, what)
    name = _text(payload[start:start + name_len], f"{what} robot name")
    ident = {"robot_name": name, "interface_hash": digest.hex(), "obs_dim": n_obs, "action_dim": n_act,
             "ctrl_dt": ctrl_dt}
    return ident, start + name_len


def _decode_hello(payload: bytes) -> Hello:
    ident, end = _decode_ident(payload, 0, "HELLO")
    if end != len(payload):
        raise FrameError("length", f"HELLO needs {end} payload bytes, got {len(payload)}")
    return Hello(**ident)


def _decode_welcome(payload: bytes) -> Welcome:
    _need(payload, WELCOME_FIXED.size, "WELCOME")
    session, watchdog_ms, stamp, accepted, reserved1, message_len, reserved2 = WELCOME_FIXED.unpack_from(payload)
    if reserved1 or reserved2:
        raise FrameError("reserved", "WELCOME reserved fields must be 0")
    if accepted not in (0, 1):
        raise FrameError("field", f"WELCOME accepted is {accepted}, must be 0 or 1")
    if accepted and session == 0:
        raise FrameError("field", "WELCOME accepts with session 0 (an accepted link needs a nonzero session)")
    if not accepted and session != 0:
        raise FrameError("field", f"WELCOME refuses with session {session} (a refusal carries session 0)")
    if stamp < 0:
        raise FrameError("field", f"WELCOME robot_stamp_ns {stamp} is negative")
    if message_len > MAX_MESSAGE_BYTES:
        raise FrameError("text", f"WELCOME message length {message_len} > {MAX_MESSAGE_BYTES}")
    ident, end = _decode_ident(payload, WELCOME_FIXED.size, "WELCOME")
    if len(payload) != end + message_len:
        raise FrameError("length", f"WELCOME needs {end + message_len} payload bytes, got {len(payload)}")
    message = _text(payload[end:], "WELCOME message") if message_len else ""
    return Welcome(accepted=bool(accepted), session=session, watchdog_ms=watchdog_ms, robot_stamp_ns=stamp,
                   message=message, **ident)


class FrameDecoder:
    """:func:`decode` with fixed expectations and a :class:`DecodeStats` that counts every outcome."""

    def __init__(self, expect: MsgType | None = None, obs_dim: int | None = None, action_dim: int | None = None,
                 stats: DecodeStats | None = None) -> None:
        self.expect = expect
        """Message type this decoder accepts (None: any)."""
        self.obs_dim = obs_dim
        """Required observation size (None: any)."""
        self.action_dim = action_dim
        """Required action size (None: any)."""
        self.stats = stats if stats is not None else DecodeStats()
        """Counters: accepted frames and rejections per reason."""
        self.last_error: FrameError | None = None
        """The most recent rejection, for diagnostics."""

    def decode(self, data: bytes | list[bytes],
               check: Callable[[Message], FrameError | None] | None = None) -> Message | None:
        """The decoded message, or None after counting the rejection (never raises on bad bytes).

        ``check`` sees each well-formed message and returns None to use it, or a :class:`FrameError`
        whose reason is one of :data:`LINK_REASONS` to reject it (counted like a decode failure).
        """
        message = self.validate(data, check)
        if message is not None:
            self.stats.accepted += 1
        return message

    def validate(self, data: bytes | list[bytes],
                 check: Callable[[Message], FrameError | None] | None = None) -> Message | None:
        """:meth:`decode` without counting the message as accepted, for a reader that validates several frames and
        uses only the newest (it counts ``stats.accepted`` for the one it uses). Rejections are counted."""
        try:
            message = decode(data, expect=self.expect, obs_dim=self.obs_dim, action_dim=self.action_dim)
        except FrameError as exc:
            self.stats.reject(exc.reason)
            self.last_error = exc
            return None
        refusal = check(message) if check is not None else None
        if refusal is not None:
            self.stats.reject(refusal.reason)
            self.last_error = refusal
            return None
        return message
