// A group of G lanes per head row (G a power of two up to 32, the fewest that cover the row in
// one pack each where they can: 8 lanes at head_dim 128 in bf16, so a warp moves four rows of
// 16-byte packs at once; one lane per row moved too few bytes per load to come near the memory
// bandwidth). Lane l of a group owns the channel pairs (i, i + D/2) for i in the packs
// [l V, l V + V), [l V + G V, ...), ...: it reads its pairs before writing them and no other
// lane touches them, which is what makes the in-place forms safe. Where one pack of each half per
// lane covers the row (head_dim up to 512 in bf16), the lane keeps its packs in registers for
// both passes (RowPacks, common.cuh); else each pass reads the row, the second from L1.
#include <cfloat>

#include "common.cuh"
#include "cuda_check.cuh"
#include "norm_rope.cuh"

namespace lmtrain::cuda {

namespace {

// The head row (b, t, h) of this thread's lane group (LaneGroup) and the table rows of position
// pos0 + t (d = D/2 entries each).
struct HeadRow : LaneGroup {
  const float *cos, *sin;
  int64_t token, head;  // b * T + t, h
  __device__ HeadRow(const float* cos_table, const float* sin_table, int64_t rows, int64_t T_,
                     int64_t H, int64_t d, int pos0, int G)
      : LaneGroup(rows, G), token(row / H), head(row % H) {
    const int64_t t = valid ? token % T_ : 0;
    cos = cos_table + (pos0 + t) * d;
    sin = sin_table + (pos0 + t) * d;
  }
  // This head row in a tensor whose tokens start `pitch` elements apart (H * D when dense, more
  // in a band of a packed projection).
  template <typename T>
  __device__ T* in(T* base, int64_t pitch, int64_t d) const {
    return base + token * pitch + head * 2 * d;
  }
};

// A lane's packs of a head row's two halves, [0, d) and [d, 2d) (RowPacks, kept in registers
// when P > 0).
template <typename T, int V, int P>
struct HalfPacks {
  RowPacks<T, V, P> first, second;
  __device__ __forceinline__ void keep(const T* row, int lane, int G, int64_t d) {
    first.keep(row, lane, G, d);
    second.keep(row + d, lane, G, d);
  }
  // The halves at the pairs [i, i + V), pack p of the lane.
  __device__ __forceinline__ void get(float (&a)[V], float (&e)[V], int p, const T* row, int64_t i,
                                      int64_t d) const {
    first.get(a, p, row, i);
    second.get(e, p, row + d, i);
  }
};

// n = x * r; out1 = n1 cos + n2 sin, out2 = -n1 sin + n2 cos.
template <int V, int P, typename T>
__global__ void norm_rope_forward_kernel(T* out, float* rstd, const T* x, const float* cos,
                                         const float* sin, int64_t rows, int64_t T_, int64_t H,
                                         int64_t d, int pos0, int G, Pitches p) {
  const HeadRow h(cos, sin, rows, T_, H, d, pos0, G);
  const T* xr = h.in(x, p.x, d);
  T* yr = h.in(out, p.y, d);
  HalfPacks<T, V, P> xs;
  float ss = 0.f;
  if (h.valid) {
    xs.keep(xr, h.lane, G, d);
    for_row_packs<V, P>(h.lane, G, d, [&](int k_pack, int64_t i) {
      float a[V], e[V];
      xs.get(a, e, k_pack, xr, i, d);
#pragma unroll
      for (int k = 0; k < V; ++k) ss += a[k] * a[k] + e[k] * e[k];
    });
  }
  ss = warp_sum(ss, G);
  if (!h.valid) return;
  const float r = 1.f / sqrtf(ss / float(2 * d) + FLT_EPSILON);
  for_row_packs<V, P>(h.lane, G, d, [&](int k_pack, int64_t i) {
    float a[V], e[V], c[V], s[V], y1[V], y2[V];
    xs.get(a, e, k_pack, xr, i, d);
    load(c, h.cos + i);
    load(s, h.sin + i);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      y1[k] = r * (a[k] * c[k] + e[k] * s[k]);
      y2[k] = r * (-a[k] * s[k] + e[k] * c[k]);
    }
    store(yr + i, y1);
    store(yr + i + d, y2);
  });
  if (h.lane == 0) rstd[h.row] = r;
}

// At the pairs [i, i + V) of a head row: n1, n2 = the transposed rotation of dout's halves, a, e
// = x's halves.
template <int V, int P, typename T>
__device__ __forceinline__ void unrotate(float (&n1)[V], float (&n2)[V], float (&a)[V],
                                         float (&e)[V], const HalfPacks<T, V, P>& gs,
                                         const HalfPacks<T, V, P>& xs, int k_pack, const T* gr,
                                         const T* xr, const HeadRow& h, int64_t i, int64_t d) {
  float c[V], s[V];
  gs.get(n1, n2, k_pack, gr, i, d);
  xs.get(a, e, k_pack, xr, i, d);
  load(c, h.cos + i);
  load(s, h.sin + i);
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const float g1 = n1[k], g2 = n2[k];
    n1[k] = g1 * c[k] - g2 * s[k];
    n2[k] = g1 * s[k] + g2 * c[k];
  }
}

// dn = the transposed rotation of dout; dx = r * (dn - x * r^2 * mean(dn * x)).
template <int V, int P, typename T>
__global__ void norm_rope_backward_kernel(T* dx, const T* dout, const T* x, const float* rstd,
                                          const float* cos, const float* sin, int64_t rows,
                                          int64_t T_, int64_t H, int64_t d, int pos0, int G,
                                          Pitches p) {
  const HeadRow h(cos, sin, rows, T_, H, d, pos0, G);
  const T* xr = h.in(x, p.x, d);
  const T* gr = h.in(dout, p.dout, d);
  T* dr = h.in(dx, p.y, d);
  HalfPacks<T, V, P> gs, xs;
  float dot = 0.f;
  if (h.valid) {
    gs.keep(gr, h.lane, G, d);
    xs.keep(xr, h.lane, G, d);
    for_row_packs<V, P>(h.lane, G, d, [&](int k_pack, int64_t i) {
      float n1[V], n2[V], a[V], e[V];
      unrotate(n1, n2, a, e, gs, xs, k_pack, gr, xr, h, i, d);
#pragma unroll
      for (int k = 0; k < V; ++k) dot += n1[k] * a[k] + n2[k] * e[k];
    });
  }
  dot = warp_sum(dot, G);
  if (!h.valid) return;
  const float r = rstd[h.row];
  const float scale = dot / float(2 * d) * r * r;
  for_row_packs<V, P>(h.lane, G, d, [&](int k_pack, int64_t i) {
    float n1[V], n2[V], a[V], e[V];
    unrotate(n1, n2, a, e, gs, xs, k_pack, gr, xr, h, i, d);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      a[k] = r * (n1[k] - a[k] * scale);
      e[k] = r * (n2[k] - e[k] * scale);
    }
    store(dr + i, a);
    store(dr + i + d, e);
  });
}

// Packs of 16 bytes of T (pairs of channels V at a time) when the half-row length d and the
// token pitches are multiples of the pack (so that every row, half row and table row starts on a
// pack) and every pointer is aligned to one (the tables to V floats); else single pairs.
template <typename T, typename... P>
bool pairs_packed(int64_t d, const Pitches& p, const float* cos, const float* sin,
                  const P*... rows) {
  return d % kPack<T> == 0 && p.x % kPack<T> == 0 && p.y % kPack<T> == 0 &&
         p.dout % kPack<T> == 0 && packs_aligned(kPack<T> * sizeof(float), cos, sin) &&
         packs_aligned(16, rows...);
}

}  // namespace

template <typename T>
void norm_rope_forward(T* out, float* rstd, const T* x, const float* cos, const float* sin,
                       int64_t B, int64_t T_, int64_t H, int64_t D, int pos0, Pitches p,
                       cudaStream_t stream) {
  const int64_t rows = B * T_ * H, d = D / 2;
  if (rows == 0) return;
  launch_rows<kPack<T>>(
      pairs_packed<T>(d, p, cos, sin, out, x), rows, d, [&](auto V, int G, unsigned blocks) {
        with_kept_packs<decltype(V)::value, 1>(d, G, [&](auto P) {
          norm_rope_forward_kernel<decltype(V)::value, decltype(P)::value>
              <<<blocks, kThreads, 0, stream>>>(out, rstd, x, cos, sin, rows, T_, H, d, pos0, G, p);
        });
      });
  launch_check("norm_rope_forward", stream);
}

template <typename T>
void norm_rope_backward(T* dx, const T* dout, const T* x, const float* rstd, const float* cos,
                        const float* sin, int64_t B, int64_t T_, int64_t H, int64_t D, int pos0,
                        Pitches p, cudaStream_t stream) {
  const int64_t rows = B * T_ * H, d = D / 2;
  if (rows == 0) return;
  launch_rows<kPack<T>>(pairs_packed<T>(d, p, cos, sin, dx, dout, x), rows, d,
                        [&](auto V, int G, unsigned blocks) {
                          with_kept_packs<decltype(V)::value, 1>(d, G, [&](auto P) {
                            norm_rope_backward_kernel<decltype(V)::value, decltype(P)::value>
                                <<<blocks, kThreads, 0, stream>>>(dx, dout, x, rstd, cos, sin, rows,
                                                                  T_, H, d, pos0, G, p);
                          });
                        });
  launch_check("norm_rope_backward", stream);
}

using bf16 = __nv_bfloat16;
template void norm_rope_forward<float>(float*, float*, const float*, const float*, const float*,
                                       int64_t, int64_t, int64_t, int64_t, int, Pitches,
                                       cudaStream_t);
template void norm_rope_forward<bf16>(bf16*, float*, const bf16*, const float*, const float*,
                                      int64_t, int64_t, int64_t, int64_t, int, Pitches,
                                      cudaStream_t);
template void norm_rope_backward<float>(float*, const float*, const float*, const float*,
                                        const float*, const float*, int64_t, int64_t, int64_t,
                                        int64_t, int, Pitches, cudaStream_t);
template void norm_rope_backward<bf16>(bf16*, const bf16*, const bf16*, const float*, const float*,
                                       const float*, int64_t, int64_t, int64_t, int64_t, int,
                                       Pitches, cudaStream_t);

}  // namespace lmtrain::cuda
