// Device helpers shared by the kernel files (included only by .cu files): dtype conversion,
// deterministic warp and block reductions, launch geometry.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <type_traits>

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
// fixed by the lane pattern, so results are bit-identical from run to run. warp_sum(v, lanes)
// sums within aligned groups of `lanes` lanes (a power of two up to 32); every lane of the warp
// must call it.
template <typename A>
__device__ __forceinline__ A warp_sum(A v, int lanes = 32) {
  for (int offset = lanes / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
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

// A token id outside a table of V rows: print it and trap the kernel (a CUDA error follows at
// the next synchronizing call). The host checks ids before uploading them; this is the guard
// for ids that reach a kernel another way.
__device__ __forceinline__ void check_token(int32_t id, int64_t n, int64_t V) {
  if (id < 0 || id >= V) {
    printf("token id %d at position %lld is outside the table of %lld rows\n", id, (long long)n,
           (long long)V);
    __trap();
  }
}

// Blocks for one thread per element.
inline unsigned blocks_for(int64_t n, int threads) { return unsigned((n + threads - 1) / threads); }

constexpr int kThreads = 256;  // the default block size of elementwise kernels

// ---- packed access ----
// Memory-bound kernels move V consecutive elements per access, 16 bytes (8 bf16, 4 floats):
// one element of 2 bytes per load keeps too few bytes in flight per multiprocessor to come near
// the memory bandwidth. Kernels take V as a template parameter; V = 1 is the fallback for
// pointers or row lengths that do not allow packs.
template <typename T>
constexpr int kPack = int(16 / sizeof(T));

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// f[0, count) = p[0, count) in fp32, the rest 0: a whole pack in one access, a partial one (the
// tail of an array) element by element.
template <int V, typename T>
__device__ __forceinline__ void load(float (&f)[V], const T* p, int count = V) {
  if (count == V) {
    const Pack<T, V> pack = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
    for (int k = 0; k < V; ++k) f[k] = to_float(pack.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) f[k] = k < count ? to_float(p[k]) : 0.f;
  }
}

// p[0, count) = f[0, count), rounded to T.
template <int V, typename T>
__device__ __forceinline__ void store(T* p, const float (&f)[V], int count = V) {
  if (count == V) {
    Pack<T, V> pack;
#pragma unroll
    for (int k = 0; k < V; ++k) pack.v[k] = from_float<T>(f[k]);
    *reinterpret_cast<Pack<T, V>*>(p) = pack;
  } else {
    for (int k = 0; k < count; ++k) p[k] = from_float<T>(f[k]);
  }
}

// Elementwise kernels: thread t handles elements [t * V, t * V + V), fewer in the array's tail.
template <int V>
__device__ __forceinline__ int64_t pack_start() {
  return (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * V;
}

// Host side: whether every pointer can be accessed in packs of `bytes` (null pointers, for
// optional arguments, always can).
template <typename... P>
bool packs_aligned(size_t bytes, const P*... ptrs) {
  return ((reinterpret_cast<uintptr_t>(ptrs) % bytes == 0) && ...);
}

// Whether rows of C elements of T can move in packs: C a multiple of the pack, every pointer
// aligned.
template <typename T, typename... P>
bool rows_packed(int64_t C, const P*... ptrs) {
  return C % kPack<T> == 0 && packs_aligned(16, ptrs...);
}

// Kernels that give each row of `len` elements a group of lanes (a short row per warp would leave
// most of it idle, or move too few bytes per load): the fewest lanes, a power of two up to 32,
// that give each lane one pack of V. Groups are aligned within the warp, for warp_sum(v, lanes).
inline int lanes_per_row(int64_t len, int V) {
  int lanes = 1;
  while (lanes < 32 && int64_t(lanes) * V < len) lanes *= 2;
  return lanes;
}

// Calls launch(std::integral_constant<int, V>{}) with V = Wide when `packed`, else V = 1.
template <int Wide, typename F>
void launch_packed(bool packed, F&& launch) {
  if (packed) {
    launch(std::integral_constant<int, Wide>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

// In a kernel launched by launch_rows: the row of this thread's group of `lanes` lanes, its lane
// in the group, and whether the row exists (the last block's groups may run past the rows; they
// must still join their group's shuffles).
struct LaneGroup {
  int64_t row;
  int lane;
  bool valid;
  __device__ LaneGroup(int64_t rows, int lanes)
      : row(int64_t(blockIdx.x) * (blockDim.x / lanes) + threadIdx.x / lanes),
        lane(threadIdx.x % lanes),
        valid(row < rows) {}
};

// Calls kernel(V, lanes, blocks) for `rows` rows of `len` elements in lane groups of
// lanes_per_row(len, V) lanes, in blocks of kThreads: V = Wide when `packed`, else 1.
template <int Wide, typename F>
void launch_rows(bool packed, int64_t rows, int64_t len, F&& kernel) {
  launch_packed<Wide>(packed, [&](auto V) {
    const int lanes = lanes_per_row(len, decltype(V)::value);
    kernel(V, lanes, blocks_for(rows, kThreads / lanes));
  });
}

}  // namespace lmtrain::cuda
