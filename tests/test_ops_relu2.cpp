// Squared ReLU.
#include "op_check.h"

using namespace lmtrain;
using namespace op_check;

TEST_CASE("relu2 forward squares the positive part", "[ops]") {
  CpuBackend cpu;
  std::vector<float> x{-2.f, -0.f, 0.5f, 3.f}, out(4);
  cpu.relu2_forward(f32(out, {2, 2}), f32(x, {2, 2}));
  CHECK(out == std::vector<float>{0.f, 0.f, 0.25f, 9.f});
}

TEST_CASE("relu2 backward matches finite differences", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(10);
  const int64_t N = 6, C = 20;
  std::vector<float> x = randn(N * C, rng), w = randn(N * C, rng), out(N * C), dx(N * C);
  cpu.relu2_forward(f32(out, {N, C}), f32(x, {N, C}));
  cpu.relu2_backward(f32(dx, {N, C}), f32(w, {N, C}), f32(out, {N, C}));
  check_gradient("x", x, dx, [&] {
    cpu.relu2_forward(f32(out, {N, C}), f32(x, {N, C}));
    return weighted_sum(w, out);
  });
}

TEST_CASE("relu2 backward from the output equals 2 max(x, 0) dout, in place too", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(11);
  const int64_t n = 257;
  std::vector<float> x = randn(n, rng, 3.f), dout = randn(n, rng), hidden = x, dx(n);
  cpu.relu2_forward(f32(hidden, {n}), f32(hidden, {n}));  // in place, as the model runs it
  cpu.relu2_backward(f32(dx, {n}), f32(dout, {n}), f32(hidden, {n}));
  std::vector<double> want(n);
  for (int64_t i = 0; i < n; ++i) want[i] = 2.0 * std::max(double(x[i]), 0.0) * dout[i];
  require_close("dx", dx, want, 1e-6);
  std::vector<float> inplace = dout;  // dx may alias dout
  cpu.relu2_backward(f32(inplace, {n}), f32(inplace, {n}), f32(hidden, {n}));
  CHECK(inplace == dx);
}

TEST_CASE("relu2 rejects mismatched shapes", "[ops]") {
  CpuBackend cpu;
  std::vector<float> x(12), out(12);
  CHECK_THROWS_AS(cpu.relu2_forward(f32(out, {3, 4}), f32(x, {4, 3})), Error);
  CHECK_THROWS_AS(cpu.relu2_backward(f32(out, {3, 4}), f32(out, {3, 4}), f32(x, {4, 3})), Error);
}
