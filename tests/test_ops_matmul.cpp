// matmul against a naive triple loop, for every transpose combination, batched and accumulating.
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
