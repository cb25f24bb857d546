#include "dist/tcp_store.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <optional>

#include "core/error.h"

namespace lmtrain::dist {

// ---- wire format: a message is a u32 field count, then each field as a u32 length and its bytes;
// integers are little-endian. Requests are {op, args...}; the reply to get is {value}, to add
// {decimal}, to set and wait {}. ----
namespace {

void put_u32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(char((v >> (8 * i)) & 0xff));
}

uint32_t get_u32(const char* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= uint32_t(uint8_t(p[i])) << (8 * i);
  return v;
}

std::string encode(const std::vector<Bytes>& fields) {
  std::string out;
  put_u32(out, uint32_t(fields.size()));
  for (const Bytes& f : fields) {
    put_u32(out, uint32_t(f.size()));
    out.append(f.data(), f.size());
  }
  return out;
}

// Parses one message from the front of `buffer`; std::nullopt until it is complete.
std::optional<std::vector<Bytes>> decode(std::string& buffer) {
  size_t pos = 0;
  auto take_u32 = [&](uint32_t& v) {
    if (buffer.size() < pos + 4) return false;
    v = get_u32(buffer.data() + pos);
    pos += 4;
    return true;
  };
  uint32_t count = 0;
  if (!take_u32(count)) return std::nullopt;
  std::vector<Bytes> fields(count);
  for (Bytes& f : fields) {
    uint32_t len = 0;
    if (!take_u32(len) || buffer.size() < pos + len) return std::nullopt;
    f.assign(buffer.data() + pos, buffer.data() + pos + len);
    pos += len;
  }
  buffer.erase(0, pos);
  return fields;
}

Bytes bytes(const std::string& s) { return Bytes(s.begin(), s.end()); }
std::string text(const Bytes& b) { return std::string(b.begin(), b.end()); }

std::string describe_keys(const std::vector<std::string>& keys) {
  std::string out = keys.size() == 1 ? "key " : "keys ";
  for (size_t i = 0; i < keys.size(); ++i) out += (i ? ", '" : "'") + keys[i] + "'";
  return out;
}

}  // namespace

// ---- server: one thread polling the listening socket, the clients and a stop eventfd ----
class TcpStore::Server {
 public:
  explicit Server(Fd listener) : listener_(std::move(listener)) {
    stop_.reset(eventfd(0, EFD_CLOEXEC));
    check(bool(stop_), "rendezvous store: eventfd: {}", std::strerror(errno));
    thread_ = std::thread([this] { run(); });
  }
  ~Server() {
    uint64_t one = 1;
    (void)!::write(stop_.get(), &one, sizeof one);
    thread_.join();
  }

 private:
  struct Client {
    Fd fd;
    std::string input;
    std::optional<std::vector<Bytes>> parked;  // a get or wait whose keys are not all present
  };

  void run() {
    while (true) {
      std::vector<pollfd> fds{{stop_.get(), POLLIN, 0}, {listener_.get(), POLLIN, 0}};
      for (auto& c : clients_) fds.push_back({c.first, POLLIN, 0});
      if (::poll(fds.data(), fds.size(), -1) < 0 && errno != EINTR) return;
      if (fds[0].revents) return;
      if (fds[1].revents & POLLIN) {
        Fd fd(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
        if (fd) {
          int key = fd.get();
          clients_[key].fd = std::move(fd);
        }
      }
      // A reply that failed while serving one client may have dropped another polled one.
      for (size_t i = 2; i < fds.size(); ++i)
        if (fds[i].revents && clients_.count(fds[i].fd)) receive(fds[i].fd);
    }
  }

  void receive(int fd) {
    Client& client = clients_.at(fd);
    char chunk[4096];
    ssize_t n = ::recv(fd, chunk, sizeof chunk, 0);
    if (n <= 0) {
      if (n < 0 && (errno == EINTR || errno == EAGAIN)) return;
      clients_.erase(fd);  // the rank finished or died; its parked request goes with it
      return;
    }
    client.input.append(chunk, size_t(n));
    try {
      while (auto message = decode(client.input)) handle(client, std::move(*message));
    } catch (const std::exception&) {
      clients_.erase(fd);  // malformed request or the client vanished mid-reply
    }
  }

  void handle(Client& client, std::vector<Bytes> message) {
    check(!message.empty(), "empty request");
    const std::string op = text(message[0]);
    if (op == "set" && message.size() == 3) {
      data_[text(message[1])] = std::move(message[2]);
      wake_parked();  // first: a failed reply to this client must not strand the waiters
      reply(client, {});
    } else if (op == "add" && message.size() == 3) {
      Bytes& slot = data_[text(message[1])];
      int64_t value = (slot.empty() ? 0 : std::stoll(text(slot))) + std::stoll(text(message[2]));
      slot = bytes(std::to_string(value));
      wake_parked();
      reply(client, {slot});
    } else if ((op == "get" && message.size() == 2) || (op == "wait" && message.size() >= 2)) {
      client.parked = std::move(message);
      serve_if_ready(client);
    } else {
      fail("unknown request '{}'", op);
    }
  }

  void serve_if_ready(Client& client) {
    const std::vector<Bytes>& request = *client.parked;
    for (size_t i = 1; i < request.size(); ++i)
      if (!data_.count(text(request[i]))) return;
    bool is_get = text(request[0]) == "get";
    std::vector<Bytes> answer;
    if (is_get) answer.push_back(data_.at(text(request[1])));
    client.parked.reset();
    reply(client, answer);
  }

  void wake_parked() {
    std::vector<int> dead;
    for (auto& [fd, client] : clients_) {
      if (!client.parked) continue;
      try {
        serve_if_ready(client);
      } catch (const std::exception&) {
        dead.push_back(fd);
      }
    }
    for (int fd : dead) clients_.erase(fd);
  }

  static void reply(Client& client, const std::vector<Bytes>& fields) {
    std::string wire = encode(fields);
    write_all(client.fd.get(), wire.data(), wire.size(), "rendezvous store reply");
  }

  Fd listener_, stop_;
  std::map<int, Client> clients_;
  std::map<std::string, Bytes> data_;
  std::thread thread_;
};

// ---- the listener `lmtrain launch` hands to rank 0 ----
Fd inherited_store_listener(const RankInfo& info) {
  if (info.rank != 0 || info.store_fd < 0) return Fd();
  const int fd = info.store_fd;
  auto problem = [&]() -> std::string {
    int listening = 0;
    socklen_t len = sizeof listening;
    if (::fcntl(fd, F_GETFD) < 0) return "is not an open file";
    if (::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) != 0 || !listening)
      return "is not a listening socket";
    if (int port = bound_port(fd); port != info.master_port)
      return fmt::format("listens on port {}, not MASTER_PORT={}", port, info.master_port);
    return "";
  }();
  check(problem.empty(),
        "LMTRAIN_STORE_FD={}: {} (lmtrain launch sets it for rank 0 only; unset it to let rank 0 "
        "listen on MASTER_PORT itself)",
        fd, problem);
  ::fcntl(fd, F_SETFD, FD_CLOEXEC);  // not passed on to programs this rank starts
  return Fd(fd);
}

// ---- client ----
TcpStore::TcpStore(const RankInfo& info, std::chrono::milliseconds timeout, Fd listener)
    : info_(info), timeout_(timeout) {
  check(info.rank == 0 || !listener, "rendezvous: only rank 0 serves the store, not rank {}",
        info.rank);
  if (info.rank == 0) {
    if (!listener) listener = listen_tcp(info.master_addr, info.master_port);
    server_ = std::make_unique<Server>(std::move(listener));
  }
  socket_ = connect_tcp(info.master_addr, info.master_port, Clock::now() + timeout);
  check(bool(socket_),
        "rendezvous: rank {} could not reach the store of rank 0 at {}:{} within {:g} s; is rank 0 "
        "running, and do all WORLD_SIZE={} ranks use the same MASTER_ADDR:MASTER_PORT?",
        info.rank, info.master_addr, info.master_port, timeout.count() / 1000.0, info.world_size);
}

TcpStore::~TcpStore() {
  socket_.reset();  // before the server, so that it sees the client leave first
  server_.reset();
}

std::vector<Bytes> TcpStore::request(const std::vector<Bytes>& message,
                                     const std::string& waited_for,
                                     std::chrono::milliseconds timeout) {
  std::lock_guard lock(mutex_);
  check(bool(socket_),
        "rendezvous: rank {}: the store connection was closed after an earlier "
        "timeout",
        info_.rank);
  const char* what = "rendezvous store";
  std::string wire = encode(message);
  write_all(socket_.get(), wire.data(), wire.size(), what);
  auto deadline = Clock::now() + timeout;
  std::string input;
  while (true) {
    if (auto answer = decode(input)) return *answer;
    // Read what is there, at least one byte, so the exact reply length need not be known.
    char chunk[4096];
    if (!read_all(socket_.get(), chunk, 1, deadline, what)) {
      socket_.reset();  // a late reply would be taken for the next request's
      // Once every rank has met, a rank that does not come has failed or stopped rather than
      // been started wrong.
      const std::string hint =
          all_met_ ? "every rank had met before: has one failed or stopped? (its own output "
                     "says why)"
                   : fmt::format(
                         "are all {}={} ranks started with the same "
                         "MASTER_ADDR:MASTER_PORT ({}:{})?",
                         info_.source == "slurm"     ? "SLURM_NTASKS"
                         : info_.source == "openmpi" ? "OMPI_COMM_WORLD_SIZE"
                                                     : "WORLD_SIZE",
                         info_.world_size, info_.master_addr, info_.master_port);
      fail("rendezvous: rank {} waited {:g} s for {}; {}", info_.rank, timeout.count() / 1000.0,
           waited_for, hint);
    }
    input.push_back(chunk[0]);
    ssize_t more = ::recv(socket_.get(), chunk, sizeof chunk, MSG_DONTWAIT);
    if (more > 0) input.append(chunk, size_t(more));
  }
}

void TcpStore::set(const std::string& key, const Bytes& value) {
  request({bytes("set"), bytes(key), value}, "the store to accept key '" + key + "'", timeout_);
}

Bytes TcpStore::get(const std::string& key) {
  auto answer = request({bytes("get"), bytes(key)}, "key '" + key + "'", timeout_);
  check(answer.size() == 1, "rendezvous store: malformed reply to get '{}'", key);
  return answer[0];
}

void TcpStore::wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) {
  if (keys.empty()) return;
  std::vector<Bytes> message{bytes("wait")};
  for (const auto& k : keys) message.push_back(bytes(k));
  request(message, describe_keys(keys), timeout.count() > 0 ? timeout : timeout_);
}

int64_t TcpStore::add(const std::string& key, int64_t n) {
  auto answer = request({bytes("add"), bytes(key), bytes(std::to_string(n))},
                        "the store to add to key '" + key + "'", timeout_);
  check(answer.size() == 1, "rendezvous store: malformed reply to add '{}'", key);
  return std::stoll(text(answer[0]));
}

void TcpStore::barrier(const std::string& name) {
  // Barriers are numbered so that the same name can be used again; all ranks call them in the
  // same order.
  std::string key = fmt::format("barrier/{}/{}", barriers_++, name);
  if (add(key, 1) == info_.world_size) set(key + "/done", {});
  wait({key + "/done"});
  std::lock_guard lock(mutex_);  // request() reads it under the same lock
  all_met_ = true;
}

}  // namespace lmtrain::dist
