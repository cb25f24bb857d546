#include "train/run_dir.h"

#include <fmt/format.h>

#include <filesystem>

#include "core/error.h"
#include "io/atomic_dir.h"
#include "train/checkpoint.h"

namespace fs = std::filesystem;

namespace lmtrain {

namespace {

// What a run leaves in its directory, besides the lock.
constexpr const char* kRunFiles[] = {"ckpt", "metrics.jsonl", "op_profile.json"};

bool present(const fs::path& path) {
  std::error_code ec;
  return fs::exists(fs::symlink_status(path, ec));
}

// replaced_run while set_aside_earlier_run fills it.
fs::path staging_dir(const std::string& run_dir) { return fs::path(run_dir) / ".replaced_run.tmp"; }

// Moves each run file present in `from` into `to`.
void move_run_files(const fs::path& from, const fs::path& to) {
  for (const char* name : kRunFiles) {
    if (present(from / name)) rename_or_fail((from / name).string(), (to / name).string());
  }
}

}  // namespace

RunDirState run_dir_state(const std::string& run_dir) {
  RunDirState state;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(fs::path(run_dir) / "ckpt", ec))
    state.checkpoints |= entry.path().filename().string().front() != '.';
  const fs::path metrics = fs::path(run_dir) / "metrics.jsonl";
  state.metrics = fs::exists(metrics, ec) && fs::file_size(metrics, ec) > 0;
  state.replaced = present(replaced_run_dir(run_dir));
  return state;
}

std::string replaced_run_dir(const std::string& run_dir) {
  return (fs::path(run_dir) / "replaced_run").string();
}

void check_replaced_run_dir(const std::string& run_dir) {
  const fs::path replaced(replaced_run_dir(run_dir));
  std::error_code ec;
  check(!present(replaced) || fs::is_directory(fs::symlink_status(replaced, ec)),
        "train: {}: expected the directory where --overwrite keeps the run it replaced, found "
        "something else",
        replaced.string());
}

bool undo_unfinished_set_aside(const std::string& run_dir) {
  const fs::path staging = staging_dir(run_dir);
  if (!present(staging)) return false;
  move_run_files(staging, run_dir);
  fs::remove(staging);
  return true;
}

std::string set_aside_earlier_run(const std::string& run_dir) {
  const fs::path dir(run_dir), replaced(replaced_run_dir(run_dir));
  check_replaced_run_dir(run_dir);
  if (present(replaced)) {
    if (!run_dir_state(run_dir).checkpoints) {
      // What a replacement that failed before its first checkpoint left: metrics, unfinished
      // saves. The run it replaced stays where it is.
      for (const char* name : kRunFiles) fs::remove_all(dir / name);
      return replaced.string();
    }
    fs::remove_all(replaced);  // the run here saved a checkpoint: it is the one to keep
  }
  // Built under another name and renamed, so that a kill halfway leaves a state that the next
  // run moves back (undo_unfinished_set_aside), never a replaced_run missing part of its run.
  const fs::path staging = staging_dir(run_dir);
  fs::create_directory(staging);
  move_run_files(dir, staging);
  rename_or_fail(staging.string(), replaced.string());
  return replaced.string();
}

bool discard_replaced_run(const std::string& run_dir) {
  const std::string replaced = replaced_run_dir(run_dir);
  if (!present(replaced)) return false;
  remove_all_or_warn(replaced);
  return true;
}

std::string replaced_run_hint(const std::string& run_dir) {
  const fs::path replaced(replaced_run_dir(run_dir));
  if (!present(replaced / "ckpt")) return "";
  return fmt::format(
      " (the run --overwrite replaced is kept in {}: eval and sample read it there; to resume "
      "it, put its ckpt/ and metrics.jsonl in place of this directory's)",
      replaced.string());
}

std::string resolve_run_checkpoint(const std::string& path) {
  try {
    return resolve_checkpoint(path);
  } catch (const Error& e) {
    fs::path run_dir = fs::path(path).lexically_normal();
    if (run_dir.filename().empty()) run_dir = run_dir.parent_path();  // a trailing '/'
    if (run_dir.filename() == "ckpt") run_dir = run_dir.parent_path();
    const std::string hint = replaced_run_hint(run_dir.string());
    if (hint.empty()) throw;
    fail("{}{}", e.what(), hint);
  }
}

}  // namespace lmtrain
