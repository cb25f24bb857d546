// Weightless RMSNorm over the last dimension: out = x * rstd, rstd = 1 / sqrt(mean(x^2) + eps).
#include <cfloat>
#include <cmath>

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

void CpuBackend::rmsnorm_forward(Tensor out, Tensor rstd, Tensor x) {
  check_rmsnorm("rmsnorm_forward", out, "out", x, rstd);
  int64_t N = x.rows(), C = x.dim(-1);
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = x.f32() + n * C;
    float* yr = out.f32() + n * C;
    double ss = 0.0;
    for (int64_t c = 0; c < C; ++c) ss += double(xr[c]) * xr[c];
    float r = float(1.0 / std::sqrt(ss / double(C) + kEps));
    for (int64_t c = 0; c < C; ++c) yr[c] = xr[c] * r;
    rstd.f32()[n] = r;
  }
}

// With y = x * r and dr/dx = -r^3 x / C:  dx = r * (dout - x * r^2 * mean(dout * x)).
// The dot product is taken before dx is written, so dx may alias dout.
void CpuBackend::rmsnorm_backward(Tensor dx, Tensor dout, Tensor x, Tensor rstd) {
  check_rmsnorm("rmsnorm_backward", dout, "dout", x, rstd);
  check(dx.dtype == DType::f32 && dx.shape == x.shape,
        "rmsnorm_backward: dx {} {} does not match x {}", dx.shape.str(), dtype_name(dx.dtype),
        x.shape.str());
  int64_t N = x.rows(), C = x.dim(-1);
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = x.f32() + n * C;
    const float* gr = dout.f32() + n * C;
    float* dr = dx.f32() + n * C;
    double dot = 0.0;
    for (int64_t c = 0; c < C; ++c) dot += double(gr[c]) * xr[c];
    float r = rstd.f32()[n];
    float k = float(dot / double(C)) * r * r;
    for (int64_t c = 0; c < C; ++c) dr[c] = r * (gr[c] - xr[c] * k);
  }
}

}  // namespace lmtrain
