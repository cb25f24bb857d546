// Bounds how long a started collective may take, for an engine with no timeout of its own
// (NCCL). A rank that is gone without a word (its machine down, or killed where no launcher
// saw it) leaves the others' collectives waiting forever, and a rank that waits forever is
// never reported as failed: the job hangs instead of stopping.
//
// A thread of its own polls the collectives in the order they were started, which is the
// order they complete in (they run on one stream). When the oldest one has not completed
// within the timeout, or the engine reports an error, the watchdog logs why and calls `end`
// (NCCL: abort the communicator, which ends the collectives in flight and so releases the host
// waiting behind them); the communicator then refuses its next collective, naming failure().
// The rank's own aborts (an error unwinding it) go through end() too. `end` runs once, on a
// thread of its own, since an abort can hang. A rank that has not stopped (destroyed the
// watchdog) one timeout after the end began, or whose end has not returned by then, is ended by
// `exit`, so that its launcher sees it fail and stops the rest.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

namespace lmtrain::dist {

class CollectiveWatchdog {
 public:
  struct Hooks {
    std::function<void()> on_thread_start;      // first, on each of the watchdog's threads
    std::function<std::string()> engine_error;  // the engine's asynchronous error, "" if none
    std::function<void()> end;                  // ends the collectives in flight
    std::function<void()> exit;                 // ends the process
  };

  // `engine`, `rank` and `world_size` name the collectives in messages: "nccl all_reduce_sum
  // (rank 1 of 2, collective 7)".
  CollectiveWatchdog(std::string engine, int rank, int world_size,
                     std::chrono::milliseconds timeout, Hooks hooks);
  // Stops watching (and joins the thread); what is still in flight is the owner's to end. After
  // a failure it waits for `end` to return, a timeout at most from when it began, then `exit`.
  ~CollectiveWatchdog();
  CollectiveWatchdog(const CollectiveWatchdog&) = delete;
  CollectiveWatchdog& operator=(const CollectiveWatchdog&) = delete;

  // Watches the collective `op` from now on. `done` is called from the watchdog's thread until
  // it returns true, so what it reads must stay valid that long. A `hint` ends the message of a
  // timeout (what to check).
  void watch(const char* op, std::function<bool()> done, const char* hint = nullptr);
  // Why the watchdog ended the collectives; empty while it has not (or the rank ended them).
  std::string failure() const;
  // Ends the collectives in flight (`end`, on its own thread, once) and starts the timeout
  // within which the rank must stop. Returns at once.
  void end();

 private:
  struct Watched {
    const char* op;
    const char* hint;
    uint64_t number;  // counts the collectives started, from 1: the ranks' numbers match
    std::chrono::steady_clock::time_point started;
    std::function<bool()> done;
  };
  void run();
  // The failure of the oldest collective in flight, or "" while it is fine.
  std::string check_oldest();
  // Starts the end unless it has begun; the caller holds mutex_.
  void begin_end();
  // Logs that the rank is still running `what` a timeout after the end began, and exits it.
  void exit_rank(const char* what);

  const std::string engine_;
  const int rank_, world_size_;
  const std::chrono::milliseconds timeout_;
  const Hooks hooks_;
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<Watched> watched_;
  uint64_t started_ = 0;
  std::string failure_;
  std::chrono::steady_clock::time_point end_began_;
  bool stopping_ = false, ended_ = false, exited_ = false;
  std::thread ender_;   // runs `end`
  std::thread thread_;  // last: starts after the members it uses exist
};

}  // namespace lmtrain::dist
