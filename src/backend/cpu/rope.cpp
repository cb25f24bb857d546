// Half-split rotary embedding, in place on (B, T, H, D): channel i pairs with channel i + D/2
// and the pair is rotated by the angle of (position, i), read from the cos/sin tables.
#include "backend/cpu/cpu_backend.h"

namespace lmtrain {

namespace {

void check_rope(const char* op, Tensor x, Tensor cos, Tensor sin, int pos0) {
  check(x.dtype == DType::f32 && cos.dtype == DType::f32 && sin.dtype == DType::f32,
        "{}: x, cos and sin must be f32, got {}, {}, {}", op, dtype_name(x.dtype),
        dtype_name(cos.dtype), dtype_name(sin.dtype));
  check(x.shape.rank == 4 && x.dim(3) % 2 == 0, "{}: x {} must be (B, T, H, D) with D even", op,
        x.shape.str());
  check(cos.shape.rank == 2 && cos.shape == sin.shape && cos.dim(1) == x.dim(3) / 2,
        "{}: cos {} and sin {} must both be (T_max, {})", op, cos.shape.str(), sin.shape.str(),
        x.dim(3) / 2);
  check(pos0 >= 0 && pos0 + x.dim(1) <= cos.dim(0),
        "{}: positions [{}, {}) exceed the {} rows of the tables", op, pos0, pos0 + x.dim(1),
        cos.dim(0));
}

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
  check_rope("rope_forward", x, cos, sin, pos0);
  rotate(x, cos, sin, pos0, 1.f);
}

void CpuBackend::rope_backward(Tensor dx, Tensor cos, Tensor sin, int pos0) {
  check_rope("rope_backward", dx, cos, sin, pos0);
  rotate(dx, cos, sin, pos0, -1.f);
}

}  // namespace lmtrain
