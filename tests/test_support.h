// Helpers shared by the model-level tests.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "config/config.h"

namespace lmtrain::test_support {

inline std::string source_path(const std::string& relative) {
  return std::string(LMTRAIN_SOURCE_DIR) + "/" + relative;
}

// The tiny config the PyTorch goldens were made with.
inline Config golden_config() { return load_config(source_path("tests/golden/gpt_tiny.json"), {}); }

inline std::vector<float> download(Backend& backend, Tensor t) {
  std::vector<float> host(t.numel());
  backend.download(host.data(), t);
  return host;
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

}  // namespace lmtrain::test_support
