// AdamW against a plain scalar loop in double.
#include "op_check.h"

using namespace lmtrain;
using namespace op_check;

TEST_CASE("adamw matches a scalar loop over three steps", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(23);
  const int64_t n = 300;
  AdamWHyper h{0.01f, 0.9f, 0.95f, 1e-8f, 0.1f, 0};
  std::vector<float> p = randn(n, rng), m(n, 0.f), v(n, 0.f);
  std::vector<double> rp(p.begin(), p.end()), rm(n, 0.0), rv(n, 0.0);
  for (int step = 1; step <= 3; ++step) {
    std::vector<float> g = randn(n, rng, 0.1f);
    h.step = step;
    cpu.adamw_update(f32(p, {10, 30}), f32(g, {10, 30}), f32(m, {10, 30}), f32(v, {10, 30}), h);
    double bc1 = 1.0 - std::pow(double(h.beta1), step), bc2 = 1.0 - std::pow(double(h.beta2), step);
    for (int64_t i = 0; i < n; ++i) {
      rp[i] *= 1.0 - double(h.lr) * h.weight_decay;
      rm[i] = h.beta1 * rm[i] + (1.0 - h.beta1) * g[i];
      rv[i] = h.beta2 * rv[i] + (1.0 - h.beta2) * double(g[i]) * g[i];
      rp[i] -= h.lr / bc1 * rm[i] / (std::sqrt(rv[i]) / std::sqrt(bc2) + h.eps);
    }
    INFO("step " << step);
    require_close("param", p, rp, 1e-5);
    require_close("m", m, rm, 1e-5);
    require_close("v", v, rv, 1e-5);
  }
}

TEST_CASE("adamw rejects mismatched state and a zero step", "[ops]") {
  CpuBackend cpu;
  std::vector<float> p(6), g(6), m(6), v(5);
  AdamWHyper h{0.01f, 0.9f, 0.95f, 1e-8f, 0.f, 1};
  CHECK_THROWS_AS(cpu.adamw_update(f32(p, {6}), f32(g, {6}), f32(m, {6}), f32(v, {5}), h), Error);
  h.step = 0;
  std::vector<float> v6(6);
  CHECK_THROWS_AS(cpu.adamw_update(f32(p, {6}), f32(g, {6}), f32(m, {6}), f32(v6, {6}), h), Error);
}
