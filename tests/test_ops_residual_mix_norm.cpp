// The top of every block: mixed = resid[l] * x + x0l[l] * x0, normed = rmsnorm(mixed).
#include <omp.h>

#include <cfloat>
#include <cstring>

#include "op_check.h"

using namespace lmtrain;
using namespace op_check;

namespace {

// The unfused reference of the forward, in double.
void mix_norm_reference(const std::vector<float>& x, const std::vector<float>& x0, double a,
                        double b, int64_t N, int64_t C, std::vector<double>& mixed,
                        std::vector<double>& normed, std::vector<double>& rstd) {
  mixed.assign(N * C, 0.0);
  normed.assign(N * C, 0.0);
  rstd.assign(N, 0.0);
  for (int64_t n = 0; n < N; ++n) {
    double ms = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t i = n * C + c;
      mixed[i] = a * x[i] + b * x0[i];
      ms += mixed[i] * mixed[i] / double(C);
    }
    rstd[n] = 1.0 / std::sqrt(ms + double(FLT_EPSILON));
    for (int64_t c = 0; c < C; ++c) normed[n * C + c] = mixed[n * C + c] * rstd[n];
  }
}

}  // namespace

TEST_CASE("residual_mix_norm forward mixes with the layer's scalars and normalises", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(15);
  const int64_t N = 4, C = 6;
  std::vector<float> x = randn(N * C, rng), x0 = randn(N * C, rng);
  std::vector<float> mixed(N * C), normed(N * C), rstd(N);
  std::vector<float> resid{0.5f, 1.25f, 2.f}, x0l{-1.f, 0.75f, 3.f};
  cpu.residual_mix_norm_forward(f32(mixed, {N, C}), f32(normed, {N, C}), f32(rstd, {N}),
                                f32(x, {N, C}), f32(x0, {N, C}), f32(resid, {3}), f32(x0l, {3}), 1);
  std::vector<double> want_mixed, want_normed, want_rstd;
  mix_norm_reference(x, x0, 1.25, 0.75, N, C, want_mixed, want_normed, want_rstd);
  require_close("mixed", mixed, want_mixed, 1e-6);
  require_close("normed", normed, want_normed, 1e-6);
  require_close("rstd", rstd, want_rstd, 1e-6);
}

// L = sum(w * normed) + sum(v * mixed): v is the gradient the skip connection brings to mixed.
TEST_CASE("residual_mix_norm backward matches finite differences", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(16);
  const int64_t B = 2, T = 3, C = 8, L = 3, N = B * T;
  const int layer = 2;
  Shape s{B, T, C};
  std::vector<float> x = randn(N * C, rng), x0 = randn(x.size(), rng);
  std::vector<float> w = randn(x.size(), rng), v = randn(x.size(), rng);
  std::vector<float> resid = randn(L, rng), x0l = randn(L, rng);
  std::vector<float> mixed(x.size()), normed(x.size()), rstd(N);
  std::vector<float> dx(x.size()), dx0(x.size(), 0.f), dresid(L, 0.f), dx0l(L, 0.f);
  auto forward = [&] {
    cpu.residual_mix_norm_forward(f32(mixed, s), f32(normed, s), f32(rstd, {B, T}), f32(x, s),
                                  f32(x0, s), f32(resid, {L}), f32(x0l, {L}), layer);
  };
  forward();
  cpu.residual_mix_norm_backward(f32(dx, s), f32(dx0, s), f32(dresid, {L}), f32(dx0l, {L}),
                                 f32(w, s), f32(v, s), f32(x, s), f32(x0, s), f32(rstd, {B, T}),
                                 f32(resid, {L}), f32(x0l, {L}), layer);
  auto loss = [&] {
    forward();
    return weighted_sum(w, normed) + weighted_sum(v, mixed);
  };
  check_gradient("x", x, dx, loss);
  check_gradient("x0", x0, dx0, loss);
  check_gradient("resid", resid, dresid, loss);
  check_gradient("x0l", x0l, dx0l, loss);
}

TEST_CASE("residual_mix_norm backward accumulates dx0 and the scalars, overwrites dx", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(17);
  const int64_t N = 3, C = 4, L = 2;
  const int layer = 1;
  Shape s{N, C};
  std::vector<float> x = randn(N * C, rng), x0 = randn(N * C, rng);
  std::vector<float> dnormed = randn(N * C, rng), dmixed = randn(N * C, rng);
  std::vector<float> resid{0.9f, 1.1f}, x0l{0.2f, -0.3f};
  std::vector<float> mixed(N * C), normed(N * C), rstd(N);
  cpu.residual_mix_norm_forward(f32(mixed, s), f32(normed, s), f32(rstd, {N}), f32(x, s),
                                f32(x0, s), f32(resid, {L}), f32(x0l, {L}), layer);
  // g, the gradient of mixed, by the standalone rmsnorm backward with the skip as its residual.
  std::vector<float> g(N * C);
  cpu.rmsnorm_backward(f32(g, s), f32(dnormed, s), f32(mixed, s), f32(rstd, {N}), f32(dmixed, s));

  std::vector<float> dx = randn(N * C, rng), dx0 = randn(N * C, rng), dx0_init = dx0;
  std::vector<float> dresid{5.f, 7.f}, dx0l{-2.f, 4.f};
  cpu.residual_mix_norm_backward(f32(dx, s), f32(dx0, s), f32(dresid, {L}), f32(dx0l, {L}),
                                 f32(dnormed, s), f32(dmixed, s), f32(x, s), f32(x0, s),
                                 f32(rstd, {N}), f32(resid, {L}), f32(x0l, {L}), layer);
  std::vector<double> want_dx(N * C), want_dx0(N * C);
  double sum_x = 0.0, sum_x0 = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    want_dx[i] = 1.1 * g[i];
    want_dx0[i] = dx0_init[i] + -0.3 * g[i];
    sum_x += double(g[i]) * x[i];
    sum_x0 += double(g[i]) * x0[i];
  }
  require_close("dx", dx, want_dx, 1e-6);
  require_close("dx0", dx0, want_dx0, 1e-6);
  CHECK(dresid[0] == 5.f);  // other layers are left alone
  CHECK(dx0l[0] == -2.f);
  CHECK(dresid[1] == Approx(7.0 + sum_x).epsilon(1e-6));
  CHECK(dx0l[1] == Approx(4.0 + sum_x0).epsilon(1e-6));

  // dx aliasing dnormed, or dmixed, gives the same dx.
  for (bool alias_normed : {true, false}) {
    std::vector<float> dn = dnormed, dm = dmixed, dx0_again = dx0_init, scalars{0.f, 0.f, 0.f, 0.f};
    std::vector<float>& out = alias_normed ? dn : dm;
    cpu.residual_mix_norm_backward(f32(out, s), f32(dx0_again, s), f32(scalars, {4}).slice(0, 2),
                                   f32(scalars, {4}).slice(2, 2), f32(dn, s), f32(dm, s), f32(x, s),
                                   f32(x0, s), f32(rstd, {N}), f32(resid, {L}), f32(x0l, {L}),
                                   layer);
    INFO("dx aliases " << (alias_normed ? "dnormed" : "dmixed"));
    CHECK(out == dx);
  }
}

TEST_CASE("residual_mix_norm backward is identical for any thread count", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(18);
  const int64_t N = 301, C = 64;
  Shape s{N, C};
  std::vector<float> x = randn(N * C, rng), x0 = randn(N * C, rng);
  std::vector<float> dn = randn(N * C, rng), dm = randn(N * C, rng);
  std::vector<float> resid{0.7f}, x0l{0.4f}, mixed(N * C), normed(N * C), rstd(N);
  cpu.residual_mix_norm_forward(f32(mixed, s), f32(normed, s), f32(rstd, {N}), f32(x, s),
                                f32(x0, s), f32(resid, {1}), f32(x0l, {1}), 0);
  auto backward = [&](int threads) {
    int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    std::vector<float> dx(N * C), dx0(N * C, 0.f), dscalars{0.f, 0.f};
    cpu.residual_mix_norm_backward(f32(dx, s), f32(dx0, s), f32(dscalars, {2}).slice(0, 1),
                                   f32(dscalars, {2}).slice(1, 1), f32(dn, s), f32(dm, s),
                                   f32(x, s), f32(x0, s), f32(rstd, {N}), f32(resid, {1}),
                                   f32(x0l, {1}), 0);
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

TEST_CASE("residual_mix_norm rejects bad shapes and layers", "[ops]") {
  CpuBackend cpu;
  std::vector<float> x(12), x0(12), mixed(12), normed(12), rstd(3), rstd_bad(4);
  std::vector<float> resid{1.f, 1.f}, x0l{0.f, 0.f}, x0l_short{0.f};
  auto forward = [&](Shape x0_shape, std::vector<float>& r, std::vector<float>& l, int layer) {
    cpu.residual_mix_norm_forward(f32(mixed, {3, 4}), f32(normed, {3, 4}),
                                  f32(r, {int64_t(r.size())}), f32(x, {3, 4}), f32(x0, x0_shape),
                                  f32(resid, {2}), f32(l, {int64_t(l.size())}), layer);
  };
  CHECK_NOTHROW(forward({3, 4}, rstd, x0l, 1));
  CHECK_THROWS_AS(forward({4, 3}, rstd, x0l, 0), Error);
  CHECK_THROWS_AS(forward({3, 4}, rstd, x0l, 2), Error);
  CHECK_THROWS_AS(forward({3, 4}, rstd, x0l_short, 0), Error);
  CHECK_THROWS_AS(forward({3, 4}, rstd_bad, x0l, 0), Error);
  // mixed overwriting an input (the CUDA kernel reads x and x0 after storing mixed).
  for (std::vector<float>* input : {&x, &x0}) {
    CHECK_THROWS_WITH(cpu.residual_mix_norm_forward(f32(*input, {3, 4}), f32(normed, {3, 4}),
                                                    f32(rstd, {3}), f32(x, {3, 4}), f32(x0, {3, 4}),
                                                    f32(resid, {2}), f32(x0l, {2}), 0),
                      Catch::Contains("may not alias"));
  }
}
