// CURVE plumbing shared by robot_client.cpp and curve.cpp (not installed: users see only CurveServerKeys).
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

namespace metarl::robot_sdk::detail {

using CurveKey = std::array<std::uint8_t, 32>;

/// 40 Z85 characters → 32 bytes; throws std::runtime_error naming `what`.
CurveKey decode_z85_key(const std::string& z85, const std::string& what);

/// A ZAP handler (ZeroMQ RFC 27) on inproc://zeromq.zap.01 of `context`: libzmq asks it about every CURVE
/// client of every socket of that context, and it answers 200 only for the listed public keys. Without one,
/// libzmq would accept any client that knows the robot's public key. Runs in its own thread because libzmq
/// asks during the connection handshake, in its I/O thread, while the robot's loop may be busy or asleep.
class ZapHandler {
 public:
  ZapHandler(void* context, std::vector<CurveKey> allowed);  ///< binds (throws std::runtime_error), then starts
  ~ZapHandler();                                             ///< stops the thread and closes its socket
  ZapHandler(const ZapHandler&) = delete;
  ZapHandler& operator=(const ZapHandler&) = delete;

  std::uint64_t refused() const { return refused_.load(); }  ///< client keys refused so far

 private:
  void run();

  void* socket_ = nullptr;
  std::vector<CurveKey> allowed_;
  std::atomic<bool> stop_{false};
  std::atomic<std::uint64_t> refused_{0};
  std::thread thread_;
};

}  // namespace metarl::robot_sdk::detail
