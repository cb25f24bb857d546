// The run directory's lock: held by one RunLock at a time (flock locks belong to an open file,
// so a second RunLock in the same process is refused like another process's), its refusal
// naming the holder's process id, and the probe that refuses without taking the lock.
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <optional>
#include <string>
#include <thread>

#include "io/run_lock.h"
#include "test_support.h"

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using lmtrain::RunLock;
using lmtrain::test_support::TempDir;

TEST_CASE("RunLock is held by one holder at a time and named when refused", "[io]") {
  TempDir tmp;
  const std::string run_dir = tmp / "runs/a";
  RunLock::refuse_if_held(run_dir);  // no lock file yet: nothing to refuse, nothing created
  CHECK(!fs::exists(run_dir));
  const std::string in_use =
      run_dir + ": in use by another lmtrain run (process " + std::to_string(::getpid()) + ")";
  {
    const RunLock held(run_dir);  // creates the directory
    CHECK(fs::exists(fs::path(run_dir) / ".lock"));
    CHECK_THROWS_WITH(RunLock(run_dir), Contains(in_use));
    CHECK_THROWS_WITH(RunLock::refuse_if_held(run_dir), Contains(in_use));
    // Another directory is another lock.
    const RunLock other(tmp / "runs/b");
  }
  // Released: both pass, and the next holder records itself again.
  RunLock::refuse_if_held(run_dir);
  std::optional<RunLock> again;
  again.emplace(run_dir);
  CHECK_THROWS_WITH(RunLock::refuse_if_held(run_dir), Contains(in_use));
}

// Another run's probe holds a shared lock for a moment: RunLock waits it out instead of calling
// the directory in use.
TEST_CASE("RunLock waits out a probe's shared lock", "[io]") {
  TempDir tmp;
  const std::string run_dir = tmp / "run";
  { const RunLock first(run_dir); }  // creates the lock file
  const int fd = ::open((run_dir + "/.lock").c_str(), O_RDONLY | O_CLOEXEC);
  REQUIRE(fd >= 0);
  REQUIRE(::flock(fd, LOCK_SH | LOCK_NB) == 0);
  std::thread release([fd] {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    ::close(fd);
  });
  CHECK_NOTHROW(RunLock(run_dir));
  release.join();
}
