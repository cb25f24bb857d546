// The top of every block: the residual re-mix mixed = resid[layer] * x + x0l[layer] * x0 and the
// attention's RMSNorm of it, forward and backward in one pass each. The per-layer scalars are
// read from device memory (f32 parameters), so there is no host round trip.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace lmtrain::cuda {

// Rows of length C: mixed = resid[layer] * x + x0l[layer] * x0 (stored in T), normed = the fp32
// mix times rstd, rstd (N) f32. No output may alias an input.
template <typename T>
void residual_mix_norm_forward(T* mixed, T* normed, float* rstd, const T* x, const T* x0,
                               const float* resid, const float* x0l, int layer, int64_t N,
                               int64_t C, cudaStream_t stream);

// Device scratch (bytes) that residual_mix_norm_backward needs for N rows.
size_t residual_mix_norm_backward_scratch_bytes(int64_t N);

// g = rmsnorm_backward(dnormed) + dmixed with the mix recomputed from x and x0;
// dx = resid[layer] * g (dx may alias dnormed or dmixed); dx0 += x0l[layer] * g;
// dresid[layer] += sum(g * x); dx0l[layer] += sum(g * x0). The two sums are deterministic: fp32
// sums per block of rows, then one block adds those in double.
template <typename T>
void residual_mix_norm_backward(T* dx, T* dx0, float* dresid, float* dx0l, const T* dnormed,
                                const T* dmixed, const T* x, const T* x0, const float* rstd,
                                const float* resid, const float* x0l, int layer, int64_t N,
                                int64_t C, void* scratch, cudaStream_t stream);

}  // namespace lmtrain::cuda
