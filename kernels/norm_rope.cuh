// Per-head RMSNorm, then half-split rotary embedding, on x (B,T,H,D): channel i pairs with
// i + D/2 and the pair is rotated by the angle of (pos0 + t, i) from the f32 tables cos/sin
// (T_max, D/2). out may alias x; dx may alias dout. Tokens (b, t) start `Pitches` elements apart
// in each tensor: H * D when dense, more in a band of a packed q|k|v projection.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lmtrain::cuda {

struct Pitches {
  int64_t x, y, dout;  // y: out in the forward, dx in the backward; dout unused in the forward
};

template <typename T>
void norm_rope_forward(T* out, float* rstd, const T* x, const float* cos, const float* sin,
                       int64_t B, int64_t T_, int64_t H, int64_t D, int pos0, Pitches pitches,
                       cudaStream_t stream);

template <typename T>
void norm_rope_backward(T* dx, const T* dout, const T* x, const float* rstd, const float* cos,
                        const float* sin, int64_t B, int64_t T_, int64_t H, int64_t D, int pos0,
                        Pitches pitches, cudaStream_t stream);

}  // namespace lmtrain::cuda
