// Residual re-mix at the top of every block: out = resid[layer] * x + x0l[layer] * x0, with the
// per-layer scalars read from device memory (f32 parameters), so no host round trip.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace lmtrain::cuda {

// out may alias x.
template <typename T>
void residual_mix_forward(T* out, const T* x, const T* x0, const float* resid, const float* x0l,
                          int layer, int64_t n, cudaStream_t stream);

// Device scratch (bytes) that residual_mix_backward needs for n elements.
size_t residual_mix_backward_scratch_bytes(int64_t n);
// dx = resid[layer] * dout (dx may alias dout); dx0 += x0l[layer] * dout;
// dresid[layer] += sum(dout * x); dx0l[layer] += sum(dout * x0). The two sums are deterministic:
// fp32 sums over fixed chunks, then one block adds the chunk sums in double.
template <typename T>
void residual_mix_backward(T* dx, T* dx0, float* dresid, float* dx0l, const T* dout, const T* x,
                           const T* x0, const float* resid, const float* x0l, int layer, int64_t n,
                           void* scratch, cudaStream_t stream);

}  // namespace lmtrain::cuda
