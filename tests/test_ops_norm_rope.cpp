// Per-head RMSNorm followed by half-split rotary embedding.
#include <cfloat>

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

TEST_CASE("norm_rope forward is RMSNorm of the rotated heads at an offset, also in place",
          "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(8);
  const int64_t B = 2, T = 3, H = 2, D = 8, d = D / 2, T_max = 10;
  const int pos0 = 4;
  Tables tab = rope_tables(T_max, D);
  Tensor cos = f32(tab.cos, {T_max, d}), sin = f32(tab.sin, {T_max, d});
  std::vector<float> x = randn(B * T * H * D, rng), out(x.size()), rstd(B * T * H);
  cpu.norm_rope_forward(f32(out, {B, T, H, D}), f32(rstd, {B * T * H}), f32(x, {B, T, H, D}), cos,
                        sin, pos0);
  // Rotate first, then normalise: the order the model is defined in.
  std::vector<double> want(x.size()), want_rstd(rstd.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t row = (b * T + t) * H + h, o = row * D;
        double ss = 0;
        for (int64_t i = 0; i < d; ++i) {
          double c = tab.cos[(pos0 + t) * d + i], s = tab.sin[(pos0 + t) * d + i];
          want[o + i] = x[o + i] * c + x[o + i + d] * s;
          want[o + i + d] = -x[o + i] * s + x[o + i + d] * c;
          ss += want[o + i] * want[o + i] + want[o + i + d] * want[o + i + d];
        }
        want_rstd[row] = 1.0 / std::sqrt(ss / D + FLT_EPSILON);
        for (int64_t i = 0; i < D; ++i) want[o + i] *= want_rstd[row];
      }
  require_close("norm_rope", out, want, 1e-6);
  require_close("norm_rope rstd", rstd, want_rstd, 1e-6);
  cpu.norm_rope_forward(f32(x, {B, T, H, D}), f32(rstd, {B * T * H}), f32(x, {B, T, H, D}), cos,
                        sin, pos0);
  CHECK(x == out);
}

TEST_CASE("norm_rope backward matches finite differences, also in place", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(9);
  const int64_t B = 1, T = 4, H = 3, D = 6, T_max = 8;
  const int pos0 = 2;
  const Shape shape{B, T, H, D};
  Tables tab = rope_tables(T_max, D);
  Tensor cos = f32(tab.cos, {T_max, D / 2}), sin = f32(tab.sin, {T_max, D / 2});
  std::vector<float> x = randn(B * T * H * D, rng), w = randn(x.size(), rng), dx(x.size()),
                     y(x.size());
  std::vector<float> rstd(B * T * H);
  auto forward = [&] {
    cpu.norm_rope_forward(f32(y, shape), f32(rstd, {B * T * H}), f32(x, shape), cos, sin, pos0);
  };
  forward();
  cpu.norm_rope_backward(f32(dx, shape), f32(w, shape), f32(x, shape), f32(rstd, {B * T * H}), cos,
                         sin, pos0);
  check_gradient("x", x, dx, [&] {
    forward();
    return weighted_sum(w, y);
  });
  forward();
  std::vector<float> in_place = w;
  cpu.norm_rope_backward(f32(in_place, shape), f32(in_place, shape), f32(x, shape),
                         f32(rstd, {B * T * H}), cos, sin, pos0);
  CHECK(in_place == dx);
}

TEST_CASE("norm_rope rejects positions beyond the tables and mismatched shapes", "[ops]") {
  CpuBackend cpu;
  Tables tab = rope_tables(4, 8);
  std::vector<float> x(2 * 3 * 8), out(x.size());
  Tensor cos = f32(tab.cos, {4, 4}), sin = f32(tab.sin, {4, 4});
  auto run = [&](Shape s, int64_t rstd_n, int pos0) {
    std::vector<float> rstd(static_cast<size_t>(rstd_n), 0.f);
    cpu.norm_rope_forward(f32(out, s), f32(rstd, {rstd_n}), f32(x, s), cos, sin, pos0);
  };
  CHECK_NOTHROW(run({1, 2, 3, 8}, 6, 2));
  CHECK_THROWS_WITH(run({1, 2, 3, 8}, 6, 3), Catch::Matchers::Contains("exceed the 4 rows"));
  CHECK_THROWS_WITH(run({1, 2, 4, 6}, 8, 0), Catch::Matchers::Contains("must both be (T_max, 3)"));
  CHECK_THROWS_WITH(run({1, 2, 3, 8}, 5, 0),
                    Catch::Matchers::Contains("rstd (5) needs one entry per head row"));
}
