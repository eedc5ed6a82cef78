// CURVE for the robot side: reading ZeroMQ certificate files and authorising controllers by public key.
#include <zmq.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>

#include "curve_internal.hpp"
#include "metarl_robot_sdk/robot_client.hpp"

namespace metarl::robot_sdk {
namespace {

const char* const kKeygenHint =
    "generate keys with `python -m metarl_robot.telemetry.keys <dir>` (see docs/telemetry.md, CURVE)";

std::string trim(const std::string& s) {
  const auto first = s.find_first_not_of(" \t\r\n");
  if (first == std::string::npos) return {};
  const auto last = s.find_last_not_of(" \t\r\n");
  return s.substr(first, last - first + 1);
}

}  // namespace

std::string CurveServerKeys::read_certificate_key(const std::string& path, const std::string& which) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("CURVE key file " + path + " not found; " + kKeygenHint);
  // ZPL (ZeroMQ property language): `curve` section, lines `public-key = "<40 Z85 chars>"`. Only the two key
  // lines matter here, so a line scan is enough (comments start with '#').
  std::string line;
  while (std::getline(in, line)) {
    const std::string t = trim(line);
    if (t.empty() || t[0] == '#' || t.rfind(which, 0) != 0) continue;
    const auto eq = t.find('=');
    if (eq == std::string::npos) continue;
    std::string value = trim(t.substr(eq + 1));
    if (value.size() >= 2 && (value.front() == '"' || value.front() == '\'') && value.back() == value.front()) {
      value = value.substr(1, value.size() - 2);
    }
    detail::decode_z85_key(value, path);  // fail here, naming the file, rather than at bind time
    return value;
  }
  throw std::runtime_error("CURVE key file " + path + " holds no " + which +
                           (which == "secret-key" ? " (give the *.key_secret file); " : "; ") + kKeygenHint);
}

CurveServerKeys CurveServerKeys::from_files(const std::string& secret_key_file,
                                            const std::string& authorized_clients_dir) {
  CurveServerKeys keys;
  keys.secret_key_z85 = read_certificate_key(secret_key_file, "secret-key");
  namespace fs = std::filesystem;
  std::error_code ec;
  std::vector<std::string> files;
  if (fs::is_directory(authorized_clients_dir, ec)) {
    for (const auto& entry : fs::directory_iterator(authorized_clients_dir, ec)) {
      if (entry.is_regular_file() && entry.path().extension() == ".key") files.push_back(entry.path().string());
    }
  }
  if (files.empty()) {
    throw std::runtime_error("CURVE authorised-clients folder " + authorized_clients_dir +
                             " is missing or holds no *.key (copy each controller's public .key there); " +
                             kKeygenHint);
  }
  std::sort(files.begin(), files.end());
  for (const auto& f : files) keys.authorized_clients_z85.push_back(read_certificate_key(f, "public-key"));
  return keys;
}

CurveServerKeys CurveServerKeys::from_dir(const std::string& key_dir) {
  const std::filesystem::path d(key_dir);
  return from_files((d / "robot.key_secret").string(), (d / "authorized_clients").string());
}

namespace detail {

CurveKey decode_z85_key(const std::string& z85, const std::string& what) {
  CurveKey key{};
  if (z85.size() != 40 || zmq_z85_decode(key.data(), z85.c_str()) == nullptr) {
    throw std::runtime_error("CURVE key in " + what + " is not 40 Z85 characters");
  }
  return key;
}

ZapHandler::ZapHandler(void* context, std::vector<CurveKey> allowed) : allowed_(std::move(allowed)) {
  socket_ = zmq_socket(context, ZMQ_REP);
  if (socket_ == nullptr) throw std::runtime_error(std::string("ZAP socket: ") + zmq_strerror(zmq_errno()));
  const int linger = 0;
  zmq_setsockopt(socket_, ZMQ_LINGER, &linger, sizeof linger);
  // Bound before any CURVE socket binds, so no client connects in a window without authentication.
  if (zmq_bind(socket_, "inproc://zeromq.zap.01") != 0) {
    const std::string why = zmq_strerror(zmq_errno());
    zmq_close(socket_);
    throw std::runtime_error("cannot bind the ZAP handler (inproc://zeromq.zap.01): " + why);
  }
  thread_ = std::thread(&ZapHandler::run, this);
}

ZapHandler::~ZapHandler() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

void ZapHandler::run() {
  while (!stop_) {
    zmq_pollitem_t item{socket_, 0, ZMQ_POLLIN, 0};
    const int rc = zmq_poll(&item, 1, 100);  // 100 ms: notice stop_ soon
    if (rc < 0 && zmq_errno() == ETERM) break;
    if (rc <= 0 || !(item.revents & ZMQ_POLLIN)) continue;
    std::vector<std::string> parts;
    int more = 1;
    while (more) {
      zmq_msg_t msg;
      zmq_msg_init(&msg);
      if (zmq_msg_recv(&msg, socket_, 0) < 0) {
        zmq_msg_close(&msg);
        break;
      }
      parts.emplace_back(static_cast<const char*>(zmq_msg_data(&msg)), zmq_msg_size(&msg));
      more = zmq_msg_more(&msg);
      zmq_msg_close(&msg);
    }
    // Request: version, request_id, domain, address, routing id, mechanism, credentials (CURVE: the client's
    // 32-byte public key). Reply: version, request_id, status code, status text, user id, metadata.
    bool ok = false;
    if (parts.size() >= 7 && parts[0] == "1.0" && parts[5] == "CURVE" && parts[6].size() == 32) {
      ok = std::any_of(allowed_.begin(), allowed_.end(), [&](const CurveKey& k) {
        return std::memcmp(k.data(), parts[6].data(), 32) == 0;
      });
    }
    if (!ok) ++refused_;
    const std::string request_id = parts.size() > 1 ? parts[1] : std::string();
    const std::string reply[6] = {"1.0", request_id, ok ? "200" : "400", ok ? "OK" : "client key not authorised",
                                  "", ""};
    for (int i = 0; i < 6; ++i) zmq_send(socket_, reply[i].data(), reply[i].size(), i < 5 ? ZMQ_SNDMORE : 0);
  }
  zmq_close(socket_);
}

}  // namespace detail
}  // namespace metarl::robot_sdk
