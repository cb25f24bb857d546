// Per-head RMSNorm followed by half-split rotary embedding on (B, T, H, D) queries or keys:
// channel i pairs with channel i + D/2 and the pair is rotated by the angle of (position, i),
// read from the cos/sin tables. A rotation keeps norms, so normalising first gives RMSNorm of
// the rotated vector, and the backward needs only the unrotated input. x, out, dout and dx may
// be bands over (B, T): the queries or keys inside a packed q|k|v projection.
#include <cfloat>
#include <cmath>
#include <utility>

#include "backend/cpu/checks.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/op_checks.h"

namespace lmtrain {

namespace {

// As rmsnorm.cpp: FLT_EPSILON is torch's F.rms_norm default for fp32.
constexpr double kEps = FLT_EPSILON;

// The head rows of a (B, T, H, D) tensor, dense or a band whose rows are the (B, T) positions.
struct HeadRows {
  float* base;
  int64_t pitch, H, D;
  explicit HeadRows(Tensor x) : base(x.f32_rows()), pitch(x.pitch(2)), H(x.dim(2)), D(x.dim(3)) {}
  // Head row i = (b * T + t) * H + h, the index of its rstd.
  float* operator[](int64_t i) const { return base + i / H * pitch + i % H * D; }
};

// Calls f(head row index, cos row, sin row) for every head row of x (B, T, H, D).
template <typename F>
void for_each_head(Tensor x, Tensor cos, Tensor sin, int pos0, F&& f) {
  const int64_t B = x.dim(0), T = x.dim(1), H = x.dim(2), D = x.dim(3), d = D / 2;
#pragma omp parallel for collapse(2)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const float* c = cos.f32() + (pos0 + t) * d;
      const float* s = sin.f32() + (pos0 + t) * d;
      for (int64_t h = 0; h < H; ++h) f((b * T + t) * H + h, c, s);
    }
  }
}

}  // namespace

// n = x * r, r = 1 / sqrt(mean(x^2) + eps); out1 = n1 cos + n2 sin, out2 = -n1 sin + n2 cos.
void CpuBackend::norm_rope_forward(Tensor out, Tensor rstd, Tensor x, Tensor cos, Tensor sin,
                                   int pos0) {
  cpu::require_dense("norm_rope_forward", {rstd, cos, sin});
  check_norm_rope_args("norm_rope_forward", out, "out", x, rstd, cos, sin, pos0, DType::f32);
  check_in_place("norm_rope_forward", "out", out, "x", x);
  const int64_t D = x.dim(3), d = D / 2;
  const HeadRows xs(x), outs(out);
  for_each_head(x, cos, sin, pos0, [&](int64_t row, const float* c, const float* s) {
    const float* xr = xs[row];
    float* yr = outs[row];
    double ss = 0.0;
    for (int64_t i = 0; i < D; ++i) ss += double(xr[i]) * xr[i];
    const float r = float(1.0 / std::sqrt(ss / double(D) + kEps));
    for (int64_t i = 0; i < d; ++i) {
      const float a = xr[i] * r, e = xr[i + d] * r;
      yr[i] = a * c[i] + e * s[i];
      yr[i + d] = -a * s[i] + e * c[i];
    }
    rstd.f32()[row] = r;
  });
}

// The transposed rotation takes dout back to dn = d(loss)/d(n); then RMSNorm's backward:
// dx = r * (dn - x * r^2 * mean(dn * x)). dx may alias dout: a row is read before it is written.
void CpuBackend::norm_rope_backward(Tensor dx, Tensor dout, Tensor x, Tensor rstd, Tensor cos,
                                    Tensor sin, int pos0) {
  cpu::require_dense("norm_rope_backward", {rstd, cos, sin});
  check_norm_rope_args("norm_rope_backward", dout, "dout", x, rstd, cos, sin, pos0, DType::f32);
  check_norm_rope_args("norm_rope_backward", dx, "dx", x, rstd, cos, sin, pos0, DType::f32);
  check_in_place("norm_rope_backward", "dx", dx, "dout", dout);
  const int64_t D = x.dim(3), d = D / 2;
  const HeadRows xs(x), douts(dout), dxs(dx);
  for_each_head(x, cos, sin, pos0, [&](int64_t row, const float* c, const float* s) {
    const float* xr = xs[row];
    const float* gr = douts[row];
    float* dr = dxs[row];
    // dn for the pair (i, i + d), computed again in the second pass rather than stored.
    auto dn = [&](int64_t i) {
      return std::pair{gr[i] * c[i] - gr[i + d] * s[i], gr[i] * s[i] + gr[i + d] * c[i]};
    };
    double dot = 0.0;
    for (int64_t i = 0; i < d; ++i) {
      const auto [g1, g2] = dn(i);
      dot += double(g1) * xr[i] + double(g2) * xr[i + d];
    }
    const float r = rstd.f32()[row];
    const float k = float(dot / double(D)) * r * r;
    for (int64_t i = 0; i < d; ++i) {
      const auto [g1, g2] = dn(i);
      dr[i] = r * (g1 - xr[i] * k);
      dr[i + d] = r * (g2 - xr[i + d] * k);
    }
  });
}

}  // namespace lmtrain
