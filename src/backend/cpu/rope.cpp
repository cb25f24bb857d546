// Half-split rotary embedding, in place on (B, T, H, D): channel i pairs with channel i + D/2
// and the pair is rotated by the angle of (position, i), read from the cos/sin tables.
#include "backend/cpu/cpu_backend.h"
#include "backend/op_checks.h"

namespace lmtrain {

namespace {

// y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos. The backward is the transposed rotation, which
// is the same rotation with sin negated.
void rotate(Tensor x, Tensor cos, Tensor sin, int pos0, float sign) {
  int64_t B = x.dim(0), T = x.dim(1), H = x.dim(2), d = x.dim(3) / 2;
#pragma omp parallel for collapse(2)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const float* c = cos.f32() + (pos0 + t) * d;
      const float* s = sin.f32() + (pos0 + t) * d;
      for (int64_t h = 0; h < H; ++h) {
        float* x1 = x.f32() + ((b * T + t) * H + h) * 2 * d;
        float* x2 = x1 + d;
        for (int64_t i = 0; i < d; ++i) {
          float a = x1[i], e = x2[i], si = sign * s[i];
          x1[i] = a * c[i] + e * si;
          x2[i] = -a * si + e * c[i];
        }
      }
    }
  }
}

}  // namespace

void CpuBackend::rope_forward(Tensor x, Tensor cos, Tensor sin, int pos0) {
  check_rope_args("rope_forward", x, cos, sin, pos0, DType::f32);
  rotate(x, cos, sin, pos0, 1.f);
}

void CpuBackend::rope_backward(Tensor dx, Tensor cos, Tensor sin, int pos0) {
  check_rope_args("rope_backward", dx, cos, sin, pos0, DType::f32);
  rotate(dx, cos, sin, pos0, -1.f);
}

}  // namespace lmtrain
