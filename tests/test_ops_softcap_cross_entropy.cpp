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
