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

// Two floats rounded to bf16, as the 32 bits of a __nv_bfloat162 (low half first).
__device__ __forceinline__ uint32_t bf16x2_bits(float lo, float hi) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
  uint32_t bits;
  memcpy(&bits, &pair, 4);
  return bits;
}

// p[0, count) = f[0, count), rounded to T. A whole 16-byte pack goes out as one 16-byte store
// built from 32-bit words: an assignment of a Pack of bf16 was at times split by the compiler
// into 2-byte pairs (four or eight stores where one does).
template <int V, typename T>
__device__ __forceinline__ void store(T* p, const float (&f)[V], int count = V) {
  if (count != V) {
    for (int k = 0; k < count; ++k) p[k] = from_float<T>(f[k]);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16> && V == 8) {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(bf16x2_bits(f[0], f[1])),
                 "r"(bf16x2_bits(f[2], f[3])), "r"(bf16x2_bits(f[4], f[5])),
                 "r"(bf16x2_bits(f[6], f[7]))
                 : "memory");
  } else if constexpr (std::is_same_v<T, float> && V == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(f[0], f[1], f[2], f[3]);
  } else {
    Pack<T, V> pack;
#pragma unroll
    for (int k = 0; k < V; ++k) pack.v[k] = from_float<T>(f[k]);
    *reinterpret_cast<Pack<T, V>*>(p) = pack;
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

// ---- rows kept in registers ----
// Row kernels make two passes over a row: one for its sum of squares (or dot product), one to
// write. A lane handles packs p = 0, 1, ... of the row, pack p starting at element
// (p * lanes + lane) * V. With P > 0 the row has at most P packs per lane: RowPacks::keep reads
// them all into registers (as stored, 16 bytes a pack) before either pass, with no arithmetic
// between the loads, and both passes take them from there. P = 0 walks a row of any length and
// reads it from memory in each pass.
template <int V, int P, typename F>
__device__ __forceinline__ void for_row_packs(int lane, int lanes, int64_t len, F&& f) {
  if constexpr (P > 0) {
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int64_t c = (int64_t(p) * lanes + lane) * V;
      if (c < len) f(p, c);
    }
  } else {
    for (int64_t c = int64_t(lane) * V; c < len; c += int64_t(lanes) * V) f(0, c);
  }
}

template <typename T, int V, int P>
struct RowPacks {
  Pack<T, V> pack[P > 0 ? P : 1];
  // P > 0: this lane's packs of the row of `len` elements at `row`, into registers.
  __device__ __forceinline__ void keep(const T* row, int lane, int lanes, int64_t len) {
    if constexpr (P > 0) {
      for_row_packs<V, P>(lane, lanes, len, [&](int p, int64_t c) {
        pack[p] = *reinterpret_cast<const Pack<T, V>*>(row + c);
      });
    }
  }
  // Pack p, elements [c, c + V) of the row at `row`, in fp32: kept, or from memory when P = 0.
  __device__ __forceinline__ void get(float (&f)[V], int p, const T* row, int64_t c) const {
    if constexpr (P > 0) {
#pragma unroll
      for (int k = 0; k < V; ++k) f[k] = to_float(pack[p].v[k]);
    } else {
      load(f, row + c);
    }
  }
};

// Host side: calls launch(P) (a std::integral_constant) for rows of `len` elements in packs of V
// with `lanes` lanes a row: P the fewest of 1, 2, 3, 4, 6, 8 packs per lane that cover the row,
// if that is at most MaxP (a kernel that keeps several tensors' packs keeps fewer of each), else
// 0. Unpacked rows (V = 1, the rare misaligned case) always take P = 0.
template <int V, int MaxP, typename F>
void with_kept_packs(int64_t len, int lanes, F&& launch) {
  const int64_t packs = (len + int64_t(lanes) * V - 1) / (int64_t(lanes) * V);
  bool done = false;
  auto try_p = [&](auto P) {
    if constexpr (V > 1 && decltype(P)::value <= MaxP) {
      if (!done && packs <= P()) {
        launch(P);
        done = true;
      }
    }
  };
  try_p(std::integral_constant<int, 1>{});
  try_p(std::integral_constant<int, 2>{});
  try_p(std::integral_constant<int, 3>{});
  try_p(std::integral_constant<int, 4>{});
  try_p(std::integral_constant<int, 6>{});
  try_p(std::integral_constant<int, 8>{});
  if (!done) launch(std::integral_constant<int, 0>{});
}

// Calls launch(V, P) for rows of `len` elements, one warp a row: V = Wide when `packed`, else 1;
// P as with_kept_packs gives.
template <int Wide, int MaxP, typename F>
void launch_warp_rows(bool packed, int64_t len, F&& launch) {
  launch_packed<Wide>(packed, [&](auto V) {
    with_kept_packs<decltype(V)::value, MaxP>(len, 32, [&](auto P) { launch(V, P); });
  });
}

}  // namespace lmtrain::cuda
