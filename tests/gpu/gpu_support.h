// Helpers of the GPU test binary: the shared CUDA backends, host-side bf16 rounding, and a
// comparison that prints the worst element and relative error of every check, pass or fail.
#pragma once

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/device.h"

namespace gpu_test {

using lmtrain::DType;

// Fails the test when no GPU is visible: the GPU tests never pass by skipping.
inline void require_gpu() {
  INFO("no CUDA device is visible: the GPU tests need one (run them where `make test-gpu` can)");
  REQUIRE(lmtrain::cuda::device_count() > 0);
}

// One backend per activation dtype for the whole binary: creating cuBLASLt handles and plans
// per test would dominate the run time. Fails the test when no GPU is visible.
inline lmtrain::CudaBackend& backend(DType act) {
  static std::unique_ptr<lmtrain::CudaBackend> f32, bf16;
  require_gpu();
  auto& slot = act == DType::bf16 ? bf16 : f32;
  if (!slot) slot = std::make_unique<lmtrain::CudaBackend>(act);
  return *slot;
}

inline const char* mode_name(DType act) { return act == DType::bf16 ? "bf16" : "fp32"; }

// Round-to-nearest-even f32 -> bf16 bits and back, independent of the GPU's conversion.
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
inline float bf16_value(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
inline float round_bf16(float x) { return bf16_value(bf16_bits(x)); }

// Any float tensor of a backend as host floats (bf16 widened exactly).
inline std::vector<float> fetch(lmtrain::Backend& b, lmtrain::Tensor t) {
  std::vector<float> host(size_t(t.numel()));
  if (t.dtype == DType::bf16) {
    std::vector<uint16_t> bits(host.size());
    b.download(bits.data(), t);
    for (size_t i = 0; i < bits.size(); ++i) host[i] = bf16_value(bits[i]);
  } else {
    b.download(host.data(), t);
  }
  return host;
}

// max |got - want| / max |want| over the finite elements (the error relative to the tensor's
// scale, so that elements near zero do not dominate), with the worst element named. A NaN or inf
// on either side fails, naming the first: the outputs start as NaN poison, so an element that no
// backend wrote is NaN on both sides. A size mismatch fails too.
struct Comparison {
  double rel = 0, max_err = 0, scale = 0;
  size_t worst = 0;
  bool nan = false;
};

// `min_scale`: a floor under max |want|, for tensors whose error is set by something larger
// than their own elements.
inline Comparison measure(const std::vector<float>& got, const std::vector<float>& want,
                          double min_scale = 0) {
  Comparison c;
  c.scale = min_scale;
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    if (!std::isfinite(got[i]) || !std::isfinite(want[i])) {
      if (!c.nan) c.worst = i;
      c.nan = true;
      continue;
    }
    c.scale = std::max(c.scale, std::abs(double(want[i])));
    const double err = std::abs(double(got[i]) - double(want[i]));
    if (err > c.max_err && !c.nan) c.worst = i;
    c.max_err = std::max(c.max_err, err);
  }
  c.rel = c.scale > 0 ? c.max_err / c.scale : c.max_err;
  return c;
}

// Prints one line per comparison and CHECKs rel <= tol.
inline void compare(const std::string& what, const std::vector<float>& got,
                    const std::vector<float>& want, double tol, double min_scale = 0) {
  const Comparison c = measure(got, want, min_scale);
  const bool sizes = got.size() == want.size() && !got.empty();
  const bool ok = sizes && !c.nan && c.rel <= tol;
  std::printf("%-4s %-58s rel %9.3e  tol %7.1e  worst [%zu] got %-13.7g want %-13.7g scale %.4g\n",
              ok ? "ok" : "FAIL", what.c_str(), c.rel, tol, c.worst,
              sizes ? double(got[c.worst]) : NAN, sizes ? double(want[c.worst]) : NAN, c.scale);
  std::fflush(stdout);
  INFO(what << ": " << got.size() << " vs " << want.size() << " elements, rel error " << c.rel
            << " (tol " << tol << "), worst element " << c.worst << " got "
            << (sizes ? got[c.worst] : NAN) << " want " << (sizes ? want[c.worst] : NAN)
            << (c.nan ? ", NaN/inf" : ""));
  CHECK(ok);
}

// ||got - want|| / ||want|| over the whole tensor, for results where single elements may
// legitimately differ a lot (weights after several bf16 training steps); prints the max-based
// figure beside it.
inline void compare_l2(const std::string& what, const std::vector<float>& got,
                       const std::vector<float>& want, double tol) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < got.size() && i < want.size(); ++i) {
    diff += (double(got[i]) - want[i]) * (double(got[i]) - want[i]);
    norm += double(want[i]) * want[i];
  }
  const double rel = std::sqrt(diff) / std::max(std::sqrt(norm), 1e-30);
  const Comparison c = measure(got, want);
  const bool ok = got.size() == want.size() && !c.nan && rel <= tol;
  std::printf("%-4s %-58s relL2 %9.3e tol %7.1e  (max-based rel %.3e, worst [%zu])\n",
              ok ? "ok" : "FAIL", what.c_str(), rel, tol, c.rel, c.worst);
  std::fflush(stdout);
  INFO(what << ": relative L2 error " << rel << " (tol " << tol << "), max-based " << c.rel
            << (c.nan ? ", NaN/inf" : ""));
  CHECK(ok);
}

inline void compare_scalar(const std::string& what, double got, double want, double tol) {
  const double rel = std::abs(got - want) / std::max(std::abs(want), 1e-30);
  const bool ok = rel <= tol;
  std::printf("%-4s %-58s rel %9.3e  tol %7.1e  got %.10g want %.10g\n", ok ? "ok" : "FAIL",
              what.c_str(), rel, tol, got, want);
  std::fflush(stdout);
  INFO(what << ": got " << got << " want " << want << " rel " << rel << " tol " << tol);
  CHECK(ok);
}

// Bit-identical results from two runs of the same GPU computation.
inline void require_identical(const std::string& what, const std::vector<float>& a,
                              const std::vector<float>& b) {
  size_t differ = 0, first = a.size();
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) {
      if (differ == 0) first = i;
      ++differ;
    }
  }
  const bool ok = a.size() == b.size() && differ == 0;
  if (!ok)
    std::printf(
        "FAIL %-58s not deterministic: %zu of %zu elements differ, first [%zu] %.9g vs %.9g\n",
        what.c_str(), differ, a.size(), first, first < a.size() ? a[first] : NAN,
        first < b.size() ? b[first] : NAN);
  INFO(what << ": " << differ << " of " << a.size() << " elements differ between two runs");
  CHECK(ok);
}

}  // namespace gpu_test
