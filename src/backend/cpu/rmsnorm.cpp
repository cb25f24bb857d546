// Weightless RMSNorm over the last dimension: out = x * rstd, rstd = 1 / sqrt(mean(x^2) + eps).
#include "backend/cpu/rmsnorm.h"

#include <cfloat>
#include <cmath>

#include "backend/cpu/checks.h"
#include "backend/cpu/cpu_backend.h"

namespace lmtrain {

namespace {

// FLT_EPSILON is what torch's F.rms_norm uses for fp32 inputs when eps is left unset.
constexpr double kEps = FLT_EPSILON;

void check_rmsnorm(const char* op, Tensor y, const char* y_name, Tensor x, Tensor rstd) {
  check(y.dtype == DType::f32 && x.dtype == DType::f32 && rstd.dtype == DType::f32,
        "{}: {}, x and rstd must be f32, got {}, {}, {}", op, y_name, dtype_name(y.dtype),
        dtype_name(x.dtype), dtype_name(rstd.dtype));
  check(y.shape == x.shape, "{}: {} {} does not match x {}", op, y_name, y.shape.str(),
        x.shape.str());
  check(rstd.numel() == x.rows(), "{}: rstd {} needs one entry per row of x {}", op,
        rstd.shape.str(), x.shape.str());
}

}  // namespace

namespace cpu {

float rmsnorm_row(float* out, const float* x, int64_t C) {
  double ss = 0.0;
  for (int64_t c = 0; c < C; ++c) ss += double(x[c]) * x[c];
  const float r = float(1.0 / std::sqrt(ss / double(C) + kEps));
  for (int64_t c = 0; c < C; ++c) out[c] = x[c] * r;
  return r;
}

// With y = x * r and dr/dx = -r^3 x / C:  dx = r * (dout - x * r^2 * mean(dout * x)). The dot
// product is taken before dx is written, and each element reads dout and residual before
// writing dx, so dx may alias either.
void rmsnorm_backward_row(float* dx, const float* dout, const float* x, float r,
                          const float* residual, int64_t C) {
  double dot = 0.0;
  for (int64_t c = 0; c < C; ++c) dot += double(dout[c]) * x[c];
  const float k = float(dot / double(C)) * r * r;
  for (int64_t c = 0; c < C; ++c) {
    const float g = r * (dout[c] - x[c] * k);
    dx[c] = residual ? g + residual[c] : g;
  }
}

}  // namespace cpu

void CpuBackend::rmsnorm_forward(Tensor out, Tensor rstd, Tensor x) {
  cpu::require_dense("rmsnorm_forward", {out, rstd, x});
  check_rmsnorm("rmsnorm_forward", out, "out", x, rstd);
  const int64_t N = x.rows(), C = x.dim(-1);
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n)
    rstd.f32()[n] = cpu::rmsnorm_row(out.f32() + n * C, x.f32() + n * C, C);
}

void CpuBackend::rmsnorm_backward(Tensor dx, Tensor dout, Tensor x, Tensor rstd, Tensor residual) {
  cpu::require_dense("rmsnorm_backward", {dx, dout, x, rstd, residual});
  check_rmsnorm("rmsnorm_backward", dout, "dout", x, rstd);
  check_rmsnorm("rmsnorm_backward", dx, "dx", x, rstd);
  if (!residual.empty()) check_rmsnorm("rmsnorm_backward", residual, "residual", x, rstd);
  const int64_t N = x.rows(), C = x.dim(-1);
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    const float* res = residual.empty() ? nullptr : residual.f32() + n * C;
    cpu::rmsnorm_backward_row(dx.f32() + n * C, dout.f32() + n * C, x.f32() + n * C, rstd.f32()[n],
                              res, C);
  }
}

}  // namespace lmtrain
