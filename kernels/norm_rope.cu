// One warp per head row (D <= a few hundred), as rmsnorm.cu. Lane l owns the channel pairs
// (i, i + D/2) with i = l, l + 32, ...: it reads a pair before writing it and no other lane
// touches it, which is what makes the in-place forms safe.
#include <cfloat>

#include "common.cuh"
#include "cuda_check.cuh"
#include "norm_rope.cuh"

namespace lmtrain::cuda {

namespace {

constexpr int kRowsPerBlock = kThreads / 32;

// The head row (b, t, h) this thread's warp works on, its lane, and the table rows of position
// pos0 + t (d = D/2 entries each).
struct HeadRow {
  int64_t row;
  int lane;
  const float *cos, *sin;
  __device__ HeadRow(const float* cos_table, const float* sin_table, int64_t T_, int64_t H,
                     int64_t d, int pos0)
      : row(int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32), lane(threadIdx.x % 32) {
    const int64_t t = (row / H) % T_;
    cos = cos_table + (pos0 + t) * d;
    sin = sin_table + (pos0 + t) * d;
  }
};

// n = x * r; out1 = n1 cos + n2 sin, out2 = -n1 sin + n2 cos.
template <typename T>
__global__ void norm_rope_forward_kernel(T* out, float* rstd, const T* x, const float* cos,
                                         const float* sin, int64_t rows, int64_t T_, int64_t H,
                                         int64_t d, int pos0) {
  const HeadRow h(cos, sin, T_, H, d, pos0);
  if (h.row >= rows) return;
  const int lane = h.lane;
  const float *c = h.cos, *s = h.sin;
  const T* xr = x + h.row * 2 * d;
  T* yr = out + h.row * 2 * d;
  float ss = 0.f;
  for (int64_t i = lane; i < d; i += 32) {
    const float a = to_float(xr[i]), e = to_float(xr[i + d]);
    ss += a * a + e * e;
  }
  ss = warp_sum(ss);
  const float r = 1.f / sqrtf(ss / float(2 * d) + FLT_EPSILON);
  for (int64_t i = lane; i < d; i += 32) {
    const float a = to_float(xr[i]) * r, e = to_float(xr[i + d]) * r;
    yr[i] = from_float<T>(a * c[i] + e * s[i]);
    yr[i + d] = from_float<T>(-a * s[i] + e * c[i]);
  }
  if (lane == 0) rstd[h.row] = r;
}

// dn = the transposed rotation of dout; dx = r * (dn - x * r^2 * mean(dn * x)).
template <typename T>
__global__ void norm_rope_backward_kernel(T* dx, const T* dout, const T* x, const float* rstd,
                                          const float* cos, const float* sin, int64_t rows,
                                          int64_t T_, int64_t H, int64_t d, int pos0) {
  const HeadRow h(cos, sin, T_, H, d, pos0);
  if (h.row >= rows) return;
  const int lane = h.lane;
  const float *c = h.cos, *s = h.sin;
  const T* xr = x + h.row * 2 * d;
  const T* gr = dout + h.row * 2 * d;
  T* dr = dx + h.row * 2 * d;
  float dot = 0.f;
  for (int64_t i = lane; i < d; i += 32) {
    const float g1 = to_float(gr[i]), g2 = to_float(gr[i + d]);
    dot +=
        (g1 * c[i] - g2 * s[i]) * to_float(xr[i]) + (g1 * s[i] + g2 * c[i]) * to_float(xr[i + d]);
  }
  dot = warp_sum(dot);
  const float r = rstd[h.row];
  const float k = dot / float(2 * d) * r * r;
  for (int64_t i = lane; i < d; i += 32) {
    const float g1 = to_float(gr[i]), g2 = to_float(gr[i + d]);
    const float n1 = g1 * c[i] - g2 * s[i], n2 = g1 * s[i] + g2 * c[i];
    dr[i] = from_float<T>(r * (n1 - to_float(xr[i]) * k));
    dr[i + d] = from_float<T>(r * (n2 - to_float(xr[i + d]) * k));
  }
}

}  // namespace

template <typename T>
void norm_rope_forward(T* out, float* rstd, const T* x, const float* cos, const float* sin,
                       int64_t B, int64_t T_, int64_t H, int64_t D, int pos0, cudaStream_t stream) {
  const int64_t rows = B * T_ * H;
  if (rows == 0) return;
  norm_rope_forward_kernel<<<blocks_for(rows, kRowsPerBlock), kThreads, 0, stream>>>(
      out, rstd, x, cos, sin, rows, T_, H, D / 2, pos0);
  launch_check("norm_rope_forward", stream);
}

template <typename T>
void norm_rope_backward(T* dx, const T* dout, const T* x, const float* rstd, const float* cos,
                        const float* sin, int64_t B, int64_t T_, int64_t H, int64_t D, int pos0,
                        cudaStream_t stream) {
  const int64_t rows = B * T_ * H;
  if (rows == 0) return;
  norm_rope_backward_kernel<<<blocks_for(rows, kRowsPerBlock), kThreads, 0, stream>>>(
      dx, dout, x, rstd, cos, sin, rows, T_, H, D / 2, pos0);
  launch_check("norm_rope_backward", stream);
}

using bf16 = __nv_bfloat16;
template void norm_rope_forward<float>(float*, float*, const float*, const float*, const float*,
                                       int64_t, int64_t, int64_t, int64_t, int, cudaStream_t);
template void norm_rope_forward<bf16>(bf16*, float*, const bf16*, const float*, const float*,
                                      int64_t, int64_t, int64_t, int64_t, int, cudaStream_t);
template void norm_rope_backward<float>(float*, const float*, const float*, const float*,
                                        const float*, const float*, int64_t, int64_t, int64_t,
                                        int64_t, int, cudaStream_t);
template void norm_rope_backward<bf16>(bf16*, const bf16*, const bf16*, const float*, const float*,
                                       const float*, int64_t, int64_t, int64_t, int64_t, int,
                                       cudaStream_t);

}  // namespace lmtrain::cuda
