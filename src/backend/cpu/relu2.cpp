// Squared ReLU, the MLP nonlinearity: out = max(x, 0)^2, so dx = 2 max(x, 0) dout = 2 sqrt(out)
// dout.
#include <cmath>

#include "backend/cpu/checks.h"
#include "backend/cpu/cpu_backend.h"

namespace lmtrain {

namespace {

void check_relu2(const char* op, Tensor y, const char* y_name, Tensor x) {
  check(y.dtype == DType::f32 && x.dtype == DType::f32, "{}: {} and x must be f32, got {}, {}", op,
        y_name, dtype_name(y.dtype), dtype_name(x.dtype));
  check(y.shape == x.shape, "{}: {} {} does not match x {}", op, y_name, y.shape.str(),
        x.shape.str());
}

}  // namespace

void CpuBackend::relu2_forward(Tensor out, Tensor x) {
  cpu::require_dense("relu2_forward", {out, x});
  check_relu2("relu2_forward", out, "out", x);
  int64_t n = x.numel();
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) {
    float r = x.f32()[i] > 0.f ? x.f32()[i] : 0.f;
    out.f32()[i] = r * r;
  }
}

void CpuBackend::relu2_backward(Tensor dx, Tensor dout, Tensor out) {
  cpu::require_dense("relu2_backward", {dx, dout, out});
  check_relu2("relu2_backward", dout, "dout", out);
  check_relu2("relu2_backward", dx, "dx", out);
  int64_t n = out.numel();
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) dx.f32()[i] = 2.f * std::sqrt(out.f32()[i]) * dout.f32()[i];
}

}  // namespace lmtrain
