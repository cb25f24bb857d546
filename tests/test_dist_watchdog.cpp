// The collective watchdog (the NCCL communicator's timeout) with stand-in collectives: flags
// that say when each is done, and hooks that record what the watchdog did.
#include <algorithm>
#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "dist/collective_watchdog.h"

using lmtrain::dist::CollectiveWatchdog;
using namespace std::chrono_literals;
using Catch::Matchers::Contains;
using Clock = std::chrono::steady_clock;

namespace {

// Set by the start hook on the thread it runs on: every other hook and done() must see it set,
// i.e. run on a thread that was prepared first.
thread_local bool thread_prepared = false;
std::atomic<int> unprepared_calls{0};
void expect_prepared() {
  if (!thread_prepared) ++unprepared_calls;
}

// What the watchdog did to its engine, and the engine's error to report. An end that hangs
// (an abort stuck in the engine) returns once the watchdog has exited the rank.
struct Engine {
  std::atomic<int> ended{0}, exited{0};
  std::atomic<bool> end_hangs{false};
  std::atomic<std::thread::id> polled_from, ended_on;
  std::mutex mutex;
  std::string error;
  std::vector<std::thread::id> started;  // the threads the start hook ran on

  CollectiveWatchdog::Hooks hooks() {
    return {
        .on_thread_start =
            [this] {
              thread_prepared = true;
              std::lock_guard lock(mutex);
              started.push_back(std::this_thread::get_id());
            },
        .engine_error =
            [this] {
              expect_prepared();
              polled_from = std::this_thread::get_id();
              std::lock_guard lock(mutex);
              return error;
            },
        .end =
            [this] {
              expect_prepared();
              ended_on = std::this_thread::get_id();
              ++ended;
              while (end_hangs && exited == 0) std::this_thread::sleep_for(1ms);
            },
        .exit = [this] { ++exited; },
    };
  }
  void report(std::string message) {
    std::lock_guard lock(mutex);
    error = std::move(message);
  }
};

struct Collective {
  std::shared_ptr<std::atomic<bool>> flag = std::make_shared<std::atomic<bool>>(false);
  std::function<bool()> done() const {
    return [flag = flag] {
      expect_prepared();
      return flag->load();
    };
  }
  void complete() const { *flag = true; }
};

// Polls until `ok` holds or 10 s pass (far beyond any timeout here); returns whether it held.
bool eventually(const std::function<bool()>& ok) {
  const auto give_up = Clock::now() + 10s;
  while (!ok() && Clock::now() < give_up) std::this_thread::sleep_for(1ms);
  return ok();
}

std::string wait_for_failure(const CollectiveWatchdog& watchdog) {
  eventually([&] { return !watchdog.failure().empty(); });
  return watchdog.failure();
}

}  // namespace

TEST_CASE("watchdog: collectives that complete in time are never failed", "[dist][watchdog]") {
  Engine engine;
  {
    CollectiveWatchdog watchdog("nccl", 1, 2, 500ms, engine.hooks());
    for (int i = 0; i < 100; ++i) {
      Collective c;
      watchdog.watch("all_reduce_sum", c.done());
      std::this_thread::sleep_for(10ms);  // 100 x 10 ms: twice the timeout in all
      c.complete();
    }
    std::this_thread::sleep_for(600ms);
    CHECK(watchdog.failure().empty());
  }
  CHECK(engine.ended == 0);
  CHECK(engine.exited == 0);
}

TEST_CASE("watchdog: the oldest collective past the timeout ends them all", "[dist][watchdog]") {
  Engine engine;
  Collective first, stuck, later;
  CollectiveWatchdog watchdog("nccl", 1, 2, 200ms, engine.hooks());
  const auto started = Clock::now();
  watchdog.watch("all_reduce_sum", first.done());
  watchdog.watch("reduce_scatter_mean", stuck.done());
  watchdog.watch("all_gather", later.done());
  first.complete();

  const std::string why = wait_for_failure(watchdog);
  CHECK(Clock::now() - started >= 200ms);
  CHECK_THAT(why, Contains("nccl reduce_scatter_mean (rank 1 of 2, collective 2): not complete "
                           "after 0.2 s; another rank has failed, stopped or stalled"));
  CHECK_THAT(why, Contains("LMTRAIN_RENDEZVOUS_TIMEOUT"));
  CHECK(eventually([&] { return engine.ended == 1; }));  // right after the failure is set
}

// A hint says what to check for the step that timed out (the NCCL init: the network).
TEST_CASE("watchdog: a timeout's message ends with the step's hint", "[dist][watchdog]") {
  Engine engine;
  Collective stuck;
  CollectiveWatchdog watchdog("nccl", 1, 2, 100ms, engine.hooks());
  watchdog.watch("init", stuck.done(), "NCCL_SOCKET_IFNAME picks the network interface");
  const std::string why = wait_for_failure(watchdog);
  CHECK_THAT(why, Catch::Matchers::StartsWith("nccl init (rank 1 of 2, collective 1): not complete "
                                              "after 0.1 s"));
  CHECK_THAT(why, Catch::Matchers::EndsWith(
                      "sets this limit); NCCL_SOCKET_IFNAME picks the network interface"));
}

TEST_CASE("watchdog: an error the engine reports ends the collectives at once",
          "[dist][watchdog]") {
  Engine engine;
  Collective stuck;
  CollectiveWatchdog watchdog("nccl", 0, 4, 60s, engine.hooks());
  watchdog.watch("broadcast", stuck.done());
  std::this_thread::sleep_for(50ms);
  CHECK(watchdog.failure().empty());  // in flight, no error, far from the timeout
  engine.report("remote process exited or there was a network error");
  const auto reported = Clock::now();
  const std::string why = wait_for_failure(watchdog);
  CHECK(Clock::now() - reported < 5s);
  CHECK(why ==
        "nccl broadcast (rank 0 of 4, collective 1): remote process exited or there was a "
        "network error");
}

TEST_CASE("watchdog: an engine error with nothing in flight is left to the next collective",
          "[dist][watchdog]") {
  Engine engine;
  engine.report("an error of a collective long done");
  CollectiveWatchdog watchdog("nccl", 0, 2, 100ms, engine.hooks());
  auto polls = std::make_shared<std::atomic<int>>(0);
  watchdog.watch("all_reduce_sum", [polls] { return ++*polls > 0; });  // done when first polled
  CHECK(eventually([&] { return *polls >= 1; }));
  std::this_thread::sleep_for(100ms);  // 20 more polls, nothing in flight
  CHECK(watchdog.failure().empty());
  CHECK(engine.polled_from.load() == std::thread::id());  // the error was never read
  CHECK(engine.ended == 0);
}

TEST_CASE("watchdog: a rank gets one timeout to stop after the end", "[dist][watchdog]") {
  Engine engine;
  Collective stuck;
  auto watchdog = std::make_unique<CollectiveWatchdog>("nccl", 1, 2, 1s, engine.hooks());
  watchdog->watch("all_reduce_mean", stuck.done());
  REQUIRE_FALSE(wait_for_failure(*watchdog).empty());
  CHECK(eventually([&] { return engine.ended == 1; }));
  SECTION("it stops: the communicator goes, and the watchdog with it") {
    watchdog.reset();
    CHECK(engine.exited == 0);
  }
  SECTION("it does not: the watchdog exits it") {
    CHECK(eventually([&] { return engine.exited == 1; }));
    watchdog.reset();
    CHECK(engine.exited == 1);
  }
}

// An abort can hang in the engine: the end runs on a thread of its own, and the rank is exited
// a timeout after the end began, whether it is still running or already destroying the
// watchdog (which then waits for the end no longer than that).
TEST_CASE("watchdog: an end that hangs exits the rank a timeout later", "[dist][watchdog]") {
  Engine engine;
  engine.end_hangs = true;
  Collective stuck;
  auto watchdog = std::make_unique<CollectiveWatchdog>("nccl", 1, 2, 500ms, engine.hooks());
  const auto watched = Clock::now();  // the end begins a timeout later, the exit two
  watchdog->watch("all_gather", stuck.done());
  REQUIRE_FALSE(wait_for_failure(*watchdog).empty());
  CHECK(eventually([&] { return engine.ended == 1; }));
  SECTION("the rank stays") {
    CHECK(eventually([&] { return engine.exited == 1; }));
    CHECK(Clock::now() - watched >= 1000ms);
  }
  SECTION("the rank stops, and waits for the end") {
    watchdog.reset();
    CHECK(engine.exited == 1);
    CHECK(Clock::now() - watched >= 1000ms);
  }
  watchdog.reset();
  CHECK(engine.exited == 1);
}

// Each of its threads prepares itself first (NCCL: selects the rank's GPU): the one that polls
// and the one that ends the collectives, neither of them the rank's.
TEST_CASE("watchdog: the thread start hook runs on the threads that poll and end",
          "[dist][watchdog]") {
  Engine engine;
  Collective stuck;
  auto watchdog = std::make_unique<CollectiveWatchdog>("nccl", 0, 2, 200ms, engine.hooks());
  watchdog->watch("broadcast", stuck.done());
  REQUIRE_FALSE(wait_for_failure(*watchdog).empty());
  CHECK(eventually([&] { return engine.ended == 1; }));
  watchdog.reset();
  const std::vector<std::thread::id> started = engine.started;
  REQUIRE(started.size() == 2);
  CHECK(started[0] == engine.polled_from.load());
  CHECK(started[1] == engine.ended_on.load());
  CHECK(started[0] != started[1]);
  CHECK(std::find(started.begin(), started.end(), std::this_thread::get_id()) == started.end());
  CHECK(unprepared_calls == 0);  // no done(), error read or end before its thread's hook
}

// The rank's own aborts (an error unwinding it) go through the watchdog too: the end runs once,
// on its thread, under the same timeout, and is no watchdog failure.
TEST_CASE("watchdog: an end the rank asks for runs once under the timeout", "[dist][watchdog]") {
  Engine engine;
  Collective stuck;
  auto watchdog = std::make_unique<CollectiveWatchdog>("nccl", 0, 2, 60s, engine.hooks());
  watchdog->watch("all_gather", stuck.done());
  watchdog->end();
  watchdog->end();  // once is enough; again does nothing
  CHECK(eventually([&] { return engine.ended == 1; }));
  CHECK(engine.ended_on.load() != std::this_thread::get_id());
  CHECK(watchdog->failure().empty());
  SECTION("the rank stops") {
    watchdog.reset();
    CHECK(engine.ended == 1);
    CHECK(engine.exited == 0);
  }
  SECTION("the end hangs and the rank stops: exited a timeout after the end began") {
    Engine hanging;
    hanging.end_hangs = true;
    auto short_one = std::make_unique<CollectiveWatchdog>("nccl", 0, 2, 300ms, hanging.hooks());
    const auto asked = Clock::now();
    short_one->end();
    short_one.reset();
    CHECK(hanging.exited == 1);
    CHECK(Clock::now() - asked >= 300ms);
  }
}
