// What a run directory holds between runs: an earlier run's checkpoints and metrics, and the
// run that --overwrite replaced, kept until the new run has a checkpoint of its own.
#pragma once

#include <string>

namespace lmtrain {

// What an earlier run left in a run directory: checkpoints (hidden entries of ckpt/ are the
// unfinished saves of killed runs), logged metrics, and a run that --overwrite set aside. A run
// that ended before its first step or save left nothing to lose.
struct RunDirState {
  bool checkpoints = false, metrics = false, replaced = false;
  bool earlier_run() const { return checkpoints || metrics || replaced; }
};
RunDirState run_dir_state(const std::string& run_dir);

// <run_dir>/replaced_run: where --overwrite moves the earlier run's ckpt/, metrics.jsonl and
// op_profile.json. Deleting them at once would lose both runs if the new one failed before its
// first checkpoint (a NaN, a crash, a kill), hours in.
std::string replaced_run_dir(const std::string& run_dir);

// Throws naming replaced_run when something other than a directory has that name.
void check_replaced_run_dir(const std::string& run_dir);

// Before anything looks for an earlier run: moves back what a set-aside that was killed halfway
// had moved (it builds replaced_run under a temporary name, then renames it). Returns whether
// there was one.
bool undo_unfinished_set_aside(const std::string& run_dir);

// For --overwrite, under the run directory's lock: moves the earlier run into replaced_run/.
// When replaced_run/ already holds a run (an earlier --overwrite whose run failed before its
// first checkpoint), that one is kept and what the failed run left is deleted instead, unless it
// has a checkpoint, which makes it the run to keep. Returns the directory the earlier run is in.
std::string set_aside_earlier_run(const std::string& run_dir);

// Deletes replaced_run/ (a failure is a warning: it must not fail the run that follows a save);
// returns whether there was one.
bool discard_replaced_run(const std::string& run_dir);

// " (the run --overwrite replaced is kept in <dir>: ...)" when replaced_run/ holds a checkpoint,
// else "": for the errors that find no checkpoint to resume or an earlier run in the way.
std::string replaced_run_hint(const std::string& run_dir);

// resolve_checkpoint(path) (a checkpoint, a ckpt/ directory or a run directory), its error
// completed with replaced_run_hint for the run directory `path` is or is in.
std::string resolve_run_checkpoint(const std::string& path);

}  // namespace lmtrain
