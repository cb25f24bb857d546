#include "common.cuh"
#include "cuda_check.cuh"
#include "elementwise.cuh"
#include "reduce.cuh"

namespace lmtrain::cuda {

namespace {

template <int V, typename T>
__global__ void fill_kernel(T* x, int64_t n, float value) {
  const int64_t i = pack_start<V>();
  if (i >= n) return;
  float v[V];
#pragma unroll
  for (int k = 0; k < V; ++k) v[k] = value;
  store(x + i, v, int(min(int64_t(V), n - i)));
}

template <int V, typename Dst, typename Src>
__global__ void convert_kernel(Dst* dst, const Src* src, int64_t n) {
  const int64_t i = pack_start<V>();
  if (i >= n) return;
  const int count = int(min(int64_t(V), n - i));
  float v[V];
  load(v, src + i, count);
  store(dst + i, v, count);
}

template <int V, typename T>
__global__ void add_kernel(T* y, const T* x, int64_t n, float alpha) {
  const int64_t i = pack_start<V>();
  if (i >= n) return;
  const int count = int(min(int64_t(V), n - i));
  float a[V], b[V];
  load(a, y + i, count);
  load(b, x + i, count);
#pragma unroll
  for (int k = 0; k < V; ++k) a[k] += alpha * b[k];
  store(y + i, a, count);
}

template <int V, typename T>
__global__ void scale_kernel(T* x, int64_t n, float alpha) {
  const int64_t i = pack_start<V>();
  if (i >= n) return;
  const int count = int(min(int64_t(V), n - i));
  float a[V];
  load(a, x + i, count);
#pragma unroll
  for (int k = 0; k < V; ++k) a[k] *= alpha;
  store(x + i, a, count);
}

}  // namespace

template <typename T>
void fill(T* x, int64_t n, float value, cudaStream_t stream) {
  if (n == 0) return;
  launch_packed<kPack<T>>(packs_aligned(16, x), [&](auto V) {
    constexpr int v = decltype(V)::value;
    fill_kernel<v><<<blocks_for(n, kThreads * v), kThreads, 0, stream>>>(x, n, value);
  });
  launch_check("fill", stream);
}

// Packs of 4: 16 bytes of floats, 8 of bf16.
template <typename Dst, typename Src>
void convert(Dst* dst, const Src* src, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  launch_packed<4>(packs_aligned(16, dst, src), [&](auto V) {
    constexpr int v = decltype(V)::value;
    convert_kernel<v><<<blocks_for(n, kThreads * v), kThreads, 0, stream>>>(dst, src, n);
  });
  launch_check("copy (dtype conversion)", stream);
}

template <typename T>
void add(T* y, const T* x, int64_t n, float alpha, cudaStream_t stream) {
  if (n == 0) return;
  launch_packed<kPack<T>>(packs_aligned(16, y, x), [&](auto V) {
    constexpr int v = decltype(V)::value;
    add_kernel<v><<<blocks_for(n, kThreads * v), kThreads, 0, stream>>>(y, x, n, alpha);
  });
  launch_check("add", stream);
}

template <typename T>
void scale(T* x, int64_t n, float alpha, cudaStream_t stream) {
  if (n == 0) return;
  launch_packed<kPack<T>>(packs_aligned(16, x), [&](auto V) {
    constexpr int v = decltype(V)::value;
    scale_kernel<v><<<blocks_for(n, kThreads * v), kThreads, 0, stream>>>(x, n, alpha);
  });
  launch_check("scale", stream);
}

size_t sum_squares_scratch_bytes(int64_t n) {
  return size_t(segment_sum_squares_scratch(1, n)) * sizeof(float);
}

template <typename T>
void sum_squares(float* result, const T* x, int64_t n, void* scratch, cudaStream_t stream) {
  segment_sum_squares(result, x, 1, n, static_cast<float*>(scratch), stream, "sum_squares");
}

using bf16 = __nv_bfloat16;
template void fill<float>(float*, int64_t, float, cudaStream_t);
template void fill<bf16>(bf16*, int64_t, float, cudaStream_t);
template void convert<bf16, float>(bf16*, const float*, int64_t, cudaStream_t);
template void convert<float, bf16>(float*, const bf16*, int64_t, cudaStream_t);
template void add<float>(float*, const float*, int64_t, float, cudaStream_t);
template void add<bf16>(bf16*, const bf16*, int64_t, float, cudaStream_t);
template void scale<float>(float*, int64_t, float, cudaStream_t);
template void scale<bf16>(bf16*, int64_t, float, cudaStream_t);
template void sum_squares<float>(float*, const float*, int64_t, void*, cudaStream_t);
template void sum_squares<bf16>(float*, const bf16*, int64_t, void*, cudaStream_t);

}  // namespace lmtrain::cuda
