#include "common.cuh"
#include "cuda_check.cuh"
#include "rope.cuh"

namespace lmtrain::cuda {

namespace {

// One thread per channel pair. y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos.
template <typename T>
__global__ void rope_kernel(T* x, const float* cos, const float* sin, int64_t pairs, int64_t T_,
                            int64_t H, int64_t d, int pos0, float sign) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= pairs) return;
  const int64_t i = idx % d, head_row = idx / d;  // head_row = (b * T + t) * H + h
  const int64_t t = (head_row / H) % T_;
  T* x1 = x + head_row * 2 * d + i;
  T* x2 = x1 + d;
  const float c = cos[(pos0 + t) * d + i], s = sign * sin[(pos0 + t) * d + i];
  const float a = to_float(*x1), e = to_float(*x2);
  *x1 = from_float<T>(a * c + e * s);
  *x2 = from_float<T>(-a * s + e * c);
}

}  // namespace

template <typename T>
void rope_rotate(T* x, const float* cos, const float* sin, int64_t B, int64_t T_, int64_t H,
                 int64_t D, int pos0, float sign, cudaStream_t stream) {
  const int64_t pairs = B * T_ * H * (D / 2);
  if (pairs == 0) return;
  rope_kernel<<<blocks_for(pairs, kThreads), kThreads, 0, stream>>>(x, cos, sin, pairs, T_, H,
                                                                    D / 2, pos0, sign);
  launch_check(sign > 0 ? "rope_forward" : "rope_backward", stream);
}

using bf16 = __nv_bfloat16;
template void rope_rotate<float>(float*, const float*, const float*, int64_t, int64_t, int64_t,
                                 int64_t, int, float, cudaStream_t);
template void rope_rotate<bf16>(bf16*, const float*, const float*, int64_t, int64_t, int64_t,
                                int64_t, int, float, cudaStream_t);

}  // namespace lmtrain::cuda
