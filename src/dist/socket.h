// Small POSIX socket helpers shared by the rendezvous store, Gloo setup and the launcher:
// an owning file descriptor, TCP listen/connect by host name, and framed reads and writes that
// give up at a deadline instead of blocking forever.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <utility>

namespace lmtrain::dist {

using Clock = std::chrono::steady_clock;

// An owned file descriptor, closed on destruction.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) reset(std::exchange(o.fd_, -1));
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }

  int get() const { return fd_; }
  explicit operator bool() const { return fd_ >= 0; }
  void reset(int fd = -1);
  // Gives up ownership: the caller closes it (or a process it is handed to does).
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_ = -1;
};

// A listening TCP socket bound to host:port (port 0 picks a free one).
Fd listen_tcp(const std::string& host, int port);
// The port a bound socket listens on.
int bound_port(int fd);
// Connects to host:port, retrying refused connections until `deadline` (the server may start
// later than its clients). Returns an empty Fd when the deadline passes.
Fd connect_tcp(const std::string& host, int port, Clock::time_point deadline);
// The local IP address this host uses to reach `host`: the address other machines can reach
// this rank on, when `host` is the master.
std::string local_address_towards(const std::string& host);

// Writes all of `bytes`; throws on a closed or broken connection.
void write_all(int fd, const void* data, size_t bytes, const char* what);
// Reads exactly `bytes` unless the deadline passes first (returns false; the stream is then
// unusable). Throws when the peer closes the connection.
bool read_all(int fd, void* data, size_t bytes, Clock::time_point deadline, const char* what);

}  // namespace lmtrain::dist
