// matmul against a naive triple loop, for every transpose combination, batched and accumulating,
// and matmul_add with its addend apart from or aliasing out.
#include "op_check.h"

using namespace lmtrain;
using namespace op_check;

namespace {

// out[bt] = alpha * op(a[bt]) @ op(b[bt]) + beta * out[bt], in double.
std::vector<double> naive_matmul(const std::vector<float>& a, const std::vector<float>& b,
                                 const std::vector<float>& out, int64_t batch, int64_t M, int64_t N,
                                 int64_t K, bool ta, bool tb, float alpha, float beta) {
  std::vector<double> r(size_t(batch * M * N));
  for (int64_t bt = 0; bt < batch; ++bt)
    for (int64_t i = 0; i < M; ++i)
      for (int64_t j = 0; j < N; ++j) {
        double s = 0.0;
        for (int64_t k = 0; k < K; ++k) {
          double av = ta ? a[bt * M * K + k * M + i] : a[bt * M * K + i * K + k];
          double bv = tb ? b[bt * K * N + j * K + k] : b[bt * K * N + k * N + j];
          s += av * bv;
        }
        size_t o = bt * M * N + i * N + j;
        r[o] = alpha * s + beta * out[o];
      }
  return r;
}

}  // namespace

TEST_CASE("matmul matches a naive loop for all transposes, batched and accumulating", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(3);
  const int64_t M = 7, N = 5, K = 9;
  for (int64_t batch : {0, 3}) {  // 0: rank 2
    int64_t nb = batch ? batch : 1;
    for (bool ta : {false, true})
      for (bool tb : {false, true})
        for (bool acc : {false, true}) {
          auto shape = [&](int64_t r, int64_t c) {
            return batch ? Shape{batch, r, c} : Shape{r, c};
          };
          std::vector<float> a = randn(nb * M * K, rng), b = randn(nb * K * N, rng),
                             out = randn(nb * M * N, rng);
          float alpha = 0.75f;
          auto want = naive_matmul(a, b, out, nb, M, N, K, ta, tb, alpha, acc ? 1.f : 0.f);
          cpu.matmul(f32(out, shape(M, N)), f32(a, ta ? shape(K, M) : shape(M, K)),
                     f32(b, tb ? shape(N, K) : shape(K, N)), ta, tb, acc, alpha);
          require_close(fmt::format("matmul batch {} ta {} tb {} acc {}", batch, ta, tb, acc), out,
                        want, 1e-5);
        }
  }
}

TEST_CASE("matmul_add adds a separate addend, or in place, and checks it", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(4);
  const int64_t M = 6, N = 4, K = 5;
  for (bool tb : {false, true}) {
    std::vector<float> a = randn(M * K, rng), b = randn(K * N, rng), addend = randn(M * N, rng);
    const std::vector<float> addend_before = addend;
    std::vector<float> out = randn(M * N, rng);
    const auto want = naive_matmul(a, b, addend, 1, M, N, K, false, tb, 1.f, 1.f);
    const Tensor tb_shape = f32(b, tb ? Shape{N, K} : Shape{K, N});
    cpu.matmul_add(f32(out, {M, N}), f32(a, {M, K}), tb_shape, false, tb, f32(addend, {M, N}));
    require_close(fmt::format("matmul_add tb {}", tb), out, want, 1e-5);
    CHECK(addend == addend_before);  // read, not written
    // Scaled terms, as Polar Express uses them: out = alpha a b + beta addend.
    const auto want_scaled = naive_matmul(a, b, addend, 1, M, N, K, false, tb, -0.75f, 2.5f);
    cpu.matmul_add(f32(out, {M, N}), f32(a, {M, K}), tb_shape, false, tb, f32(addend, {M, N}),
                   -0.75f, 2.5f);
    require_close(fmt::format("matmul_add scaled tb {}", tb), out, want_scaled, 1e-5);
    CHECK(addend == addend_before);
    cpu.matmul_add(f32(addend, {M, N}), f32(a, {M, K}), tb_shape, false, tb, f32(addend, {M, N}));
    require_close(fmt::format("matmul_add in place tb {}", tb), addend, want, 1e-5);
  }
  std::vector<float> a(12), b(12), out(16), wrong(12);
  CHECK_THROWS_WITH(
      cpu.matmul_add(f32(out, {4, 4}), f32(a, {4, 3}), f32(b, {3, 4}), false, false,
                     f32(wrong, {4, 3})),
      Catch::Matchers::Contains("matmul_add: addend (4, 3) f32 must have out's shape"));
}

TEST_CASE("matmul rejects shapes that do not multiply", "[ops]") {
  CpuBackend cpu;
  std::vector<float> a(12), b(12), out(16), out3(32);
  CHECK_THROWS_AS(
      cpu.matmul(f32(out, {4, 4}), f32(a, {4, 3}), f32(b, {4, 3}), false, false, false, 1.f),
      Error);
  CHECK_THROWS_AS(
      cpu.matmul(f32(out, {4, 4}), f32(a, {3, 4}), f32(b, {3, 4}), false, false, false, 1.f),
      Error);
  CHECK_NOTHROW(
      cpu.matmul(f32(out, {4, 4}), f32(a, {4, 3}), f32(b, {4, 3}), false, true, false, 1.f));
  CHECK_THROWS_AS(
      cpu.matmul(f32(out3, {2, 4, 4}), f32(a, {4, 3}), f32(b, {3, 4}), false, false, false, 1.f),
      Error);
}

// The linear layer as the model runs it (src/model/gpt.cpp): y = x W^T (+ beta * r), the weight
// gradient accumulated as dW += dy^T x, the input gradient dx = dy W; checked by central
// differences of L = sum(w * y), batched (rank 3, as Polar Express) and not.
TEST_CASE("a linear layer's matmul gradients match finite differences", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(5);
  const int64_t N = 6, C_in = 5, C_out = 4;
  const float beta = 0.6f;
  for (int64_t batch : {0, 2}) {
    const int64_t nb = batch ? batch : 1;
    auto shape = [&](int64_t r, int64_t c) { return batch ? Shape{batch, r, c} : Shape{r, c}; };
    std::vector<float> x = randn(nb * N * C_in, rng), W = randn(nb * C_out * C_in, rng),
                       r = randn(nb * N * C_out, rng), w = randn(nb * N * C_out, rng),
                       y(nb * N * C_out);
    auto forward = [&] {
      cpu.matmul_add(f32(y, shape(N, C_out)), f32(x, shape(N, C_in)), f32(W, shape(C_out, C_in)),
                     false, true, f32(r, shape(N, C_out)), 1.f, beta);
      return weighted_sum(w, y);
    };
    // dW accumulates onto a random start, as parameter gradients do over micro-steps.
    const std::vector<float> dW0 = randn(W.size(), rng);
    std::vector<float> dW = dW0, dx(x.size()), dr(r.size(), 0.f);
    cpu.matmul(f32(dW, shape(C_out, C_in)), f32(w, shape(N, C_out)), f32(x, shape(N, C_in)), true,
               false, true);
    for (size_t i = 0; i < dW.size(); ++i) dW[i] -= dW0[i];
    cpu.matmul(f32(dx, shape(N, C_in)), f32(w, shape(N, C_out)), f32(W, shape(C_out, C_in)), false,
               false, false);
    cpu.add(f32(dr, {int64_t(dr.size())}), f32(w, {int64_t(w.size())}), beta);
    INFO("batch " << batch);
    check_gradient("W", W, dW, forward);
    check_gradient("x", x, dx, forward);
    check_gradient("r", r, dr, forward);
  }
}
