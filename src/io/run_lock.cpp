#include "io/run_lock.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <thread>

#include "core/error.h"

namespace lmtrain {

namespace {

std::string lock_path(const std::string& run_dir) { return run_dir + "/.lock"; }

// The error for a run directory whose lock file `path` another process holds.
[[noreturn]] void fail_in_use(const std::string& run_dir, const std::string& path) {
  std::string holder = read_file(path);
  while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
  fail(
      "{}: in use by another lmtrain run (process {}); wait for it, or start this one with "
      "--set run.name=NAME",
      run_dir, holder.empty() ? "?" : holder);
}

}  // namespace

void RunLock::refuse_if_held(const std::string& run_dir) {
  const std::string path = lock_path(run_dir);
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);  // a FIFO must not hang
  if (fd < 0) return;  // no lock file: no run has held this directory
  const UniqueFd probe(fd);
  if (::flock(probe.get(), LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK)
    fail_in_use(run_dir, path);
}

RunLock::RunLock(const std::string& run_dir) {
  std::error_code ec;
  std::filesystem::create_directories(run_dir, ec);
  check(!ec, "{}: cannot create the run directory: {}", run_dir, ec.message());
  const std::string path = lock_path(run_dir);
  fd_ = open_file(path, O_RDWR | O_CREAT | O_CLOEXEC);
  // Another run's refuse_if_held holds a shared lock for a moment: try 5 times, 20 ms apart,
  // before calling the directory in use.
  int error = 0;
  for (int attempt = 0; attempt < 5; ++attempt) {
    if (attempt) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    // (The call comes first: errno must not be read in the same call that may set it.)
    const bool locked = ::flock(fd_.get(), LOCK_EX | LOCK_NB) == 0;
    error = locked ? 0 : errno;
    if (error != EWOULDBLOCK) break;
  }
  if (error != 0) {
    if (error == EWOULDBLOCK) fail_in_use(run_dir, path);
    // A filesystem without locks (some network filesystems) must not stop the run.
    spdlog::warn(
        "{}: cannot lock ({}): a second training on this run directory would not be "
        "refused",
        path, std::strerror(error));
    return;
  }
  // The holder's id, for the message above: truncate first, as an earlier holder's may be longer.
  const std::string pid = std::to_string(::getpid()) + "\n";
  // (The calls come first: errno must not be read in the same call that may set it.)
  const bool truncated = ::ftruncate(fd_.get(), 0) == 0;
  check(truncated, "{}: cannot truncate: {}", path, std::strerror(errno));
  write_all(fd_.get(), pid.data(), pid.size(), path);
}

}  // namespace lmtrain
