// Helpers shared by the tests.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <optional>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include "backend/backend.h"
#include "config/config.h"
#include "model/gpt.h"

namespace lmtrain::test_support {

// A path in the source tree the tests were built from, or, where that tree is not (a bundle on
// another machine), under the working directory, a checkout of the same commit.
inline std::string source_path(const std::string& relative) {
  std::error_code error;
  const bool built_here = std::filesystem::is_directory(LMTRAIN_SOURCE_DIR, error);
  return (built_here ? std::string(LMTRAIN_SOURCE_DIR) + "/" : std::string()) + relative;
}

// The tiny config the PyTorch goldens were made with.
inline Config golden_config() { return load_config(source_path("tests/golden/gpt_tiny.json"), {}); }

inline std::vector<float> download(Backend& backend, Tensor t) {
  std::vector<float> host(t.numel());
  backend.download(host.data(), t);
  return host;
}

// The logits of a model's last forward, (batch * T, padded_vocab), on the host (f32 backends).
inline std::vector<float> logits(Gpt& model) {
  Backend& backend = model.backend();
  const int64_t rows = int64_t(model.batch()) * model.shape().seq_len;
  const int64_t cols = model.shape().padded_vocab;
  const Buffer memory = backend.allocate(size_t(rows * cols) * sizeof(float));
  const Tensor out = memory.tensor({rows, cols}, DType::f32);
  model.logits(out);
  return download(backend, out);
}

// max |a - b| / max |b|: the error relative to the tensor's scale, so that elements near zero
// do not dominate.
inline double max_relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  if (a.size() != b.size()) return INFINITY;
  double diff = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(double(a[i]) - double(b[i])));
    scale = std::max(scale, std::abs(double(b[i])));
  }
  return scale > 0 ? diff / scale : diff;
}

// A fresh, empty directory under the system temp dir, unique to this instance (pid + counter),
// removed with everything in it at scope exit.
class TempDir {
 public:
  TempDir() {
    static std::atomic<unsigned> counter{0};
    for (int attempt = 0;; ++attempt) {
      path_ = std::filesystem::temp_directory_path() /
              ("lmtrain_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
      if (std::filesystem::create_directory(path_)) break;
      if (attempt > 100) throw std::runtime_error("cannot create a temporary directory");
    }
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::filesystem::path& path() const { return path_; }
  std::string operator/(const std::string& relative) const { return (path_ / relative).string(); }

 private:
  std::filesystem::path path_;
};

// Sets (or with nullptr unsets) an environment variable for one scope, then restores it. For
// the test's own thread only: nothing else may read the environment meanwhile.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if ((value ? ::setenv(name, value, 1) : ::unsetenv(name)) != 0)
      throw std::runtime_error(std::string("cannot set ") + name);
  }
  ~ScopedEnv() { old_ ? ::setenv(name_, old_->c_str(), 1) : ::unsetenv(name_); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

}  // namespace lmtrain::test_support
