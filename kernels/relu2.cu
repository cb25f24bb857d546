#include "common.cuh"
#include "cuda_check.cuh"
#include "relu2.cuh"

namespace lmtrain::cuda {

namespace {

template <int V, typename T>
__global__ void relu2_forward_kernel(T* out, const T* x, int64_t n) {
  const int64_t i = pack_start<V>();
  if (i >= n) return;
  const int count = int(min(int64_t(V), n - i));
  float v[V];
  load(v, x + i, count);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const float r = fmaxf(v[k], 0.f);
    v[k] = r * r;
  }
  store(out + i, v, count);
}

template <int V, typename T>
__global__ void relu2_backward_kernel(T* dx, const T* dout, const T* out, int64_t n) {
  const int64_t i = pack_start<V>();
  if (i >= n) return;
  const int count = int(min(int64_t(V), n - i));
  float g[V], y[V];
  load(g, dout + i, count);
  load(y, out + i, count);
#pragma unroll
  for (int k = 0; k < V; ++k) g[k] *= 2.f * sqrtf(y[k]);
  store(dx + i, g, count);
}

}  // namespace

template <typename T>
void relu2_forward(T* out, const T* x, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  launch_packed<kPack<T>>(packs_aligned(16, out, x), [&](auto V) {
    constexpr int v = decltype(V)::value;
    relu2_forward_kernel<v><<<blocks_for(n, kThreads * v), kThreads, 0, stream>>>(out, x, n);
  });
  launch_check("relu2_forward", stream);
}

template <typename T>
void relu2_backward(T* dx, const T* dout, const T* out, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  launch_packed<kPack<T>>(packs_aligned(16, dx, dout, out), [&](auto V) {
    constexpr int v = decltype(V)::value;
    relu2_backward_kernel<v>
        <<<blocks_for(n, kThreads * v), kThreads, 0, stream>>>(dx, dout, out, n);
  });
  launch_check("relu2_backward", stream);
}

using bf16 = __nv_bfloat16;
template void relu2_forward<float>(float*, const float*, int64_t, cudaStream_t);
template void relu2_forward<bf16>(bf16*, const bf16*, int64_t, cudaStream_t);
template void relu2_backward<float>(float*, const float*, const float*, int64_t, cudaStream_t);
template void relu2_backward<bf16>(bf16*, const bf16*, const bf16*, int64_t, cudaStream_t);

}  // namespace lmtrain::cuda
