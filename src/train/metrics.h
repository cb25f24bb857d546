// Per-step metrics: one console line and one JSON object per line in <run>/metrics.jsonl.
#pragma once

#include <cstdint>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

namespace lmtrain {

class MetricsLog {
 public:
  // Appends to `path` (a resumed run continues the same file).
  explicit MetricsLog(const std::string& path);
  void write(const nlohmann::json& record);
  // The file's size after the last write: a checkpoint keeps it (see drop_records_after).
  std::uintmax_t bytes() const;

 private:
  std::string path_;
  std::ofstream out_;
};

// A resumed run redoes the steps after its checkpoint, so the lines written after it (past
// `bytes`, the file's size when the checkpoint was saved) are dropped and each step is
// recorded once. A file that does not fit (shorter, or `bytes` not at a line's end) is left as
// it is, with a warning. Returns the number of lines dropped.
int drop_records_after(const std::string& path, std::uintmax_t bytes);

// "1:02:03" from seconds.
std::string format_duration(double seconds);

}  // namespace lmtrain
