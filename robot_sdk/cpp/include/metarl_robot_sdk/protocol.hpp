// The telemetry wire format of docs/telemetry.md: four single-part frames (HELLO, WELCOME, STATE, COMMAND),
// each a 16-byte little-endian header with a CRC-32, then a fixed-layout payload.
//
// This header has no ZeroMQ in it: the codec can be unit-tested (and reused by a driver that moves frames
// itself) without sockets. Encoders throw std::invalid_argument on values the decoder would reject, so this
// library never emits a frame its peer must refuse; the decoder never throws and reports the first rule a
// frame breaks as a Reason, in the same order as the Python reference (metarl_robot.telemetry.protocol), so
// both implementations count the same reason for the same bytes.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace metarl::robot_sdk {

inline constexpr std::array<std::uint8_t, 4> kMagic{{'M', 'R', 'L', 'T'}};
inline constexpr std::uint8_t kProtocolVersion = 1;
inline constexpr std::size_t kHeaderSize = 16;
/// Largest frame either side accepts, header included.
inline constexpr std::size_t kMaxFrameBytes = 65536;
/// ZMQ_MAXMSGSIZE of receiving sockets: bigger messages drop the peer's connection; frames between
/// kMaxFrameBytes and this still arrive and are counted as Reason::TooLong.
inline constexpr std::int64_t kRecvMaxBytes = 4 * static_cast<std::int64_t>(kMaxFrameBytes);
/// ZMQ_RCVHWM of receiving SUBs: frames queued for a reader; every one is validated, the newest valid one kept.
inline constexpr int kRecvQueueFrames = 64;
inline constexpr std::size_t kMaxDim = 1024;
inline constexpr std::size_t kMaxNameBytes = 64;
inline constexpr std::size_t kMaxMessageBytes = 1024;
/// STATE flag bit 0: the applied action was the robot's safe command.
inline constexpr std::uint16_t kStateFlagSafe = 0x0001;

enum class MsgType : std::uint8_t { Hello = 1, Welcome = 2, State = 3, Command = 4 };

/// Why a frame is rejected. The first 14 are decode faults (in the order the decoder checks them), the next 4
/// link-level checks of a well-formed frame; Oversized (a message over ZMQ_MAXMSGSIZE, dropped by libzmq with its
/// connection) is counted only by the controller, and is here so both sides share one list of counter keys.
/// Names (reason_name) are the protocol's counter keys.
enum class Reason : std::uint8_t {
  TooShort, TooLong, Magic, Version, Type, UnexpectedType, Length, Crc, Flags, Reserved, Dims, Field,
  NonFinite, Text,
  ForeignSession, OldSeq, Expired, OutOfRange,
  Oversized,
};
inline constexpr std::size_t kReasonCount = 19;

/// "too_short", "crc", "foreign_session", ... (the keys docs/telemetry.md and the Python counters use).
const char* reason_name(Reason reason);
/// The Reason of a counter key; nullopt for an unknown name.
std::optional<Reason> reason_from_name(std::string_view name);

/// robot.yaml's interface hash: the raw 32 bytes of a sha256 (printed as 64 hex digits by `metarl robot`).
using InterfaceHash = std::array<std::uint8_t, 32>;
/// 64 hex digits → bytes; throws std::invalid_argument otherwise.
InterfaceHash parse_interface_hash(std::string_view hex);
std::string to_hex(const InterfaceHash& hash);

using Bytes = std::vector<std::uint8_t>;

struct StateFrame {
  std::uint64_t seq = 0;                  ///< 1 for the robot's first frame, +1 per frame
  std::int64_t stamp_ns = 0;              ///< robot monotonic clock when the observation was measured
  std::uint64_t applied_command_seq = 0;  ///< COMMAND applied in the period that ended; 0 for the safe command
  std::uint32_t session = 0;              ///< session of the armed controller, 0 when none
  bool safe = false;                      ///< the applied action was the safe command (flag bit 0)
  std::vector<double> obs;                ///< robot.yaml observation order; NaN/Inf allowed (a failed sensor)
  std::vector<double> applied_action;     ///< empty: not sent (action_dim 0)
};

struct CommandFrame {
  std::uint64_t seq = 0;          ///< strictly increasing within a session, from 1
  std::uint64_t answers_seq = 0;  ///< the STATE it was computed from
  std::int64_t expires_ns = 0;    ///< robot-clock stamp from which it must not be applied
  std::uint32_t session = 0;      ///< from the controller's WELCOME, never 0
  std::vector<double> action;     ///< robot.yaml action order
};

/// The 48 + L byte block HELLO and WELCOME share: one side's view of robot.yaml.
struct Identity {
  std::string robot_name;          ///< robot.yaml `name`, 1..64 printable ASCII bytes (0x20..0x7E)
  InterfaceHash interface_hash{};  ///< raw sha256
  double ctrl_dt = 0.0;            ///< control period, seconds
  std::uint16_t obs_dim = 0;
  std::uint16_t action_dim = 0;
};

struct Hello {
  Identity identity;  ///< the controller's view
};

struct Welcome {
  bool accepted = false;
  std::uint32_t session = 0;       ///< nonzero iff accepted
  std::uint32_t watchdog_ms = 0;   ///< informational
  std::int64_t robot_stamp_ns = 0; ///< robot clock when it answered
  Identity identity;               ///< the robot's own view
  std::string message;             ///< why it refused; empty when accepted; printable ASCII
};

using Message = std::variant<Hello, Welcome, StateFrame, CommandFrame>;

/// A rejected frame: the reason (a counter key) and a sentence for people.
struct FrameError {
  Reason reason = Reason::Field;
  std::string detail;
  int version = -1;  ///< the version byte, when the rejection is Reason::Version (for the handshake's refusal)
};

/// The outcome of decode(): a message, or why not.
struct Decoded {
  std::optional<Message> message;
  FrameError error;  ///< meaningful only when !ok()
  bool ok() const { return message.has_value(); }
};

/// What the receiving socket expects; unset fields are not checked.
struct DecodeExpect {
  std::optional<MsgType> type;            ///< other types → Reason::UnexpectedType
  std::optional<std::uint16_t> obs_dim;   ///< STATE must carry exactly this many observations
  std::optional<std::uint16_t> action_dim;///< COMMAND exactly this many values; STATE this many or 0
};

/// zlib-compatible CRC-32 (IEEE 802.3, reflected 0x04C11DB7). `previous` continues a running CRC exactly like
/// zlib's crc32(previous, data, size): crc32(b, n, crc32(a, m)) is the CRC of a followed by b.
std::uint32_t crc32(const std::uint8_t* data, std::size_t size, std::uint32_t previous = 0);

Bytes encode_state(const StateFrame& frame);
Bytes encode_command(const CommandFrame& frame);
Bytes encode_hello(const Hello& hello);
Bytes encode_welcome(const Welcome& welcome);
/// `frame` with payload_len and CRC recomputed, for tests that need a frame that passes the CRC but breaks
/// another rule (a real sender never needs it).
Bytes reseal(Bytes frame);

/// Decode one frame, checking every rule of docs/telemetry.md. Never throws on any input.
Decoded decode(const std::uint8_t* data, std::size_t size, const DecodeExpect& expect = {});

/// Accepted frames and rejections per reason.
struct DecodeStats {
  std::uint64_t accepted = 0;
  std::array<std::uint64_t, kReasonCount> rejected{};

  void reject(Reason reason) { ++rejected[static_cast<std::size_t>(reason)]; }
  std::uint64_t count(Reason reason) const { return rejected[static_cast<std::size_t>(reason)]; }
  std::uint64_t total_rejected() const;
  /// {"accepted": n, "total_rejected": n, "rejected": {reason: n, ...}} with non-zero reasons only: the same
  /// shape as the Python DecodeStats.as_dict().
  std::string to_json() const;
};

/// True when `text` may be sent as a robot name or WELCOME message: printable ASCII, every byte 0x20..0x7E.
bool is_protocol_text(std::string_view text);

/// `text` as a JSON string literal (quotes included).
std::string json_string(std::string_view text);

}  // namespace metarl::robot_sdk
