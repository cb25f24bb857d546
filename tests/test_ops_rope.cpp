// Half-split rotary embedding.
#include "op_check.h"

using namespace lmtrain;
using namespace op_check;

namespace {

struct Tables {
  std::vector<float> cos, sin;
};

// The tables the model builds: angle (pos, i) = pos * base^(-2i/D).
Tables rope_tables(int64_t T_max, int64_t D) {
  Tables t{std::vector<float>(T_max * D / 2), std::vector<float>(T_max * D / 2)};
  for (int64_t p = 0; p < T_max; ++p)
    for (int64_t i = 0; i < D / 2; ++i) {
      double angle = p * std::pow(100.0, -2.0 * i / D);
      t.cos[p * D / 2 + i] = float(std::cos(angle));
      t.sin[p * D / 2 + i] = float(std::sin(angle));
    }
  return t;
}

}  // namespace

TEST_CASE("rope forward matches the formula at an offset, backward inverts it", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(8);
  const int64_t B = 2, T = 3, H = 2, D = 8, d = D / 2, T_max = 10;
  const int pos0 = 4;
  Tables tab = rope_tables(T_max, D);
  Tensor cos = f32(tab.cos, {T_max, d}), sin = f32(tab.sin, {T_max, d});
  std::vector<float> x0 = randn(B * T * H * D, rng), x = x0;
  cpu.rope_forward(f32(x, {B, T, H, D}), cos, sin, pos0);
  std::vector<double> want(x.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < d; ++i) {
          int64_t o = ((b * T + t) * H + h) * D;
          double c = tab.cos[(pos0 + t) * d + i], s = tab.sin[(pos0 + t) * d + i];
          want[o + i] = x0[o + i] * c + x0[o + i + d] * s;
          want[o + i + d] = -x0[o + i] * s + x0[o + i + d] * c;
        }
  require_close("rope", x, want, 1e-6);
  cpu.rope_backward(f32(x, {B, T, H, D}), cos, sin, pos0);  // a rotation's transpose undoes it
  require_close("rope inverse", x, x0, 1e-6);
}

TEST_CASE("rope backward matches finite differences", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(9);
  const int64_t B = 1, T = 4, H = 3, D = 6, T_max = 8;
  const int pos0 = 2;
  Tables tab = rope_tables(T_max, D);
  Tensor cos = f32(tab.cos, {T_max, D / 2}), sin = f32(tab.sin, {T_max, D / 2});
  std::vector<float> x = randn(B * T * H * D, rng), w = randn(x.size(), rng), dx = w, y;
  cpu.rope_backward(f32(dx, {B, T, H, D}), cos, sin, pos0);
  check_gradient("x", x, dx, [&] {
    y = x;
    cpu.rope_forward(f32(y, {B, T, H, D}), cos, sin, pos0);
    return weighted_sum(w, y);
  });
}

TEST_CASE("rope rejects positions beyond the tables and mismatched widths", "[ops]") {
  CpuBackend cpu;
  Tables tab = rope_tables(4, 8);
  std::vector<float> x(2 * 3 * 8);
  Tensor cos = f32(tab.cos, {4, 4}), sin = f32(tab.sin, {4, 4});
  CHECK_NOTHROW(cpu.rope_forward(f32(x, {1, 2, 3, 8}), cos, sin, 2));
  CHECK_THROWS_AS(cpu.rope_forward(f32(x, {1, 2, 3, 8}), cos, sin, 3), Error);
  CHECK_THROWS_AS(cpu.rope_forward(f32(x, {1, 2, 4, 6}), cos, sin, 0), Error);
}
