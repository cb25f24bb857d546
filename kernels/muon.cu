#include <algorithm>

#include "common.cuh"
#include "cuda_check.cuh"
#include "muon.cuh"
#include "reduce.cuh"

namespace lmtrain::cuda {

namespace {

__global__ void muon_momentum_kernel(float* u, float* buf, const float* grad, int64_t n, float mu,
                                     bool lerp, bool nesterov) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float g = grad[i];
  float b = buf[i];
  if (lerp) {
    b = b + (1.f - mu) * (g - b);
    u[i] = nesterov ? g + mu * (b - g) : b;
  } else {
    b = mu * b + g;
    u[i] = nesterov ? g + mu * b : b;
  }
  buf[i] = b;
}

// 1 / (||x_k|| * norm_mult + eps) from matrix k's sum of squares, in double as the CPU reference
// does; 1 without sums (a plain transpose).
__device__ __forceinline__ float matrix_scale(const double* sumsq, int64_t k, float norm_mult,
                                              float eps) {
  return sumsq ? float(1.0 / (sqrt(sumsq[k]) * norm_mult + eps)) : 1.f;
}

// Grid (tiles of a matrix, K): out = x * scale_k, rounded to Out. Thread 0 computes the scale
// once per block.
template <typename Out>
__global__ void normalize_kernel(Out* out, const float* x, const double* sumsq, int64_t size,
                                 float norm_mult, float eps) {
  __shared__ float scale;
  const int64_t k = blockIdx.y;
  if (threadIdx.x == 0) scale = matrix_scale(sumsq, k, norm_mult, eps);
  __syncthreads();
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < size) out[k * size + i] = from_float<Out>(x[k * size + i] * scale);
}

// out (K, cols, rows) = the transpose of x (K, rows, cols), times scale_k when sumsq is given,
// converting In to Out. 32 x 32 tiles through shared memory (padded against bank conflicts):
// reads and writes are both coalesced. Grid (col tiles, row tiles, K), block (32, 8).
template <typename In, typename Out>
__global__ void transpose_kernel(Out* out, const In* x, int64_t rows, int64_t cols,
                                 const double* sumsq, float norm_mult, float eps) {
  __shared__ float tile[32][33];
  __shared__ float scale;
  const int64_t k = blockIdx.z, r0 = int64_t(blockIdx.y) * 32, c0 = int64_t(blockIdx.x) * 32;
  if (threadIdx.x == 0 && threadIdx.y == 0) scale = matrix_scale(sumsq, k, norm_mult, eps);
  const In* src = x + k * rows * cols;
  Out* dst = out + k * rows * cols;
  for (int dy = threadIdx.y; dy < 32; dy += blockDim.y) {
    const int64_t r = r0 + dy, c = c0 + threadIdx.x;
    if (r < rows && c < cols) tile[dy][threadIdx.x] = to_float(src[r * cols + c]);
  }
  __syncthreads();
  for (int dy = threadIdx.y; dy < 32; dy += blockDim.y) {
    const int64_t c = c0 + dy, r = r0 + threadIdx.x;  // out row c, out column r
    if (r < rows && c < cols) dst[c * rows + r] = from_float<Out>(tile[threadIdx.x][dy] * scale);
  }
}

template <typename In, typename Out>
void launch_transpose(Out* out, const In* x, int64_t K, int64_t rows, int64_t cols,
                      const double* sumsq, float norm_mult, float eps, cudaStream_t stream) {
  const dim3 grid(unsigned((cols + 31) / 32), unsigned((rows + 31) / 32), unsigned(K));
  transpose_kernel<<<grid, dim3(32, 8), 0, stream>>>(out, x, rows, cols, sumsq, norm_mult, eps);
}

// NorMuon's second moment in two passes over x: the moment kernels read x once, update the state
// and keep each row's (or column's) sum of squares; moment_scale turns those into each matrix's
// norm before and after the division (the division scales a whole row or column by one factor,
// so no second pass over x is needed for the norms), and apply_moment divides and restores the
// norm in one read-modify-write.

// Per-row mean of squares: one warp per (matrix, row).
__global__ void row_moment_kernel(float* state, float* slot_ss, const float* x, int64_t K,
                                  int64_t rows, int64_t cols, float beta2) {
  const int64_t kr = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (kr >= K * rows) return;
  const float* xr = x + kr * cols;
  float ss = 0.f;
  for (int64_t c = lane; c < cols; c += 32) ss += xr[c] * xr[c];
  ss = warp_sum(ss);
  if (lane == 0) {
    const float v = ss / float(cols);
    state[kr] = state[kr] + (1.f - beta2) * (v - state[kr]);
    slot_ss[kr] = ss;
  }
}

// Per-column mean of squares: one thread per (matrix, column), walking down the rows; the
// threads of a warp read neighbouring columns, so every row read is coalesced.
__global__ void col_moment_kernel(float* state, float* slot_ss, const float* x, int64_t K,
                                  int64_t rows, int64_t cols, float beta2) {
  const int64_t kc = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (kc >= K * cols) return;
  const int64_t k = kc / cols, c = kc % cols;
  const float* m = x + k * rows * cols;
  float ss = 0.f;
  for (int64_t r = 0; r < rows; ++r) ss += m[r * cols + c] * m[r * cols + c];
  const float v = ss / float(rows);
  state[kc] = state[kc] + (1.f - beta2) * (v - state[kc]);
  slot_ss[kc] = ss;
}

__device__ __forceinline__ float moment_rsqrt(float s) { return 1.f / sqrtf(fmaxf(s, 1e-10f)); }

// One block per matrix: scale[k] = ||x|| / ||x / sqrt(state)||, the factor that restores the
// norm, from the slots' sums of squares (added in double in a fixed order).
__global__ void moment_scale_kernel(double* scale, const float* slot_ss, const float* state,
                                    int64_t slots) {
  const int64_t k = blockIdx.x;
  double before = 0, after = 0;
  for (int64_t j = threadIdx.x; j < slots; j += blockDim.x) {
    const double ss = slot_ss[k * slots + j], rs = moment_rsqrt(state[k * slots + j]);
    before += ss;
    after += ss * rs * rs;
  }
  before = block_sum(before);
  after = block_sum(after);
  if (threadIdx.x == 0) scale[k] = sqrt(before) / fmax(sqrt(after), 1e-10);
}

__global__ void apply_moment_kernel(float* x, const float* state, const double* scale, int64_t K,
                                    int64_t rows, int64_t cols, bool per_row) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= K * rows * cols) return;
  const int64_t k = i / (rows * cols), r = (i / cols) % rows, c = i % cols;
  x[i] *= moment_rsqrt(state[per_row ? k * rows + r : k * cols + c]) * float(scale[k]);
}

__global__ void muon_apply_kernel(float* p, const float* x, int64_t n, float lr, float decay,
                                  bool cautious) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  if (cautious) {
    const float mask = x[i] * p[i] >= 0.f ? 1.f : 0.f;
    p[i] = p[i] - lr * x[i] - decay * p[i] * mask;
  } else {
    p[i] = p[i] * (1.f - decay) - lr * x[i];
  }
}

// Scratch layout: K doubles (each matrix's sum of squares, or its norm-restoring scale), the
// fp32 sums of squares of the K * slots rows or columns, then the fp32 chunk sums of
// segment_sum_squares.
struct MuonScratch {
  double* per_matrix;
  float* slot_ss;
  float* partials;
};

MuonScratch carve(void* scratch, int64_t K, int64_t rows, int64_t cols) {
  auto* d = static_cast<double*>(scratch);
  auto* f = reinterpret_cast<float*>(d + K);
  return {d, f, f + K * std::max(rows, cols)};
}

}  // namespace

void muon_momentum(float* u, float* buf, const float* grad, int64_t n, float mu, bool lerp,
                   bool nesterov, cudaStream_t stream) {
  if (n == 0) return;
  muon_momentum_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(u, buf, grad, n, mu, lerp,
                                                                         nesterov);
  launch_check("muon_momentum", stream);
}

size_t muon_scratch_bytes(int64_t K, int64_t rows, int64_t cols) {
  return size_t(K) * sizeof(double) + size_t(K * std::max(rows, cols)) * sizeof(float) +
         size_t(segment_sum_squares_scratch(K, rows * cols)) * sizeof(float);
}

template <typename Out>
void normalize_matrices(Out* out, const float* x, int64_t K, int64_t rows, int64_t cols,
                        bool transpose, float norm_mult, float eps, void* scratch,
                        cudaStream_t stream) {
  const int64_t size = rows * cols;
  if (K * size == 0) return;
  const MuonScratch s = carve(scratch, K, rows, cols);
  segment_sum_squares(s.per_matrix, x, K, size, s.partials, stream, "normalize_matrices (norms)");
  if (transpose) {
    launch_transpose(out, x, K, rows, cols, s.per_matrix, norm_mult, eps, stream);
  } else {
    normalize_kernel<<<dim3(blocks_for(size, kThreads), unsigned(K)), kThreads, 0, stream>>>(
        out, x, s.per_matrix, size, norm_mult, eps);
  }
  launch_check("normalize_matrices", stream);
}

template <typename In>
void transpose_matrices(float* out, const In* x, int64_t K, int64_t rows, int64_t cols,
                        cudaStream_t stream) {
  if (K * rows * cols == 0) return;
  launch_transpose(out, x, K, rows, cols, static_cast<const double*>(nullptr), 1.f, 0.f, stream);
  launch_check("transpose_matrices", stream);
}

void normuon_second_moment(float* x, float* state, int64_t K, int64_t rows, int64_t cols,
                           float beta2, void* scratch, cudaStream_t stream) {
  const int64_t size = rows * cols;
  if (K * size == 0) return;
  const MuonScratch s = carve(scratch, K, rows, cols);
  const bool per_row = rows >= cols;
  if (per_row) {
    row_moment_kernel<<<blocks_for(K * rows, kThreads / 32), kThreads, 0, stream>>>(
        state, s.slot_ss, x, K, rows, cols, beta2);
  } else {
    col_moment_kernel<<<blocks_for(K * cols, kThreads), kThreads, 0, stream>>>(
        state, s.slot_ss, x, K, rows, cols, beta2);
  }
  launch_check("normuon_second_moment (moments)", stream);
  moment_scale_kernel<<<unsigned(K), kThreads, 0, stream>>>(s.per_matrix, s.slot_ss, state,
                                                            per_row ? rows : cols);
  launch_check("normuon_second_moment (scale)", stream);
  apply_moment_kernel<<<blocks_for(K * size, kThreads), kThreads, 0, stream>>>(
      x, state, s.per_matrix, K, rows, cols, per_row);
  launch_check("normuon_second_moment (apply)", stream);
}

void muon_apply(float* param, const float* update, int64_t n, float lr, float decay, bool cautious,
                cudaStream_t stream) {
  if (n == 0) return;
  muon_apply_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(param, update, n, lr, decay,
                                                                      cautious);
  launch_check("muon_apply", stream);
}

using bf16 = __nv_bfloat16;
template void normalize_matrices<float>(float*, const float*, int64_t, int64_t, int64_t, bool,
                                        float, float, void*, cudaStream_t);
template void normalize_matrices<bf16>(bf16*, const float*, int64_t, int64_t, int64_t, bool, float,
                                       float, void*, cudaStream_t);
template void transpose_matrices<float>(float*, const float*, int64_t, int64_t, int64_t,
                                        cudaStream_t);
template void transpose_matrices<bf16>(float*, const bf16*, int64_t, int64_t, int64_t,
                                       cudaStream_t);

}  // namespace lmtrain::cuda
