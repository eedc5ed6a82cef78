// Codec of docs/telemetry.md. Byte order is spelled out with shifts (not memcpy of structs) so the code is
// right on any host; doubles travel as their IEEE-754 bit pattern in a little-endian u64.
#include "metarl_robot_sdk/protocol.hpp"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <stdexcept>

namespace metarl::robot_sdk {
namespace {

constexpr const char* kReasonNames[kReasonCount] = {
    "too_short", "too_long", "magic", "version", "type", "unexpected_type", "length", "crc", "flags",
    "reserved", "dims", "field", "non_finite", "text", "foreign_session", "old_seq", "expired", "out_of_range",
    "oversized",
};

// Payload sizes of the fixed parts (docs/telemetry.md, "Messages").
constexpr std::size_t kStateFixed = 32;
constexpr std::size_t kCommandFixed = 32;
constexpr std::size_t kIdentFixed = 48;
constexpr std::size_t kWelcomeFixed = 24;

// ---- little-endian access ---------------------------------------------------------------------------------
std::uint64_t load_le(const std::uint8_t* p, std::size_t n) {
  std::uint64_t v = 0;
  for (std::size_t i = 0; i < n; ++i) v |= static_cast<std::uint64_t>(p[i]) << (8 * i);
  return v;
}
std::uint16_t u16_at(const std::uint8_t* p) { return static_cast<std::uint16_t>(load_le(p, 2)); }
std::uint32_t u32_at(const std::uint8_t* p) { return static_cast<std::uint32_t>(load_le(p, 4)); }
std::uint64_t u64_at(const std::uint8_t* p) { return load_le(p, 8); }
std::int64_t i64_at(const std::uint8_t* p) { return static_cast<std::int64_t>(load_le(p, 8)); }
double f64_at(const std::uint8_t* p) {
  const std::uint64_t bits = load_le(p, 8);
  double v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

void put_le(Bytes& out, std::uint64_t v, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) out.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}
void put_f64(Bytes& out, double v) {
  std::uint64_t bits;
  std::memcpy(&bits, &v, sizeof v);
  put_le(out, bits, 8);
}

// ---- text rule --------------------------------------------------------------------------------------------
// Names and messages are printable ASCII, bytes 0x20..0x7E (docs/telemetry.md): exactly what the Python reference
// checks, with no Unicode tables on either side. Empty string when `text` is valid, else why not.
std::string text_problem(const std::uint8_t* p, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    if (p[i] < 0x20 || p[i] > 0x7E) {
      char hex[8];
      std::snprintf(hex, sizeof hex, "0x%02x", static_cast<unsigned>(p[i]));
      return std::string("has byte ") + hex + " at offset " + std::to_string(i) +
             "; names and messages are printable ASCII (0x20..0x7e)";
    }
  }
  return {};
}

// ---- encoding ---------------------------------------------------------------------------------------------
[[noreturn]] void bad_value(const std::string& what) { throw std::invalid_argument("telemetry encode: " + what); }

void check_vector(const char* name, const std::vector<double>& v, bool finite = true) {
  if (v.empty() || v.size() > kMaxDim) {
    bad_value(std::string(name) + " must have 1.." + std::to_string(kMaxDim) + " values, got " +
              std::to_string(v.size()));
  }
  for (double x : v) {
    if (finite && !std::isfinite(x)) {
      bad_value(std::string(name) + " contains NaN or Inf; the protocol carries finite values here");
    }
  }
}

Bytes finish_frame(MsgType type, std::uint16_t flags, const Bytes& payload) {
  if (kHeaderSize + payload.size() > kMaxFrameBytes) bad_value("frame longer than 65536 bytes");
  Bytes frame;
  frame.reserve(kHeaderSize + payload.size());
  frame.insert(frame.end(), kMagic.begin(), kMagic.end());
  frame.push_back(kProtocolVersion);
  frame.push_back(static_cast<std::uint8_t>(type));
  put_le(frame, flags, 2);
  put_le(frame, payload.size(), 4);
  // The CRC covers header bytes 0..11, then the payload, as one stream.
  const std::uint32_t crc = crc32(payload.data(), payload.size(), crc32(frame.data(), 12));
  put_le(frame, crc, 4);
  frame.insert(frame.end(), payload.begin(), payload.end());
  return frame;
}

void put_identity(Bytes& out, const Identity& id) {
  const std::size_t name_len = id.robot_name.size();
  if (name_len < 1 || name_len > kMaxNameBytes) {
    bad_value("robot name must be 1.." + std::to_string(kMaxNameBytes) + " bytes");
  }
  const std::string problem =
      text_problem(reinterpret_cast<const std::uint8_t*>(id.robot_name.data()), name_len);
  if (!problem.empty()) bad_value("robot name " + problem);
  if (!(std::isfinite(id.ctrl_dt) && id.ctrl_dt > 0)) bad_value("ctrl_dt must be finite and > 0");
  if (id.obs_dim < 1 || id.obs_dim > kMaxDim || id.action_dim < 1 || id.action_dim > kMaxDim) {
    bad_value("obs_dim and action_dim must be 1..1024");
  }
  out.insert(out.end(), id.interface_hash.begin(), id.interface_hash.end());
  put_f64(out, id.ctrl_dt);
  put_le(out, id.obs_dim, 2);
  put_le(out, id.action_dim, 2);
  put_le(out, name_len, 2);
  put_le(out, 0, 2);  // reserved
  out.insert(out.end(), id.robot_name.begin(), id.robot_name.end());
}

// ---- decoding ---------------------------------------------------------------------------------------------
// A broken rule throws this private type, which decode() turns into a FrameError: every check stays one line,
// and nothing escapes decode() (its callers never see an exception).
struct Fail {
  FrameError error;
};
[[noreturn]] void fail(Reason reason, std::string detail, int version = -1) {
  throw Fail{FrameError{reason, std::move(detail), version}};
}

void need(std::size_t have, std::size_t size, const char* what) {
  if (have < size) {
    fail(Reason::Length, std::string(what) + " payload needs at least " + std::to_string(size) + " bytes, got " +
                             std::to_string(have));
  }
}

void check_dim(const char* name, std::uint16_t got, std::optional<std::uint16_t> expected, bool allow_zero = false) {
  if (allow_zero && got == 0) return;
  if (got < 1 || got > kMaxDim) {
    fail(Reason::Dims, std::string(name) + " " + std::to_string(got) + " is outside 1..1024");
  }
  if (expected && got != *expected) {
    fail(Reason::Dims, std::string(name) + " is " + std::to_string(got) + ", the robot's is " +
                           std::to_string(*expected));
  }
}

std::vector<double> floats(const std::uint8_t* p, std::size_t count, const char* what, bool finite = true) {
  std::vector<double> v(count);
  for (std::size_t i = 0; i < count; ++i) {
    v[i] = f64_at(p + 8 * i);
    if (finite && !std::isfinite(v[i])) {
      fail(Reason::NonFinite, std::string(what) + " has NaN/Inf at index " + std::to_string(i));
    }
  }
  return v;
}

std::string text(const std::uint8_t* p, std::size_t n, const char* what) {
  const std::string problem = text_problem(p, n);
  if (!problem.empty()) fail(Reason::Text, std::string(what) + " " + problem);
  return std::string(reinterpret_cast<const char*>(p), n);
}

StateFrame decode_state(const std::uint8_t* pl, std::size_t n, std::uint16_t flags, const DecodeExpect& ex) {
  need(n, kStateFixed, "STATE");
  StateFrame f;
  f.seq = u64_at(pl);
  f.stamp_ns = i64_at(pl + 8);
  f.applied_command_seq = u64_at(pl + 16);
  f.session = u32_at(pl + 24);
  const std::uint16_t n_obs = u16_at(pl + 28);
  const std::uint16_t n_act = u16_at(pl + 30);
  check_dim("obs_dim", n_obs, ex.obs_dim);
  check_dim("action_dim", n_act, ex.action_dim, /*allow_zero=*/true);
  const std::size_t expected = kStateFixed + 8 * (static_cast<std::size_t>(n_obs) + n_act);
  if (n != expected) {
    fail(Reason::Length, "STATE with these dims needs " + std::to_string(expected) + " payload bytes, got " +
                             std::to_string(n));
  }
  if (f.seq == 0) fail(Reason::Field, "STATE seq is 0 (sequence numbers start at 1)");
  if (f.stamp_ns < 0) fail(Reason::Field, "STATE stamp_ns is negative");
  f.safe = (flags & kStateFlagSafe) != 0;
  if (f.safe && f.applied_command_seq != 0) fail(Reason::Field, "STATE SAFE flag with an applied_command_seq");
  if (f.safe && n_act == 0) fail(Reason::Field, "STATE SAFE flag without an applied action");
  // A NaN/Inf observation passes: a failed sensor, which the controller's safety layer answers (OBS_NONFINITE).
  f.obs = floats(pl + kStateFixed, n_obs, "obs", /*finite=*/false);
  if (n_act) f.applied_action = floats(pl + kStateFixed + 8 * n_obs, n_act, "applied_action");
  return f;
}

CommandFrame decode_command(const std::uint8_t* pl, std::size_t n, const DecodeExpect& ex) {
  need(n, kCommandFixed, "COMMAND");
  CommandFrame f;
  f.seq = u64_at(pl);
  f.answers_seq = u64_at(pl + 8);
  f.expires_ns = i64_at(pl + 16);
  f.session = u32_at(pl + 24);
  const std::uint16_t n_act = u16_at(pl + 28);
  if (u16_at(pl + 30) != 0) fail(Reason::Reserved, "COMMAND reserved field must be 0");
  check_dim("action_dim", n_act, ex.action_dim);
  const std::size_t expected = kCommandFixed + 8 * static_cast<std::size_t>(n_act);
  if (n != expected) {
    fail(Reason::Length, "COMMAND with action_dim=" + std::to_string(n_act) + " needs " + std::to_string(expected) +
                             " payload bytes, got " + std::to_string(n));
  }
  if (f.seq == 0 || f.answers_seq == 0) fail(Reason::Field, "COMMAND seq and answers_seq start at 1");
  if (f.expires_ns < 0) fail(Reason::Field, "COMMAND expires_ns is negative");
  if (f.session == 0) fail(Reason::Field, "COMMAND session is 0 (commands need an accepted handshake's session)");
  f.action = floats(pl + kCommandFixed, n_act, "action");
  return f;
}

// The identity block at `offset`; returns the offset just past the name.
std::size_t decode_identity(const std::uint8_t* pl, std::size_t n, std::size_t offset, const char* what,
                            Identity& id) {
  need(n, offset + kIdentFixed, what);
  const std::uint8_t* p = pl + offset;
  std::memcpy(id.interface_hash.data(), p, 32);
  id.ctrl_dt = f64_at(p + 32);
  id.obs_dim = u16_at(p + 40);
  id.action_dim = u16_at(p + 42);
  const std::uint16_t name_len = u16_at(p + 44);
  if (u16_at(p + 46) != 0) fail(Reason::Reserved, std::string(what) + " reserved field must be 0");
  check_dim("obs_dim", id.obs_dim, std::nullopt);
  check_dim("action_dim", id.action_dim, std::nullopt);
  if (!std::isfinite(id.ctrl_dt)) fail(Reason::NonFinite, std::string(what) + " ctrl_dt is not finite");
  if (id.ctrl_dt <= 0) fail(Reason::Field, std::string(what) + " ctrl_dt must be > 0");
  if (name_len < 1 || name_len > kMaxNameBytes) {
    fail(Reason::Text, std::string(what) + " robot name length " + std::to_string(name_len) + " is outside 1..64");
  }
  const std::size_t start = offset + kIdentFixed;
  need(n, start + name_len, what);
  id.robot_name = text(pl + start, name_len, (std::string(what) + " robot name").c_str());
  return start + name_len;
}

Hello decode_hello(const std::uint8_t* pl, std::size_t n) {
  Hello h;
  const std::size_t end = decode_identity(pl, n, 0, "HELLO", h.identity);
  if (end != n) fail(Reason::Length, "HELLO needs " + std::to_string(end) + " payload bytes, got " + std::to_string(n));
  return h;
}

Welcome decode_welcome(const std::uint8_t* pl, std::size_t n) {
  need(n, kWelcomeFixed, "WELCOME");
  Welcome w;
  w.session = u32_at(pl);
  w.watchdog_ms = u32_at(pl + 4);
  w.robot_stamp_ns = i64_at(pl + 8);
  const std::uint8_t accepted = pl[16];
  const std::uint16_t message_len = u16_at(pl + 18);
  if (pl[17] != 0 || u32_at(pl + 20) != 0) fail(Reason::Reserved, "WELCOME reserved fields must be 0");
  if (accepted > 1) fail(Reason::Field, "WELCOME accepted must be 0 or 1");
  if (accepted && w.session == 0) fail(Reason::Field, "WELCOME accepts with session 0");
  if (!accepted && w.session != 0) fail(Reason::Field, "WELCOME refuses with a nonzero session");
  if (w.robot_stamp_ns < 0) fail(Reason::Field, "WELCOME robot_stamp_ns is negative");
  if (message_len > kMaxMessageBytes) fail(Reason::Text, "WELCOME message longer than 1024 bytes");
  w.accepted = accepted == 1;
  const std::size_t end = decode_identity(pl, n, kWelcomeFixed, "WELCOME", w.identity);
  if (n != end + message_len) {
    fail(Reason::Length, "WELCOME needs " + std::to_string(end + message_len) + " payload bytes, got " +
                             std::to_string(n));
  }
  if (message_len) w.message = text(pl + end, message_len, "WELCOME message");
  return w;
}

Message decode_or_throw(const std::uint8_t* data, std::size_t size, const DecodeExpect& ex) {
  if (size > kMaxFrameBytes) fail(Reason::TooLong, std::to_string(size) + " bytes > the 65536-byte limit");
  if (size < kHeaderSize) fail(Reason::TooShort, std::to_string(size) + " bytes < the 16-byte header");
  if (std::memcmp(data, kMagic.data(), kMagic.size()) != 0) fail(Reason::Magic, "does not start with MRLT");
  const std::uint8_t version = data[4];
  if (version != kProtocolVersion) {
    fail(Reason::Version,
         "protocol version " + std::to_string(version) + ", this side speaks " + std::to_string(kProtocolVersion),
         version);
  }
  const std::uint8_t type_byte = data[5];
  if (type_byte < 1 || type_byte > 4) fail(Reason::Type, "unknown message type " + std::to_string(type_byte));
  const auto type = static_cast<MsgType>(type_byte);
  if (ex.type && type != *ex.type) fail(Reason::UnexpectedType, "a message type this socket does not carry");
  const std::uint16_t flags = u16_at(data + 6);
  const std::uint32_t payload_len = u32_at(data + 8);
  if (payload_len != size - kHeaderSize) {
    fail(Reason::Length, "header says " + std::to_string(payload_len) + " payload bytes, frame has " +
                             std::to_string(size - kHeaderSize));
  }
  const std::uint8_t* payload = data + kHeaderSize;
  const std::uint32_t actual = crc32(payload, payload_len, crc32(data, 12));
  if (u32_at(data + 12) != actual) fail(Reason::Crc, "CRC-32 mismatch");
  const std::uint16_t allowed = type == MsgType::State ? kStateFlagSafe : 0;
  if (flags & ~allowed) fail(Reason::Flags, "flag bits this message type does not define");
  switch (type) {
    case MsgType::State: return decode_state(payload, payload_len, flags, ex);
    case MsgType::Command: return decode_command(payload, payload_len, ex);
    case MsgType::Hello: return decode_hello(payload, payload_len);
    case MsgType::Welcome: break;
  }
  return decode_welcome(payload, payload_len);
}

}  // namespace

// ---- public API -------------------------------------------------------------------------------------------
const char* reason_name(Reason reason) {
  const auto i = static_cast<std::size_t>(reason);
  return i < kReasonCount ? kReasonNames[i] : "unknown";
}

std::optional<Reason> reason_from_name(std::string_view name) {
  for (std::size_t i = 0; i < kReasonCount; ++i) {
    if (name == kReasonNames[i]) return static_cast<Reason>(i);
  }
  return std::nullopt;
}

InterfaceHash parse_interface_hash(std::string_view hex) {
  if (hex.size() != 64) throw std::invalid_argument("interface hash must be 64 hex digits (a sha256)");
  InterfaceHash out{};
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  for (std::size_t i = 0; i < 32; ++i) {
    const int hi = nibble(hex[2 * i]), lo = nibble(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) throw std::invalid_argument("interface hash must be 64 hex digits (a sha256)");
    out[i] = static_cast<std::uint8_t>(hi * 16 + lo);
  }
  return out;
}

std::string to_hex(const InterfaceHash& hash) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string s;
  s.reserve(64);
  for (std::uint8_t b : hash) {
    s.push_back(kDigits[b >> 4]);
    s.push_back(kDigits[b & 15]);
  }
  return s;
}

std::uint32_t crc32(const std::uint8_t* data, std::size_t size, std::uint32_t previous) {
  static const auto kTable = [] {
    std::array<std::uint32_t, 256> t{};
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  std::uint32_t c = previous ^ 0xFFFFFFFFu;
  for (std::size_t i = 0; i < size; ++i) c = kTable[(c ^ data[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

bool is_protocol_text(std::string_view text) {
  return text_problem(reinterpret_cast<const std::uint8_t*>(text.data()), text.size()).empty();
}

Bytes encode_state(const StateFrame& f) {
  check_vector("obs", f.obs, /*finite=*/false);  // a failed sensor is reported, not hidden
  if (!f.applied_action.empty()) check_vector("applied_action", f.applied_action);
  if (f.seq == 0) bad_value("STATE seq must be >= 1");
  if (f.stamp_ns < 0) bad_value("STATE stamp_ns must be >= 0");
  if (f.safe && (f.applied_command_seq != 0 || f.applied_action.empty())) {
    bad_value("a SAFE state needs applied_command_seq 0 and the applied action");
  }
  Bytes p;
  p.reserve(kStateFixed + 8 * (f.obs.size() + f.applied_action.size()));
  put_le(p, f.seq, 8);
  put_le(p, static_cast<std::uint64_t>(f.stamp_ns), 8);
  put_le(p, f.applied_command_seq, 8);
  put_le(p, f.session, 4);
  put_le(p, f.obs.size(), 2);
  put_le(p, f.applied_action.size(), 2);
  for (double x : f.obs) put_f64(p, x);
  for (double x : f.applied_action) put_f64(p, x);
  return finish_frame(MsgType::State, f.safe ? kStateFlagSafe : 0, p);
}

Bytes encode_command(const CommandFrame& f) {
  check_vector("action", f.action);
  if (f.seq == 0 || f.answers_seq == 0) bad_value("COMMAND seq and answers_seq must be >= 1");
  if (f.expires_ns < 0) bad_value("COMMAND expires_ns must be >= 0");
  if (f.session == 0) bad_value("COMMAND session must not be 0");
  Bytes p;
  put_le(p, f.seq, 8);
  put_le(p, f.answers_seq, 8);
  put_le(p, static_cast<std::uint64_t>(f.expires_ns), 8);
  put_le(p, f.session, 4);
  put_le(p, f.action.size(), 2);
  put_le(p, 0, 2);  // reserved
  for (double x : f.action) put_f64(p, x);
  return finish_frame(MsgType::Command, 0, p);
}

Bytes encode_hello(const Hello& h) {
  Bytes p;
  put_identity(p, h.identity);
  return finish_frame(MsgType::Hello, 0, p);
}

Bytes encode_welcome(const Welcome& w) {
  if (w.message.size() > kMaxMessageBytes) bad_value("WELCOME message longer than 1024 bytes");
  if (w.accepted != (w.session != 0)) bad_value("an accepted WELCOME needs a nonzero session, a refusal session 0");
  if (w.robot_stamp_ns < 0) bad_value("WELCOME robot_stamp_ns must be >= 0");
  if (!w.message.empty()) {
    const std::string problem = text_problem(reinterpret_cast<const std::uint8_t*>(w.message.data()), w.message.size());
    if (!problem.empty()) bad_value("WELCOME message " + problem);
  }
  Bytes p;
  put_le(p, w.session, 4);
  put_le(p, w.watchdog_ms, 4);
  put_le(p, static_cast<std::uint64_t>(w.robot_stamp_ns), 8);
  p.push_back(w.accepted ? 1 : 0);
  p.push_back(0);  // reserved
  put_le(p, w.message.size(), 2);
  put_le(p, 0, 4);  // reserved
  put_identity(p, w.identity);
  p.insert(p.end(), w.message.begin(), w.message.end());
  return finish_frame(MsgType::Welcome, 0, p);
}

Bytes reseal(Bytes frame) {
  if (frame.size() < kHeaderSize) frame.resize(kHeaderSize, 0);
  const std::size_t payload = frame.size() - kHeaderSize;
  for (std::size_t i = 0; i < 4; ++i) frame[8 + i] = static_cast<std::uint8_t>(payload >> (8 * i));
  const std::uint32_t crc = crc32(frame.data() + kHeaderSize, payload, crc32(frame.data(), 12));
  for (std::size_t i = 0; i < 4; ++i) frame[12 + i] = static_cast<std::uint8_t>(crc >> (8 * i));
  return frame;
}

Decoded decode(const std::uint8_t* data, std::size_t size, const DecodeExpect& expect) {
  Decoded out;
  try {
    out.message = decode_or_throw(data, size, expect);
  } catch (const Fail& f) {
    out.error = f.error;
  } catch (const std::exception& e) {  // e.g. bad_alloc: still a counted rejection, never a crash
    out.error = FrameError{Reason::Field, std::string("undecodable: ") + e.what(), -1};
  }
  return out;
}

std::uint64_t DecodeStats::total_rejected() const {
  std::uint64_t total = 0;
  for (std::uint64_t n : rejected) total += n;
  return total;
}

std::string DecodeStats::to_json() const {
  std::string s = "{\"accepted\": " + std::to_string(accepted) + ", \"total_rejected\": " +
                  std::to_string(total_rejected()) + ", \"rejected\": {";
  bool first = true;
  for (std::size_t i = 0; i < kReasonCount; ++i) {
    if (!rejected[i]) continue;
    s += (first ? "\"" : ", \"") + std::string(kReasonNames[i]) + "\": " + std::to_string(rejected[i]);
    first = false;
  }
  return s + "}}";
}

std::string json_string(std::string_view text) {
  std::string s = "\"";
  for (char ch : text) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == '"' || c == '\\') {
      s += '\\';
      s += ch;
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      s += buf;
    } else {
      s += ch;  // UTF-8 passes through (JSON is UTF-8)
    }
  }
  return s + "\"";
}

}  // namespace metarl::robot_sdk
