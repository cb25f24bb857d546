#include "train/metrics.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <iterator>

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

std::uintmax_t MetricsLog::bytes() const { return std::filesystem::file_size(path_); }

int drop_records_after(const std::string& path, std::uintmax_t bytes) {
  namespace fs = std::filesystem;
  if (!fs::exists(path)) return 0;
  const std::uintmax_t size = fs::file_size(path);
  if (size <= bytes) {
    if (size < bytes) {
      spdlog::warn("{}: shorter than when the checkpoint was saved ({} < {} bytes); appending",
                   path, size, bytes);
    }
    return 0;
  }
  std::ifstream in(path, std::ios::binary);
  check(in.good(), "{}: cannot open for reading", path);
  char before = '\n';
  if (bytes > 0) {
    in.seekg(std::streamoff(bytes - 1));
    in.get(before);
  }
  if (before != '\n') {
    spdlog::warn(
        "{}: byte {} is not the end of a line as it was when the checkpoint was saved; "
        "keeping the file as it is",
        path, bytes);
    return 0;
  }
  in.seekg(std::streamoff(bytes));
  const int dropped =
      int(std::count(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>(), '\n'));
  in.close();
  fs::resize_file(path, bytes);
  return dropped;
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  long s = std::lround(seconds);
  return fmt::format("{}:{:02d}:{:02d}", s / 3600, int(s / 60 % 60), int(s % 60));
}

}  // namespace lmtrain
