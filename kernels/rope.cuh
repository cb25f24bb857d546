// Half-split rotary embedding in place on x (B,T,H,D): channel i pairs with i + D/2 and the pair
// is rotated by the angle of (pos0 + t, i) from the f32 tables cos/sin (T_max, D/2).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lmtrain::cuda {

// sign = +1: the forward rotation; sign = -1: its transpose, the backward.
template <typename T>
void rope_rotate(T* x, const float* cos, const float* sin, int64_t B, int64_t T_, int64_t H,
                 int64_t D, int pos0, float sign, cudaStream_t stream);

}  // namespace lmtrain::cuda
