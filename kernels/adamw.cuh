// Fused AdamW on the GPU: one pass over param, grad and both moments, fp32 throughout.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lmtrain::cuda {

struct AdamWArgs {
  float lr, beta1, beta2, eps, weight_decay;
  int step;  // 1-based, for bias correction
};

// Same math and order as torch.optim.AdamW and the CPU backend's adamw_update: decoupled weight
// decay, moment updates, bias-corrected step (the corrections formed in double on the host).
void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n,
                  const AdamWArgs& args, cudaStream_t stream);

}  // namespace lmtrain::cuda
