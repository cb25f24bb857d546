// The elementwise and per-matrix pieces of the Muon family over f32 stacks x (K, rows, cols),
// the math of src/backend/cpu/muon.cpp. Per-matrix reductions are deterministic (reduce.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace lmtrain::cuda {

// lerp: buf = lerp(buf, g, 1-mu), u = nesterov ? lerp(g, buf, mu) : buf.
// classic: buf = mu*buf + g, u = nesterov ? g + mu*buf : buf.
void muon_momentum(float* u, float* buf, const float* grad, int64_t n, float mu, bool lerp,
                   bool nesterov, cudaStream_t stream);

// Device scratch (bytes) that normalize_matrices and normuon_second_moment need.
size_t muon_scratch_bytes(int64_t K, int64_t rows, int64_t cols);
// Per matrix: out = x / (||x||_F * norm_mult + eps), out (K, rows, cols) or, with transpose,
// (K, cols, rows); Out is float or bf16 (rounded once). out may alias x only without transpose
// and with Out float.
template <typename Out>
void normalize_matrices(Out* out, const float* x, int64_t K, int64_t rows, int64_t cols,
                        bool transpose, float norm_mult, float eps, void* scratch,
                        cudaStream_t stream);
// out (K, cols, rows) f32 = the transpose of each matrix of x (In: float or bf16).
template <typename In>
void transpose_matrices(float* out, const In* x, int64_t K, int64_t rows, int64_t cols,
                        cudaStream_t stream);
// NorMuon's second moment in place on x; state is (K, rows) when rows >= cols, else (K, cols).
void normuon_second_moment(float* x, float* state, int64_t K, int64_t rows, int64_t cols,
                           float beta2, void* scratch, cudaStream_t stream);
// cautious: p -= lr*x + decay*p where x*p >= 0; otherwise p = p*(1 - decay) - lr*x.
void muon_apply(float* param, const float* update, int64_t n, float lr, float decay, bool cautious,
                cudaStream_t stream);

}  // namespace lmtrain::cuda
