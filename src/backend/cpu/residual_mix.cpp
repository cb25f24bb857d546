// The residual stream re-mix at the top of every block: out = resid[l] * x + x0l[l] * x0, where
// x0 is the normed embedding and resid, x0l are learned per-layer scalars.
#include <algorithm>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "backend/op_checks.h"

namespace lmtrain {

namespace {

void check_like(const char* op, const char* name, Tensor t, Tensor x) {
  check(t.dtype == DType::f32 && t.shape == x.shape, "{}: {} {} {} must be f32 like x {}", op, name,
        t.shape.str(), dtype_name(t.dtype), x.shape.str());
}

}  // namespace

void CpuBackend::residual_mix_forward(Tensor out, Tensor x, Tensor x0, Tensor resid, Tensor x0l,
                                      int layer) {
  check_layer_scalars("residual_mix_forward", resid, x0l, layer);
  check_like("residual_mix_forward", "x", x, x);
  check_like("residual_mix_forward", "x0", x0, x);
  check_like("residual_mix_forward", "out", out, x);
  float a = resid.f32()[layer], b = x0l.f32()[layer];
  int64_t n = x.numel();
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) out.f32()[i] = a * x.f32()[i] + b * x0.f32()[i];
}

// The two scalar gradients are sums over the whole activation. They are formed from partial
// sums over fixed-size chunks, added in chunk order, so the result does not depend on the
// thread count. Each element reads dout before writing dx, which is what lets dx alias dout.
void CpuBackend::residual_mix_backward(Tensor dx, Tensor dx0, Tensor dresid, Tensor dx0l,
                                       Tensor dout, Tensor x, Tensor x0, Tensor resid, Tensor x0l,
                                       int layer) {
  const char* op = "residual_mix_backward";
  check_layer_scalars(op, resid, x0l, layer);
  check_layer_scalars(op, dresid, dx0l, layer);
  check(dresid.shape == resid.shape, "{}: dresid {} does not match resid {}", op,
        dresid.shape.str(), resid.shape.str());
  check_like(op, "x0", x0, x);
  check_like(op, "dx", dx, x);
  check_like(op, "dx0", dx0, x);
  check_like(op, "dout", dout, x);
  float a = resid.f32()[layer], b = x0l.f32()[layer];
  constexpr int64_t kChunk = 1 << 14;
  int64_t n = x.numel(), chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> sum_x(chunks), sum_x0(chunks);
#pragma omp parallel for
  for (int64_t c = 0; c < chunks; ++c) {
    double sx = 0.0, sx0 = 0.0;
    for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) {
      float g = dout.f32()[i];
      sx += double(g) * x.f32()[i];
      sx0 += double(g) * x0.f32()[i];
      dx0.f32()[i] += b * g;
      dx.f32()[i] = a * g;
    }
    sum_x[c] = sx;
    sum_x0[c] = sx0;
  }
  double total_x = 0.0, total_x0 = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    total_x += sum_x[c];
    total_x0 += sum_x0[c];
  }
  dresid.f32()[layer] += float(total_x);
  dx0l.f32()[layer] += float(total_x0);
}

}  // namespace lmtrain
