#include <cstdio>
#include <cub/device/device_radix_sort.cuh>

#include "common.cuh"
#include "cuda_check.cuh"
#include "embedding.cuh"

namespace lmtrain::cuda {

namespace {

__device__ void check_token(int32_t id, int64_t n, int64_t V) {
  if (id < 0 || id >= V) {
    printf("embedding: token id %d at position %lld is outside the table of %lld rows\n", id,
           (long long)n, (long long)V);
    __trap();
  }
}

template <typename T>
__global__ void embedding_forward_kernel(T* out, const T* table, const int32_t* tokens, int64_t N,
                                         int64_t C, int64_t V) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * C) return;
  const int64_t n = i / C, c = i % C;
  const int32_t id = tokens[n];
  check_token(id, n, V);
  out[i] = table[int64_t(id) * C + c];
}

__global__ void positions_kernel(int32_t* positions, const int32_t* tokens, int64_t N, int64_t V) {
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  check_token(tokens[n], n, V);
  positions[n] = int32_t(n);
}

// Block (i, channel tile): only the first sorted index of each run of equal ids does work, so
// every table row has exactly one writer, which adds its rows in ascending position order.
template <typename T>
__global__ void scatter_add_kernel(float* dtable, const T* dout, const int32_t* sorted_ids,
                                   const int32_t* sorted_positions, int64_t N, int64_t C) {
  const int64_t i = blockIdx.x;
  const int32_t id = sorted_ids[i];
  if (i > 0 && sorted_ids[i - 1] == id) return;
  const int64_t c = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float acc = dtable[int64_t(id) * C + c];
  for (int64_t j = i; j < N && sorted_ids[j] == id; ++j)
    acc += to_float(dout[int64_t(sorted_positions[j]) * C + c]);
  dtable[int64_t(id) * C + c] = acc;
}

// Scratch layout: sorted ids, positions, sorted positions (N i32 each, 256-byte aligned), then
// CUB's temporary storage.
size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

int key_bits(int64_t V) {
  int bits = 1;
  while ((int64_t(1) << bits) < V) ++bits;
  return bits;
}

size_t cub_temp_bytes(int64_t N, int64_t V) {
  size_t bytes = 0;
  cuda_check(cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const int32_t*>(nullptr),
                                             static_cast<int32_t*>(nullptr),
                                             static_cast<const int32_t*>(nullptr),
                                             static_cast<int32_t*>(nullptr), N, 0, key_bits(V)),
             "embedding_backward (sort size query)");
  return bytes;
}

}  // namespace

template <typename T>
void embedding_forward(T* out, const T* table, const int32_t* tokens, int64_t N, int64_t C,
                       int64_t V, cudaStream_t stream) {
  if (N * C == 0) return;
  embedding_forward_kernel<<<blocks_for(N * C, kThreads), kThreads, 0, stream>>>(out, table, tokens,
                                                                                 N, C, V);
  launch_check("embedding_forward", stream);
}

size_t embedding_backward_scratch_bytes(int64_t N, int64_t V) {
  return 3 * align256(size_t(N) * sizeof(int32_t)) + cub_temp_bytes(N, V);
}

template <typename T>
void embedding_backward(float* dtable, const T* dout, const int32_t* tokens, int64_t N, int64_t C,
                        int64_t V, void* scratch, size_t scratch_bytes, cudaStream_t stream) {
  if (N == 0 || C == 0) return;
  const size_t ids_bytes = align256(size_t(N) * sizeof(int32_t));
  char* base = static_cast<char*>(scratch);
  auto* sorted_ids = reinterpret_cast<int32_t*>(base);
  auto* positions = reinterpret_cast<int32_t*>(base + ids_bytes);
  auto* sorted_positions = reinterpret_cast<int32_t*>(base + 2 * ids_bytes);
  void* temp = base + 3 * ids_bytes;
  size_t temp_bytes = scratch_bytes - 3 * ids_bytes;

  positions_kernel<<<blocks_for(N, kThreads), kThreads, 0, stream>>>(positions, tokens, N, V);
  launch_check("embedding_backward (positions)", stream);
  // LSD radix sort is stable: equal ids keep ascending positions.
  cuda_check(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, tokens, sorted_ids, positions,
                                             sorted_positions, N, 0, key_bits(V), stream),
             "embedding_backward (sort)");
  const dim3 grid(unsigned(N), blocks_for(C, kThreads));
  scatter_add_kernel<<<grid, kThreads, 0, stream>>>(dtable, dout, sorted_ids, sorted_positions, N,
                                                    C);
  launch_check("embedding_backward", stream);
}

using bf16 = __nv_bfloat16;
template void embedding_forward<float>(float*, const float*, const int32_t*, int64_t, int64_t,
                                       int64_t, cudaStream_t);
template void embedding_forward<bf16>(bf16*, const bf16*, const int32_t*, int64_t, int64_t, int64_t,
                                      cudaStream_t);
template void embedding_backward<float>(float*, const float*, const int32_t*, int64_t, int64_t,
                                        int64_t, void*, size_t, cudaStream_t);
template void embedding_backward<bf16>(float*, const bf16*, const int32_t*, int64_t, int64_t,
                                       int64_t, void*, size_t, cudaStream_t);

}  // namespace lmtrain::cuda
