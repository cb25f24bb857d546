// One warp per row: rows are short (C up to a few thousand, head_dim for the q/k norms), and a
// warp reduction needs no shared memory or block barriers. Each lane moves packs of V elements
// (common.cuh), keeps the row's packs in registers between the two passes where the row is short
// enough (RowPacks), and reads its elements before writing them, which is what makes the in-place
// forms safe.
#include <cfloat>

#include "common.cuh"
#include "cuda_check.cuh"
#include "rmsnorm.cuh"

namespace lmtrain::cuda {

namespace {

constexpr int kRowsPerBlock = kThreads / 32;

template <int V, int P, typename T>
__global__ void rmsnorm_forward_kernel(T* out, float* rstd, const T* x, int64_t N, int64_t C) {
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= N) return;
  const T* xr = x + row * C;
  T* yr = out + row * C;
  RowPacks<T, V, P> xs;
  xs.keep(xr, lane, 32, C);
  float ss = 0.f;
  for_row_packs<V, P>(lane, 32, C, [&](int p, int64_t c) {
    float v[V];
    xs.get(v, p, xr, c);
#pragma unroll
    for (int k = 0; k < V; ++k) ss += v[k] * v[k];
  });
  ss = warp_sum(ss);
  const float r = 1.f / sqrtf(ss / float(C) + FLT_EPSILON);
  for_row_packs<V, P>(lane, 32, C, [&](int p, int64_t c) {
    float v[V];
    xs.get(v, p, xr, c);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] *= r;
    store(yr + c, v);
  });
  if (lane == 0) rstd[row] = r;
}

template <int V, int P, typename T>
__global__ void rmsnorm_backward_kernel(T* dx, const T* dout, const T* x, const float* rstd,
                                        const T* residual, int64_t N, int64_t C) {
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= N) return;
  const T* xr = x + row * C;
  const T* gr = dout + row * C;
  T* dr = dx + row * C;
  RowPacks<T, V, P> gs, xs;
  gs.keep(gr, lane, 32, C);
  xs.keep(xr, lane, 32, C);
  float dot = 0.f;
  for_row_packs<V, P>(lane, 32, C, [&](int p, int64_t c) {
    float g[V], v[V];
    gs.get(g, p, gr, c);
    xs.get(v, p, xr, c);
#pragma unroll
    for (int k = 0; k < V; ++k) dot += g[k] * v[k];
  });
  dot = warp_sum(dot);
  const float r = rstd[row];
  const float scale = dot / float(C) * r * r;
  for_row_packs<V, P>(lane, 32, C, [&](int p, int64_t c) {
    float g[V], v[V], res[V] = {};
    gs.get(g, p, gr, c);
    xs.get(v, p, xr, c);
    if (residual) load(res, residual + row * C + c);
#pragma unroll
    for (int k = 0; k < V; ++k) g[k] = r * (g[k] - v[k] * scale) + res[k];
    store(dr + c, g);
  });
}
}  // namespace

template <typename T>
void rmsnorm_forward(T* out, float* rstd, const T* x, int64_t N, int64_t C, cudaStream_t stream) {
  if (N == 0) return;
  // One tensor kept: up to 8 packs (95 registers in bf16 on sm_90a).
  launch_warp_rows<kPack<T>, 8>(rows_packed<T>(C, out, x), C, [&](auto V, auto P) {
    rmsnorm_forward_kernel<decltype(V)::value, decltype(P)::value>
        <<<blocks_for(N, kRowsPerBlock), kThreads, 0, stream>>>(out, rstd, x, N, C);
  });
  launch_check("rmsnorm_forward", stream);
}

template <typename T>
void rmsnorm_backward(T* dx, const T* dout, const T* x, const float* rstd, const T* residual,
                      int64_t N, int64_t C, cudaStream_t stream) {
  if (N == 0) return;
  // Two tensors kept: at most 4 packs of each (81 registers in bf16 on sm_90a, 152 at 8).
  launch_warp_rows<kPack<T>, 4>(rows_packed<T>(C, dx, dout, x, residual), C, [&](auto V, auto P) {
    rmsnorm_backward_kernel<decltype(V)::value, decltype(P)::value>
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
