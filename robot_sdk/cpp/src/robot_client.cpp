// RobotClient: sockets, handshake, STATE publishing, COMMAND checks and the watchdog (docs/telemetry.md).
#include "metarl_robot_sdk/robot_client.hpp"

#include <zmq.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <utility>
#include <random>
#include <stdexcept>

#include "curve_internal.hpp"

namespace metarl::robot_sdk {
namespace {

constexpr int kDefaultWatchdogPeriods = 5;  // 200 ms on the 25 Hz cart-pole
constexpr int kMaxHandshakesPerService = 16;
constexpr int kMaxCommandsPerService = 4 * kRecvQueueFrames;

std::int64_t steady_now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Python's repr() of a string / float, so refusal messages read the same from either implementation.
std::string py_repr(const std::string& s) { return "'" + s + "'"; }
std::string py_repr(double x) {
  char buf[32];
  for (int precision = 1; precision <= 17; ++precision) {  // the shortest form that reads back exactly
    std::snprintf(buf, sizeof buf, "%.*g", precision, x);
    if (std::strtod(buf, nullptr) == x) break;
  }
  std::string s = buf;
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
  return s;
}
std::string fmt_g(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}

// A refusal message the protocol can carry: printable ASCII (any other byte written as \xNN, as a guard: the
// messages are built from checked names and decoder details) within its 1024 bytes.
std::string fit_message(const std::string& message) {
  std::string out;
  for (const char ch : message) {
    const auto c = static_cast<unsigned char>(ch);
    if (c >= 0x20 && c <= 0x7E) {
      out += ch;
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned>(c));
      out += buf;
    }
  }
  if (out.size() <= kMaxMessageBytes) return out;
  return out.substr(0, kMaxMessageBytes - 3) + "...";
}

void set_int(void* sock, int option, int value) { zmq_setsockopt(sock, option, &value, sizeof value); }

std::string last_endpoint(void* sock) {
  char buf[1024];
  std::size_t len = sizeof buf;
  if (zmq_getsockopt(sock, ZMQ_LAST_ENDPOINT, buf, &len) != 0 || len == 0) return {};
  return std::string(buf, len - 1);  // len counts the terminating NUL
}

}  // namespace

// ---- small public types ----------------------------------------------------------------------------------
const char* decision_reason_name(DecisionReason reason) {
  switch (reason) {
    case DecisionReason::Command: return "command";
    case DecisionReason::NoCommand: return "no_command";
    case DecisionReason::Expired: return "expired";
    case DecisionReason::Watchdog: return "watchdog";
  }
  return "unknown";
}

void RobotInterface::validate() const {
  auto bad = [](const std::string& what) { throw std::invalid_argument("RobotInterface: " + what); };
  if (name.empty() || name.size() > kMaxNameBytes || !is_protocol_text(name)) {
    bad("name must be 1..64 printable ASCII characters (every WELCOME carries it)");
  }
  if (!(std::isfinite(ctrl_dt) && ctrl_dt > 0)) bad("ctrl_dt must be finite and > 0");
  if (obs_dim < 1 || obs_dim > kMaxDim || action_dim < 1 || action_dim > kMaxDim) bad("dims must be 1..1024");
  if (action_low.size() != action_dim || action_high.size() != action_dim || safe_command.size() != action_dim) {
    bad("action_low, action_high and safe_command need action_dim values each");
  }
  if (!action_names.empty() && action_names.size() != action_dim) bad("action_names needs action_dim names");
  for (std::size_t i = 0; i < action_dim; ++i) {
    if (!(action_low[i] <= action_high[i])) bad("action_low must be <= action_high");
    if (!(action_low[i] <= safe_command[i] && safe_command[i] <= action_high[i])) {
      bad("safe_command must lie within [action_low, action_high]");
    }
  }
}

Endpoints Endpoints::from_port_base(const std::string& host, int port_base) {
  if (port_base == 0) return {"tcp://" + host + ":*", "tcp://" + host + ":*", "tcp://" + host + ":*"};
  if (port_base < 1 || port_base > 65533) throw std::invalid_argument("port_base must be 0 or 1..65533");
  auto at = [&](int i) { return "tcp://" + host + ":" + std::to_string(port_base + i); };
  return {at(0), at(1), at(2)};
}

Endpoints Endpoints::ipc(const std::string& directory) {
  return {"ipc://" + directory + "/state", "ipc://" + directory + "/command", "ipc://" + directory + "/handshake"};
}

Endpoints Endpoints::parse(const std::string& text) {
  std::vector<std::string> parts;
  std::size_t start = 0;
  while (start <= text.size()) {
    const std::size_t comma = text.find(',', start);
    std::string part = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    part.erase(0, part.find_first_not_of(" \t"));
    part.erase(part.find_last_not_of(" \t") + 1);
    if (!part.empty()) parts.push_back(part);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  if (parts.size() != 3) {
    throw std::invalid_argument("endpoints: expected three comma-separated addresses (state, command, handshake)");
  }
  Endpoints e;
  bool named = true;
  for (const auto& p : parts) {
    const auto eq = p.find('=');
    const std::string key = eq == std::string::npos ? "" : p.substr(0, eq);
    named = named && (key == "state" || key == "command" || key == "handshake");
  }
  if (named) {
    for (const auto& p : parts) {
      const auto eq = p.find('=');
      const std::string key = p.substr(0, eq), value = p.substr(eq + 1);
      std::string& slot = key == "state" ? e.state : key == "command" ? e.command : e.handshake;
      if (!slot.empty()) throw std::invalid_argument("endpoints: each of state, command, handshake exactly once");
      slot = value;
    }
    return e;
  }
  for (const auto& p : parts) {
    if (p.find("://") == std::string::npos) {
      throw std::invalid_argument("endpoints: " + p + " is not a ZeroMQ address like tcp://127.0.0.1:47100");
    }
  }
  return {parts[0], parts[1], parts[2]};
}

std::string RobotCounters::to_json() const {
  return "{\"commands\": " + commands.to_json() +
         ", \"handshakes_accepted\": " + std::to_string(handshakes_accepted) +
         ", \"handshakes_refused\": " + std::to_string(handshakes_refused) +
         ", \"states_published\": " + std::to_string(states_published) +
         ", \"raw_frames_published\": " + std::to_string(raw_frames_published) +
         ", \"periods_commanded\": " + std::to_string(periods_commanded) +
         ", \"periods_safe\": " + std::to_string(periods_safe) +
         ", \"watchdog_engagements\": " + std::to_string(watchdog_engagements) +
         ", \"last_engagement_ns\": " + (last_engagement_ns ? std::to_string(*last_engagement_ns) : "null") +
         ", \"last_refusal\": " + json_string(last_refusal) + "}";
}

// ---- RobotClient -------------------------------------------------------------------------------------------
struct RobotClient::Impl {
  RobotInterface robot;
  Endpoints requested;
  Endpoints bound;
  std::function<std::int64_t()> clock;
  double clock_rate = 1.0;
  double watchdog_ms = 0.0;
  std::int64_t watchdog_ns = 0;
  std::optional<CurveServerKeys> curve;

  RobotCounters counters;
  std::uint32_t session = 0;
  std::optional<CommandFrame> latest;  // newest valid command since the last handshake
  std::int64_t latest_received_ns = 0;
  std::uint64_t last_command_seq = 0;
  std::uint64_t accepted_total = 0;
  std::uint64_t state_seq = 0;
  std::optional<CommandDecision> last_decision;
  std::optional<FrameError> last_command_error;
  std::mt19937 session_rng{std::random_device{}()};

  void* context = nullptr;
  void* state_sock = nullptr;
  void* command_sock = nullptr;
  void* handshake_sock = nullptr;
  std::unique_ptr<detail::ZapHandler> zap;

  void require_started() const {
    if (state_sock == nullptr) {
      throw std::logic_error("RobotClient is not started (call start() first)");
    }
  }

  // One socket: options first (CONFLATE must be set before bind), then CURVE, then bind.
  void* make_socket(int type, const std::string& address) {
    void* s = zmq_socket(context, type);
    if (s == nullptr) throw std::runtime_error(std::string("zmq_socket: ") + zmq_strerror(zmq_errno()));
    set_int(s, ZMQ_LINGER, 0);  // nothing is sent late after close
    if (type == ZMQ_PUB) {
      set_int(s, ZMQ_SNDHWM, 1);  // ignored under CONFLATE; bounds a libzmq without PUB CONFLATE
      set_int(s, ZMQ_CONFLATE, 1);  // the newest frame replaces one still queued: latest-state semantics
    } else {
      const std::int64_t max_size = kRecvMaxBytes;  // an absurdly large message drops the peer, never buffers
      zmq_setsockopt(s, ZMQ_MAXMSGSIZE, &max_size, sizeof max_size);
    }
    if (type == ZMQ_SUB) {
      // A bounded queue, not CONFLATE: libzmq would keep the newest frame before anything validated it, so a
      // garbage frame could displace a valid command. service() validates every queued frame instead.
      set_int(s, ZMQ_RCVHWM, kRecvQueueFrames);
      zmq_setsockopt(s, ZMQ_SUBSCRIBE, "", 0);  // everything: malformed frames reach the decoder and are counted
    }
    if (curve) {
      const auto secret = detail::decode_z85_key(curve->secret_key_z85, "the robot's secret key");
      set_int(s, ZMQ_CURVE_SERVER, 1);
      zmq_setsockopt(s, ZMQ_CURVE_SECRETKEY, secret.data(), secret.size());
    }
    if (zmq_bind(s, address.c_str()) != 0) {
      const std::string why = zmq_strerror(zmq_errno());
      zmq_close(s);
      throw std::runtime_error("cannot bind telemetry endpoint " + address + ": " + why +
                               " (is another robot or twin running there? pick other ports)");
    }
    return s;
  }

  void send_state_bytes(const std::uint8_t* data, std::size_t size) {
    // PUB never blocks: it drops when no one listens or the queue is full, which latest-state wants.
    zmq_send(state_sock, data, size, ZMQ_DONTWAIT);
  }

  // Wait for socket activity until `until_ns` (robot clock); false once the deadline has passed.
  bool poll_until(std::int64_t until_ns) {
    const std::int64_t remaining_ns = until_ns - clock();
    if (remaining_ns <= 0) return false;
    const double wall_ms = static_cast<double>(remaining_ns) / clock_rate / 1e6;
    const long timeout_ms = std::max(1L, std::min(50L, static_cast<long>(wall_ms)));  // 50: re-read the clock
    zmq_pollitem_t items[2] = {{command_sock, 0, ZMQ_POLLIN, 0}, {handshake_sock, 0, ZMQ_POLLIN, 0}};
    zmq_poll(items, 2, timeout_ms);
    return true;
  }

  // One whole message from `sock` without blocking: its first part into `first`, the other parts read and dropped
  // (a REP may reply only after every part; a frame is one single-part message). Returns the number of parts, 0
  // when nothing is waiting.
  static std::size_t read_message(void* sock, Bytes& first) {
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    if (zmq_msg_recv(&msg, sock, ZMQ_DONTWAIT) < 0) {
      zmq_msg_close(&msg);
      return 0;
    }
    const auto* data = static_cast<const std::uint8_t*>(zmq_msg_data(&msg));
    first.assign(data, data + zmq_msg_size(&msg));
    std::size_t parts = 1;
    bool more = zmq_msg_more(&msg);
    zmq_msg_close(&msg);
    while (more) {  // the other parts of a message arrive with the first: no wait
      zmq_msg_init(&msg);
      if (zmq_msg_recv(&msg, sock, 0) < 0) more = false;
      else more = zmq_msg_more(&msg);
      zmq_msg_close(&msg);
      ++parts;
    }
    return parts;
  }

  static std::string multipart_detail(std::size_t parts) {
    return "a multi-part message (" + std::to_string(parts) + " parts); a frame is one single-part message";
  }

  void service() {
    require_started();
    Bytes data;
    // Handshakes: answer every request, exactly once. The caps on both loops bound the time one call can take
    // under a flood (a real-time loop must get back to its motors); what is left waits for the next call.
    for (int taken = 0; taken < kMaxHandshakesPerService; ++taken) {
      const std::size_t parts = read_message(handshake_sock, data);
      if (parts == 0) break;
      answer(data, parts);
    }
    // Commands: every queued one, oldest first (normally one; at most kRecvQueueFrames). Each valid one replaces
    // the held command, so the newest valid command wins and a bad frame never displaces a good one.
    for (int taken = 0; taken < kMaxCommandsPerService; ++taken) {
      const std::size_t parts = read_message(command_sock, data);
      if (parts == 0) break;
      if (parts > 1) {
        reject(Reason::Length, multipart_detail(parts));  // its first part is not taken for a frame
        continue;
      }
      take_command(data.data(), data.size());
    }
  }

  void reject(Reason reason, std::string detail) {
    counters.commands.reject(reason);
    last_command_error = FrameError{reason, std::move(detail), -1};
  }

  void take_command(const std::uint8_t* data, std::size_t size) {
    DecodeExpect expect{MsgType::Command, robot.obs_dim, robot.action_dim};
    Decoded d = decode(data, size, expect);
    if (!d.ok()) {
      counters.commands.reject(d.error.reason);
      last_command_error = d.error;
      return;
    }
    CommandFrame& c = std::get<CommandFrame>(*d.message);
    if (session == 0 || c.session != session) {
      return reject(Reason::ForeignSession, "command session " + std::to_string(c.session) + ", robot's is " +
                                                std::to_string(session) +
                                                " (the controller must complete a handshake first)");
    }
    if (c.seq <= last_command_seq) {
      return reject(Reason::OldSeq, "command seq " + std::to_string(c.seq) + " <= last accepted " +
                                        std::to_string(last_command_seq));
    }
    const std::int64_t now = clock();
    if (now >= c.expires_ns) {
      return reject(Reason::Expired, "command expired " + fmt_g(static_cast<double>(now - c.expires_ns) / 1e6) + " ms ago");
    }
    for (std::size_t i = 0; i < c.action.size(); ++i) {
      if (c.action[i] < robot.action_low[i] || c.action[i] > robot.action_high[i]) {
        const std::string name = robot.action_names.empty() ? "[" + std::to_string(i) + "]" : robot.action_names[i];
        return reject(Reason::OutOfRange, "action " + name + " = " + fmt_g(c.action[i]) + " outside [" +
                                              fmt_g(robot.action_low[i]) + ", " + fmt_g(robot.action_high[i]) + "]");
      }
    }
    last_command_seq = c.seq;
    latest = std::move(c);
    latest_received_ns = now;
    ++accepted_total;
    ++counters.commands.accepted;
  }

  Welcome own_identity(bool accepted, std::uint32_t new_session, const std::string& message) {
    Welcome w;
    w.accepted = accepted;
    w.session = new_session;
    w.watchdog_ms = static_cast<std::uint32_t>(std::nearbyint(watchdog_ms));  // ties to even, as Python's round
    w.robot_stamp_ns = std::max<std::int64_t>(0, clock());
    w.identity = {robot.name, robot.interface_hash, robot.ctrl_dt, robot.obs_dim, robot.action_dim};
    w.message = fit_message(message);
    return w;
  }

  Welcome welcome_for(const Hello& hello) {
    const Identity& h = hello.identity;
    if (h.interface_hash != robot.interface_hash) {
      std::vector<std::string> diffs;
      if (h.robot_name != robot.name) diffs.push_back("name: controller " + py_repr(h.robot_name) + ", robot " + py_repr(robot.name));
      if (h.obs_dim != robot.obs_dim) {
        diffs.push_back("obs_dim: controller " + std::to_string(h.obs_dim) + ", robot " + std::to_string(robot.obs_dim));
      }
      if (h.action_dim != robot.action_dim) {
        diffs.push_back("action_dim: controller " + std::to_string(h.action_dim) + ", robot " +
                        std::to_string(robot.action_dim));
      }
      if (h.ctrl_dt != robot.ctrl_dt) {
        diffs.push_back("ctrl_dt: controller " + py_repr(h.ctrl_dt) + ", robot " + py_repr(robot.ctrl_dt));
      }
      std::string joined;
      for (std::size_t i = 0; i < diffs.size(); ++i) joined += (i ? "; " : "") + diffs[i];
      return own_identity(false, 0,
                          "robot.yaml interface mismatch: the controller was built for " + py_repr(h.robot_name) +
                              " with interface sha256 " + to_hex(h.interface_hash) + ", this robot " +
                              py_repr(robot.name) + " has sha256 " + to_hex(robot.interface_hash) +
                              (diffs.empty() ? "" : " (" + joined + ")") +
                              ". Both sides must load the same robot.yaml (field order, scales, limits, control "
                              "period, safe command); `metarl robot <name>` prints the hash.");
    }
    std::uint32_t fresh = session;
    while (fresh == 0 || fresh == session) fresh = static_cast<std::uint32_t>(session_rng());
    session = fresh;
    // A new controller starts from scratch: nothing the previous one sent may be applied.
    latest.reset();
    last_command_seq = 0;
    return own_identity(true, fresh, "");
  }

  void answer(const Bytes& request, std::size_t parts) {
    Welcome reply;
    if (parts > 1) {
      reply = own_identity(false, 0, "malformed HELLO: " + multipart_detail(parts));
    } else {
      Decoded d = decode(request.data(), request.size(), DecodeExpect{MsgType::Hello, {}, {}});
      if (d.ok()) {
        reply = welcome_for(std::get<Hello>(*d.message));
      } else if (d.error.reason == Reason::Version) {
        reply = own_identity(false, 0,
                             "protocol version mismatch: the controller speaks v" + std::to_string(d.error.version) +
                                 ", this robot v" + std::to_string(kProtocolVersion) + "; update one side");
      } else {
        reply = own_identity(false, 0, "malformed HELLO: " + d.error.detail);
      }
    }
    if (reply.accepted) {
      ++counters.handshakes_accepted;
    } else {
      ++counters.handshakes_refused;
      counters.last_refusal = reply.message;
    }
    const Bytes frame = encode_welcome(reply);
    zmq_send(handshake_sock, frame.data(), frame.size(), 0);  // REP: the one reply the request is owed
  }

  // The next STATE frame and its bytes; the sequence number is used up only once the frame encoded.
  std::pair<StateFrame, Bytes> build_state(const std::vector<double>& obs, const std::vector<double>* applied_action,
                                           std::optional<std::int64_t> stamp_ns) {
    require_started();
    std::vector<double> applied;
    if (applied_action != nullptr) {
      applied = *applied_action;
    } else if (last_decision) {
      applied = last_decision->action;  // what the motors got, unless the driver says otherwise
    }
    if ((applied_action != nullptr || last_decision) && applied.size() != robot.action_dim) {
      throw std::invalid_argument("applied_action must have " + std::to_string(robot.action_dim) + " values, got " +
                                  std::to_string(applied.size()));
    }
    if (obs.size() != robot.obs_dim) {
      throw std::invalid_argument("obs must have " + std::to_string(robot.obs_dim) +
                                  " values (robot.yaml's measured observation), got " + std::to_string(obs.size()));
    }
    StateFrame f;
    f.seq = state_seq + 1;
    f.stamp_ns = stamp_ns ? *stamp_ns : clock();
    f.obs = obs;
    f.applied_action = std::move(applied);
    f.session = session;
    f.safe = last_decision && last_decision->safe && !f.applied_action.empty();
    f.applied_command_seq = (!last_decision || last_decision->safe) ? 0 : last_decision->command_seq;
    Bytes data = encode_state(f);  // throws std::invalid_argument for NaN/Inf or a negative stamp
    state_seq = f.seq;
    return {std::move(f), std::move(data)};
  }

  CommandDecision safe_decision(DecisionReason reason, std::int64_t now) const {
    CommandDecision d;
    d.action = robot.safe_command;
    d.safe = true;
    d.reason = reason;
    d.stamp_ns = now;
    return d;
  }
};

RobotClient::RobotClient(RobotInterface robot, Endpoints endpoints, RobotClientOptions options)
    : impl_(std::make_unique<Impl>()) {
  robot.validate();
  Impl& m = *impl_;
  m.watchdog_ms = options.watchdog_ms > 0 ? options.watchdog_ms : kDefaultWatchdogPeriods * robot.ctrl_dt * 1000.0;
  if (!(std::isfinite(m.watchdog_ms) && m.watchdog_ms > 0 && m.watchdog_ms < 4294967296.0)) {
    throw std::invalid_argument("watchdog_ms must be > 0 and finite");
  }
  if (!(std::isfinite(options.clock_rate) && options.clock_rate > 0)) {
    throw std::invalid_argument("clock_rate must be > 0");
  }
  m.watchdog_ns = static_cast<std::int64_t>(m.watchdog_ms * 1e6);
  m.robot = std::move(robot);
  m.requested = std::move(endpoints);
  m.clock = options.clock ? std::move(options.clock) : std::function<std::int64_t()>(steady_now_ns);
  m.clock_rate = options.clock_rate;
  m.curve = std::move(options.curve);
}

RobotClient::~RobotClient() { close(); }

Endpoints RobotClient::start() {
  Impl& m = *impl_;
  if (m.context != nullptr) throw std::logic_error("RobotClient already started");
  m.context = zmq_ctx_new();
  if (m.context == nullptr) throw std::runtime_error("zmq_ctx_new failed");
  try {
    if (m.curve) {
      if (!zmq_has("curve")) throw std::runtime_error("this libzmq was built without CURVE support");
      std::vector<detail::CurveKey> allowed;
      for (const auto& k : m.curve->authorized_clients_z85) allowed.push_back(detail::decode_z85_key(k, "authorized key"));
      if (allowed.empty()) throw std::runtime_error("CURVE needs at least one authorised controller public key");
      m.zap = std::make_unique<detail::ZapHandler>(m.context, std::move(allowed));
    }
    m.state_sock = m.make_socket(ZMQ_PUB, m.requested.state);
    m.command_sock = m.make_socket(ZMQ_SUB, m.requested.command);
    m.handshake_sock = m.make_socket(ZMQ_REP, m.requested.handshake);
  } catch (...) {
    close();
    throw;
  }
  m.bound = {last_endpoint(m.state_sock), last_endpoint(m.command_sock), last_endpoint(m.handshake_sock)};
  return m.bound;
}

void RobotClient::close() {
  if (!impl_) return;
  Impl& m = *impl_;
  for (void** s : {&m.state_sock, &m.command_sock, &m.handshake_sock}) {
    if (*s != nullptr) {
      zmq_close(*s);
      *s = nullptr;
    }
  }
  m.zap.reset();  // before zmq_ctx_term, which waits for every socket of the context to close
  if (m.context != nullptr) {
    zmq_ctx_term(m.context);
    m.context = nullptr;
  }
}

void RobotClient::service() { impl_->service(); }

CommandDecision RobotClient::current_action() {
  Impl& m = *impl_;
  m.service();
  const std::int64_t now = m.clock();
  CommandDecision d;
  if (!m.latest) {
    d = m.safe_decision(DecisionReason::NoCommand, now);
  } else if (now >= m.latest->expires_ns) {
    d = m.safe_decision(DecisionReason::Expired, now);
  } else if (now - m.latest_received_ns > m.watchdog_ns) {
    d = m.safe_decision(DecisionReason::Watchdog, now);
  } else {
    d.action = m.latest->action;
    d.safe = false;
    d.reason = DecisionReason::Command;
    d.command_seq = m.latest->seq;
    d.answers_seq = m.latest->answers_seq;
    d.stamp_ns = now;
  }
  if (d.safe) {
    ++m.counters.periods_safe;
    if (m.last_decision && !m.last_decision->safe) {  // commanding → safe: one watchdog engagement
      ++m.counters.watchdog_engagements;
      m.counters.last_engagement_ns = now;
    }
  } else {
    ++m.counters.periods_commanded;
  }
  m.last_decision = d;
  return d;
}

bool RobotClient::wait_for_command(std::int64_t until_ns, std::uint64_t answering_seq) {
  Impl& m = *impl_;
  const std::uint64_t accepted_before = m.accepted_total;
  while (true) {
    m.service();
    if (m.accepted_total > accepted_before && m.latest && m.latest->answers_seq >= answering_seq) return true;
    if (!m.poll_until(until_ns)) return false;
  }
}

void RobotClient::serve_until(std::int64_t until_ns) {
  Impl& m = *impl_;
  while (true) {
    m.service();
    if (!m.poll_until(until_ns)) return;
  }
}

StateFrame RobotClient::make_state(const std::vector<double>& obs, const std::vector<double>* applied_action,
                                   std::optional<std::int64_t> stamp_ns) {
  return impl_->build_state(obs, applied_action, stamp_ns).first;
}

StateFrame RobotClient::publish_state(const std::vector<double>& obs, const std::vector<double>* applied_action,
                                      std::optional<std::int64_t> stamp_ns) {
  Impl& m = *impl_;
  auto [frame, data] = m.build_state(obs, applied_action, stamp_ns);
  m.send_state_bytes(data.data(), data.size());
  ++m.counters.states_published;
  return frame;
}

void RobotClient::publish_raw(const std::uint8_t* data, std::size_t size) {
  Impl& m = *impl_;
  m.require_started();
  m.send_state_bytes(data, size);
  ++m.counters.raw_frames_published;
}

std::int64_t RobotClient::now() const { return impl_->clock(); }
bool RobotClient::armed() const { return impl_->session != 0; }
std::uint32_t RobotClient::session() const { return impl_->session; }
std::uint64_t RobotClient::state_seq() const { return impl_->state_seq; }
double RobotClient::watchdog_ms() const { return impl_->watchdog_ms; }
const RobotInterface& RobotClient::robot() const { return impl_->robot; }
const RobotCounters& RobotClient::counters() const { return impl_->counters; }
const std::optional<CommandDecision>& RobotClient::last_decision() const { return impl_->last_decision; }
std::optional<std::int64_t> RobotClient::last_command_received_ns() const {
  return impl_->latest ? std::optional<std::int64_t>(impl_->latest_received_ns) : std::nullopt;
}
const std::optional<FrameError>& RobotClient::last_command_error() const { return impl_->last_command_error; }

}  // namespace metarl::robot_sdk
