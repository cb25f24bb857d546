// Weightless RMSNorm.
#include <cfloat>

#include "op_check.h"

using namespace lmtrain;
using namespace op_check;

TEST_CASE("rmsnorm forward matches the formula and saves rstd", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(6);
  const int64_t N = 5, C = 24;
  std::vector<float> x = randn(N * C, rng, 2.f), out(N * C), rstd(N);
  std::fill(x.begin() + C, x.begin() + 2 * C, 0.f);  // a zero row stays finite thanks to eps
  cpu.rmsnorm_forward(f32(out, {N, C}), f32(rstd, {N}), f32(x, {N, C}));
  std::vector<double> want(N * C), want_rstd(N);
  for (int64_t n = 0; n < N; ++n) {
    double ms = 0.0;
    for (int64_t c = 0; c < C; ++c) ms += double(x[n * C + c]) * x[n * C + c] / C;
    want_rstd[n] = 1.0 / std::sqrt(ms + double(FLT_EPSILON));
    for (int64_t c = 0; c < C; ++c) want[n * C + c] = x[n * C + c] * want_rstd[n];
  }
  require_close("out", out, want, 1e-6);
  require_close("rstd", rstd, want_rstd, 1e-6);
}

TEST_CASE("rmsnorm backward matches finite differences", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(7);
  const int64_t B = 2, T = 3, C = 16;
  std::vector<float> x = randn(B * T * C, rng), w = randn(B * T * C, rng);
  std::vector<float> out(x.size()), rstd(B * T), dx(x.size());
  cpu.rmsnorm_forward(f32(out, {B, T, C}), f32(rstd, {B, T}), f32(x, {B, T, C}));
  cpu.rmsnorm_backward(f32(dx, {B, T, C}), f32(w, {B, T, C}), f32(x, {B, T, C}), f32(rstd, {B, T}),
                       {});
  check_gradient("x", x, dx, [&] {
    cpu.rmsnorm_forward(f32(out, {B, T, C}), f32(rstd, {B, T}), f32(x, {B, T, C}));
    return weighted_sum(w, out);
  });
  cpu.rmsnorm_forward(f32(out, {B, T, C}), f32(rstd, {B, T}), f32(x, {B, T, C}));
  std::vector<float> inplace = w;  // dx may alias dout
  cpu.rmsnorm_backward(f32(inplace, {B, T, C}), f32(inplace, {B, T, C}), f32(x, {B, T, C}),
                       f32(rstd, {B, T}), {});
  CHECK(inplace == dx);
}

TEST_CASE("rmsnorm backward adds a residual gradient in the same pass", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(8);
  const int64_t N = 5, C = 12;
  Shape s{N, C};
  std::vector<float> x = randn(N * C, rng), dout = randn(N * C, rng), res = randn(N * C, rng);
  std::vector<float> out(N * C), rstd(N), plain(N * C), joined(N * C);
  cpu.rmsnorm_forward(f32(out, s), f32(rstd, {N}), f32(x, s));
  cpu.rmsnorm_backward(f32(plain, s), f32(dout, s), f32(x, s), f32(rstd, {N}), {});
  cpu.rmsnorm_backward(f32(joined, s), f32(dout, s), f32(x, s), f32(rstd, {N}), f32(res, s));
  std::vector<double> want(N * C);
  for (size_t i = 0; i < want.size(); ++i) want[i] = double(plain[i]) + res[i];
  require_close("dx", joined, want, 1e-6);
  // dx may alias the residual or dout.
  std::vector<float> into_res = res, into_dout = dout;
  cpu.rmsnorm_backward(f32(into_res, s), f32(dout, s), f32(x, s), f32(rstd, {N}), f32(into_res, s));
  cpu.rmsnorm_backward(f32(into_dout, s), f32(into_dout, s), f32(x, s), f32(rstd, {N}),
                       f32(res, s));
  CHECK(into_res == joined);
  CHECK(into_dout == joined);
  std::vector<float> res_bad(N * (C + 1));
  CHECK_THROWS_AS(cpu.rmsnorm_backward(f32(plain, s), f32(dout, s), f32(x, s), f32(rstd, {N}),
                                       f32(res_bad, {N, C + 1})),
                  Error);
}

TEST_CASE("rmsnorm rejects mismatched shapes", "[ops]") {
  CpuBackend cpu;
  std::vector<float> x(36), x8(32), out(32), rstd(4), rstd_bad(3);
  CHECK_THROWS_AS(cpu.rmsnorm_forward(f32(out, {4, 8}), f32(rstd, {4}), f32(x, {4, 9})), Error);
  CHECK_THROWS_AS(cpu.rmsnorm_forward(f32(out, {4, 8}), f32(rstd_bad, {3}), f32(x8, {4, 8})),
                  Error);
}
