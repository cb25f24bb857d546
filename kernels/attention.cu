// Fused attention kernels, version 1: tiled fp32-FMA (CUDA cores) for both float and bf16.
// No tensor cores yet: bf16 inputs are widened to fp32 as tiles are staged in shared memory, and
// every product and sum runs in fp32. See docs/CUDA.md, "Attention kernels".
//
// Every kernel runs 256 threads as a 16 x 16 grid (tx = threadIdx.x & 15, ty = threadIdx.x >> 4).
// A score tile S (rows x cols) is split into register micro-tiles: thread (ty, tx) owns rows
// ty*RM + i and columns tx + 16*j. The 16 threads sharing a row are one half-warp, so row
// reductions are four xor-shuffles. Shared-memory matrices with D columns use a row stride of D+1
// (odd), which keeps the strided column reads free of bank conflicts.
//
// Forward: one block per (batch, head, tile of BQ queries); loop over the key tiles that intersect
//   the causal window of some query in the tile, online softmax in the log2 domain.
// Backward: (1) delta = rowsum(dout * out) into the workspace; (2) one block per (batch, kv head,
//   tile of BK keys), looping over the query heads of the group and the query tiles that see the
//   key tile, dk/dv accumulated in registers; (3) one block per (batch, head, query tile) for dq,
//   looping over key tiles like the forward. Probabilities are recomputed from lse in (2) and (3).
//   Nothing is accumulated with atomics, so the backward is bit-for-bit deterministic.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "attention.cuh"
#include "cuda_check.cuh"

namespace lmtrain::cuda {

namespace {

constexpr int kThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x) {
  if constexpr (std::is_same_v<T, float>)
    return x;
  else
    return __float2bfloat16_rn(x);
}

// Stages ROWS rows of D elements in shared memory as f32 with row stride D+1. Row r is global row
// row0 + r, found at base + (row0 + r) * row_stride; rows at or past `limit` are zero.
template <int D, int ROWS, typename T>
__device__ __forceinline__ void load_tile(float* dst, const T* __restrict__ base,
                                          int64_t row_stride, int row0, int limit) {
  for (int idx = threadIdx.x; idx < ROWS * D; idx += kThreads) {
    int r = idx / D, d = idx % D, row = row0 + r;
    float x = 0.f;
    if (row < limit) x = to_f32(base[int64_t(row) * row_stride + d]);
    dst[r * (D + 1) + d] = x;
  }
}

// acc[i][j] = sum_d A[ty*RM + i][d] * Bm[tx + 16*j][d], both in shared memory with stride D+1.
template <int D, int RM, int RN>
__device__ __forceinline__ void tile_dot(float (&acc)[RM][RN], const float* A, const float* Bm,
                                         int ty, int tx) {
#pragma unroll
  for (int i = 0; i < RM; ++i)
#pragma unroll
    for (int j = 0; j < RN; ++j) acc[i][j] = 0.f;
  const float* a_row = A + ty * RM * (D + 1);
  const float* b_row = Bm + tx * (D + 1);
#pragma unroll 4
  for (int d = 0; d < D; ++d) {
    float a[RM], b[RN];
#pragma unroll
    for (int i = 0; i < RM; ++i) a[i] = a_row[i * (D + 1) + d];
#pragma unroll
    for (int j = 0; j < RN; ++j) b[j] = b_row[j * 16 * (D + 1) + d];
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
      for (int j = 0; j < RN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
  }
}

// acc[i][c] += sum_j W[ty*RM + i][j] * M[j][tx + 16*c] over j < N: a tile of weights (P or dS,
// row stride ldw) times N rows of a value tile (stride D+1), summed in j order.
template <int D, int RM, int N>
__device__ __forceinline__ void tile_accumulate(float (&acc)[RM][D / 16], const float* W, int ldw,
                                                const float* M, int ty, int tx) {
#pragma unroll 4
  for (int j = 0; j < N; ++j) {
    float m[D / 16];
#pragma unroll
    for (int c = 0; c < D / 16; ++c) m[c] = M[j * (D + 1) + tx + 16 * c];
#pragma unroll
    for (int i = 0; i < RM; ++i) {
      const float w = W[(ty * RM + i) * ldw + j];
#pragma unroll
      for (int c = 0; c < D / 16; ++c) acc[i][c] = fmaf(w, m[c], acc[i][c]);
    }
  }
}

// Reductions across the 16 lanes of a half-warp (lanes with the same ty).
__device__ __forceinline__ float half_warp_max(float x) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}
__device__ __forceinline__ float half_warp_sum(float x) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <int D, int BQ, int BK>
constexpr size_t fwd_smem_bytes() {
  return sizeof(float) * (size_t(BQ) * (D + 1) + 2 * size_t(BK) * (D + 1) + size_t(BQ) * (BK + 1));
}

template <typename T, int D, int BQ, int BK>
__global__ void __launch_bounds__(kThreads)
    attn_fwd_kernel(T* __restrict__ out, float* __restrict__ lse, const T* __restrict__ q,
                    const T* __restrict__ k, const T* __restrict__ v, int BH, int H, int Hkv,
                    int Tq, int Tk, int window, int q_offset, float scale_log2) {
  constexpr int RM = BQ / 16, RN = BK / 16, DC = D / 16, LD = D + 1, LP = BK + 1;
  extern __shared__ float smem[];
  float* sQ = smem;
  float* sK = sQ + BQ * LD;
  float* sV = sK + BK * LD;
  float* sP = sV + BK * LD;

  const int nqt = (Tq + BQ - 1) / BQ;
  const int bh = blockIdx.x % BH;
  const int qt = nqt - 1 - int(blockIdx.x / BH);  // longest rows (latest queries) first
  const int b = bh / H, h = bh % H, g = h / (H / Hkv);
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int q0 = qt * BQ;

  const int64_t q_stride = int64_t(H) * D, kv_stride = int64_t(Hkv) * D;
  const T* qb = q + (int64_t(b) * Tq * H + h) * D;
  const T* kb = k + (int64_t(b) * Tk * Hkv + g) * D;
  const T* vb = v + (int64_t(b) * Tk * Hkv + g) * D;

  load_tile<D, BQ>(sQ, qb, q_stride, q0, Tq);

  float m[RM], l[RM], acc[RM][DC];
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int c = 0; c < DC; ++c) acc[i][c] = 0.f;
  }

  // Keys visible to some query of the tile: [max(0, pmin - window), pmax], pmax <= Tk - 1.
  const int pmin = q_offset + q0, pmax = q_offset + min(q0 + BQ, Tq) - 1;
  const int kt_lo = max(0, pmin - window) / BK, kt_hi = pmax / BK;

  for (int kt = kt_lo; kt <= kt_hi; ++kt) {
    const int k0 = kt * BK;
    __syncthreads();  // the previous tile's sK, sV, sP are no longer read
    load_tile<D, BK>(sK, kb, kv_stride, k0, Tk);
    load_tile<D, BK>(sV, vb, kv_stride, k0, Tk);
    __syncthreads();

    float s[RM][RN];
    tile_dot<D, RM, RN>(s, sQ, sK, ty, tx);
#pragma unroll
    for (int i = 0; i < RM; ++i) {
      const int t = q0 + ty * RM + i, p = q_offset + t;
      const bool row_ok = t < Tq;
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < RN; ++j) {
        const int key = k0 + tx + 16 * j;
        const bool ok = row_ok && key <= p && key >= p - window;
        s[i][j] = ok ? s[i][j] * scale_log2 : -INFINITY;
        mx = fmaxf(mx, s[i][j]);
      }
      mx = half_warp_max(mx);
      const float m_new = fmaxf(m[i], mx);
      // A row with nothing visible yet keeps m = -inf; exponentiate against 0 so that no
      // (-inf) - (-inf) appears: its p and alpha come out 0.
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m[i] - m_use);
      float rs = 0.f;
#pragma unroll
      for (int j = 0; j < RN; ++j) {
        s[i][j] = exp2f(s[i][j] - m_use);
        rs += s[i][j];
      }
      rs = half_warp_sum(rs);
      l[i] = l[i] * alpha + rs;
      m[i] = m_new;
#pragma unroll
      for (int c = 0; c < DC; ++c) acc[i][c] *= alpha;
#pragma unroll
      for (int j = 0; j < RN; ++j) sP[(ty * RM + i) * LP + tx + 16 * j] = s[i][j];
    }
    __syncthreads();

    tile_accumulate<D, RM, BK>(acc, sP, LP, sV, ty, tx);  // O += P V
  }

#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const int t = q0 + ty * RM + i;
    if (t >= Tq) continue;
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    T* orow = out + ((int64_t(b) * Tq + t) * H + h) * D;
#pragma unroll
    for (int c = 0; c < DC; ++c) orow[tx + 16 * c] = from_f32<T>(acc[i][c] * inv);
    if (tx == 0) lse[(int64_t(b) * H + h) * Tq + t] = (m[i] + log2f(l[i])) * kLn2;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward (1): delta[b, h, t] = sum_d dout * out, one warp per row.
// ---------------------------------------------------------------------------------------------

template <typename T, int D>
__global__ void attn_bwd_delta_kernel(float* __restrict__ delta, const T* __restrict__ dout,
                                      const T* __restrict__ out, int64_t rows, int T_, int H) {
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;  // uniform per warp
  const T* a = dout + row * D;
  const T* o = out + row * D;
  float s = 0.f;
  for (int d = lane; d < D; d += 32) s = fmaf(to_f32(a[d]), to_f32(o[d]), s);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) {
    // row = (b * T + t) * H + h  ->  delta at (b * H + h) * T + t
    const int64_t h = row % H, bt = row / H, t = bt % T_, b = bt / T_;
    delta[(b * H + h) * T_ + t] = s;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward (2): dk, dv. One block per (batch, kv head, key tile of BK keys).
// ---------------------------------------------------------------------------------------------

template <int D, int BK, int BQ>
constexpr size_t dkv_smem_bytes() {
  return sizeof(float) * (2 * size_t(BK) * (D + 1) + 2 * size_t(BQ) * (D + 1) +
                          2 * size_t(BK) * (BQ + 1) + 2 * size_t(BQ));
}

template <typename T, int D, int BK, int BQ>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_dkv_kernel(T* __restrict__ dk, T* __restrict__ dv, const T* __restrict__ q,
                        const T* __restrict__ k, const T* __restrict__ v,
                        const T* __restrict__ dout, const float* __restrict__ lse,
                        const float* __restrict__ delta, int BHkv, int T_, int H, int Hkv,
                        int window, float scale, float scale_log2) {
  constexpr int RM = BK / 16, RN = BQ / 16, DC = D / 16, LD = D + 1, LP = BQ + 1;
  extern __shared__ float smem[];
  float* sK = smem;
  float* sV = sK + BK * LD;
  float* sQ = sV + BK * LD;
  float* sO = sQ + BQ * LD;  // dout
  float* sP = sO + BQ * LD;
  float* sS = sP + BK * LP;  // dS
  float* sL = sS + BK * LP;  // lse * log2(e)
  float* sDelta = sL + BQ;

  const int bg = blockIdx.x % BHkv;
  const int kt = int(blockIdx.x / BHkv);  // early key tiles (seen by most queries) first
  const int b = bg / Hkv, g = bg % Hkv, group = H / Hkv;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int k0 = kt * BK, klast = min(k0 + BK, T_) - 1;

  const int64_t q_stride = int64_t(H) * D, kv_stride = int64_t(Hkv) * D;
  load_tile<D, BK>(sK, k + (int64_t(b) * T_ * Hkv + g) * D, kv_stride, k0, T_);
  load_tile<D, BK>(sV, v + (int64_t(b) * T_ * Hkv + g) * D, kv_stride, k0, T_);

  float dK[RM][DC], dV[RM][DC];
#pragma unroll
  for (int i = 0; i < RM; ++i)
#pragma unroll
    for (int c = 0; c < DC; ++c) dK[i][c] = dV[i][c] = 0.f;

  // Queries that see a key of the tile: t >= k0 and t - window <= klast.
  const int qt_lo = k0 / BQ, qt_hi = min(T_ - 1, klast + window) / BQ;

  for (int h = g * group; h < (g + 1) * group; ++h) {
    const T* qb = q + (int64_t(b) * T_ * H + h) * D;
    const T* ob = dout + (int64_t(b) * T_ * H + h) * D;
    const float* lb = lse + (int64_t(b) * H + h) * T_;
    const float* db = delta + (int64_t(b) * H + h) * T_;
    for (int qt = qt_lo; qt <= qt_hi; ++qt) {
      const int t0 = qt * BQ;
      __syncthreads();  // previous sQ, sO, sP, sS, sL, sDelta no longer read
      load_tile<D, BQ>(sQ, qb, q_stride, t0, T_);
      load_tile<D, BQ>(sO, ob, q_stride, t0, T_);
      for (int i = threadIdx.x; i < BQ; i += kThreads) {
        const int t = t0 + i;
        sL[i] = t < T_ ? lb[t] * kLog2e : 0.f;
        sDelta[i] = t < T_ ? db[t] : 0.f;
      }
      __syncthreads();

      float s[RM][RN], dp[RM][RN];
      tile_dot<D, RM, RN>(s, sK, sQ, ty, tx);
      tile_dot<D, RM, RN>(dp, sV, sO, ty, tx);
#pragma unroll
      for (int i = 0; i < RM; ++i) {
        const int key = k0 + ty * RM + i;
#pragma unroll
        for (int j = 0; j < RN; ++j) {
          const int col = tx + 16 * j, t = t0 + col;
          const bool ok = key < T_ && t < T_ && key <= t && key >= t - window;
          const float p = ok ? exp2f(s[i][j] * scale_log2 - sL[col]) : 0.f;
          sP[(ty * RM + i) * LP + col] = p;
          sS[(ty * RM + i) * LP + col] = p * (dp[i][j] - sDelta[col]);
        }
      }
      __syncthreads();

      tile_accumulate<D, RM, BQ>(dV, sP, LP, sO, ty, tx);  // dV += P^T dO
      tile_accumulate<D, RM, BQ>(dK, sS, LP, sQ, ty, tx);  // dK += dS^T Q
    }
  }

#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const int key = k0 + ty * RM + i;
    if (key >= T_) continue;
    const int64_t off = ((int64_t(b) * T_ + key) * Hkv + g) * D;
#pragma unroll
    for (int c = 0; c < DC; ++c) {
      dk[off + tx + 16 * c] = from_f32<T>(dK[i][c] * scale);
      dv[off + tx + 16 * c] = from_f32<T>(dV[i][c]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward (3): dq. One block per (batch, head, query tile of BQ queries).
// ---------------------------------------------------------------------------------------------

template <int D, int BQ, int BK>
constexpr size_t dq_smem_bytes() {
  return sizeof(float) *
         (2 * size_t(BQ) * (D + 1) + 2 * size_t(BK) * (D + 1) + size_t(BQ) * (BK + 1));
}

template <typename T, int D, int BQ, int BK>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_dq_kernel(T* __restrict__ dq, const T* __restrict__ q, const T* __restrict__ k,
                       const T* __restrict__ v, const T* __restrict__ dout,
                       const float* __restrict__ lse, const float* __restrict__ delta, int BH,
                       int T_, int H, int Hkv, int window, float scale, float scale_log2) {
  constexpr int RM = BQ / 16, RN = BK / 16, DC = D / 16, LD = D + 1, LP = BK + 1;
  extern __shared__ float smem[];
  float* sQ = smem;
  float* sO = sQ + BQ * LD;  // dout
  float* sK = sO + BQ * LD;
  float* sV = sK + BK * LD;
  float* sS = sV + BK * LD;  // dS

  const int nqt = (T_ + BQ - 1) / BQ;
  const int bh = blockIdx.x % BH;
  const int qt = nqt - 1 - int(blockIdx.x / BH);
  const int b = bh / H, h = bh % H, g = h / (H / Hkv);
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int q0 = qt * BQ;

  const int64_t q_stride = int64_t(H) * D, kv_stride = int64_t(Hkv) * D;
  const T* kb = k + (int64_t(b) * T_ * Hkv + g) * D;
  const T* vb = v + (int64_t(b) * T_ * Hkv + g) * D;
  load_tile<D, BQ>(sQ, q + (int64_t(b) * T_ * H + h) * D, q_stride, q0, T_);
  load_tile<D, BQ>(sO, dout + (int64_t(b) * T_ * H + h) * D, q_stride, q0, T_);

  float lrow[RM], drow[RM], dQ[RM][DC];
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const int t = q0 + ty * RM + i;
    lrow[i] = t < T_ ? lse[(int64_t(b) * H + h) * T_ + t] * kLog2e : 0.f;
    drow[i] = t < T_ ? delta[(int64_t(b) * H + h) * T_ + t] : 0.f;
#pragma unroll
    for (int c = 0; c < DC; ++c) dQ[i][c] = 0.f;
  }

  const int qlast = min(q0 + BQ, T_) - 1;
  const int kt_lo = max(0, q0 - window) / BK, kt_hi = qlast / BK;

  for (int kt = kt_lo; kt <= kt_hi; ++kt) {
    const int k0 = kt * BK;
    __syncthreads();
    load_tile<D, BK>(sK, kb, kv_stride, k0, T_);
    load_tile<D, BK>(sV, vb, kv_stride, k0, T_);
    __syncthreads();

    float s[RM][RN], dp[RM][RN];
    tile_dot<D, RM, RN>(s, sQ, sK, ty, tx);
    tile_dot<D, RM, RN>(dp, sO, sV, ty, tx);
#pragma unroll
    for (int i = 0; i < RM; ++i) {
      const int t = q0 + ty * RM + i;
#pragma unroll
      for (int j = 0; j < RN; ++j) {
        const int key = k0 + tx + 16 * j;
        const bool ok = t < T_ && key <= t && key >= t - window;
        const float p = ok ? exp2f(s[i][j] * scale_log2 - lrow[i]) : 0.f;
        sS[(ty * RM + i) * LP + tx + 16 * j] = p * (dp[i][j] - drow[i]);
      }
    }
    __syncthreads();

    tile_accumulate<D, RM, BK>(dQ, sS, LP, sK, ty, tx);  // dQ += dS K
  }

#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const int t = q0 + ty * RM + i;
    if (t >= T_) continue;
    T* row = dq + ((int64_t(b) * T_ + t) * H + h) * D;
#pragma unroll
    for (int c = 0; c < DC; ++c) row[tx + 16 * c] = from_f32<T>(dQ[i][c] * scale);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

// Tile shapes per head dimension. BQ and BK are multiples of 16 (the thread grid's side).
template <int D>
struct Tiles {
  static constexpr int kFwdQ = 64, kFwdK = D > 64 ? 32 : 64;  // forward
  static constexpr int kDkvK = 64, kDkvQ = D > 64 ? 32 : 64;  // backward dk/dv
  static constexpr int kDqQ = 64, kDqK = D > 64 ? 32 : 64;    // backward dq
};

void fail_arg(const char* what) { cuda_check(cudaErrorInvalidValue, what); }

// Calls f(std::integral_constant<int, D>{}) for the head dims the kernels are built for.
template <typename F>
void with_head_dim(int D, const char* op, F&& f) {
  switch (D) {
    case 16:
      return f(std::integral_constant<int, 16>{});
    case 32:
      return f(std::integral_constant<int, 32>{});
    case 64:
      return f(std::integral_constant<int, 64>{});
    case 128:
      return f(std::integral_constant<int, 128>{});
    default:
      fail_arg((std::string(op) + ": head dim D must be 16, 32, 64 or 128").c_str());
  }
}

unsigned grid_size(int64_t blocks, const char* what) {
  if (blocks > int64_t(0x7fffffff)) fail_arg(what);
  return unsigned(blocks);
}

// Opts a kernel into more than 48 KiB of dynamic shared memory. The attribute belongs to the
// device's context, so it is set once per kernel instantiation and device (`done` is per kernel).
template <typename Kernel>
void set_smem(std::atomic<uint64_t>& done, Kernel kernel, size_t bytes, const char* what) {
  if (bytes <= 48 * 1024) return;
  int device = 0;
  cuda_check(cudaGetDevice(&device), what);
  const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
  if (bit != 0 && (done.load(std::memory_order_relaxed) & bit)) return;
  cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
             what);
  done.fetch_or(bit, std::memory_order_relaxed);
}

template <typename T, int D>
void launch_forward(T* out, float* lse, const T* q, const T* k, const T* v, int B, int Tq, int Tk,
                    int H, int Hkv, int window, int q_offset, cudaStream_t stream) {
  constexpr int BQ = Tiles<D>::kFwdQ, BK = Tiles<D>::kFwdK;
  constexpr size_t smem = fwd_smem_bytes<D, BQ, BK>();
  auto kernel = attn_fwd_kernel<T, D, BQ, BK>;
  static std::atomic<uint64_t> configured{0};
  set_smem(configured, kernel, smem, "attention_forward smem attribute");
  const int BH = B * H;
  const unsigned blocks =
      grid_size(int64_t(BH) * ((Tq + BQ - 1) / BQ), "attention_forward: grid too large");
  const float scale_log2 = kLog2e / std::sqrt(float(D));
  kernel<<<blocks, kThreads, smem, stream>>>(out, lse, q, k, v, BH, H, Hkv, Tq, Tk, window,
                                             q_offset, scale_log2);
  launch_check("attention_forward launch", stream);
}

template <typename T, int D>
void launch_backward(T* dq, T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v,
                     const T* out, const float* lse, int B, int T_, int H, int Hkv, int window,
                     float* delta, cudaStream_t stream) {
  const float scale = 1.f / std::sqrt(float(D)), scale_log2 = kLog2e * scale;

  {
    const int64_t rows = int64_t(B) * T_ * H;
    constexpr int kWarps = 8;
    const unsigned blocks =
        grid_size((rows + kWarps - 1) / kWarps, "attention_backward: grid too large");
    attn_bwd_delta_kernel<T, D><<<blocks, kWarps * 32, 0, stream>>>(delta, dout, out, rows, T_, H);
    launch_check("attention_backward delta launch", stream);
  }
  {
    constexpr int BK = Tiles<D>::kDkvK, BQ = Tiles<D>::kDkvQ;
    constexpr size_t smem = dkv_smem_bytes<D, BK, BQ>();
    auto kernel = attn_bwd_dkv_kernel<T, D, BK, BQ>;
    static std::atomic<uint64_t> configured{0};
    set_smem(configured, kernel, smem, "attention_backward dk/dv smem attribute");
    const int BHkv = B * Hkv;
    const unsigned blocks =
        grid_size(int64_t(BHkv) * ((T_ + BK - 1) / BK), "attention_backward: grid too large");
    kernel<<<blocks, kThreads, smem, stream>>>(dk, dv, q, k, v, dout, lse, delta, BHkv, T_, H, Hkv,
                                               window, scale, scale_log2);
    launch_check("attention_backward dk/dv launch", stream);
  }
  {
    constexpr int BQ = Tiles<D>::kDqQ, BK = Tiles<D>::kDqK;
    constexpr size_t smem = dq_smem_bytes<D, BQ, BK>();
    auto kernel = attn_bwd_dq_kernel<T, D, BQ, BK>;
    static std::atomic<uint64_t> configured{0};
    set_smem(configured, kernel, smem, "attention_backward dq smem attribute");
    const int BH = B * H;
    const unsigned blocks =
        grid_size(int64_t(BH) * ((T_ + BQ - 1) / BQ), "attention_backward: grid too large");
    kernel<<<blocks, kThreads, smem, stream>>>(dq, q, k, v, dout, lse, delta, BH, T_, H, Hkv,
                                               window, scale, scale_log2);
    launch_check("attention_backward dq launch", stream);
  }
}

bool valid_heads(int H, int Hkv) { return H > 0 && Hkv > 0 && H % Hkv == 0; }

}  // namespace

template <typename T>
void attention_forward(T* out, float* lse, const T* q, const T* k, const T* v, int B, int Tq,
                       int Tk, int H, int Hkv, int D, int window, int q_offset,
                       cudaStream_t stream) {
  if (B < 0 || Tq < 0 || !valid_heads(H, Hkv))
    fail_arg("attention_forward: bad shape (need B, Tq >= 0 and Hkv dividing H)");
  if (window < 0) fail_arg("attention_forward: window must be >= 0");
  if (q_offset < 0 || int64_t(q_offset) + Tq > Tk)
    fail_arg("attention_forward: need q_offset >= 0 and q_offset + Tq <= Tk");
  if (B == 0 || Tq == 0) return;
  window = std::min(window, Tk);  // keeps window arithmetic far from int overflow
  with_head_dim(D, "attention_forward", [&](auto d) {
    launch_forward<T, decltype(d)::value>(out, lse, q, k, v, B, Tq, Tk, H, Hkv, window, q_offset,
                                          stream);
  });
}

size_t attention_backward_workspace_bytes(int B, int T, int H, int /*Hkv*/, int /*D*/) {
  const size_t n = size_t(std::max(B, 0)) * size_t(std::max(T, 0)) * size_t(std::max(H, 0));
  return (n * sizeof(float) + 255) / 256 * 256;
}

template <typename T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v,
                        const T* out, const float* lse, int B, int T_, int H, int Hkv, int D,
                        int window, void* workspace, cudaStream_t stream) {
  if (B < 0 || T_ < 0 || !valid_heads(H, Hkv))
    fail_arg("attention_backward: bad shape (need B, T >= 0 and Hkv dividing H)");
  if (window < 0) fail_arg("attention_backward: window must be >= 0");
  if (B == 0 || T_ == 0) return;
  if (workspace == nullptr) fail_arg("attention_backward: workspace is null");
  window = std::min(window, T_);
  float* delta = static_cast<float*>(workspace);
  with_head_dim(D, "attention_backward", [&](auto d) {
    launch_backward<T, decltype(d)::value>(dq, dk, dv, dout, q, k, v, out, lse, B, T_, H, Hkv,
                                           window, delta, stream);
  });
}

template void attention_forward<float>(float*, float*, const float*, const float*, const float*,
                                       int, int, int, int, int, int, int, int, cudaStream_t);
template void attention_forward<__nv_bfloat16>(__nv_bfloat16*, float*, const __nv_bfloat16*,
                                               const __nv_bfloat16*, const __nv_bfloat16*, int, int,
                                               int, int, int, int, int, int, cudaStream_t);
template void attention_backward<float>(float*, float*, float*, const float*, const float*,
                                        const float*, const float*, const float*, const float*, int,
                                        int, int, int, int, int, void*, cudaStream_t);
template void attention_backward<__nv_bfloat16>(__nv_bfloat16*, __nv_bfloat16*, __nv_bfloat16*,
                                                const __nv_bfloat16*, const __nv_bfloat16*,
                                                const __nv_bfloat16*, const __nv_bfloat16*,
                                                const __nv_bfloat16*, const float*, int, int, int,
                                                int, int, int, void*, cudaStream_t);

}  // namespace lmtrain::cuda
