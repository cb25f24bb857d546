// One row of weightless RMSNorm, forward and backward: shared by rmsnorm and the ops that fuse
// it with their neighbours (residual_mix_norm).
#pragma once

#include <cstdint>

namespace lmtrain::cpu {

// out = x * r over C elements (out may alias x); returns r = 1 / sqrt(mean(x^2) + eps).
float rmsnorm_row(float* out, const float* x, int64_t C);

// dx = the gradient through the norm of dout, plus residual unless it is null. dx may alias
// dout or residual.
void rmsnorm_backward_row(float* dx, const float* dout, const float* x, float r,
                          const float* residual, int64_t C);

}  // namespace lmtrain::cpu
