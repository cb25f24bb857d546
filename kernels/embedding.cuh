// Token embedding: out (N,C) = table (V,C) [tokens]; backward dtable[tokens] += dout.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace lmtrain::cuda {

// A token id outside [0, V) traps the kernel after printing the id (a CUDA error follows).
template <typename T>
void embedding_forward(T* out, const T* table, const int32_t* tokens, int64_t N, int64_t C,
                       int64_t V, cudaStream_t stream);

// Device scratch (bytes) that embedding_backward needs for N tokens over a (V,C) table.
size_t embedding_backward_scratch_bytes(int64_t N, int64_t C, int64_t V);
// dtable (V,C) f32 += the rows of dout (N,C) scattered by tokens. Deterministic, no atomics:
// positions are stably sorted by token id and added in chunks of a fixed number of sorted
// entries (a frequent token's rows spread over many blocks), the pieces of a token that spans
// chunks added in chunk order.
template <typename T>
void embedding_backward(float* dtable, const T* dout, const int32_t* tokens, int64_t N, int64_t C,
                        int64_t V, void* scratch, size_t scratch_bytes, cudaStream_t stream);

}  // namespace lmtrain::cuda
