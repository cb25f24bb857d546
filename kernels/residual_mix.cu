#include "common.cuh"
#include "cuda_check.cuh"
#include "residual_mix.cuh"

namespace lmtrain::cuda {

namespace {

constexpr int64_t kChunk = 8192;  // elements per block in the backward's first pass

int64_t chunks_for(int64_t n) { return (n + kChunk - 1) / kChunk; }

template <typename T>
__global__ void residual_mix_forward_kernel(T* out, const T* x, const T* x0, const float* resid,
                                            const float* x0l, int layer, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  out[i] = from_float<T>(resid[layer] * to_float(x[i]) + x0l[layer] * to_float(x0[i]));
}

// Pass 1: the elementwise part and per-chunk sums. Each element reads dout before dx is
// written by the same thread, which is what lets dx alias dout.
template <typename T>
__global__ void residual_mix_backward_kernel(T* dx, T* dx0, float2* partials, const T* dout,
                                             const T* x, const T* x0, const float* resid,
                                             const float* x0l, int layer, int64_t n) {
  const float a = resid[layer], b = x0l[layer];
  const int64_t begin = int64_t(blockIdx.x) * kChunk, end = min(n, begin + kChunk);
  float sx = 0.f, sx0 = 0.f;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const float g = to_float(dout[i]);
    sx += g * to_float(x[i]);
    sx0 += g * to_float(x0[i]);
    dx0[i] = from_float<T>(to_float(dx0[i]) + b * g);
    dx[i] = from_float<T>(a * g);
  }
  sx = block_sum(sx);
  sx0 = block_sum(sx0);
  if (threadIdx.x == 0) partials[blockIdx.x] = make_float2(sx, sx0);
}

// Pass 2: one block adds the chunk sums in double and accumulates into the two gradients.
__global__ void residual_mix_total_kernel(float* dresid, float* dx0l, const float2* partials,
                                          int64_t chunks, int layer) {
  double sx = 0.0, sx0 = 0.0;
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
    sx += partials[c].x;
    sx0 += partials[c].y;
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
void residual_mix_forward(T* out, const T* x, const T* x0, const float* resid, const float* x0l,
                          int layer, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  residual_mix_forward_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(out, x, x0, resid,
                                                                                x0l, layer, n);
  launch_check("residual_mix_forward", stream);
}

size_t residual_mix_backward_scratch_bytes(int64_t n) {
  return size_t(chunks_for(n)) * sizeof(float2);
}

template <typename T>
void residual_mix_backward(T* dx, T* dx0, float* dresid, float* dx0l, const T* dout, const T* x,
                           const T* x0, const float* resid, const float* x0l, int layer, int64_t n,
                           void* scratch, cudaStream_t stream) {
  if (n == 0) return;
  const int64_t chunks = chunks_for(n);
  auto* partials = static_cast<float2*>(scratch);
  residual_mix_backward_kernel<<<unsigned(chunks), kThreads, 0, stream>>>(
      dx, dx0, partials, dout, x, x0, resid, x0l, layer, n);
  launch_check("residual_mix_backward", stream);
  residual_mix_total_kernel<<<1, 1024, 0, stream>>>(dresid, dx0l, partials, chunks, layer);
  launch_check("residual_mix_backward (sums)", stream);
}

using bf16 = __nv_bfloat16;
template void residual_mix_forward<float>(float*, const float*, const float*, const float*,
                                          const float*, int, int64_t, cudaStream_t);
template void residual_mix_forward<bf16>(bf16*, const bf16*, const bf16*, const float*,
                                         const float*, int, int64_t, cudaStream_t);
template void residual_mix_backward<float>(float*, float*, float*, float*, const float*,
                                           const float*, const float*, const float*, const float*,
                                           int, int64_t, void*, cudaStream_t);
template void residual_mix_backward<bf16>(bf16*, bf16*, float*, float*, const bf16*, const bf16*,
                                          const bf16*, const float*, const float*, int, int64_t,
                                          void*, cudaStream_t);

}  // namespace lmtrain::cuda
