// A tiny robot driver: a simulated cart-pole (a stand-in for real motors and encoders) behind the C++
// RobotClient, speaking the telemetry protocol to the metarl controller (the ROS 2 node, or ControllerLink).
//
//   metarl_cartpole_driver [--port-base 47100 | --endpoints SPEC] [--host 127.0.0.1] [--watchdog-ms 200]
//                          [--speed 1] [--duration SECONDS] [--curve-keys DIR] [--print-interface]
//
// Prints one JSON line {"event": "ready", "endpoints": {...}, ...} once bound, runs until SIGINT/SIGTERM (or
// --duration robot seconds), applies the safe command, and prints {"event": "summary", ...} with the counters.
//
// Each control period: wait (serving the sockets) until the command answering the newest state arrives or the
// period ends, apply the decision (the newest valid command, or the safe command), simulate the period, and
// publish the next STATE at the period boundary. A real driver replaces CartPole with its motor and encoder I/O.
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "metarl_robot_sdk/robot_client.hpp"

namespace sdk = metarl::robot_sdk;

namespace {

// sim/robots/cartpole/robot.yaml, as `metarl robot cartpole` prints it. The robot side never parses robot.yaml:
// these numbers are its copy of the interface, and the handshake refuses a controller built for another one.
// Change them together with robot.yaml (tests/robot_sdk checks that they still match).
constexpr const char* kCartpoleInterfaceSha256 = "bf5857a81adeb57abdd9797d665c8a2bd2d7b8dea2652f9e4a3a5ea9c3653f25";

sdk::RobotInterface cartpole_interface() {
  sdk::RobotInterface robot;
  robot.name = "cartpole";
  robot.interface_hash = sdk::parse_interface_hash(kCartpoleInterfaceSha256);
  robot.ctrl_dt = 0.04;        // control.period
  robot.obs_dim = 4;           // cart_pos, pole_angle, cart_vel, pole_angvel
  robot.action_dim = 1;        // motor
  robot.action_low = {-1.0};
  robot.action_high = {1.0};
  robot.safe_command = {0.0};  // safe_command.motor
  robot.action_names = {"motor"};
  return robot;
}

// Cart on a 4 m rail, pole hinged on it (angle 0 = upright, pi = hanging, unwrapped), pushed by 10 N per unit of
// command; the textbook equations of motion, integrated in 8 substeps per period like the MuJoCo model.
class CartPole {
 public:
  std::vector<double> observe() const { return {x_, theta_, x_dot_, theta_dot_}; }

  void step(double command, double dt) {
    constexpr double kGravity = 9.81, kCartMass = 1.0, kPoleMass = 0.1, kHalfLength = 0.5, kForcePerUnit = 10.0;
    constexpr double kTotal = kCartMass + kPoleMass, kRailEnd = 2.0, kFriction = 0.1;
    const int substeps = 8;
    const double h = dt / substeps;
    for (int i = 0; i < substeps; ++i) {
      const double friction = x_dot_ == 0.0 ? 0.0 : std::copysign(kFriction, x_dot_);  // rail friction, N
      const double force = kForcePerUnit * command - friction;
      const double s = std::sin(theta_), c = std::cos(theta_);
      const double temp = (force + kPoleMass * kHalfLength * theta_dot_ * theta_dot_ * s) / kTotal;
      const double theta_acc =
          (kGravity * s - c * temp) / (kHalfLength * (4.0 / 3.0 - kPoleMass * c * c / kTotal));
      const double x_acc = temp - kPoleMass * kHalfLength * theta_acc * c / kTotal;
      x_dot_ += h * x_acc;
      theta_dot_ += h * theta_acc;
      x_ += h * x_dot_;
      theta_ += h * theta_dot_;
      if (std::abs(x_) > kRailEnd) {  // the rail's end stop
        x_ = std::copysign(kRailEnd, x_);
        x_dot_ = 0.0;
      }
    }
  }

 private:
  double x_ = 0.0, theta_ = 3.14159265358979323846, x_dot_ = 0.0, theta_dot_ = 0.0;  // hanging at rest
};

std::atomic<bool> g_stop{false};
extern "C" void on_signal(int) { g_stop = true; }

std::string json_array(const std::vector<double>& v) {
  std::string s = "[";
  char buf[40];
  for (std::size_t i = 0; i < v.size(); ++i) {
    std::snprintf(buf, sizeof buf, "%.17g", v[i]);
    s += (i ? ", " : "") + std::string(buf);
  }
  return s + "]";
}

int usage(const std::string& problem) {
  std::fprintf(stderr,
               "metarl_cartpole_driver: %s\nusage: metarl_cartpole_driver [--host H] [--port-base N | --endpoints "
               "state=URL,command=URL,handshake=URL] [--watchdog-ms MS] [--speed X] [--duration S] "
               "[--curve-keys DIR] [--print-interface]\n",
               problem.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string host = "127.0.0.1", endpoints_spec, curve_dir;
  int port_base = 47100;
  double watchdog_ms = 0.0, speed = 1.0, duration_s = 0.0;
  bool print_interface = false;
  try {
    for (int i = 1; i < argc; ++i) {
      const std::string flag = argv[i];
      if (flag == "--print-interface") {
        print_interface = true;
        continue;
      }
      if (i + 1 >= argc) return usage("missing value after " + flag);
      const std::string value = argv[++i];
      if (flag == "--host") host = value;
      else if (flag == "--port-base") port_base = std::stoi(value);
      else if (flag == "--endpoints") endpoints_spec = value;
      else if (flag == "--watchdog-ms") watchdog_ms = std::stod(value);
      else if (flag == "--speed") speed = std::stod(value);
      else if (flag == "--duration") duration_s = std::stod(value);
      else if (flag == "--curve-keys") curve_dir = value;
      else return usage("unknown flag " + flag);
    }
  } catch (const std::exception&) {
    return usage("bad number");
  }

  const sdk::RobotInterface robot = cartpole_interface();
  if (print_interface) {
    std::cout << "{\"name\": " << sdk::json_string(robot.name) << ", \"interface_sha256\": \""
              << sdk::to_hex(robot.interface_hash) << "\", \"ctrl_dt\": " << robot.ctrl_dt
              << ", \"obs_dim\": " << robot.obs_dim << ", \"action_dim\": " << robot.action_dim
              << ", \"action_low\": " << json_array(robot.action_low)
              << ", \"action_high\": " << json_array(robot.action_high)
              << ", \"safe_command\": " << json_array(robot.safe_command) << "}" << std::endl;
    return 0;
  }

  // The robot clock: steady_clock, running `speed` times as fast as the wall clock (1 on hardware; a slower
  // simulation lets a loaded test machine keep up). Stamps, expiry and the watchdog all read it.
  const auto wall0 = std::chrono::steady_clock::now();
  const std::int64_t clock0 =
      std::chrono::duration_cast<std::chrono::nanoseconds>(wall0.time_since_epoch()).count();
  sdk::RobotClientOptions options;
  options.watchdog_ms = watchdog_ms;
  options.clock_rate = speed;
  options.clock = [wall0, clock0, speed] {
    const auto wall = std::chrono::steady_clock::now() - wall0;
    return clock0 + static_cast<std::int64_t>(
                        static_cast<double>(std::chrono::duration_cast<std::chrono::nanoseconds>(wall).count()) * speed);
  };

  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  try {
    if (!curve_dir.empty()) options.curve = sdk::CurveServerKeys::from_dir(curve_dir);
    const sdk::Endpoints endpoints =
        endpoints_spec.empty() ? sdk::Endpoints::from_port_base(host, port_base) : sdk::Endpoints::parse(endpoints_spec);
    sdk::RobotClient client(robot, endpoints, options);
    const sdk::Endpoints bound = client.start();
    std::cout << "{\"event\": \"ready\", \"endpoints\": {\"state\": " << sdk::json_string(bound.state)
              << ", \"command\": " << sdk::json_string(bound.command)
              << ", \"handshake\": " << sdk::json_string(bound.handshake) << "}, \"robot\": "
              << sdk::json_string(robot.name) << ", \"interface_sha256\": \"" << sdk::to_hex(robot.interface_hash)
              << "\", \"watchdog_ms\": " << client.watchdog_ms() << "}" << std::endl;

    CartPole plant;
    const auto period_ns = static_cast<std::int64_t>(std::llround(robot.ctrl_dt * 1e9));
    const std::int64_t t0 = client.now();
    client.publish_state(plant.observe());  // no decision yet: the frame carries no applied action
    long periods = 0;
    while (!g_stop) {
      if (duration_s > 0 && static_cast<double>(periods + 1) * robot.ctrl_dt > duration_s + 1e-9) break;
      const std::int64_t period_end = t0 + (periods + 1) * period_ns;
      // Apply the answer to the newest state as soon as it arrives (or whatever is current at the deadline).
      client.wait_for_command(period_end, client.state_seq());
      const sdk::CommandDecision decision = client.current_action();
      plant.step(decision.action[0], robot.ctrl_dt);  // a real driver writes decision.action to its motors here
      client.serve_until(period_end);
      ++periods;
      client.publish_state(plant.observe());  // carries decision.action and whether it was the safe command
    }
    // Shutting down: the motors' last word is the safe command (a real driver writes it before closing).
    plant.step(robot.safe_command[0], 0.0);
    std::cout << "{\"event\": \"summary\", \"periods\": " << periods << ", \"session\": " << client.session()
              << ", \"final_obs\": " << json_array(plant.observe()) << ", \"counters\": " << client.counters().to_json()
              << "}" << std::endl;
    client.close();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "metarl_cartpole_driver: %s\n", e.what());
    return 1;
  }
  return 0;
}
