// One warp per row, as rmsnorm.cu, moving packs of V elements and keeping short rows' packs in
// registers between the two passes. The second pass recomputes the mix in fp32 from x and x0
// (rather than reading it back in bf16); the backward recomputes it the same way, so it never
// reads `mixed`.
#include <cfloat>

#include "common.cuh"
#include "cuda_check.cuh"
#include "residual_mix_norm.cuh"

namespace lmtrain::cuda {

namespace {

constexpr int kRowsPerBlock = kThreads / 32;

int64_t row_blocks(int64_t N) { return (N + kRowsPerBlock - 1) / kRowsPerBlock; }

// x and x0 at pack p (elements [c, c + V) of their rows), and their mix m = a x + b x0.
template <int V, int P, typename T>
__device__ __forceinline__ void get_mix(float (&m)[V], float (&xv)[V], float (&x0v)[V],
                                        const RowPacks<T, V, P>& xs, const RowPacks<T, V, P>& x0s,
                                        int p, const T* x, const T* x0, int64_t c, float a,
                                        float b) {
  xs.get(xv, p, x, c);
  x0s.get(x0v, p, x0, c);
#pragma unroll
  for (int k = 0; k < V; ++k) m[k] = a * xv[k] + b * x0v[k];
}

template <int V, int P, typename T>
__global__ void residual_mix_norm_forward_kernel(T* mixed, T* normed, float* rstd, const T* x,
                                                 const T* x0, const float* resid, const float* x0l,
                                                 int layer, int64_t N, int64_t C) {
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= N) return;
  const float a = resid[layer], b = x0l[layer];
  const int64_t base = row * C;
  const T *xr = x + base, *x0r = x0 + base;
  RowPacks<T, V, P> xs, x0s;
  xs.keep(xr, lane, 32, C);
  x0s.keep(x0r, lane, 32, C);
  float ss = 0.f;
  for_row_packs<V, P>(lane, 32, C, [&](int p, int64_t c) {
    float m[V], xv[V], x0v[V];
    get_mix(m, xv, x0v, xs, x0s, p, xr, x0r, c, a, b);
#pragma unroll
    for (int k = 0; k < V; ++k) ss += m[k] * m[k];
    store(mixed + base + c, m);
  });
  ss = warp_sum(ss);
  const float r = 1.f / sqrtf(ss / float(C) + FLT_EPSILON);
  for_row_packs<V, P>(lane, 32, C, [&](int p, int64_t c) {
    float m[V], xv[V], x0v[V];
    get_mix(m, xv, x0v, xs, x0s, p, xr, x0r, c, a, b);
#pragma unroll
    for (int k = 0; k < V; ++k) m[k] *= r;
    store(normed + base + c, m);
  });
  if (lane == 0) rstd[row] = r;
}

// Pass 1: the rows' gradients, and each block's sums of g * x and g * x0. Rows past N add
// nothing but still take part in the block reduction.
template <int V, int P, typename T>
__global__ void residual_mix_norm_backward_kernel(T* dx, T* dx0, float2* partials, const T* dnormed,
                                                  const T* dmixed, const T* x, const T* x0,
                                                  const float* rstd, const float* resid,
                                                  const float* x0l, int layer, int64_t N,
                                                  int64_t C) {
  const int64_t row = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const float a = resid[layer], b = x0l[layer];
  float sx = 0.f, sx0 = 0.f;
  if (row < N) {
    const int64_t base = row * C;
    const T *xr = x + base, *x0r = x0 + base, *dnr = dnormed + base;
    RowPacks<T, V, P> xs, x0s, dns;
    xs.keep(xr, lane, 32, C);
    x0s.keep(x0r, lane, 32, C);
    dns.keep(dnr, lane, 32, C);
    float dot = 0.f;
    for_row_packs<V, P>(lane, 32, C, [&](int p, int64_t c) {
      float m[V], xv[V], x0v[V], dn[V];
      get_mix(m, xv, x0v, xs, x0s, p, xr, x0r, c, a, b);
      dns.get(dn, p, dnr, c);
#pragma unroll
      for (int k = 0; k < V; ++k) dot += dn[k] * m[k];
    });
    dot = warp_sum(dot);
    const float r = rstd[row];
    const float scale = dot / float(C) * r * r;
    for_row_packs<V, P>(lane, 32, C, [&](int p, int64_t c) {
      float m[V], xv[V], x0v[V], dn[V], dm[V], d0[V];
      get_mix(m, xv, x0v, xs, x0s, p, xr, x0r, c, a, b);
      dns.get(dn, p, dnr, c);
      load(dm, dmixed + base + c);
      load(d0, dx0 + base + c);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const float g = r * (dn[k] - m[k] * scale) + dm[k];
        sx += g * xv[k];
        sx0 += g * x0v[k];
        d0[k] += b * g;
        dn[k] = a * g;
      }
      store(dx0 + base + c, d0);
      store(dx + base + c, dn);
    });
  }
  sx = block_sum(sx);
  sx0 = block_sum(sx0);
  if (threadIdx.x == 0) partials[blockIdx.x] = make_float2(sx, sx0);
}

// Pass 2: one block adds the per-block sums in double and accumulates into the two gradients.
__global__ void residual_mix_norm_total_kernel(float* dresid, float* dx0l, const float2* partials,
                                               int64_t blocks, int layer) {
  double sx = 0.0, sx0 = 0.0;
  for (int64_t i = threadIdx.x; i < blocks; i += blockDim.x) {
    sx += partials[i].x;
    sx0 += partials[i].y;
  }
  sx = block_sum(sx);
  sx0 = block_sum(sx0);
  if (threadIdx.x == 0) {
    dresid[layer] += float(sx);
    dx0l[layer] += float(sx0);
  }
}
}  // namespace

template <typename T>
void residual_mix_norm_forward(T* mixed, T* normed, float* rstd, const T* x, const T* x0,
                               const float* resid, const float* x0l, int layer, int64_t N,
                               int64_t C, cudaStream_t stream) {
  if (N == 0) return;
  // Two tensors kept: at most 4 packs of each (74 registers in bf16 at 3 packs, 96 at 4).
  launch_warp_rows<kPack<T>, 4>(rows_packed<T>(C, mixed, normed, x, x0), C, [&](auto V, auto P) {
    residual_mix_norm_forward_kernel<decltype(V)::value, decltype(P)::value>
        <<<unsigned(row_blocks(N)), kThreads, 0, stream>>>(mixed, normed, rstd, x, x0, resid, x0l,
                                                           layer, N, C);
  });
  launch_check("residual_mix_norm_forward", stream);
}

size_t residual_mix_norm_backward_scratch_bytes(int64_t N) {
  return size_t(row_blocks(N)) * sizeof(float2);
}

template <typename T>
void residual_mix_norm_backward(T* dx, T* dx0, float* dresid, float* dx0l, const T* dnormed,
                                const T* dmixed, const T* x, const T* x0, const float* rstd,
                                const float* resid, const float* x0l, int layer, int64_t N,
                                int64_t C, void* scratch, cudaStream_t stream) {
  if (N == 0) return;
  const int64_t blocks = row_blocks(N);
  auto* partials = static_cast<float2*>(scratch);
  // Three tensors kept: at most 2 packs of each (71 registers in bf16 on sm_90a; 96 at 3 packs,
  // C = 768, would halve the blocks per SM of a kernel that reached 2.8 TB/s reading twice).
  launch_warp_rows<kPack<T>, 2>(
      rows_packed<T>(C, dx, dx0, dnormed, dmixed, x, x0), C, [&](auto V, auto P) {
        residual_mix_norm_backward_kernel<decltype(V)::value, decltype(P)::value>
            <<<unsigned(blocks), kThreads, 0, stream>>>(dx, dx0, partials, dnormed, dmixed, x, x0,
                                                        rstd, resid, x0l, layer, N, C);
      });
  launch_check("residual_mix_norm_backward", stream);
  residual_mix_norm_total_kernel<<<1, 1024, 0, stream>>>(dresid, dx0l, partials, blocks, layer);
  launch_check("residual_mix_norm_backward (sums)", stream);
}

using bf16 = __nv_bfloat16;
template void residual_mix_norm_forward<float>(float*, float*, float*, const float*, const float*,
                                               const float*, const float*, int, int64_t, int64_t,
                                               cudaStream_t);
template void residual_mix_norm_forward<bf16>(bf16*, bf16*, float*, const bf16*, const bf16*,
                                              const float*, const float*, int, int64_t, int64_t,
                                              cudaStream_t);
template void residual_mix_norm_backward<float>(float*, float*, float*, float*, const float*,
                                                const float*, const float*, const float*,
                                                const float*, const float*, const float*, int,
                                                int64_t, int64_t, void*, cudaStream_t);
template void residual_mix_norm_backward<bf16>(bf16*, bf16*, float*, float*, const bf16*,
                                               const bf16*, const bf16*, const bf16*, const float*,
                                               const float*, const float*, int, int64_t, int64_t,
                                               void*, cudaStream_t);

}  // namespace lmtrain::cuda
