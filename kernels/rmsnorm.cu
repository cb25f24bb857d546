// One warp per row: rows are short (C up to a few thousand, head_dim for the q/k norms), and a
// warp reduction needs no shared memory or block barriers. Each lane moves packs of V elements
// (common.cuh) and reads its elements before writing them, which is what makes the in-place
// forms safe.
#include <cfloat>

#include "common.cuh"
#include "cuda_check.cuh"
#include "rmsnorm.cuh"

namespace lmtrain::cuda {

namespace {

constexpr int kRowsPerBlock = kThreads / 32;

template <int V, typename T>
__global__ void rmsnorm_forward_kernel(T* out, float* rstd, const T* x, int64_t N, int64_t C) {
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= N) return;
  const T* xr = x + row * C;
  T* yr = out + row * C;
  float ss = 0.f;
  for (int64_t c = lane * V; c < C; c += 32 * V) {
    float v[V];
    load(v, xr + c);
#pragma unroll
    for (int k = 0; k < V; ++k) ss += v[k] * v[k];
  }
  ss = warp_sum(ss);
  const float r = 1.f / sqrtf(ss / float(C) + FLT_EPSILON);
  for (int64_t c = lane * V; c < C; c += 32 * V) {
    float v[V];
    load(v, xr + c);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] *= r;
    store(yr + c, v);
  }
  if (lane == 0) rstd[row] = r;
}

template <int V, typename T>
__global__ void rmsnorm_backward_kernel(T* dx, const T* dout, const T* x, const float* rstd,
                                        const T* residual, int64_t N, int64_t C) {
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= N) return;
  const T* xr = x + row * C;
  const T* gr = dout + row * C;
  T* dr = dx + row * C;
  float dot = 0.f;
  for (int64_t c = lane * V; c < C; c += 32 * V) {
    float g[V], v[V];
    load(g, gr + c);
    load(v, xr + c);
#pragma unroll
    for (int k = 0; k < V; ++k) dot += g[k] * v[k];
  }
  dot = warp_sum(dot);
  const float r = rstd[row];
  const float scale = dot / float(C) * r * r;
  for (int64_t c = lane * V; c < C; c += 32 * V) {
    float g[V], v[V], res[V] = {};
    load(g, gr + c);
    load(v, xr + c);
    if (residual) load(res, residual + row * C + c);
#pragma unroll
    for (int k = 0; k < V; ++k) g[k] = r * (g[k] - v[k] * scale) + res[k];
    store(dr + c, g);
  }
}
}  // namespace

template <typename T>
void rmsnorm_forward(T* out, float* rstd, const T* x, int64_t N, int64_t C, cudaStream_t stream) {
  if (N == 0) return;
  launch_packed<kPack<T>>(rows_packed<T>(C, out, x), [&](auto V) {
    rmsnorm_forward_kernel<decltype(V)::value>
        <<<blocks_for(N, kRowsPerBlock), kThreads, 0, stream>>>(out, rstd, x, N, C);
  });
  launch_check("rmsnorm_forward", stream);
}

template <typename T>
void rmsnorm_backward(T* dx, const T* dout, const T* x, const float* rstd, const T* residual,
                      int64_t N, int64_t C, cudaStream_t stream) {
  if (N == 0) return;
  launch_packed<kPack<T>>(rows_packed<T>(C, dx, dout, x, residual), [&](auto V) {
    rmsnorm_backward_kernel<decltype(V)::value>
        <<<blocks_for(N, kRowsPerBlock), kThreads, 0, stream>>>(dx, dout, x, rstd, residual, N, C);
  });
  launch_check("rmsnorm_backward", stream);
}

using bf16 = __nv_bfloat16;
template void rmsnorm_forward<float>(float*, float*, const float*, int64_t, int64_t, cudaStream_t);
template void rmsnorm_forward<bf16>(bf16*, float*, const bf16*, int64_t, int64_t, cudaStream_t);
template void rmsnorm_backward<float>(float*, const float*, const float*, const float*,
                                      const float*, int64_t, int64_t, cudaStream_t);
template void rmsnorm_backward<bf16>(bf16*, const bf16*, const bf16*, const float*, const bf16*,
                                     int64_t, int64_t, cudaStream_t);

}  // namespace lmtrain::cuda
