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

// The MLP's ends with the activation: out = relu2(x w_fc^T) from the forward, and the gradient
// of L = sum(g * (relu2(h) w_proj^T)) with respect to h from the backward, checked by finite
// differences of h (the backward reads relu2(h), the forward's output).
TEST_CASE("matmul + relu2 forward and backward match their definitions", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(12);
  const int64_t M = 5, K = 7, N = 12;
  std::vector<float> x = randn(M * K, rng), w_fc = randn(N * K, rng), out(M * N);
  cpu.matmul_relu2_forward(f32(out, {M, N}), f32(x, {M, K}), f32(w_fc, {N, K}));
  std::vector<double> want(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += double(x[m * K + k]) * w_fc[n * K + k];
      want[m * N + n] = acc > 0 ? acc * acc : 0.0;
    }
  require_close("out", out, want, 1e-6);

  std::vector<float> h = randn(M * N, rng), g = randn(M * K, rng), w_proj = randn(K * N, rng);
  std::vector<float> hidden(M * N), y(M * K), dh(M * N);
  auto objective = [&] {
    cpu.relu2_forward(f32(hidden, {M, N}), f32(h, {M, N}));
    cpu.matmul(f32(y, {M, K}), f32(hidden, {M, N}), f32(w_proj, {K, N}), false, true, false);
    return weighted_sum(g, y);
  };
  objective();
  cpu.matmul_relu2_backward(f32(dh, {M, N}), f32(g, {M, K}), f32(w_proj, {K, N}),
                            f32(hidden, {M, N}));
  check_gradient("h", h, dh, objective);
}
