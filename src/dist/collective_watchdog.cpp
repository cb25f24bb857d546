#include "dist/collective_watchdog.h"

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>

namespace lmtrain::dist {

namespace {

// Often enough that a failure is seen within a small part of the timeout; a query of an event
// costs about a microsecond, so even 10 polls a second cost nothing.
std::chrono::milliseconds poll_interval(std::chrono::milliseconds timeout) {
  return std::clamp(timeout / 20, std::chrono::milliseconds(1), std::chrono::milliseconds(100));
}

double seconds(std::chrono::milliseconds t) { return double(t.count()) / 1000.0; }

}  // namespace

CollectiveWatchdog::CollectiveWatchdog(std::string engine, int rank, int world_size,
                                       std::chrono::milliseconds timeout, Hooks hooks)
    : engine_(std::move(engine)),
      rank_(rank),
      world_size_(world_size),
      timeout_(timeout),
      hooks_(std::move(hooks)),
      thread_([this] { run(); }) {}

CollectiveWatchdog::~CollectiveWatchdog() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_one();
  thread_.join();
}

void CollectiveWatchdog::watch(const char* op, std::function<bool()> done) {
  std::lock_guard lock(mutex_);
  watched_.push_back({op, ++started_, std::chrono::steady_clock::now(), std::move(done)});
}

std::string CollectiveWatchdog::failure() const {
  std::lock_guard lock(mutex_);
  return failure_;
}

std::string CollectiveWatchdog::check_oldest() {
  while (!watched_.empty() && watched_.front().done()) watched_.pop_front();
  if (watched_.empty()) return "";
  const Watched& oldest = watched_.front();
  const std::string name = fmt::format("{} {} (rank {} of {}, collective {})", engine_, oldest.op,
                                       rank_, world_size_, oldest.number);
  if (std::string error = hooks_.engine_error(); !error.empty()) return name + ": " + error;
  if (std::chrono::steady_clock::now() - oldest.started < timeout_) return "";
  return fmt::format(
      "{}: not complete after {:g} s; another rank has failed, stopped or stalled, or cannot "
      "be reached (its own output says which; LMTRAIN_RENDEZVOUS_TIMEOUT sets this limit)",
      name, seconds(timeout_));
}

void CollectiveWatchdog::run() {
  const auto poll = poll_interval(timeout_);
  std::unique_lock lock(mutex_);
  while (!wake_.wait_for(lock, poll, [this] { return stopping_; })) {
    std::string why = check_oldest();
    if (why.empty()) continue;
    failure_ = why;
    watched_.clear();
    lock.unlock();
    spdlog::error("{}; ending this rank's collectives", why);
    if (!hooks_.end()) {
      spdlog::error("{} (rank {} of {}): the collectives cannot be ended; exiting", engine_, rank_,
                    world_size_);
      hooks_.exit();
      return;
    }
    lock.lock();
    // Ending the collectives releases the rank, whose next collective then fails with the
    // reason and unwinds it; a rank that has not stopped a timeout later is stuck elsewhere.
    if (wake_.wait_for(lock, timeout_, [this] { return stopping_; })) return;
    lock.unlock();
    spdlog::error(
        "{} (rank {} of {}): still running {:g} s after its collectives were ended; "
        "exiting",
        engine_, rank_, world_size_, seconds(timeout_));
    hooks_.exit();
    return;
  }
}

}  // namespace lmtrain::dist
