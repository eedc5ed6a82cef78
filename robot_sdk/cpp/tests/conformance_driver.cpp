// The C++ RobotClient behind a line protocol on stdin/stdout, so the Python conformance tests
// (tests/robot_sdk/test_cpp_client.py) can drive it exactly as they drive the Python RobotClient in-process.
//
//   metarl_robot_sdk_conformance --name cartpole --interface-hash HEX --obs-dim 4 --action-dim 1 --ctrl-dt 0.04
//       --low -1 --high 1 --safe 0 [--action-names motor] [--watchdog-ms 150] [--endpoints SPEC]
//       [--manual-clock START_NS] [--curve-keys DIR]
//
// First line out: {"event": "ready", "endpoints": {...}, ...}. Then one JSON line per command line in:
//   service                      answer handshakes, take in commands      → {"ok": true}
//   decide                       current_action()                          → the decision
//   publish OBS_CSV [APPLIED_CSV] publish_state()                          → the frame's header fields
//   publish_raw HEX              publish_raw()                             → {"ok": true}
//   advance NS                   move the manual clock forward             → {"ok": true}
//   serve MS                     service() for MS wall milliseconds        → {"ok": true}
//   status                       session, armed, state_seq, now_ns, last_command_received_ns, watchdog_ms
//   counters                     RobotCounters as JSON (the Python RobotCounters.as_dict() shape)
//   decode EXPECT OBS ACT HEX    decode() with expectations (EXPECT any|hello|welcome|state|command,
//                                OBS/ACT 0 = not checked)                  → {"ok": false, "reason": ...} or fields
//   quit
// Errors in a command (bad numbers, a wrong-size observation) answer {"error": "..."} and the driver goes on.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "metarl_robot_sdk/robot_client.hpp"

using namespace metarl::robot_sdk;

namespace {

std::vector<std::string> split(const std::string& text, char sep) {
  std::vector<std::string> out;
  std::string item;
  std::istringstream in(text);
  while (std::getline(in, item, sep)) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

double to_double(const std::string& s) {
  char* end = nullptr;
  const double v = std::strtod(s.c_str(), &end);
  if (end == s.c_str() || *end != '\0') throw std::invalid_argument("not a number: " + s);
  return v;
}

std::vector<double> doubles(const std::string& csv) {
  std::vector<double> out;
  for (const auto& s : split(csv, ',')) out.push_back(to_double(s));
  return out;
}

std::string num(double x) {
  // Python's json reads these three tokens for the non-finite values a STATE observation may carry.
  if (std::isnan(x)) return "NaN";
  if (std::isinf(x)) return x > 0 ? "Infinity" : "-Infinity";
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", x);
  return buf;
}

std::string json_array(const std::vector<double>& v) {
  std::string s = "[";
  for (std::size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + num(v[i]);
  return s + "]";
}

Bytes from_hex(const std::string& hex) {
  if (hex.size() % 2) throw std::invalid_argument("hex string of odd length");
  Bytes out(hex.size() / 2);
  for (std::size_t i = 0; i < out.size(); ++i) out[i] = static_cast<std::uint8_t>(std::stoul(hex.substr(2 * i, 2), nullptr, 16));
  return out;
}

std::string identity_json(const Identity& id) {
  return "\"robot_name\": " + json_string(id.robot_name) + ", \"interface_hash\": \"" + to_hex(id.interface_hash) +
         "\", \"obs_dim\": " + std::to_string(id.obs_dim) + ", \"action_dim\": " + std::to_string(id.action_dim) +
         ", \"ctrl_dt\": " + num(id.ctrl_dt);
}

// A decoded message as JSON, with the field names of the Python dataclasses.
std::string message_json(const Message& message) {
  if (const auto* s = std::get_if<StateFrame>(&message)) {
    return "{\"ok\": true, \"type\": \"STATE\", \"seq\": " + std::to_string(s->seq) + ", \"stamp_ns\": " +
           std::to_string(s->stamp_ns) + ", \"applied_command_seq\": " + std::to_string(s->applied_command_seq) +
           ", \"session\": " + std::to_string(s->session) + ", \"safe\": " + (s->safe ? "true" : "false") +
           ", \"obs\": " + json_array(s->obs) + ", \"applied_action\": " +
           (s->applied_action.empty() ? "null" : json_array(s->applied_action)) + "}";
  }
  if (const auto* c = std::get_if<CommandFrame>(&message)) {
    return "{\"ok\": true, \"type\": \"COMMAND\", \"seq\": " + std::to_string(c->seq) + ", \"answers_seq\": " +
           std::to_string(c->answers_seq) + ", \"expires_ns\": " + std::to_string(c->expires_ns) +
           ", \"session\": " + std::to_string(c->session) + ", \"action\": " + json_array(c->action) + "}";
  }
  if (const auto* h = std::get_if<Hello>(&message)) {
    return "{\"ok\": true, \"type\": \"HELLO\", " + identity_json(h->identity) + "}";
  }
  const auto& w = std::get<Welcome>(message);
  return "{\"ok\": true, \"type\": \"WELCOME\", \"accepted\": " + std::string(w.accepted ? "true" : "false") +
         ", \"session\": " + std::to_string(w.session) + ", \"watchdog_ms\": " + std::to_string(w.watchdog_ms) +
         ", \"robot_stamp_ns\": " + std::to_string(w.robot_stamp_ns) + ", " + identity_json(w.identity) +
         ", \"message\": " + json_string(w.message) + "}";
}

std::string decision_json(const CommandDecision& d) {
  return "{\"action\": " + json_array(d.action) + ", \"safe\": " + (d.safe ? "true" : "false") + ", \"reason\": \"" +
         decision_reason_name(d.reason) + "\", \"command_seq\": " + std::to_string(d.command_seq) +
         ", \"answers_seq\": " + std::to_string(d.answers_seq) + ", \"stamp_ns\": " + std::to_string(d.stamp_ns) + "}";
}

std::string optional_json(const std::optional<std::int64_t>& v) { return v ? std::to_string(*v) : "null"; }

struct Args {
  RobotInterface robot;
  double watchdog_ms = 0;
  std::string endpoints = "tcp://127.0.0.1:*,tcp://127.0.0.1:*,tcp://127.0.0.1:*";
  std::optional<std::int64_t> manual_clock;
  std::string curve_keys;
};

Args parse_args(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (i + 1 >= argc) throw std::invalid_argument("missing value after " + flag);
    const std::string value = argv[++i];
    if (flag == "--name") a.robot.name = value;
    else if (flag == "--interface-hash") a.robot.interface_hash = parse_interface_hash(value);
    else if (flag == "--obs-dim") a.robot.obs_dim = static_cast<std::uint16_t>(std::stoi(value));
    else if (flag == "--action-dim") a.robot.action_dim = static_cast<std::uint16_t>(std::stoi(value));
    else if (flag == "--ctrl-dt") a.robot.ctrl_dt = to_double(value);
    else if (flag == "--low") a.robot.action_low = doubles(value);
    else if (flag == "--high") a.robot.action_high = doubles(value);
    else if (flag == "--safe") a.robot.safe_command = doubles(value);
    else if (flag == "--action-names") a.robot.action_names = split(value, ',');
    else if (flag == "--watchdog-ms") a.watchdog_ms = to_double(value);
    else if (flag == "--endpoints") a.endpoints = value;
    else if (flag == "--manual-clock") a.manual_clock = std::stoll(value);
    else if (flag == "--curve-keys") a.curve_keys = value;
    else throw std::invalid_argument("unknown flag " + flag);
  }
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  try {
    args = parse_args(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "conformance driver: %s\n", e.what());
    return 2;
  }
  auto manual_now = std::make_shared<std::int64_t>(args.manual_clock.value_or(0));
  RobotClientOptions options;
  options.watchdog_ms = args.watchdog_ms;
  if (args.manual_clock) options.clock = [manual_now] { return *manual_now; };
  if (!args.curve_keys.empty()) options.curve = CurveServerKeys::from_dir(args.curve_keys);

  RobotClient client(args.robot, Endpoints::parse(args.endpoints), options);
  Endpoints bound;
  try {
    bound = client.start();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "conformance driver: %s\n", e.what());
    return 2;
  }
  std::cout << "{\"event\": \"ready\", \"endpoints\": {\"state\": " << json_string(bound.state)
            << ", \"command\": " << json_string(bound.command) << ", \"handshake\": " << json_string(bound.handshake)
            << "}, \"interface_sha256\": \"" << to_hex(args.robot.interface_hash) << "\", \"watchdog_ms\": "
            << num(client.watchdog_ms()) << "}" << std::endl;

  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string cmd;
    in >> cmd;
    std::string out;
    try {
      if (cmd == "quit") break;
      if (cmd == "service") {
        client.service();
        out = "{\"ok\": true}";
      } else if (cmd == "decide") {
        out = decision_json(client.current_action());
      } else if (cmd == "publish") {
        std::string obs_csv, applied_csv;
        in >> obs_csv >> applied_csv;
        const std::vector<double> obs = doubles(obs_csv);
        const std::vector<double> applied = doubles(applied_csv);
        const StateFrame f = client.publish_state(obs, applied_csv.empty() ? nullptr : &applied);
        out = "{\"seq\": " + std::to_string(f.seq) + ", \"stamp_ns\": " + std::to_string(f.stamp_ns) +
              ", \"session\": " + std::to_string(f.session) + ", \"safe\": " + (f.safe ? "true" : "false") +
              ", \"applied_command_seq\": " + std::to_string(f.applied_command_seq) + "}";
      } else if (cmd == "publish_raw") {
        std::string hex;
        in >> hex;
        const Bytes data = from_hex(hex);
        client.publish_raw(data.data(), data.size());
        out = "{\"ok\": true}";
      } else if (cmd == "advance") {
        std::int64_t ns = 0;
        in >> ns;
        if (!args.manual_clock) throw std::invalid_argument("advance needs --manual-clock");
        *manual_now += ns;
        out = "{\"ok\": true}";
      } else if (cmd == "serve") {
        double ms = 0;
        in >> ms;
        const auto end = std::chrono::steady_clock::now() + std::chrono::microseconds(static_cast<long>(ms * 1000));
        while (std::chrono::steady_clock::now() < end) {
          client.service();
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
        out = "{\"ok\": true}";
      } else if (cmd == "status") {
        out = "{\"session\": " + std::to_string(client.session()) + ", \"armed\": " +
              (client.armed() ? "true" : "false") + ", \"state_seq\": " + std::to_string(client.state_seq()) +
              ", \"now_ns\": " + std::to_string(client.now()) + ", \"last_command_received_ns\": " +
              optional_json(client.last_command_received_ns()) + ", \"watchdog_ms\": " + num(client.watchdog_ms()) +
              "}";
      } else if (cmd == "counters") {
        out = client.counters().to_json();
      } else if (cmd == "decode") {
        std::string expect_name, hex;
        int obs_dim = 0, action_dim = 0;
        in >> expect_name >> obs_dim >> action_dim >> hex;
        DecodeExpect expect;
        if (expect_name == "hello") expect.type = MsgType::Hello;
        else if (expect_name == "welcome") expect.type = MsgType::Welcome;
        else if (expect_name == "state") expect.type = MsgType::State;
        else if (expect_name == "command") expect.type = MsgType::Command;
        else if (expect_name != "any") throw std::invalid_argument("unknown EXPECT " + expect_name);
        if (obs_dim) expect.obs_dim = static_cast<std::uint16_t>(obs_dim);
        if (action_dim) expect.action_dim = static_cast<std::uint16_t>(action_dim);
        const Bytes data = from_hex(hex);
        const Decoded d = decode(data.data(), data.size(), expect);
        out = d.ok() ? message_json(*d.message)
                     : "{\"ok\": false, \"reason\": \"" + std::string(reason_name(d.error.reason)) + "\", \"detail\": " +
                           json_string(d.error.detail) + "}";
      } else {
        throw std::invalid_argument("unknown command " + json_string(cmd));
      }
    } catch (const std::exception& e) {
      out = "{\"error\": " + json_string(e.what()) + "}";
    }
    std::cout << out << std::endl;  // endl flushes: the test waits for each answer line
  }
  client.close();
  return 0;
}
