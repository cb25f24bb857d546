#include "dist/socket.h"

#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <memory>
#include <thread>

#include "core/error.h"

namespace lmtrain::dist {

void Fd::reset(int fd) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = fd;
}

namespace {

using AddrInfo = std::unique_ptr<addrinfo, decltype(&freeaddrinfo)>;

AddrInfo resolve(const std::string& host, int port, int socktype, bool passive) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = socktype;
  hints.ai_flags = passive ? AI_PASSIVE : 0;
  addrinfo* result = nullptr;
  int rc = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &result);
  check(rc == 0, "cannot resolve host '{}': {}", host, gai_strerror(rc));
  return AddrInfo(result, &freeaddrinfo);
}

std::string errno_text() { return std::strerror(errno); }

int millis_until(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
  return int(std::clamp<int64_t>(left.count(), 0, 1'000'000));
}

}  // namespace

Fd listen_tcp(const std::string& host, int port) {
  AddrInfo info = resolve(host, port, SOCK_STREAM, true);
  std::string last_error = "no address";
  for (addrinfo* a = info.get(); a; a = a->ai_next) {
    Fd fd(socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol));
    if (!fd) continue;
    int one = 1;
    setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd.get(), a->ai_addr, a->ai_addrlen) == 0 && listen(fd.get(), 128) == 0) return fd;
    last_error = errno_text();
  }
  fail("cannot listen on {}:{}: {}", host, port, last_error);
}

int bound_port(int fd) {
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  check(getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0, "getsockname: {}",
        errno_text());
  if (addr.ss_family == AF_INET6) return ntohs(reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port);
  return ntohs(reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
}

Fd connect_tcp(const std::string& host, int port, Clock::time_point deadline) {
  AddrInfo info = resolve(host, port, SOCK_STREAM, false);
  while (true) {
    for (addrinfo* a = info.get(); a; a = a->ai_next) {
      Fd fd(socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol));
      if (!fd) continue;
      if (connect(fd.get(), a->ai_addr, a->ai_addrlen) == 0) {
        // Store requests are tiny request/response pairs: Nagle would delay each by ~40 ms.
        int one = 1;
        setsockopt(fd.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        return fd;
      }
    }
    if (Clock::now() >= deadline) return Fd();
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

std::string local_address_towards(const std::string& host) {
  // Connecting a UDP socket sends nothing; it only asks the kernel which local address routes
  // to `host`.
  AddrInfo info = resolve(host, 9, SOCK_DGRAM, false);
  Fd fd(socket(info->ai_family, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  check(bool(fd) && connect(fd.get(), info->ai_addr, info->ai_addrlen) == 0,
        "no route from this host to '{}': {}", host, errno_text());
  sockaddr_storage addr{};
  socklen_t len = sizeof addr;
  check(getsockname(fd.get(), reinterpret_cast<sockaddr*>(&addr), &len) == 0, "getsockname: {}",
        errno_text());
  char name[NI_MAXHOST];
  int rc = getnameinfo(reinterpret_cast<sockaddr*>(&addr), len, name, sizeof name, nullptr, 0,
                       NI_NUMERICHOST);
  check(rc == 0, "getnameinfo: {}", gai_strerror(rc));
  return name;
}

void write_all(int fd, const void* data, size_t bytes, const char* what) {
  auto* p = static_cast<const char*>(data);
  while (bytes > 0) {
    ssize_t n = ::send(fd, p, bytes, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    check(n > 0, "{}: connection lost while sending ({})", what, errno_text());
    p += n;
    bytes -= size_t(n);
  }
}

bool read_all(int fd, void* data, size_t bytes, Clock::time_point deadline, const char* what) {
  auto* p = static_cast<char*>(data);
  while (bytes > 0) {
    pollfd pfd{fd, POLLIN, 0};
    int ready = ::poll(&pfd, 1, millis_until(deadline));
    if (ready < 0 && errno == EINTR) continue;
    check(ready >= 0, "{}: poll: {}", what, errno_text());
    if (ready == 0) {
      if (Clock::now() >= deadline) return false;
      continue;
    }
    ssize_t n = ::recv(fd, p, bytes, 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    check(n > 0, "{}: connection closed by the peer", what);
    p += n;
    bytes -= size_t(n);
  }
  return true;
}

}  // namespace lmtrain::dist
