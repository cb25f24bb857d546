// Helpers shared by the op tests: random host inputs viewed as tensors, a comparison that names
// the worst element, and a finite-difference gradient checker.
//
// Gradients are checked on a scalar objective L = sum(w * f(inputs)) with a fixed random w: the
// backward is fed dout = w, and each input element is perturbed by +-eps to get central
// differences of L, which is summed in float64 from the op's fp32 outputs.
#pragma once

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "backend/cpu/cpu_backend.h"

namespace op_check {

inline std::vector<float> randn(size_t n, std::mt19937& rng, float stddev = 1.f) {
  std::normal_distribution<float> dist(0.f, stddev);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Host vectors are directly usable as CPU-backend tensors.
inline lmtrain::Tensor f32(std::vector<float>& v, lmtrain::Shape s) {
  REQUIRE(size_t(s.numel()) == v.size());
  return lmtrain::Tensor{v.data(), s, lmtrain::DType::f32};
}

inline lmtrain::Tensor i32(std::vector<int32_t>& v, lmtrain::Shape s) {
  REQUIRE(size_t(s.numel()) == v.size());
  return lmtrain::Tensor{v.data(), s, lmtrain::DType::i32};
}

inline double weighted_sum(const std::vector<float>& w, const std::vector<float>& y) {
  REQUIRE(w.size() == y.size());
  double s = 0.0;
  for (size_t i = 0; i < w.size(); ++i) s += double(w[i]) * y[i];
  return s;
}

// max |actual - expected| <= tol * max |expected|, a relative error that suits fp32 results
// whose small elements carry large relative noise.
template <typename T>
void require_close(const std::string& what, const std::vector<float>& actual,
                   const std::vector<T>& expected, double tol) {
  REQUIRE(actual.size() == expected.size());
  double scale = 0.0, worst_err = -1.0;
  size_t worst = 0;
  for (size_t i = 0; i < actual.size(); ++i) {
    scale = std::max(scale, std::abs(double(expected[i])));
    double err = std::abs(double(actual[i]) - double(expected[i]));
    if (!(err <= worst_err)) {  // also catches NaN
      worst_err = err;
      worst = i;
    }
  }
  INFO(what << ": worst element " << worst << " is " << actual[worst] << ", expected "
            << double(expected[worst]) << " (max abs error " << worst_err << ", scale " << scale
            << ", tol " << tol << ")");
  CHECK(worst_err <= tol * std::max(scale, 1e-12));
}

// Compares `analytic` with central differences of `loss` in every element of `x`. The fp32
// rounding of the op's outputs puts the differences' noise near 1e-4 of the gradient's scale;
// the default tolerance sits a few times above that, well below a 1% error in a formula.
inline void check_gradient(const std::string& name, std::vector<float>& x,
                           const std::vector<float>& analytic, const std::function<double()>& loss,
                           double eps = 1e-3, double tol = 2e-3) {
  std::vector<double> numeric(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    float orig = x[i];
    float up = orig + float(eps), down = orig - float(eps);
    x[i] = up;
    double l_up = loss();
    x[i] = down;
    double l_down = loss();
    x[i] = orig;
    numeric[i] = (l_up - l_down) / (double(up) - double(down));  // the step fp32 really took
  }
  require_close("d" + name, analytic, numeric, tol);
}

}  // namespace op_check
