// Cross-entropy on softcapped logits c = cap * tanh(z / cap), over the first `vocab` columns
// (the rest is padding that rounds the lm_head up to a friendly size). Forward and backward are
// one fused op, so the logits can be turned into their own gradient in place.
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/checks.h"
#include "backend/cpu/cpu_backend.h"

namespace lmtrain {

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
    std::vector<double> e(vocab);  // exp(c - max), reused by the gradient
#pragma omp for
    for (int64_t n = 0; n < N; ++n) {
      float* z = logits.f32() + n * Vp;
      if (tgt[n] == -1) {
        losses.f32()[n] = 0.f;
        if (grad_scale != 0.f) std::fill(z, z + Vp, 0.f);
        continue;
      }
      float mx = -INFINITY;
      for (int64_t j = 0; j < vocab; ++j) {
        th[j] = std::tanh(z[j] / softcap);
        mx = std::max(mx, softcap * th[j]);
      }
      double sum = 0.0;
      for (int64_t j = 0; j < vocab; ++j) {
        e[j] = std::exp(double(softcap * th[j] - mx));
        sum += e[j];
      }
      double lse = mx + std::log(sum);
      losses.f32()[n] = float(lse - softcap * th[tgt[n]]);
      if (grad_scale == 0.f) continue;
      // dL/dc = softmax(c) - onehot(target); dc/dz = 1 - tanh^2.
      for (int64_t j = 0; j < vocab; ++j) {
        double p = e[j] / sum - (j == tgt[n] ? 1.0 : 0.0);
        z[j] = float(grad_scale * p * (1.0 - double(th[j]) * th[j]));
      }
      std::fill(z + vocab, z + Vp, 0.f);
    }
  }
}

}  // namespace lmtrain
