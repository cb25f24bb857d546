// Elementwise utilities over flat arrays of float or bf16 (T), fp32 arithmetic.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lmtrain::cuda {

template <typename T>
void fill(T* x, int64_t n, float value, cudaStream_t stream);
// dst = src converted (float -> bf16 rounds to nearest even, bf16 -> float is exact).
template <typename Dst, typename Src>
void convert(Dst* dst, const Src* src, int64_t n, cudaStream_t stream);
// y += alpha * x
template <typename T>
void add(T* y, const T* x, int64_t n, float alpha, cudaStream_t stream);
// x *= alpha
template <typename T>
void scale(T* x, int64_t n, float alpha, cudaStream_t stream);

// Device scratch (bytes) that sum_squares needs for n elements.
size_t sum_squares_scratch_bytes(int64_t n);
// *result (device) = sum of x^2, chunk sums in fp32 added in double, in a fixed order.
template <typename T>
void sum_squares(float* result, const T* x, int64_t n, void* scratch, cudaStream_t stream);

}  // namespace lmtrain::cuda
