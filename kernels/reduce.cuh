// Deterministic sums of squares over contiguous segments, shared by sum_squares (one segment)
// and the per-matrix norms of the Muon kernels (one segment per matrix); the value gate's weight
// gradient adds its chunk sums with the second pass. Included only by .cu files.
//
// Two passes with a fixed split that depends on the sizes alone (not on the GPU): pass 1 gives
// each block a chunk of kChunk elements and writes the chunk's fp32 sum; pass 2 runs one block
// per segment and adds the segment's chunk sums in double, in a fixed tree order.
#pragma once

#include "common.cuh"
#include "cuda_check.cuh"

namespace lmtrain::cuda {

namespace reduce_detail {

constexpr int64_t kChunk = 8192;

template <typename T>
__global__ void chunk_sum_squares(float* partials, const T* x, int64_t len, int64_t chunks) {
  const int64_t segment = blockIdx.y, chunk = blockIdx.x;
  const T* seg = x + segment * len;
  const int64_t begin = chunk * kChunk, end = min(len, begin + kChunk);
  float acc = 0.f;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    float v = to_float(seg[i]);
    acc += v * v;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[segment * chunks + chunk] = acc;
}

// out[segment] = (or += with kAdd) the sum of the segment's `chunks` partials, which lie
// together: each thread adds a strided set in order, then the block in its fixed tree.
template <typename Out, bool kAdd = false>
__global__ void segment_total(Out* out, const float* partials, int64_t chunks) {
  const int64_t segment = blockIdx.x;
  double acc = 0.0;
  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) acc += partials[segment * chunks + c];
  acc = block_sum(acc);
  if (threadIdx.x == 0) out[segment] = kAdd ? Out(out[segment] + Out(acc)) : Out(acc);
}

}  // namespace reduce_detail

// Floats of scratch that segment_sum_squares needs for `count` segments of `len` elements.
inline int64_t segment_sum_squares_scratch(int64_t count, int64_t len) {
  return count * ((len + reduce_detail::kChunk - 1) / reduce_detail::kChunk);
}

// out[s] = sum of x[s * len + i]^2 over i < len, for s < count (out is device memory, double or
// float; the chunk sums are added in double either way).
template <typename T, typename Out>
void segment_sum_squares(Out* out, const T* x, int64_t count, int64_t len, float* scratch,
                         cudaStream_t stream, const char* what) {
  using namespace reduce_detail;
  const int64_t chunks = (len + kChunk - 1) / kChunk;
  if (count == 0) return;
  if (chunks == 0) {
    cuda_check(cudaMemsetAsync(out, 0, count * sizeof(Out), stream), what);
    return;
  }
  chunk_sum_squares<<<dim3(unsigned(chunks), unsigned(count)), kThreads, 0, stream>>>(scratch, x,
                                                                                      len, chunks);
  launch_check(what, stream);
  segment_total<<<unsigned(count), kThreads, 0, stream>>>(out, scratch, chunks);
  launch_check(what, stream);
}

}  // namespace lmtrain::cuda
