// Per-head RMSNorm, then half-split rotary embedding, on x (B,T,H,D): channel i pairs with
// i + D/2 and the pair is rotated by the angle of (pos0 + t, i) from the f32 tables cos/sin
// (T_max, D/2). out may alias x; dx may alias dout.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lmtrain::cuda {

template <typename T>
void norm_rope_forward(T* out, float* rstd, const T* x, const float* cos, const float* sin,
                       int64_t B, int64_t T_, int64_t H, int64_t D, int pos0, cudaStream_t stream);

template <typename T>
void norm_rope_backward(T* dx, const T* dout, const T* x, const float* rstd, const float* cos,
                        const float* sin, int64_t B, int64_t T_, int64_t H, int64_t D, int pos0,
                        cudaStream_t stream);

}  // namespace lmtrain::cuda
