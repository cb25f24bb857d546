// Squared ReLU: out = max(x, 0)^2; backward dx = 2 max(x, 0) dout = 2 sqrt(out) dout, from the
// forward's output, so the forward can run in place.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lmtrain::cuda {

// out may alias x.
template <typename T>
void relu2_forward(T* out, const T* x, int64_t n, cudaStream_t stream);
// dx may alias dout.
template <typename T>
void relu2_backward(T* dx, const T* dout, const T* out, int64_t n, cudaStream_t stream);

}  // namespace lmtrain::cuda
