// AdamW, step for step as torch.optim.AdamW (single-tensor path): decoupled weight decay first,
// then the moment updates, then the bias-corrected step.
#include <cmath>

#include "backend/cpu/checks.h"
#include "backend/cpu/cpu_backend.h"

namespace lmtrain {

void CpuBackend::adamw_update(Tensor param, Tensor grad, Tensor m, Tensor v, const AdamWHyper& h) {
  cpu::require_dense("adamw_update", {param, grad, m, v});
  for (Tensor t : {param, grad, m, v})
    check(t.dtype == DType::f32 && t.shape == param.shape,
          "adamw_update: param {}, grad, m and v must all be f32 of that shape, got {} {}",
          param.shape.str(), t.shape.str(), dtype_name(t.dtype));
  check(h.step >= 1, "adamw_update: step {} must be 1-based", h.step);
  // torch forms the bias corrections in double and hands them to float kernels.
  double bc1 = 1.0 - std::pow(double(h.beta1), h.step);
  double bc2 = 1.0 - std::pow(double(h.beta2), h.step);
  float step_size = float(h.lr / bc1), bc2_sqrt = float(std::sqrt(bc2));
  float decay = float(1.0 - double(h.lr) * h.weight_decay);
  int64_t n = param.numel();
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) {
    float g = grad.f32()[i];
    float mi = h.beta1 * m.f32()[i] + (1.f - h.beta1) * g;
    float vi = h.beta2 * v.f32()[i] + (1.f - h.beta2) * (g * g);
    m.f32()[i] = mi;
    v.f32()[i] = vi;
    float denom = std::sqrt(vi) / bc2_sqrt + h.eps;
    float p = param.f32()[i] * decay;
    param.f32()[i] = p - step_size * (mi / denom);
  }
}

}  // namespace lmtrain
