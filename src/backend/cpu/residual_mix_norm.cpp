// The top of every block: the residual stream re-mix mixed = resid[l] * x + x0l[l] * x0 (x0 is
// the normed embedding, resid and x0l learned per-layer scalars), then the attention's RMSNorm.
#include <vector>

#include "backend/cpu/checks.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/rmsnorm.h"
#include "backend/op_checks.h"

namespace lmtrain {

namespace {

void check_like(const char* op, const char* name, Tensor t, Tensor x) {
  check(t.dtype == DType::f32 && t.shape == x.shape, "{}: {} {} {} must be f32 like x {}", op, name,
        t.shape.str(), dtype_name(t.dtype), x.shape.str());
}

void check_rstd(const char* op, Tensor rstd, Tensor x) {
  check(rstd.dtype == DType::f32 && rstd.numel() == x.rows(),
        "{}: rstd {} {} needs one f32 entry per row of x {}", op, rstd.shape.str(),
        dtype_name(rstd.dtype), x.shape.str());
}

void mix_row(float* out, const float* x, const float* x0, float a, float b, int64_t C) {
  for (int64_t c = 0; c < C; ++c) out[c] = a * x[c] + b * x0[c];
}

}  // namespace

void CpuBackend::residual_mix_norm_forward(Tensor mixed, Tensor normed, Tensor rstd, Tensor x,
                                           Tensor x0, Tensor resid, Tensor x0l, int layer) {
  cpu::require_dense("residual_mix_norm_forward", {mixed, normed, rstd, x, x0, resid, x0l});
  const char* op = "residual_mix_norm_forward";
  check_layer_scalars(op, resid, x0l, layer);
  check_like(op, "x", x, x);
  check_like(op, "x0", x0, x);
  check_like(op, "mixed", mixed, x);
  check_mix_output(op, mixed, x, x0);
  check_like(op, "normed", normed, x);
  check_rstd(op, rstd, x);
  const float a = resid.f32()[layer], b = x0l.f32()[layer];
  const int64_t N = x.rows(), C = x.dim(-1);
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    float* m = mixed.f32() + n * C;
    mix_row(m, x.f32() + n * C, x0.f32() + n * C, a, b, C);
    rstd.f32()[n] = cpu::rmsnorm_row(normed.f32() + n * C, m, C);
  }
}

// The two scalar gradients are sums over the whole activation, formed from per-row sums added
// in row order, so the result does not depend on the thread count. Each element reads dnormed
// and dmixed before writing dx, which is what lets dx alias either.
void CpuBackend::residual_mix_norm_backward(Tensor dx, Tensor dx0, Tensor dresid, Tensor dx0l,
                                            Tensor dnormed, Tensor dmixed, Tensor x, Tensor x0,
                                            Tensor rstd, Tensor resid, Tensor x0l, int layer) {
  cpu::require_dense("residual_mix_norm_backward",
                     {dx, dx0, dresid, dx0l, dnormed, dmixed, x, x0, rstd, resid, x0l});
  const char* op = "residual_mix_norm_backward";
  check_layer_scalars(op, resid, x0l, layer);
  check_layer_scalars(op, dresid, dx0l, layer);
  check(dresid.shape == resid.shape, "{}: dresid {} does not match resid {}", op,
        dresid.shape.str(), resid.shape.str());
  for (auto [name, t] :
       {std::pair{"x0", x0}, {"dx", dx}, {"dx0", dx0}, {"dnormed", dnormed}, {"dmixed", dmixed}})
    check_like(op, name, t, x);
  check_rstd(op, rstd, x);
  const float a = resid.f32()[layer], b = x0l.f32()[layer];
  const int64_t N = x.rows(), C = x.dim(-1);
  std::vector<double> sum_x(N), sum_x0(N);
#pragma omp parallel
  {
    std::vector<float> m(C), g(C);
#pragma omp for
    for (int64_t n = 0; n < N; ++n) {
      const float* xr = x.f32() + n * C;
      const float* x0r = x0.f32() + n * C;
      mix_row(m.data(), xr, x0r, a, b, C);
      cpu::rmsnorm_backward_row(g.data(), dnormed.f32() + n * C, m.data(), rstd.f32()[n],
                                dmixed.f32() + n * C, C);
      float* dxr = dx.f32() + n * C;
      float* dx0r = dx0.f32() + n * C;
      double sx = 0.0, sx0 = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        sx += double(g[c]) * xr[c];
        sx0 += double(g[c]) * x0r[c];
        dx0r[c] += b * g[c];
        dxr[c] = a * g[c];
      }
      sum_x[n] = sx;
      sum_x0[n] = sx0;
    }
  }
  double total_x = 0.0, total_x0 = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    total_x += sum_x[n];
    total_x0 += sum_x0[n];
  }
  dresid.f32()[layer] += float(total_x);
  dx0l.f32()[layer] += float(total_x0);
}

}  // namespace lmtrain
