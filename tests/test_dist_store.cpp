// The rendezvous store across threads and processes, and its timeouts.
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <thread>

#include "core/error.h"
#include "dist/socket.h"
#include "dist/tcp_store.h"
#include "dist_support.h"

using namespace lmtrain;
using namespace lmtrain::dist;
using lmtrain::test_support::rank_info;
using lmtrain::test_support::ReservedPort;
using lmtrain::test_support::StoreSocket;
using namespace std::chrono_literals;
using Catch::Matchers::Contains;

namespace {

Bytes bytes(const std::string& s) { return Bytes(s.begin(), s.end()); }
std::string text(const Bytes& b) { return std::string(b.begin(), b.end()); }

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

}  // namespace

TEST_CASE("tcp store: set, get, add, wait and barrier across threads", "[dist]") {
  const ReservedPort reserved;
  const int world = 4, port = reserved.port;
  REQUIRE(port > 0);
  std::vector<std::unique_ptr<TcpStore>> stores(world);
  // Clients start before the server exists: they retry until rank 0 listens (rank 0 binds the
  // port itself here, as it does when started without `lmtrain launch`).
  std::vector<std::thread> threads;
  for (int r = world - 1; r >= 0; --r)
    threads.emplace_back(
        [&, r] { stores[r] = std::make_unique<TcpStore>(rank_info(r, world, port), 10s); });
  for (auto& t : threads) t.join();
  threads.clear();

  // get blocks until another rank sets the key.
  std::string seen;
  std::thread reader([&] { seen = text(stores[2]->get("late")); });
  std::this_thread::sleep_for(100ms);
  stores[1]->set("late", bytes("value"));
  reader.join();
  CHECK(seen == "value");

  // Binary values survive unchanged.
  Bytes binary{0, 1, char(255), '\n', 0};
  stores[0]->set("binary", binary);
  CHECK(stores[3]->get("binary") == binary);

  // add is atomic across clients; the counter reads back as decimal text.
  std::vector<std::thread> adders;
  for (int r = 0; r < world; ++r)
    adders.emplace_back([&, r] {
      for (int i = 0; i < 50; ++i) stores[r]->add("counter", 1);
    });
  for (auto& t : adders) t.join();
  CHECK(stores[0]->add("counter", 0) == world * 50);
  CHECK(text(stores[1]->get("counter")) == std::to_string(world * 50));

  // wait returns once all keys exist; barrier releases all ranks together, and can repeat.
  std::atomic<int> passed{0};
  for (int r = 0; r < world; ++r)
    threads.emplace_back([&, r] {
      stores[r]->set("k" + std::to_string(r), {});
      stores[r]->wait({"k0", "k1", "k2", "k3"});
      for (int round = 0; round < 3; ++round) stores[r]->barrier("round");
      passed += 1;
    });
  for (auto& t : threads) t.join();
  CHECK(passed == world);
}

TEST_CASE("tcp store: ranks in separate processes", "[dist]") {
  StoreSocket socket;
  const int port = socket.port;
  pid_t child = fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    // Rank 1: no Catch2 here; the exit code tells the parent what happened.
    int code = 0;
    try {
      TcpStore store(rank_info(1, 2, port), 10s);
      store.set("from1", bytes("hello"));
      code = text(store.get("from0")) == "world" ? 0 : 1;
      store.barrier("done");
    } catch (...) {
      code = 2;
    }
    _exit(code);
  }
  TcpStore store(rank_info(0, 2, port), 10s, std::move(socket.listener));
  CHECK(text(store.get("from1")) == "hello");
  store.set("from0", bytes("world"));
  store.barrier("done");
  int status = 0;
  REQUIRE(waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("tcp store: waits end with an error that names the rank and the key", "[dist]") {
  StoreSocket socket, other_socket;
  const int port = socket.port;
  TcpStore store(rank_info(0, 4, port), 300ms, std::move(socket.listener));
  auto start = Clock::now();
  CHECK_THROWS_WITH(store.get("nccl_id"),
                    Contains("rendezvous: rank 0 waited 0.3 s for key 'nccl_id'") &&
                        Contains("WORLD_SIZE=4") && Contains(fmt::format("127.0.0.1:{}", port)));
  CHECK(seconds_since(start) < 2.0);
  // After a timeout the connection is unusable, and says so.
  CHECK_THROWS_WITH(store.set("x", {}), Contains("closed after an earlier timeout"));

  TcpStore other(rank_info(0, 2, other_socket.port), 10s, std::move(other_socket.listener));
  start = Clock::now();
  CHECK_THROWS_WITH(other.wait({"a", "b"}, 200ms), Contains("waited 0.2 s for keys 'a', 'b'"));
  CHECK(seconds_since(start) < 2.0);
}

// After a barrier every rank had started, so a later wait that times out asks about a rank that
// failed, not about how the ranks were started.
TEST_CASE("tcp store: a wait after every rank met suspects a failed rank", "[dist]") {
  StoreSocket socket;
  const int port = socket.port;
  TcpStore rank0(rank_info(0, 2, port), 10s, std::move(socket.listener));
  std::thread rank1([&] {
    TcpStore store(rank_info(1, 2, port), 10s);
    store.barrier("start");  // then leaves
  });
  rank0.barrier("start");
  rank1.join();
  CHECK_THROWS_WITH(rank0.wait({"never_set"}, 300ms),
                    Contains("rendezvous: rank 0 waited 0.3 s for key 'never_set'") &&
                        Contains("every rank had met before: has one failed or stopped?") &&
                        !Contains("MASTER_ADDR"));
}

TEST_CASE("tcp store: a client without a server gives up at the timeout", "[dist]") {
  const ReservedPort reserved;  // connections to it are refused
  const int port = reserved.port;
  REQUIRE(port > 0);
  auto start = Clock::now();
  CHECK_THROWS_WITH(TcpStore(rank_info(1, 2, port), 300ms),
                    Contains("rank 1 could not reach the store of rank 0 at 127.0.0.1") &&
                        Contains("WORLD_SIZE=2"));
  CHECK(seconds_since(start) < 2.0);
}

// `lmtrain launch` binds rank 0's store socket and passes it on as LMTRAIN_STORE_FD; rank 0 takes
// it only when it is what it claims to be.
TEST_CASE("tcp store: rank 0 serves on the socket the launcher handed it", "[dist]") {
  StoreSocket socket;
  RankInfo info = rank_info(0, 2, socket.port);
  CHECK_FALSE(inherited_store_listener(info));  // store_fd -1: none

  int pipe_fds[2];
  REQUIRE(::pipe(pipe_fds) == 0);
  Fd pipe_read(pipe_fds[0]), pipe_write(pipe_fds[1]);
  info.store_fd = pipe_read.get();
  CHECK_THROWS_WITH(
      inherited_store_listener(info),
      Contains(fmt::format("LMTRAIN_STORE_FD={}: is not a listening socket", pipe_read.get())) &&
          Contains("unset it to let rank 0 listen on MASTER_PORT itself"));
  StoreSocket elsewhere;
  info.store_fd = elsewhere.listener.get();
  CHECK_THROWS_WITH(
      inherited_store_listener(info),
      Contains(fmt::format("listens on port {}, not MASTER_PORT={}", elsewhere.port, socket.port)));
  info.store_fd = Fd(::dup(pipe_write.get())).get();  // closed again at once
  CHECK_THROWS_WITH(inherited_store_listener(info), Contains("is not an open file"));

  // Another rank never takes it; rank 0 does, closes it on exec, and serves on it.
  info.store_fd = socket.listener.get();
  RankInfo rank1 = rank_info(1, 2, socket.port);
  rank1.store_fd = info.store_fd;
  CHECK_FALSE(inherited_store_listener(rank1));
  REQUIRE(::fcntl(info.store_fd, F_SETFD, 0) == 0);  // as inherited across exec
  Fd adopted = inherited_store_listener(info);
  REQUIRE(adopted.get() == socket.listener.release());
  CHECK(::fcntl(adopted.get(), F_GETFD) == FD_CLOEXEC);
  TcpStore rank0(info, 10s, std::move(adopted));
  std::thread other([&] { TcpStore(rank1, 10s).set("key", bytes("from 1")); });
  CHECK(text(rank0.get("key")) == "from 1");
  other.join();
}
