// The per-layer residual re-mix out = resid[l] * x + x0l[l] * x0.
#include <omp.h>

#include <cstring>

#include "op_check.h"

using namespace lmtrain;
using namespace op_check;

TEST_CASE("residual_mix forward mixes with the layer's scalars", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(15);
  const int64_t N = 4, C = 6;
  std::vector<float> x = randn(N * C, rng), x0 = randn(N * C, rng), out(N * C);
  std::vector<float> resid{0.5f, 1.25f, 2.f}, x0l{-1.f, 0.75f, 3.f};
  cpu.residual_mix_forward(f32(out, {N, C}), f32(x, {N, C}), f32(x0, {N, C}), f32(resid, {3}),
                           f32(x0l, {3}), 1);
  std::vector<double> want(N * C);
  for (size_t i = 0; i < want.size(); ++i) want[i] = 1.25 * x[i] + 0.75 * x0[i];
  require_close("out", out, want, 1e-6);
}

TEST_CASE("residual_mix backward matches finite differences", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(16);
  const int64_t B = 2, T = 3, C = 5, L = 3;
  const int layer = 2;
  Shape s{B, T, C};
  std::vector<float> x = randn(B * T * C, rng), x0 = randn(x.size(), rng), w = randn(x.size(), rng);
  std::vector<float> resid = randn(L, rng), x0l = randn(L, rng), out(x.size());
  std::vector<float> dx(x.size()), dx0(x.size(), 0.f), dresid(L, 0.f), dx0l(L, 0.f);
  cpu.residual_mix_backward(f32(dx, s), f32(dx0, s), f32(dresid, {L}), f32(dx0l, {L}), f32(w, s),
                            f32(x, s), f32(x0, s), f32(resid, {L}), f32(x0l, {L}), layer);
  auto loss = [&] {
    cpu.residual_mix_forward(f32(out, s), f32(x, s), f32(x0, s), f32(resid, {L}), f32(x0l, {L}),
                             layer);
    return weighted_sum(w, out);
  };
  check_gradient("x", x, dx, loss);
  check_gradient("x0", x0, dx0, loss);
  check_gradient("resid", resid, dresid, loss);
  check_gradient("x0l", x0l, dx0l, loss);
}

TEST_CASE("residual_mix backward accumulates dx0 and the scalars, overwrites dx", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(17);
  const int64_t N = 3, C = 4, L = 2;
  const int layer = 1;
  Shape s{N, C};
  std::vector<float> x = randn(N * C, rng), x0 = randn(N * C, rng), dout = randn(N * C, rng);
  std::vector<float> resid{0.9f, 1.1f}, x0l{0.2f, -0.3f};
  std::vector<float> dx = randn(N * C, rng), dx0 = randn(N * C, rng), dx0_init = dx0;
  std::vector<float> dresid{5.f, 7.f}, dx0l{-2.f, 4.f};
  cpu.residual_mix_backward(f32(dx, s), f32(dx0, s), f32(dresid, {L}), f32(dx0l, {L}), f32(dout, s),
                            f32(x, s), f32(x0, s), f32(resid, {L}), f32(x0l, {L}), layer);
  std::vector<double> want_dx(N * C), want_dx0(N * C);
  double sum_x = 0.0, sum_x0 = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    want_dx[i] = 1.1 * dout[i];
    want_dx0[i] = dx0_init[i] + -0.3 * dout[i];
    sum_x += double(dout[i]) * x[i];
    sum_x0 += double(dout[i]) * x0[i];
  }
  require_close("dx", dx, want_dx, 1e-6);
  require_close("dx0", dx0, want_dx0, 1e-6);
  CHECK(dresid[0] == 5.f);  // other layers are left alone
  CHECK(dx0l[0] == -2.f);
  CHECK(dresid[1] == Approx(7.0 + sum_x).epsilon(1e-6));
  CHECK(dx0l[1] == Approx(4.0 + sum_x0).epsilon(1e-6));

  // dx aliasing dout gives the same dx.
  std::vector<float> inplace = dout;
  cpu.residual_mix_backward(f32(inplace, s), f32(dx0, s), f32(dresid, {L}), f32(dx0l, {L}),
                            f32(inplace, s), f32(x, s), f32(x0, s), f32(resid, {L}), f32(x0l, {L}),
                            layer);
  CHECK(inplace == dx);
}

TEST_CASE("residual_mix backward is identical for any thread count", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(18);
  const int64_t N = 3 * 16384 + 123;  // several reduction chunks, the last one partial
  std::vector<float> x = randn(N, rng), x0 = randn(N, rng), dout = randn(N, rng);
  std::vector<float> resid{0.7f}, x0l{0.4f};
  auto backward = [&](int threads) {
    int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    std::vector<float> dx(N), dx0(N, 0.f), dscalars{0.f, 0.f};
    cpu.residual_mix_backward(f32(dx, {N}), f32(dx0, {N}), f32(dscalars, {2}).slice(0, 1),
                              f32(dscalars, {2}).slice(1, 1), f32(dout, {N}), f32(x, {N}),
                              f32(x0, {N}), f32(resid, {1}), f32(x0l, {1}), 0);
    omp_set_num_threads(saved);
    dx.insert(dx.end(), dx0.begin(), dx0.end());
    dx.insert(dx.end(), dscalars.begin(), dscalars.end());
    return dx;
  };
  std::vector<float> one = backward(1);
  for (int threads : {2, 3}) {
    std::vector<float> many = backward(threads);
    INFO(threads << " threads");
    CHECK(std::memcmp(one.data(), many.data(), one.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("residual_mix rejects bad shapes and layers", "[ops]") {
  CpuBackend cpu;
  std::vector<float> x(12), x0(12), out(12), resid{1.f, 1.f}, x0l{0.f, 0.f}, x0l_short{0.f};
  CHECK_THROWS_AS(cpu.residual_mix_forward(f32(out, {3, 4}), f32(x, {3, 4}), f32(x0, {4, 3}),
                                           f32(resid, {2}), f32(x0l, {2}), 0),
                  Error);
  CHECK_THROWS_AS(cpu.residual_mix_forward(f32(out, {3, 4}), f32(x, {3, 4}), f32(x0, {3, 4}),
                                           f32(resid, {2}), f32(x0l, {2}), 2),
                  Error);
  CHECK_THROWS_AS(cpu.residual_mix_forward(f32(out, {3, 4}), f32(x, {3, 4}), f32(x0, {3, 4}),
                                           f32(resid, {2}), f32(x0l_short, {1}), 0),
                  Error);
}
