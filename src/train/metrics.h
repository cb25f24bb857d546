// Per-step metrics: one console line and one JSON object per line in <run>/metrics.jsonl.
#pragma once

#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

namespace lmtrain {

class MetricsLog {
 public:
  // Appends to `path` (a resumed run continues the same file).
  explicit MetricsLog(const std::string& path);
  void write(const nlohmann::json& record);

 private:
  std::string path_;
  std::ofstream out_;
};

// "1:02:03" from seconds.
std::string format_duration(double seconds);

}  // namespace lmtrain
