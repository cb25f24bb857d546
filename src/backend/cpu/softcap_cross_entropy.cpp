// Cross-entropy on softcapped logits c = cap * tanh(z / cap), over the first `vocab` columns
// (the rest is padding that rounds the lm_head up to a friendly size). Forward and backward are
// one fused op, so the logits can be turned into their own gradient in place.
#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "backend/cpu/checks.h"
#include "backend/cpu/cpu_backend.h"

// glibc's libmvec has expf for the x86-64 vector function ABI (since glibc 2.22). Declared so,
// the `omp simd` loops below call it on 8 or 16 logits at a time: the two exponentials per logit
// were most of the op (56 of 136 ms of a step of a 2-layer model at vocab 8192, on 2 cores).
// Elsewhere the loops stay scalar, with the same formulas.
#if defined(__x86_64__) && defined(__GLIBC__)
#pragma omp declare simd notinbranch
extern "C" float expf(float) noexcept;
#endif

namespace lmtrain {

namespace {

// One row: th[j] = tanh(z[j] / cap) and e[j] = exp(cap * th[j] - max); returns the max and the
// sum of e. tanh(y) = sign(y) (1 - t) / (1 + t) with t = exp(-2|y|), within 1e-7 of tanh (the
// cancellation near 0 costs relative, not absolute, accuracy, and only cap * tanh is used).
// A NaN logit makes the sum NaN, as it must for the non-finite check.
std::pair<float, double> softcap_exponentials(const float* z, float* th, float* e, int64_t vocab,
                                              float cap) {
  float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < vocab; ++j) {
    const float y = z[j] / cap, t = expf(-2.f * std::fabs(y));
    th[j] = std::copysign((1.f - t) / (1.f + t), y);
    mx = std::max(mx, cap * th[j]);
  }
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < vocab; ++j) {
    e[j] = expf(cap * th[j] - mx);
    sum += e[j];
  }
  return {mx, sum};
}

}  // namespace

void CpuBackend::softcap_cross_entropy(Tensor logits, Tensor losses, Tensor targets, int vocab,
                                       float softcap, float grad_scale) {
  cpu::require_dense("softcap_cross_entropy", {logits, losses, targets});
  const char* op = "softcap_cross_entropy";
  check(logits.dtype == DType::f32 && losses.dtype == DType::f32 && targets.dtype == DType::i32,
        "{}: logits and losses must be f32 and targets i32, got {}, {}, {}", op,
        dtype_name(logits.dtype), dtype_name(losses.dtype), dtype_name(targets.dtype));
  int64_t N = logits.rows(), Vp = logits.dim(-1);
  check(losses.numel() == N && targets.numel() == N,
        "{}: losses {} and targets {} need one entry per row of logits {}", op, losses.shape.str(),
        targets.shape.str(), logits.shape.str());
  check(vocab > 0 && vocab <= Vp, "{}: vocab {} must be in [1, {}]", op, vocab, Vp);
  check(softcap > 0.f, "{}: softcap {} must be positive", op, softcap);
  const int32_t* tgt = targets.i32();
  for (int64_t n = 0; n < N; ++n)  // before the parallel loop: exceptions cannot leave it
    check(tgt[n] == -1 || (tgt[n] >= 0 && tgt[n] < vocab),
          "{}: target {} at row {} is neither -1 nor a token below {}", op, tgt[n], n, vocab);

#pragma omp parallel
  {
    std::vector<float> th(vocab);  // tanh(z / cap), reused by the gradient
    std::vector<float> e(vocab);   // exp(c - max), reused by the gradient
#pragma omp for
    for (int64_t n = 0; n < N; ++n) {
      float* z = logits.f32() + n * Vp;
      if (tgt[n] == -1) {
        losses.f32()[n] = 0.f;
        if (grad_scale != 0.f) std::fill(z, z + Vp, 0.f);
        continue;
      }
      const auto [mx, sum] = softcap_exponentials(z, th.data(), e.data(), vocab, softcap);
      const double lse = mx + std::log(sum);
      losses.f32()[n] = float(lse - softcap * th[tgt[n]]);
      if (grad_scale == 0.f) continue;
      // dL/dc = softmax(c) - onehot(target); dc/dz = 1 - tanh^2.
      const double inv_sum = 1.0 / sum;
#pragma omp simd
      for (int64_t j = 0; j < vocab; ++j) {
        const double p = e[j] * inv_sum;
        z[j] = float(grad_scale * p * (1.0 - double(th[j]) * th[j]));
      }
      const double t = th[tgt[n]];
      z[tgt[n]] = float(grad_scale * (e[tgt[n]] * inv_sum - 1.0) * (1.0 - t * t));
      std::fill(z + vocab, z + Vp, 0.f);
    }
  }
}

}  // namespace lmtrain
