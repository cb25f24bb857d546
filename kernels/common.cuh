// Device helpers shared by the kernel files (included only by .cu files): dtype conversion,
// deterministic warp and block reductions, launch geometry.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lmtrain::cuda {

// Storage is float or bf16; arithmetic is always fp32.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Butterfly reductions: every lane ends with the full result, and the order of additions is
// fixed by the lane pattern, so results are bit-identical from run to run.
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset /= 2)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024), returned to every
// thread: warp sums, then the first warp sums those in warp order. Deterministic. Contains
// __syncthreads, so every thread of the block must call it.
template <typename A>
__device__ A block_sum(A v) {
  __shared__ A warp_totals[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  __syncthreads();  // warp_totals may still be read by a previous call
  if (lane == 0) warp_totals[warp] = v;
  __syncthreads();
  A total = lane < warps ? warp_totals[lane] : A(0);
  return warp_sum(total);
}

__device__ __forceinline__ float block_max(float v) {
  __shared__ float warp_totals[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) warp_totals[warp] = v;
  __syncthreads();
  float m = lane < warps ? warp_totals[lane] : -INFINITY;
  return warp_max(m);
}

// Blocks for one thread per element.
inline unsigned blocks_for(int64_t n, int threads) { return unsigned((n + threads - 1) / threads); }

constexpr int kThreads = 256;  // the default block size of elementwise kernels

}  // namespace lmtrain::cuda
