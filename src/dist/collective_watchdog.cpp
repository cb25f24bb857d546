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
  wake_.notify_all();
  thread_.join();
  if (!ender_.joinable()) return;
  std::unique_lock lock(mutex_);
  if (!wake_.wait_until(lock, end_began_ + timeout_, [this] { return ended_; })) {
    lock.unlock();
    exit_rank("ending its collectives");
  } else {
    lock.unlock();
  }
  ender_.join();
}

void CollectiveWatchdog::watch(const char* op, std::function<bool()> done, const char* hint) {
  std::lock_guard lock(mutex_);
  watched_.push_back({op, hint, ++started_, std::chrono::steady_clock::now(), std::move(done)});
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
      "be reached (its own output says which; LMTRAIN_RENDEZVOUS_TIMEOUT sets this limit){}{}",
      name, seconds(timeout_), oldest.hint ? "; " : "", oldest.hint ? oldest.hint : "");
}

void CollectiveWatchdog::exit_rank(const char* what) {
  {
    std::lock_guard lock(mutex_);
    if (exited_) return;  // once (an exit hook of a test returns)
    exited_ = true;
  }
  spdlog::error(
      "{} (rank {} of {}): still {} {:g} s after its collectives began to be ended; "
      "exiting",
      engine_, rank_, world_size_, what, seconds(timeout_));
  hooks_.exit();
}

void CollectiveWatchdog::end() {
  std::lock_guard lock(mutex_);
  begin_end();
}

void CollectiveWatchdog::begin_end() {
  if (ender_.joinable()) return;
  watched_.clear();
  end_began_ = std::chrono::steady_clock::now();
  ender_ = std::thread([this] {
    if (hooks_.on_thread_start) hooks_.on_thread_start();
    hooks_.end();
    {
      std::lock_guard lock(mutex_);
      ended_ = true;
    }
    wake_.notify_all();
  });
  wake_.notify_all();
}

void CollectiveWatchdog::run() {
  if (hooks_.on_thread_start) hooks_.on_thread_start();
  const auto poll = poll_interval(timeout_);
  std::unique_lock lock(mutex_);
  while (!wake_.wait_for(lock, poll, [this] { return stopping_ || ender_.joinable(); })) {
    std::string why = check_oldest();
    if (why.empty()) continue;
    failure_ = why;
    lock.unlock();
    spdlog::error("{}; ending this rank's collectives", why);
    lock.lock();
    begin_end();
  }
  // Ending the collectives releases the rank, whose next collective then fails and unwinds it,
  // destroying the watchdog; a rank still here a timeout later is stuck (in the engine, or
  // elsewhere).
  if (wake_.wait_until(lock, end_began_ + timeout_, [this] { return stopping_; })) return;
  lock.unlock();
  exit_rank("running");
}

}  // namespace lmtrain::dist
