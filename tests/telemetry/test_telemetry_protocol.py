"""The frame codec: round trips, every rejection reason, and fuzzing (no crash; every bad frame counted)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metarl_robot.spec.robot import load_robot
from metarl_robot.telemetry.protocol import (
    FRAME_REASONS,
    HEADER_SIZE,
    MAX_FRAME_BYTES,
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
    encode,
    encode_command,
    encode_state,
    peek_type,
    printable_ascii,
    reseal,
)

ROBOT = load_robot("cartpole")
HASH = ROBOT.interface_hash


def state(**overrides) -> StateFrame:
    values = dict(seq=7, stamp_ns=123_456_789, obs=np.array([0.1, 3.1, -0.2, 4.0]), applied_action=np.array([0.3]),
                  applied_command_seq=6, session=99, safe=False)
    values.update(overrides)
    return StateFrame(**values)


def command(**overrides) -> CommandFrame:
    values = dict(seq=3, answers_seq=7, expires_ns=10**9, session=99, action=np.array([-0.5]))
    values.update(overrides)
    return CommandFrame(**values)


def hello() -> Hello:
    return Hello("cartpole", HASH, 4, 1, 0.04)


def welcome(**overrides) -> Welcome:
    values = dict(accepted=True, session=5, watchdog_ms=200, robot_stamp_ns=42, robot_name="cartpole",
                  interface_hash=HASH, obs_dim=4, action_dim=1, ctrl_dt=0.04, message="")
    values.update(overrides)
    return Welcome(**values)


VALID_MESSAGES = [
    state(), state(applied_action=None, applied_command_seq=0), state(safe=True, applied_command_seq=0, session=0),
    state(obs=np.array([np.nan, 3.1, np.inf, -np.inf])),  # a failed sensor travels, for the safety layer to judge
    command(), hello(), welcome(),
    welcome(accepted=False, session=0, message="robot.yaml interface mismatch: ~ all printable ASCII {} |\\"),
]


def assert_same(a, b) -> None:
    assert type(a) is type(b)
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y, name


@pytest.mark.parametrize("message", VALID_MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip_is_exact_and_canonical(message):
    data = encode(message)
    decoded = decode(data)
    assert_same(decoded, message)
    assert encode(decoded) == data


def test_header_layout_and_checksum():
    data = encode_state(state())
    magic, version, msg_type, flags, length, crc = struct.unpack_from("<4sBBHII", data)
    assert (magic, version, msg_type, flags) == (b"MRLT", PROTOCOL_VERSION, MsgType.STATE, 0)
    assert length == len(data) - HEADER_SIZE == 32 + 8 * 5
    assert crc == zlib.crc32(data[:12] + data[16:])
    assert peek_type(data) is MsgType.STATE


def test_encoders_refuse_what_the_decoder_would_reject():
    with pytest.raises(ValueError, match="NaN or Inf"):
        encode_state(state(applied_action=np.array([np.nan])))
    with pytest.raises(ValueError, match="NaN or Inf"):
        encode_command(command(action=np.array([np.inf])))
    with pytest.raises(ValueError, match="SAFE state"):
        encode_state(state(safe=True, applied_command_seq=6))  # the decoder's "SAFE flag with a command seq"
    with pytest.raises(ValueError, match="SAFE state"):
        encode_state(state(safe=True, applied_command_seq=0, applied_action=None))
    for name in ("cart\npole", "caf\u00e9", "tab\there", "del\x7f", ""):
        with pytest.raises(ValueError, match="robot name"):
            encode(Hello(name, HASH, 4, 1, 0.04))
        with pytest.raises(ValueError, match="robot name"):
            encode(welcome(robot_name=name))
    for message in ("line\nbreak", "unicode \u2713", "nul\x00"):
        with pytest.raises(ValueError, match="WELCOME message must be printable ASCII"):
            encode(welcome(accepted=False, session=0, message=message))
    with pytest.raises(ValueError, match="seq"):
        encode_state(state(seq=0))
    with pytest.raises(ValueError, match="session"):
        encode_command(command(session=0))
    with pytest.raises(ValueError, match="1-D vector"):
        encode_command(command(action=np.zeros((1, 1))))
    with pytest.raises(ValueError, match="interface_hash"):
        encode(Hello("cartpole", "abc", 4, 1, 0.04))
    with pytest.raises(ValueError, match="session"):
        encode(welcome(accepted=False))  # a refusal carries session 0


def _patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return reseal(bytes(out))


STATE_BYTES = encode_state(state())
COMMAND_BYTES = encode_command(command())
WELCOME_BYTES = encode(welcome())
REJECTIONS = {
    "too_long": (b"MRLT" + bytes(MAX_FRAME_BYTES), {}),
    "too_short": (STATE_BYTES[:15], {}),
    "magic": (b"XRLT" + STATE_BYTES[4:], {}),
    "version": (_patch(STATE_BYTES, 4, "<B", 2), {}),
    "type": (_patch(STATE_BYTES, 5, "<B", 9), {}),
    "unexpected_type": (COMMAND_BYTES, {"expect": MsgType.STATE}),
    "length": (STATE_BYTES + b"\0", {}),
    "crc": (STATE_BYTES[:-1] + bytes([STATE_BYTES[-1] ^ 1]), {}),
    "flags": (_patch(COMMAND_BYTES, 6, "<H", 1), {}),
    "reserved": (_patch(COMMAND_BYTES, 16 + 30, "<H", 1), {}),
    "dims": (STATE_BYTES, {"obs_dim": 5}),
    "field": (_patch(STATE_BYTES, 16, "<Q", 0), {}),
    "non_finite": (_patch(STATE_BYTES, 48 + 8 * 4, "<d", float("inf")), {}),  # the applied action
    "text": (_patch(WELCOME_BYTES, 16 + 24 + 48, "<B", 0xFF), {}),
}


def test_every_reason_has_a_witness():
    assert set(REJECTIONS) == set(FRAME_REASONS)


@pytest.mark.parametrize("reason", FRAME_REASONS)
def test_each_rejection_reason(reason):
    data, kwargs = REJECTIONS[reason]
    with pytest.raises(FrameError) as info:
        decode(data, **kwargs)
    assert info.value.reason == reason, info.value
    decoder = FrameDecoder(**kwargs)
    assert decoder.decode(data) is None
    assert decoder.stats.rejected[reason] == 1 and decoder.stats.total_rejected == 1 and decoder.stats.accepted == 0


def test_more_semantic_rejections():
    cases = [
        (_patch(encode_state(state(safe=True, applied_command_seq=0)), 16 + 16, "<Q", 5), "field"),  # SAFE + seq
        (encode_state(state()), "dims", {"action_dim": 2}),
        (_patch(encode(welcome()), 16 + 16, "<B", 2), "field"),  # accepted not 0/1
        (_patch(encode(welcome()), 16, "<I", 0), "field"),  # accepted with session 0
        (_patch(encode(hello()), 16 + 32, "<d", -0.04), "field"),  # ctrl_dt <= 0
        (_patch(encode(hello()), 16 + 32, "<d", float("nan")), "non_finite"),
        (_patch(encode(hello()), 16 + 44, "<H", 0), "text"),  # empty name
        (_patch(encode(hello()), 16 + 40, "<H", 0), "dims"),  # obs_dim 0
        (_patch(encode_command(command()), 16 + 16, "<q", -1), "field"),  # negative expiry
    ]
    for data, reason, *kwargs in cases:
        with pytest.raises(FrameError) as info:
            decode(data, **(kwargs[0] if kwargs else {}))
        assert info.value.reason == reason, info.value


def test_text_is_printable_ascii_exactly():
    name_at = 16 + 48  # HELLO: the name follows the 48-byte identity block
    for byte in (0x00, 0x1F, 0x7F, 0x80, 0xC3, 0xFF):
        with pytest.raises(FrameError) as info:
            decode(_patch(encode(hello()), name_at, "<B", byte))
        assert info.value.reason == "text" and f"{byte:#04x}" in str(info.value)
    for byte in (0x20, 0x7E):
        assert decode(_patch(encode(hello()), name_at, "<B", byte)).robot_name == chr(byte) + "artpole"
    assert printable_ascii("caf\u00e9\n\u2713 ok") == "caf\\xe9\\n\\u2713 ok"


def test_observations_may_be_non_finite_but_nothing_else_may():
    frame = decode(encode_state(state(obs=np.array([0.1, np.nan, np.inf, -np.inf]))), obs_dim=4, action_dim=1)
    assert frame.obs[0] == 0.1 and np.isnan(frame.obs[1]) and np.isposinf(frame.obs[2]) and np.isneginf(frame.obs[3])
    for data, what in ((_patch(STATE_BYTES, 48 + 8 * 4, "<d", float("nan")), "applied_action"),
                       (_patch(COMMAND_BYTES, 48, "<d", float("-inf")), "action"),
                       (_patch(encode(hello()), 16 + 32, "<d", float("inf")), "ctrl_dt")):
        with pytest.raises(FrameError, match=what) as info:
            decode(data)
        assert info.value.reason == "non_finite"


def test_a_multi_part_message_is_not_a_frame():
    assert decode([STATE_BYTES]).seq == 7  # one part: the frame
    for parts in ([STATE_BYTES, b"x"], [STATE_BYTES, STATE_BYTES], []):
        with pytest.raises(FrameError, match="multi-part") as info:
            decode(parts)
        assert info.value.reason == "length"
    decoder = FrameDecoder(MsgType.STATE)
    assert decoder.decode([STATE_BYTES, b""]) is None and decoder.stats.rejected["length"] == 1


def test_version_error_carries_the_version():
    with pytest.raises(FrameError) as info:
        decode(_patch(encode(hello()), 4, "<B", 7))
    assert info.value.version == 7 and "protocol version 7" in str(info.value)


def test_decode_stats_refuses_unknown_reasons():
    with pytest.raises(ValueError, match="unknown reject reason"):
        DecodeStats().reject("weird")


def test_frame_decoder_link_check_counts_the_link_reason():
    decoder = FrameDecoder(MsgType.STATE, obs_dim=4, action_dim=1)
    refusal = FrameError("foreign_session", "not ours")
    assert decoder.decode(STATE_BYTES, check=lambda m: refusal) is None
    assert decoder.decode(STATE_BYTES, check=lambda m: None) is not None
    assert decoder.stats.as_dict() == {"accepted": 1, "total_rejected": 1, "rejected": {"foreign_session": 1}}


# ---- fuzzing -----------------------------------------------------------------------------------
VALID_FRAMES = [encode(m) for m in VALID_MESSAGES]
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_never_crash_and_are_counted(data):
    decoder = FrameDecoder()
    result = decoder.decode(data)
    # Random bytes cannot carry the magic, a known version and type, a matching length and CRC.
    assert result is None
    assert decoder.stats.total_rejected == 1 and decoder.stats.accepted == 0


@FUZZ
@given(st.binary(min_size=HEADER_SIZE, max_size=300))
def test_random_payload_behind_a_plausible_header(data):
    """Random bytes after a correct magic/version and a recomputed length + CRC reach the payload checks."""
    raw = b"MRLT" + bytes([PROTOCOL_VERSION, 1 + data[0] % 4]) + data[2:]
    frame = reseal(raw)
    decoder = FrameDecoder()
    message = decoder.decode(frame)
    assert decoder.stats.accepted + decoder.stats.total_rejected == 1
    if message is not None:  # anything accepted is canonical: it re-encodes to the same bytes
        assert encode(message) == frame


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.just(0)),
)


def _mutate(frame: bytes, mutations) -> bytes:
    out = bytearray(frame)
    for kind, where, value in mutations:
        i = where % (len(out) + 1)
        if kind == "flip" and out:
            out[i % len(out)] ^= value
        elif kind == "truncate":
            del out[i:]
        elif kind == "insert":
            out.insert(i, value)
        elif kind == "delete" and out:
            del out[i % len(out)]
    return bytes(out)


@FUZZ
@given(st.sampled_from(VALID_FRAMES), st.lists(mutation, min_size=1, max_size=4), st.booleans())
def test_mutated_frames_are_rejected_and_counted(frame, mutations, fix_crc):
    mutated = _mutate(frame, mutations)
    if fix_crc and len(mutated) >= HEADER_SIZE:
        mutated = reseal(mutated)  # get past length and CRC to exercise the field checks
    decoder = FrameDecoder()
    message = decoder.decode(mutated)
    assert decoder.stats.accepted + decoder.stats.total_rejected == 1
    if message is None:
        assert decoder.last_error.reason in FRAME_REASONS
    else:
        # Accepted only if it is still a canonical frame; without a resealed CRC, only the original.
        assert encode(message) == mutated
        assert fix_crc or mutated == frame
