// The robot side of the metarl telemetry link (docs/telemetry.md), for a C++ motor driver.
//
// RobotClient binds the three sockets (state PUB, command SUB, handshake REP), answers handshakes, publishes
// STATE frames, takes in COMMAND frames and decides, once per control period, what the motors get: the newest
// valid command, or robot.yaml's safe command when there is none, when it expired, or when no fresh valid
// command arrived for watchdog_ms (the robot-side command watchdog). Everything but the optional CURVE
// authenticator runs in the caller's thread; call current_action() at least once per control period:
//
//   metarl::robot_sdk::RobotClient client(interface, metarl::robot_sdk::Endpoints::from_port_base("0.0.0.0"));
//   client.start();
//   while (running) {
//     auto decision = client.current_action();   // newest valid command, or the safe command
//     driver.write(decision.action);
//     sleep_until_next_period();
//     client.publish_state(driver.read());       // carries the action applied in the period that just ended
//   }
//
// It is a port of the Python reference metarl_robot.telemetry.robot_client.RobotClient (same decisions, same
// counters, same refusal messages where it matters); the conformance tests in tests/robot_sdk run both.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "metarl_robot_sdk/protocol.hpp"

namespace metarl::robot_sdk {

/// What the robot side must know of its robot.yaml. A C++ robot does not parse robot.yaml: copy these numbers
/// (`metarl robot <name>` prints them, the hash as "interface sha256 ...") and update them together with it.
struct RobotInterface {
  std::string name;                  ///< robot.yaml `name`
  InterfaceHash interface_hash{};    ///< parse_interface_hash("<64 hex digits>")
  double ctrl_dt = 0.0;              ///< control period, seconds
  std::uint16_t obs_dim = 0;         ///< measured observation size (privileged fields left out)
  std::uint16_t action_dim = 0;
  std::vector<double> action_low;    ///< per action: commands outside [low, high] are rejected
  std::vector<double> action_high;
  std::vector<double> safe_command;  ///< robot.yaml safe_command, applied when no valid command is current
  std::vector<std::string> action_names;  ///< optional: names in rejection details

  /// Throws std::invalid_argument naming what is inconsistent (sizes, limits, safe command outside them).
  void validate() const;
};

/// The three ZeroMQ addresses the robot binds.
struct Endpoints {
  std::string state;      ///< STATE, robot PUB → controller SUB
  std::string command;    ///< COMMAND, controller PUB → robot SUB
  std::string handshake;  ///< HELLO/WELCOME, controller REQ → robot REP

  /// tcp://host:base, base+1, base+2; port_base 0 binds free ports (read them back from start()).
  static Endpoints from_port_base(const std::string& host = "127.0.0.1", int port_base = 47100);
  /// ipc://dir/state, ipc://dir/command, ipc://dir/handshake.
  static Endpoints ipc(const std::string& directory);
  /// "state=URL,command=URL,handshake=URL" (any order) or three URLs in that order.
  static Endpoints parse(const std::string& text);
};

/// Robot side of CURVE (docs/telemetry.md, "CURVE"): the robot's secret key and the controller public keys
/// it accepts. With it, every socket is a CURVE server and a ZAP handler refuses any other client key.
struct CurveServerKeys {
  std::string secret_key_z85;                      ///< 40 Z85 characters
  std::vector<std::string> authorized_clients_z85; ///< public keys, 40 Z85 characters each

  /// The layout `python -m metarl_robot.telemetry.keys DIR` writes: DIR/robot.key_secret and
  /// DIR/authorized_clients/*.key (ZeroMQ certificate files). Throws std::runtime_error naming the file.
  static CurveServerKeys from_dir(const std::string& key_dir);
  static CurveServerKeys from_files(const std::string& secret_key_file, const std::string& authorized_clients_dir);
  /// The `public-key` or `secret-key` of a ZeroMQ certificate (ZPL) file; throws std::runtime_error.
  static std::string read_certificate_key(const std::string& path, const std::string& which);
};

struct RobotClientOptions {
  /// No fresh valid command for this long (robot clock) → safe command. 0: 5 control periods.
  double watchdog_ms = 0.0;
  /// Robot monotonic clock in ns; stamps, expiry and the watchdog all use it. Empty: std::chrono::steady_clock.
  std::function<std::int64_t()> clock;
  /// Robot-clock seconds per wall-clock second (1 on hardware; a simulation running faster or slower).
  double clock_rate = 1.0;
  std::optional<CurveServerKeys> curve;
};

/// Why the motors get what they get.
enum class DecisionReason { Command, NoCommand, Expired, Watchdog };
const char* decision_reason_name(DecisionReason reason);  ///< "command", "no_command", "expired", "watchdog"

struct CommandDecision {
  std::vector<double> action;     ///< what the motors get, robot.yaml order
  bool safe = true;               ///< action is the safe command
  DecisionReason reason = DecisionReason::NoCommand;
  std::uint64_t command_seq = 0;  ///< seq of the applied COMMAND; 0 for the safe command
  std::uint64_t answers_seq = 0;  ///< the STATE it answered; 0 for the safe command
  std::int64_t stamp_ns = 0;      ///< robot clock when decided
};

/// What the robot side did (the same fields as the Python RobotCounters).
struct RobotCounters {
  DecodeStats commands;                      ///< COMMAND frames: accepted, rejected per reason
  std::uint64_t handshakes_accepted = 0;
  std::uint64_t handshakes_refused = 0;
  std::uint64_t states_published = 0;
  std::uint64_t raw_frames_published = 0;
  std::uint64_t periods_commanded = 0;       ///< decisions that applied a controller command
  std::uint64_t periods_safe = 0;            ///< decisions that applied the safe command
  std::uint64_t watchdog_engagements = 0;    ///< switches from a command to the safe command
  std::optional<std::int64_t> last_engagement_ns;
  std::string last_refusal;                  ///< message of the latest refused handshake

  /// The shape of the Python RobotCounters.as_dict(), as JSON.
  std::string to_json() const;
};

class RobotClient {
 public:
  RobotClient(RobotInterface robot, Endpoints endpoints, RobotClientOptions options = {});
  ~RobotClient();  ///< close()
  RobotClient(const RobotClient&) = delete;
  RobotClient& operator=(const RobotClient&) = delete;

  /// Bind the sockets (and start the CURVE authenticator); returns the bound endpoints (ports resolved).
  /// Throws std::runtime_error naming the address that could not be bound.
  Endpoints start();
  /// Close the sockets (linger 0); safe to call twice. Applying the safe command first is the driver's job.
  void close();

  /// Answer pending handshakes and take in pending commands, without blocking.
  void service();
  /// service(), then decide what the motors get now (the watchdog lives here). Call once per control period.
  CommandDecision current_action();
  /// Block (servicing) until a new valid command answering STATE `answering_seq` or later arrives (true) or the
  /// robot clock reaches `until_ns` (false).
  bool wait_for_command(std::int64_t until_ns, std::uint64_t answering_seq = 0);
  /// Block until the robot clock reaches `until_ns`, answering handshakes and taking in commands meanwhile.
  void serve_until(std::int64_t until_ns);

  /// Build the next STATE frame (seq + 1, stamp = now unless given) without sending it. The applied action is
  /// the last decision's unless given (pass what the motors really got if the driver limited it); the frame
  /// says whether that was the safe command and which command it was. Throws std::invalid_argument for a
  /// wrong-size or non-finite observation (no sequence number is used up).
  StateFrame make_state(const std::vector<double>& obs, const std::vector<double>* applied_action = nullptr,
                        std::optional<std::int64_t> stamp_ns = std::nullopt);
  /// make_state() and send it.
  StateFrame publish_state(const std::vector<double>& obs, const std::vector<double>* applied_action = nullptr,
                           std::optional<std::int64_t> stamp_ns = std::nullopt);
  /// Send already-encoded bytes on the state socket (fault injection and tests only).
  void publish_raw(const std::uint8_t* data, std::size_t size);

  std::int64_t now() const;                   ///< the robot clock
  bool armed() const;                         ///< a controller completed a handshake
  std::uint32_t session() const;              ///< the armed controller's session, 0 when none
  std::uint64_t state_seq() const;            ///< seq of the newest STATE made (0: none yet)
  double watchdog_ms() const;
  const RobotInterface& robot() const;
  const RobotCounters& counters() const;
  const std::optional<CommandDecision>& last_decision() const;
  /// Robot clock when the newest valid command arrived; nullopt when none since the last handshake.
  std::optional<std::int64_t> last_command_received_ns() const;
  /// The most recent rejected COMMAND (for diagnostics).
  const std::optional<FrameError>& last_command_error() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;  // keeps zmq.h out of this header
};

}  // namespace metarl::robot_sdk
