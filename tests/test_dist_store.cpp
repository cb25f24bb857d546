// The rendezvous store across threads and processes, and its timeouts.
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
  const int world = 4, port = free_port("127.0.0.1");
  std::vector<std::unique_ptr<TcpStore>> stores(world);
  // Clients start before the server exists: they retry until rank 0 listens.
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
  const int port = free_port("127.0.0.1");
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
  TcpStore store(rank_info(0, 2, port), 10s);
  CHECK(text(store.get("from1")) == "hello");
  store.set("from0", bytes("world"));
  store.barrier("done");
  int status = 0;
  REQUIRE(waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("tcp store: waits end with an error that names the rank and the key", "[dist]") {
  const int port = free_port("127.0.0.1");
  TcpStore store(rank_info(0, 4, port), 300ms);
  auto start = Clock::now();
  CHECK_THROWS_WITH(store.get("nccl_id"),
                    Contains("rendezvous: rank 0 waited 0.3 s for key 'nccl_id'") &&
                        Contains("WORLD_SIZE=4") && Contains(fmt::format("127.0.0.1:{}", port)));
  CHECK(seconds_since(start) < 2.0);
  // After a timeout the connection is unusable, and says so.
  CHECK_THROWS_WITH(store.set("x", {}), Contains("closed after an earlier timeout"));

  TcpStore other(rank_info(0, 2, free_port("127.0.0.1")), 10s);
  start = Clock::now();
  CHECK_THROWS_WITH(other.wait({"a", "b"}, 200ms), Contains("waited 0.2 s for keys 'a', 'b'"));
  CHECK(seconds_since(start) < 2.0);
}

// After a barrier every rank had started, so a later wait that times out asks about a rank that
// failed, not about how the ranks were started.
TEST_CASE("tcp store: a wait after every rank met suspects a failed rank", "[dist]") {
  const int port = free_port("127.0.0.1");
  TcpStore rank0(rank_info(0, 2, port), 10s);
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
  const int port = free_port("127.0.0.1");
  auto start = Clock::now();
  CHECK_THROWS_WITH(TcpStore(rank_info(1, 2, port), 300ms),
                    Contains("rank 1 could not reach the store of rank 0 at 127.0.0.1") &&
                        Contains("WORLD_SIZE=2"));
  CHECK(seconds_since(start) < 2.0);
}
