// Self-test of the C++ robot SDK without Python: the codec against the byte-for-byte example frames of
// docs/telemetry.md, the decoder's rejections, and a loopback link where this program plays the controller
// over raw libzmq (handshake, a state, a command, the watchdog). Run by ctest; exits non-zero on a failure.
#include <zmq.h>

#include <chrono>
#include <cmath>
#include <optional>
#include <cstdio>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "metarl_robot_sdk/protocol.hpp"
#include "metarl_robot_sdk/robot_client.hpp"

using namespace metarl::robot_sdk;

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

Bytes from_hex(const std::string& text) {
  Bytes out;
  int hi = -1;
  for (char c : text) {
    int v = (c >= '0' && c <= '9') ? c - '0' : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : -1;
    if (v < 0) continue;
    if (hi < 0) {
      hi = v;
    } else {
      out.push_back(static_cast<std::uint8_t>(hi * 16 + v));
      hi = -1;
    }
  }
  return out;
}

// docs/telemetry.md, "Example frames, byte by byte".
const char* const kDocState =
    "4d 52 4c 54 01 03 00 00 48 00 00 00 15 a5 3a f4 2a 00 00 00 00 00 00 00 00 ca 9a 3b 00 00 00 00"
    "29 00 00 00 00 00 00 00 78 56 34 12 04 00 01 00 00 00 00 00 00 00 e0 3f 00 00 00 00 00 00 08 40"
    "00 00 00 00 00 00 d0 bf 00 00 00 00 00 00 f8 3f 00 00 00 00 00 00 e8 3f";
const char* const kDocCommand =
    "4d 52 4c 54 01 04 00 00 28 00 00 00 58 ae b7 22 2b 00 00 00 00 00 00 00 2a 00 00 00 00 00 00 00"
    "00 d8 c1 42 00 00 00 00 78 56 34 12 01 00 00 00 00 00 00 00 00 00 e8 3f";
const char* const kDocHash = "bf5857a81adeb57abdd9797d665c8a2bd2d7b8dea2652f9e4a3a5ea9c3653f25";
const char* const kDocHello =
    "4d 52 4c 54 01 01 00 00 38 00 00 00 87 54 8d 93 bf 58 57 a8 1a de b5 7a bd d9 79 7d 66 5c 8a 2b"
    "d2 d7 b8 de a2 65 2f 9e 4a 3a 5e a9 c3 65 3f 25 7b 14 ae 47 e1 7a a4 3f 04 00 01 00 08 00 00 00"
    "63 61 72 74 70 6f 6c 65";
const char* const kDocWelcome =
    "4d 52 4c 54 01 02 00 00 50 00 00 00 f6 75 2f 35 78 56 34 12 c8 00 00 00 80 d9 9f 38 00 00 00 00"
    "01 00 00 00 00 00 00 00 bf 58 57 a8 1a de b5 7a bd d9 79 7d 66 5c 8a 2b d2 d7 b8 de a2 65 2f 9e"
    "4a 3a 5e a9 c3 65 3f 25 7b 14 ae 47 e1 7a a4 3f 04 00 01 00 08 00 00 00 63 61 72 74 70 6f 6c 65";
const char* const kDocRefusal =
    "4d 52 4c 54 01 02 00 00 6d 00 00 00 e7 7b 8e 0b 00 00 00 00 c8 00 00 00 80 d9 9f 38 00 00 00 00"
    "00 00 1d 00 00 00 00 00 bf 58 57 a8 1a de b5 7a bd d9 79 7d 66 5c 8a 2b d2 d7 b8 de a2 65 2f 9e"
    "4a 3a 5e a9 c3 65 3f 25 7b 14 ae 47 e1 7a a4 3f 04 00 01 00 08 00 00 00 63 61 72 74 70 6f 6c 65"
    "72 6f 62 6f 74 2e 79 61 6d 6c 20 69 6e 74 65 72 66 61 63 65 20 6d 69 73 6d 61 74 63 68";

// The rejection reason, or nullopt when the frame decodes.
std::optional<Reason> reason_of(const Bytes& frame, const DecodeExpect& expect = {}) {
  Decoded d = decode(frame.data(), frame.size(), expect);
  return d.ok() ? std::nullopt : std::optional<Reason>(d.error.reason);
}

void codec_tests() {
  const char* digits = "123456789";
  check(crc32(reinterpret_cast<const std::uint8_t*>(digits), 9) == 0xCBF43926u, "crc32(\"123456789\")");

  StateFrame s;
  s.seq = 42;
  s.stamp_ns = 1000000000;
  s.applied_command_seq = 41;
  s.session = 0x12345678;
  s.obs = {0.5, 3.0, -0.25, 1.5};
  s.applied_action = {0.75};
  check(encode_state(s) == from_hex(kDocState), "STATE example frame of docs/telemetry.md");

  CommandFrame c;
  c.seq = 43;
  c.answers_seq = 42;
  c.expires_ns = 1120000000;
  c.session = 0x12345678;
  c.action = {0.75};
  const Bytes command = encode_command(c);
  check(command == from_hex(kDocCommand), "COMMAND example frame of docs/telemetry.md");

  const DecodeExpect as_command{MsgType::Command, 4, 1};
  Decoded d = decode(command.data(), command.size(), as_command);
  check(d.ok() && std::get<CommandFrame>(*d.message).answers_seq == 42, "COMMAND round trip");

  Bytes bad = command;
  bad[20] ^= 1;
  check(reason_of(bad, as_command) == Reason::Crc, "a flipped payload bit is a crc rejection");
  bad = command;
  bad[4] = 2;
  check(reason_of(reseal(bad), as_command) == Reason::Version, "version 2 is refused");
  check(reason_of(Bytes(command.begin(), command.begin() + 10), as_command) == Reason::TooShort, "too_short");
  check(reason_of(Bytes(65600, 0), as_command) == Reason::TooLong, "too_long");
  check(reason_of(from_hex(kDocState), as_command) == Reason::UnexpectedType, "a STATE on the command socket");
  bad = command;
  bad[46] = 1;  // reserved
  check(reason_of(reseal(bad), as_command) == Reason::Reserved, "reserved");
  check(reason_of(command, DecodeExpect{MsgType::Command, 4, 2}) == Reason::Dims, "dims");
  CommandFrame nan = c;
  nan.action = {0.0};
  bad = encode_command(nan);
  const double not_a_number = std::nan("");
  std::memcpy(bad.data() + 48, &not_a_number, 8);
  check(reason_of(reseal(bad), as_command) == Reason::NonFinite, "non_finite");
  bad = command;
  bad[6] = 1;  // a flag on a COMMAND
  check(reason_of(reseal(bad), as_command) == Reason::Flags, "flags");

  // A NaN/Inf observation is carried (a failed sensor, for the controller's safety layer); an applied action is not.
  StateFrame failed = s;
  failed.obs = {std::nan(""), 3.0, -std::numeric_limits<double>::infinity(), 1.5};
  Bytes nan_state = encode_state(failed);
  d = decode(nan_state.data(), nan_state.size(), DecodeExpect{MsgType::State, 4, 1});
  check(d.ok() && std::isnan(std::get<StateFrame>(*d.message).obs[0]) &&
            std::isinf(std::get<StateFrame>(*d.message).obs[2]),
        "a STATE with a NaN/Inf observation decodes");
  std::memcpy(nan_state.data() + 16 + 32 + 8 * 4, &not_a_number, 8);
  check(reason_of(reseal(nan_state)) == Reason::NonFinite, "a NaN applied action is non_finite");
  failed.safe = true;  // SAFE needs applied_command_seq 0: the encoder refuses what the decoder refuses
  bool refused = false;
  try {
    encode_state(failed);
  } catch (const std::invalid_argument&) {
    refused = true;
  }
  check(refused, "encode_state refuses SAFE with a command seq");

  Hello doc_hello;
  doc_hello.identity = {"cartpole", parse_interface_hash(kDocHash), 0.04, 4, 1};
  check(encode_hello(doc_hello) == from_hex(kDocHello), "HELLO example frame of docs/telemetry.md");
  Welcome doc_welcome;
  doc_welcome.accepted = true;
  doc_welcome.session = 0x12345678;
  doc_welcome.watchdog_ms = 200;
  doc_welcome.robot_stamp_ns = 950000000;
  doc_welcome.identity = doc_hello.identity;
  check(encode_welcome(doc_welcome) == from_hex(kDocWelcome), "WELCOME example frame of docs/telemetry.md");
  doc_welcome.accepted = false;
  doc_welcome.session = 0;
  doc_welcome.message = "robot.yaml interface mismatch";
  check(encode_welcome(doc_welcome) == from_hex(kDocRefusal), "refusing WELCOME example frame of docs/telemetry.md");

  Hello h;
  h.identity = {"cartpole", parse_interface_hash(std::string(64, 'a')), 0.04, 4, 1};
  Bytes hello = encode_hello(h);
  d = decode(hello.data(), hello.size(), DecodeExpect{MsgType::Hello, {}, {}});
  check(d.ok() && std::get<Hello>(*d.message).identity.robot_name == "cartpole", "HELLO round trip");
  hello[64] = '\n';  // a control character in the name
  check(reason_of(reseal(hello)) == Reason::Text, "text");
  hello[64] = static_cast<std::uint8_t>(0xC3);  // not ASCII (the first byte of a UTF-8 e-acute)
  check(reason_of(reseal(hello)) == Reason::Text, "text: names are ASCII");
  check(is_protocol_text("cart pole ~") && !is_protocol_text("caf\xc3\xa9") && !is_protocol_text("a\x7f"),
        "is_protocol_text is printable ASCII");

  Welcome w;
  w.accepted = true;
  w.session = 7;
  w.watchdog_ms = 200;
  w.identity = h.identity;
  const Bytes welcome = encode_welcome(w);
  d = decode(welcome.data(), welcome.size());
  check(d.ok() && std::get<Welcome>(*d.message).session == 7, "WELCOME round trip");

  for (std::size_t i = 0; i < kReasonCount; ++i) {
    const auto r = static_cast<Reason>(i);
    check(reason_from_name(reason_name(r)) == r, std::string("reason name ") + reason_name(r));
  }
  const Endpoints e = Endpoints::parse("command=ipc:///tmp/c, state=ipc:///tmp/s, handshake=ipc:///tmp/h");
  check(e.state == "ipc:///tmp/s" && e.command == "ipc:///tmp/c" && e.handshake == "ipc:///tmp/h", "Endpoints::parse");
}

// ---- loopback: this program is the controller -------------------------------------------------------------
Bytes recv_bytes(void* sock, int timeout_ms) {
  zmq_pollitem_t item{sock, 0, ZMQ_POLLIN, 0};
  if (zmq_poll(&item, 1, timeout_ms) <= 0) return {};
  zmq_msg_t msg;
  zmq_msg_init(&msg);
  zmq_msg_recv(&msg, sock, 0);
  const auto* p = static_cast<const std::uint8_t*>(zmq_msg_data(&msg));
  Bytes out(p, p + zmq_msg_size(&msg));
  zmq_msg_close(&msg);
  return out;
}

void loopback_test() {
  RobotInterface robot;
  robot.name = "cartpole";
  robot.interface_hash = parse_interface_hash(std::string(64, 'b'));
  robot.ctrl_dt = 0.04;
  robot.obs_dim = 4;
  robot.action_dim = 1;
  robot.action_low = {-1.0};
  robot.action_high = {1.0};
  robot.safe_command = {0.0};
  RobotClientOptions options;
  options.watchdog_ms = 100;
  RobotClient client(robot, Endpoints::from_port_base("127.0.0.1", 0), options);
  const Endpoints bound = client.start();

  void* ctx = zmq_ctx_new();
  const int zero = 0;
  void* req = zmq_socket(ctx, ZMQ_REQ);
  void* sub = zmq_socket(ctx, ZMQ_SUB);
  void* pub = zmq_socket(ctx, ZMQ_PUB);
  for (void* s : {req, sub, pub}) zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
  const int queue = kRecvQueueFrames;  // as a controller's state SUB: a bounded queue, every frame validated
  zmq_setsockopt(sub, ZMQ_RCVHWM, &queue, sizeof queue);
  zmq_setsockopt(sub, ZMQ_SUBSCRIBE, "", 0);
  zmq_connect(req, bound.handshake.c_str());
  zmq_connect(sub, bound.state.c_str());
  zmq_connect(pub, bound.command.c_str());

  Hello hello;
  hello.identity = {robot.name, robot.interface_hash, robot.ctrl_dt, 4, 1};
  const Bytes hello_bytes = encode_hello(hello);
  zmq_send(req, hello_bytes.data(), hello_bytes.size(), 0);
  Bytes reply;
  for (int i = 0; i < 500 && reply.empty(); ++i) {
    client.service();
    reply = recv_bytes(req, 10);
  }
  Decoded d = decode(reply.data(), reply.size(), DecodeExpect{MsgType::Welcome, {}, {}});
  check(d.ok() && std::get<Welcome>(*d.message).accepted, "the robot accepts a HELLO with its own hash");
  const std::uint32_t session = d.ok() ? std::get<Welcome>(*d.message).session : 0;
  check(session != 0 && session == client.session(), "the WELCOME's session is the robot's");
  check(client.current_action().reason == DecisionReason::NoCommand, "safe command before any command");

  StateFrame state;
  for (int i = 0; i < 500 && state.seq == 0; ++i) {  // PUB drops until the SUB's connection is up
    client.publish_state({0.0, 3.14, 0.0, 0.0});
    Bytes frame = recv_bytes(sub, 10);
    Decoded s = decode(frame.data(), frame.size(), DecodeExpect{MsgType::State, 4, 1});
    if (s.ok()) state = std::get<StateFrame>(*s.message);
  }
  check(state.seq >= 1 && state.session == session && state.safe, "a SAFE state of the session arrives");

  CommandFrame command;
  command.answers_seq = state.seq;
  command.expires_ns = state.stamp_ns + 10'000'000'000;
  command.session = session;
  command.action = {0.5};
  for (int i = 0; i < 500 && client.counters().commands.accepted == 0; ++i) {
    command.seq = static_cast<std::uint64_t>(i) + 1;
    const Bytes bytes = encode_command(command);
    zmq_send(pub, bytes.data(), bytes.size(), 0);
    client.serve_until(client.now() + 10'000'000);
  }
  CommandDecision decision = client.current_action();
  check(decision.reason == DecisionReason::Command && decision.action == std::vector<double>{0.5},
        "the command reaches the motors");
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  decision = client.current_action();
  check(decision.safe && decision.reason == DecisionReason::Watchdog, "the watchdog engages after 100 ms");
  check(client.counters().watchdog_engagements == 1, "one watchdog engagement");

  for (void* s : {req, sub, pub}) zmq_close(s);
  zmq_ctx_term(ctx);
  client.close();
}

}  // namespace

int main() {
  codec_tests();
  loopback_test();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("metarl_robot_sdk selftest: all checks passed\n");
  return 0;
}
