#include "train/metrics.h"

#include <cmath>

#include "core/error.h"

namespace lmtrain {

MetricsLog::MetricsLog(const std::string& path) : path_(path), out_(path, std::ios::app) {
  check(out_.good(), "{}: cannot open for appending", path);
}

void MetricsLog::write(const nlohmann::json& record) {
  out_ << record.dump() << '\n';
  out_.flush();
  check(out_.good(), "{}: write failed", path_);
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  long s = std::lround(seconds);
  return fmt::format("{}:{:02d}:{:02d}", s / 3600, int(s / 60 % 60), int(s % 60));
}

}  // namespace lmtrain
