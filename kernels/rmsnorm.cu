// One warp per row: rows are short (C up to a few thousand, head_dim for the q/k norms), and a
// warp reduction needs no shared memory or block barriers. Each lane reads its elements before
// writing them, which is what makes the in-place forms safe.
#include <cfloat>

#include "common.cuh"
#include "cuda_check.cuh"
#include "rmsnorm.cuh"

namespace lmtrain::cuda {

namespace {

constexpr int kRowsPerBlock = kThreads / 32;

template <typename T>
__global__ void rmsnorm_forward_kernel(T* out, float* rstd, const T* x, int64_t N, int64_t C) {
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= N) return;
  const T* xr = x + row * C;
  T* yr = out + row * C;
  float ss = 0.f;
  for (int64_t c = lane; c < C; c += 32) {
    const float v = to_float(xr[c]);
    ss += v * v;
  }
  ss = warp_sum(ss);
  const float r = 1.f / sqrtf(ss / float(C) + FLT_EPSILON);
  for (int64_t c = lane; c < C; c += 32) yr[c] = from_float<T>(to_float(xr[c]) * r);
  if (lane == 0) rstd[row] = r;
}

template <typename T>
__global__ void rmsnorm_backward_kernel(T* dx, const T* dout, const T* x, const float* rstd,
                                        int64_t N, int64_t C) {
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= N) return;
  const T* xr = x + row * C;
  const T* gr = dout + row * C;
  T* dr = dx + row * C;
  float dot = 0.f;
  for (int64_t c = lane; c < C; c += 32) dot += to_float(gr[c]) * to_float(xr[c]);
  dot = warp_sum(dot);
  const float r = rstd[row];
  const float k = dot / float(C) * r * r;
  for (int64_t c = lane; c < C; c += 32)
    dr[c] = from_float<T>(r * (to_float(gr[c]) - to_float(xr[c]) * k));
}

}  // namespace

template <typename T>
void rmsnorm_forward(T* out, float* rstd, const T* x, int64_t N, int64_t C, cudaStream_t stream) {
  if (N == 0) return;
  rmsnorm_forward_kernel<<<blocks_for(N, kRowsPerBlock), kThreads, 0, stream>>>(out, rstd, x, N, C);
  launch_check("rmsnorm_forward", stream);
}

template <typename T>
void rmsnorm_backward(T* dx, const T* dout, const T* x, const float* rstd, int64_t N, int64_t C,
                      cudaStream_t stream) {
  if (N == 0) return;
  rmsnorm_backward_kernel<<<blocks_for(N, kRowsPerBlock), kThreads, 0, stream>>>(dx, dout, x, rstd,
                                                                                 N, C);
  launch_check("rmsnorm_backward", stream);
}

using bf16 = __nv_bfloat16;
template void rmsnorm_forward<float>(float*, float*, const float*, int64_t, int64_t, cudaStream_t);
template void rmsnorm_forward<bf16>(bf16*, float*, const bf16*, int64_t, int64_t, cudaStream_t);
template void rmsnorm_backward<float>(float*, const float*, const float*, const float*, int64_t,
                                      int64_t, cudaStream_t);
template void rmsnorm_backward<bf16>(bf16*, const bf16*, const bf16*, const float*, int64_t,
                                     int64_t, cudaStream_t);

}  // namespace lmtrain::cuda
