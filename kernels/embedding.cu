#include <algorithm>
#include <cstdio>
#include <cub/device/device_radix_sort.cuh>

#include "common.cuh"
#include "cuda_check.cuh"
#include "embedding.cuh"

namespace lmtrain::cuda {

namespace {

// Thread t copies channels [t * W, t * W + W) of one row.
template <typename T, int W>
__global__ void embedding_forward_kernel(T* out, const T* table, const int32_t* tokens, int64_t N,
                                         int64_t C, int64_t V) {
  const int64_t i = pack_start<W>();
  if (i >= N * C) return;
  const int64_t n = i / C, c = i % C;
  const int32_t id = tokens[n];
  check_token(id, n, V);
  float row[W];
  load<W>(row, table + int64_t(id) * C + c);
  store<W>(out + i, row);
}

__global__ void positions_kernel(int32_t* positions, const int32_t* tokens, int64_t N, int64_t V) {
  const int64_t n = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  check_token(tokens[n], n, V);
  positions[n] = int32_t(n);
}

// The scatter-add runs over the positions sorted by token id, in chunks of kChunkRows sorted
// entries, so that the work per block does not depend on how often a token occurs: one token
// can be a tenth of a batch, and a block per distinct id would add its rows one after another.
// Pass 1 adds up each run of equal ids inside a chunk. A run that lies wholly inside its chunk
// has no other writer and goes straight into dtable; the pieces of a run that crosses chunk
// boundaries go to the chunk's partial rows: slot 0 for the piece at the chunk's start, slot 1
// for a piece that starts later and continues into the next chunk. Pass 2 adds each crossing
// run's pieces in chunk order into dtable. Every sum has a fixed order: deterministic.
constexpr int kChunkRows = 64;
constexpr int kGroups = 4;      // row groups of pass 2, each taking every kGroups-th piece
constexpr int kMaxLanes = 256;  // threads along the channels; a block covers kMaxLanes * W

template <int W>
__device__ __forceinline__ void add_into(float* dst, const float (&acc)[W]) {
  float row[W];
  load<W>(row, dst);
#pragma unroll
  for (int k = 0; k < W; ++k) row[k] += acc[k];
  store<W>(dst, row);
}

// Block (chunk, channel tile); thread t owns channels [t * W, t * W + W) of the tile.
template <typename T, int W>
__global__ void scatter_chunks_kernel(float* dtable, float* partials, const T* dout,
                                      const int32_t* sorted_ids, const int32_t* sorted_positions,
                                      int64_t N, int64_t C) {
  __shared__ int32_t ids[kChunkRows], positions[kChunkRows];
  const int64_t begin = int64_t(blockIdx.x) * kChunkRows, end = min(N, begin + kChunkRows);
  const int count = int(end - begin);
  for (int j = threadIdx.x; j < count; j += blockDim.x) {
    ids[j] = sorted_ids[begin + j];
    positions[j] = sorted_positions[begin + j];
  }
  __syncthreads();
  const int64_t c = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * W;
  if (c >= C) return;
  const bool continued = begin > 0 && sorted_ids[begin - 1] == ids[0];
  const bool continues = end < N && sorted_ids[end] == ids[count - 1];
  float acc[W] = {};
  int start = 0;
  for (int j = 0; j < count; ++j) {
    float row[W];
    load<W>(row, dout + int64_t(positions[j]) * C + c);
#pragma unroll
    for (int k = 0; k < W; ++k) acc[k] += row[k];
    if (j + 1 < count && ids[j + 1] == ids[j]) continue;
    // The piece [start, j] of id ids[j] ends here.
    const bool first = start == 0, last = j + 1 == count;
    if ((first && continued) || (last && continues)) {
      store<W>(partials + (int64_t(blockIdx.x) * 2 + (first ? 0 : 1)) * C + c, acc);
    } else {
      add_into<W>(dtable + int64_t(ids[j]) * C + c, acc);
    }
#pragma unroll
    for (int k = 0; k < W; ++k) acc[k] = 0.f;
    start = j + 1;
  }
}

// Block (chunk, channel tile) of (lanes, kGroups) threads: acts only when the chunk holds the
// first piece of a run that continues into the next chunk. Group g adds pieces g, g + kGroups,
// ...; the groups' sums are then added in group order.
template <int W>
__global__ void combine_runs_kernel(float* dtable, const float* partials, const int32_t* sorted_ids,
                                    int64_t N, int64_t C) {
  extern __shared__ float group_sums[];  // [kGroups][blockDim.x * W]
  const int64_t k = blockIdx.x, begin = k * kChunkRows, end = min(N, begin + kChunkRows);
  const int32_t id = sorted_ids[end - 1];
  if (end == N || sorted_ids[end] != id) return;  // the chunk's last run ends inside it
  const bool whole = sorted_ids[begin] == id;     // sorted: the run fills the chunk
  if (whole && begin > 0 && sorted_ids[begin - 1] == id) return;  // it started earlier
  // The run ends before the first entry past it: [end, N) holds it first, larger ids after.
  int64_t lo = end, hi = N;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (sorted_ids[mid] <= id) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  const int64_t last_chunk = (lo - 1) / kChunkRows;
  const int64_t c = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * W;
  float acc[W] = {};
  if (c < C) {
    for (int64_t j = k + threadIdx.y; j <= last_chunk; j += kGroups) {
      const int slot = j == k && !whole ? 1 : 0;
      float row[W];
      load<W>(row, partials + (j * 2 + slot) * C + c);
#pragma unroll
      for (int m = 0; m < W; ++m) acc[m] += row[m];
    }
  }
  float* mine = group_sums + (int64_t(threadIdx.y) * blockDim.x + threadIdx.x) * W;
#pragma unroll
  for (int m = 0; m < W; ++m) mine[m] = acc[m];
  __syncthreads();
  if (threadIdx.y != 0 || c >= C) return;
  for (int g = 1; g < kGroups; ++g) {
    const float* theirs = group_sums + (int64_t(g) * blockDim.x + threadIdx.x) * W;
#pragma unroll
    for (int m = 0; m < W; ++m) acc[m] += theirs[m];
  }
  add_into<W>(dtable + int64_t(id) * C + c, acc);
}

// Scratch layout: sorted ids, positions, sorted positions (N i32 each), the partial rows (two
// of C floats per chunk), each 256-byte aligned, then CUB's temporary storage.
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
  launch_packed<kPack<T>>(rows_packed<T>(C, out, table), [&](auto pack) {
    constexpr int W = decltype(pack)::value;
    embedding_forward_kernel<T, W>
        <<<blocks_for(N * C / W, kThreads), kThreads, 0, stream>>>(out, table, tokens, N, C, V);
  });
  launch_check("embedding_forward", stream);
}

size_t embedding_backward_scratch_bytes(int64_t N, int64_t C, int64_t V) {
  const int64_t chunks = (N + kChunkRows - 1) / kChunkRows;
  return 3 * align256(size_t(N) * sizeof(int32_t)) +
         align256(size_t(chunks) * 2 * size_t(C) * sizeof(float)) + cub_temp_bytes(N, V);
}

template <typename T>
void embedding_backward(float* dtable, const T* dout, const int32_t* tokens, int64_t N, int64_t C,
                        int64_t V, void* scratch, size_t scratch_bytes, cudaStream_t stream) {
  if (N == 0 || C == 0) return;
  if (scratch_bytes < embedding_backward_scratch_bytes(N, C, V))
    cuda_check(cudaErrorInvalidValue, "embedding_backward (scratch smaller than it needs)");
  const int64_t chunks = (N + kChunkRows - 1) / kChunkRows;
  const size_t ids_bytes = align256(size_t(N) * sizeof(int32_t));
  const size_t partial_bytes = align256(size_t(chunks) * 2 * size_t(C) * sizeof(float));
  char* base = static_cast<char*>(scratch);
  auto* sorted_ids = reinterpret_cast<int32_t*>(base);
  auto* positions = reinterpret_cast<int32_t*>(base + ids_bytes);
  auto* sorted_positions = reinterpret_cast<int32_t*>(base + 2 * ids_bytes);
  auto* partials = reinterpret_cast<float*>(base + 3 * ids_bytes);
  void* temp = base + 3 * ids_bytes + partial_bytes;
  size_t temp_bytes = scratch_bytes - 3 * ids_bytes - partial_bytes;

  positions_kernel<<<blocks_for(N, kThreads), kThreads, 0, stream>>>(positions, tokens, N, V);
  launch_check("embedding_backward (positions)", stream);
  // LSD radix sort is stable: equal ids keep ascending positions.
  cuda_check(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, tokens, sorted_ids, positions,
                                             sorted_positions, N, 0, key_bits(V), stream),
             "embedding_backward (sort)");
  // Packs of dout rows; dtable and the partial rows then take packs of as many floats.
  const bool packed = rows_packed<T>(C, dout) && packs_aligned(kPack<T> * sizeof(float), dtable);
  launch_packed<kPack<T>>(packed, [&](auto pack) {
    constexpr int W = decltype(pack)::value;
    const int64_t lanes = C / W, round = (std::min<int64_t>(lanes, kMaxLanes) + 31) / 32 * 32;
    const dim3 grid(unsigned(chunks), unsigned((lanes + round - 1) / round));
    scatter_chunks_kernel<T, W><<<grid, unsigned(round), 0, stream>>>(
        dtable, partials, dout, sorted_ids, sorted_positions, N, C);
    launch_check("embedding_backward (chunks)", stream);
    const size_t shared = size_t(kGroups) * size_t(round) * W * sizeof(float);
    combine_runs_kernel<W><<<grid, dim3(unsigned(round), kGroups), shared, stream>>>(
        dtable, partials, sorted_ids, N, C);
    launch_check("embedding_backward (runs)", stream);
  });
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
