// Softcapped cross-entropy with ignored targets and a padded vocabulary.
#include "op_check.h"

using namespace lmtrain;
using namespace op_check;

namespace {

constexpr int64_t N = 6, V = 11, Vp = 16;
constexpr float kCap = 2.f;  // small, so the cap bends the logits it sees

std::vector<int32_t> targets() { return {3, -1, 0, 10, -1, 7}; }

}  // namespace

TEST_CASE("softcap cross-entropy forward matches the formula", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(21);
  std::vector<float> logits = randn(N * Vp, rng, 3.f), before = logits, losses(N, -1.f);
  std::vector<int32_t> tgt = targets();
  cpu.softcap_cross_entropy(f32(logits, {N, Vp}), f32(losses, {N}), i32(tgt, {N}), int(V), kCap,
                            0.f);
  CHECK(logits == before);  // grad_scale 0 leaves the logits alone
  std::vector<double> want(N, 0.0);
  for (int64_t n = 0; n < N; ++n) {
    if (tgt[n] == -1) continue;
    double sum = 0.0;
    for (int64_t j = 0; j < V; ++j) sum += std::exp(kCap * std::tanh(before[n * Vp + j] / kCap));
    want[n] = std::log(sum) - kCap * std::tanh(before[n * Vp + tgt[n]] / kCap);
  }
  require_close("losses", losses, want, 1e-6);
  CHECK(losses[1] == 0.f);
  CHECK(losses[4] == 0.f);
}

TEST_CASE("softcap cross-entropy gradient matches finite differences", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(22);
  const float grad_scale = 0.37f;
  std::vector<float> logits = randn(N * Vp, rng, 3.f), losses(N), grad = logits;
  std::vector<int32_t> tgt = targets();
  cpu.softcap_cross_entropy(f32(grad, {N, Vp}), f32(losses, {N}), i32(tgt, {N}), int(V), kCap,
                            grad_scale);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < Vp; ++j)
      if (tgt[n] == -1 || j >= V) REQUIRE(grad[n * Vp + j] == 0.f);
  std::vector<float> scratch;
  check_gradient("logits", logits, grad, [&] {
    scratch = logits;
    cpu.softcap_cross_entropy(f32(scratch, {N, Vp}), f32(losses, {N}), i32(tgt, {N}), int(V), kCap,
                              0.f);
    double sum = 0.0;
    for (float l : losses) sum += l;
    return grad_scale * sum;
  });
}

// A NaN logit reaches its row's loss (the trainer's non-finite check stops on it) and no other.
TEST_CASE("softcap cross-entropy keeps a NaN logit's NaN in its row", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(23);
  for (float grad_scale : {0.f, 1.f}) {
    std::vector<float> logits = randn(N * Vp, rng, 3.f), losses(N, -1.f);
    logits[2 * Vp + 5] = NAN;  // row 2, not its target
    logits[3 * Vp + 4] = NAN;  // row 3, beside its target 10
    std::vector<int32_t> tgt = targets();
    cpu.softcap_cross_entropy(f32(logits, {N, Vp}), f32(losses, {N}), i32(tgt, {N}), int(V), kCap,
                              grad_scale);
    for (int64_t n = 0; n < N; ++n) {
      INFO("row " << n << " grad_scale " << grad_scale);
      CHECK(std::isnan(losses[n]) == (n == 2 || n == 3));
    }
  }
}

// At a real vocabulary the rows run through the vectorized exponentials (16 or 8 logits a call)
// and a remainder; against the formula in double, with logits from tiny to far past the cap and
// an infinite one (capped like any other), and a NaN deep inside a row.
TEST_CASE("softcap cross-entropy at a real vocabulary matches the formula in double", "[ops]") {
  constexpr int64_t rows = 4, vocab = 8192 + 37, padded = 8192 + 64;
  constexpr float cap = 15.f, grad_scale = 0.25f;
  CpuBackend cpu;
  std::mt19937 rng(24);
  std::vector<float> logits = randn(rows * padded, rng, 8.f);
  logits[5] = 1e-30f, logits[6] = -1e-30f, logits[7] = 0.f, logits[8] = 3e4f, logits[9] = -3e4f;
  logits[padded + 100] = INFINITY, logits[2 * padded + 200] = -INFINITY;
  std::vector<int32_t> tgt = {8, 4000, -1, int32_t(vocab - 1)};
  std::vector<double> want_loss(rows, 0.0), want_grad(rows * padded, 0.0);
  for (int64_t n = 0; n < rows; ++n) {
    if (tgt[n] == -1) continue;
    const float* z = logits.data() + n * padded;
    double sum = 0.0;
    for (int64_t j = 0; j < vocab; ++j) sum += std::exp(cap * std::tanh(double(z[j]) / cap));
    want_loss[n] = std::log(sum) - cap * std::tanh(double(z[tgt[n]]) / cap);
    for (int64_t j = 0; j < vocab; ++j) {
      const double t = std::tanh(double(z[j]) / cap);
      want_grad[n * padded + j] =
          grad_scale * (std::exp(cap * t) / sum - (j == tgt[n] ? 1.0 : 0.0)) * (1.0 - t * t);
    }
  }
  std::vector<float> losses(rows), grad = logits;
  cpu.softcap_cross_entropy(f32(grad, {rows, padded}), f32(losses, {rows}), i32(tgt, {rows}),
                            int(vocab), cap, grad_scale);
  require_close("losses", losses, want_loss, 1e-6);
  require_close("gradient", grad, want_grad, 1e-6);

  logits[3 * padded + 5000] = NAN;
  cpu.softcap_cross_entropy(f32(logits, {rows, padded}), f32(losses, {rows}), i32(tgt, {rows}),
                            int(vocab), cap, 0.f);
  for (int64_t n = 0; n < rows; ++n) CHECK(std::isnan(losses[n]) == (n == 3));
}

TEST_CASE("softcap cross-entropy rejects bad targets and shapes", "[ops]") {
  CpuBackend cpu;
  std::vector<float> logits(2 * 8), losses(2), losses3(3);
  std::vector<int32_t> ok{1, -1}, too_big{1, 6}, negative{-2, 0};
  CHECK_NOTHROW(
      cpu.softcap_cross_entropy(f32(logits, {2, 8}), f32(losses, {2}), i32(ok, {2}), 6, 15.f, 1.f));
  CHECK_THROWS_AS(cpu.softcap_cross_entropy(f32(logits, {2, 8}), f32(losses, {2}),
                                            i32(too_big, {2}), 6, 15.f, 1.f),
                  Error);
  CHECK_THROWS_AS(cpu.softcap_cross_entropy(f32(logits, {2, 8}), f32(losses, {2}),
                                            i32(negative, {2}), 6, 15.f, 1.f),
                  Error);
  CHECK_THROWS_AS(
      cpu.softcap_cross_entropy(f32(logits, {2, 8}), f32(losses, {2}), i32(ok, {2}), 9, 15.f, 1.f),
      Error);
  CHECK_THROWS_AS(
      cpu.softcap_cross_entropy(f32(logits, {2, 8}), f32(losses3, {3}), i32(ok, {2}), 6, 15.f, 1.f),
      Error);
}
