// An exclusive lock on a run directory: two trainings writing one run directory would
// interleave their metrics and replace each other's checkpoints.
#pragma once

#include <string>

#include "io/atomic_dir.h"

namespace lmtrain {

class RunLock {
 public:
  // Creates `run_dir` if needed and holds flock(LOCK_EX) on <run_dir>/.lock, which records this
  // process's id, until destroyed; throws naming the holder when another process has it. On a
  // filesystem without locks it warns and goes on unlocked.
  explicit RunLock(const std::string& run_dir);

  // Throws the same error when another process holds `run_dir`'s lock now (a probe that takes
  // and drops a shared lock; nothing is created). Lets a run that would fail at the lock say so
  // before it looks for checkpoints the holder may not have written yet.
  static void refuse_if_held(const std::string& run_dir);

 private:
  UniqueFd fd_;
};

}  // namespace lmtrain
