// Weightless RMSNorm over rows of length C: out = x * rstd, rstd = 1 / sqrt(mean(x^2) + eps) with
// eps = FLT_EPSILON (torch's F.rms_norm default for fp32). rstd (N) is f32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lmtrain::cuda {

// out may alias x.
template <typename T>
void rmsnorm_forward(T* out, float* rstd, const T* x, int64_t N, int64_t C, cudaStream_t stream);

// dx = rstd * (dout - x * rstd^2 * mean(dout * x)), plus residual unless it is null (a skip
// connection's gradient joined in the same pass). dx may alias dout or residual.
template <typename T>
void rmsnorm_backward(T* dx, const T* dout, const T* x, const float* rstd, const T* residual,
                      int64_t N, int64_t C, cudaStream_t stream);

}  // namespace lmtrain::cuda
