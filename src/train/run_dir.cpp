#include "train/run_dir.h"

#include <fmt/format.h>

#include <filesystem>

#include "core/error.h"

namespace fs = std::filesystem;

namespace lmtrain {

namespace {

// What a run leaves in its directory, besides the lock.
constexpr const char* kRunFiles[] = {"ckpt", "metrics.jsonl", "op_profile.json"};

void remove_run_files(const fs::path& dir) {
  for (const char* name : kRunFiles) fs::remove_all(dir / name);
}

}  // namespace

RunDirState run_dir_state(const std::string& run_dir) {
  RunDirState state;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(fs::path(run_dir) / "ckpt", ec))
    state.checkpoints |= entry.path().filename().string().front() != '.';
  const fs::path metrics = fs::path(run_dir) / "metrics.jsonl";
  state.metrics = fs::exists(metrics, ec) && fs::file_size(metrics, ec) > 0;
  return state;
}

std::string replaced_run_dir(const std::string& run_dir) {
  return (fs::path(run_dir) / "replaced_run").string();
}

std::string set_aside_earlier_run(const std::string& run_dir) {
  const fs::path dir(run_dir), replaced(replaced_run_dir(run_dir));
  std::error_code ec;
  if (fs::exists(replaced, ec)) {
    if (!run_dir_state(run_dir).checkpoints) {
      remove_run_files(dir);  // a failed replacement's metrics and unfinished saves
      return replaced.string();
    }
    fs::remove_all(replaced);  // the run here saved a checkpoint: it is the one to keep
  }
  fs::create_directory(replaced);
  for (const char* name : kRunFiles) {
    if (fs::exists(fs::symlink_status(dir / name, ec))) fs::rename(dir / name, replaced / name);
  }
  return replaced.string();
}

bool discard_replaced_run(const std::string& run_dir) {
  const fs::path replaced(replaced_run_dir(run_dir));
  std::error_code ec;
  if (!fs::exists(replaced, ec)) return false;
  fs::remove_all(replaced);
  return true;
}

std::string replaced_run_hint(const std::string& run_dir) {
  const fs::path replaced(replaced_run_dir(run_dir));
  std::error_code ec;
  if (!fs::exists(replaced / "ckpt", ec)) return "";
  return fmt::format(
      " (the run --overwrite replaced is kept in {}: move its ckpt/ and metrics.jsonl back to "
      "resume it)",
      replaced.string());
}

}  // namespace lmtrain
