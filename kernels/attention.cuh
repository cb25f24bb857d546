// Fused causal sliding-window attention with grouped-query heads (flash-attention style): no
// T x T matrix in memory, online softmax in fp32, key tiles outside the window skipped.
// Same semantics as the CPU reference (src/backend/cpu/attention.cpp):
//   q (B,Tq,H,D), k/v (B,Tk,Hkv,D), out (B,Tq,H,D) in T; lse (B,H,Tq) f32, natural log of the
//   sum of exp of the scaled scores; scale 1/sqrt(D). Query t sits at absolute position
//   p = q_offset + t and sees keys j with p - window <= j <= p (window >= 0; window >= Tk is
//   plain causal). Query head h reads kv head h / (H / Hkv).
// T is float or __nv_bfloat16; D must be 16, 32, 64 or 128. All arithmetic is fp32.
// Bad arguments and launch failures are reported through cuda_check (cuda_check.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>

namespace lmtrain::cuda {

// Requires q_offset >= 0 and q_offset + Tq <= Tk.
template <typename T>
void attention_forward(T* out, float* lse, const T* q, const T* k, const T* v, int B, int Tq,
                       int Tk, int H, int Hkv, int D, int window, int q_offset,
                       cudaStream_t stream);

// Device scratch that attention_backward needs (the f32 row sums delta = rowsum(dout * out)).
size_t attention_backward_workspace_bytes(int B, int T, int H, int Hkv, int D);

// Training backward (Tq == Tk == T_len, q_offset 0; the sequence length is not named T, which
// would shadow the element type). dq, dk, dv are overwritten; dk/dv sum over the
// H / Hkv query heads sharing a kv head. Deterministic: no atomics, fixed summation order.
// `workspace` holds attention_backward_workspace_bytes(...) bytes of device memory.
template <typename T>
void attention_backward(T* dq, T* dk, T* dv, const T* dout, const T* q, const T* k, const T* v,
                        const T* out, const float* lse, int B, int T_len, int H, int Hkv, int D,
                        int window, void* workspace, cudaStream_t stream);

extern template void attention_forward<float>(float*, float*, const float*, const float*,
                                              const float*, int, int, int, int, int, int, int, int,
                                              cudaStream_t);
extern template void attention_forward<__nv_bfloat16>(__nv_bfloat16*, float*, const __nv_bfloat16*,
                                                      const __nv_bfloat16*, const __nv_bfloat16*,
                                                      int, int, int, int, int, int, int, int,
                                                      cudaStream_t);
extern template void attention_backward<float>(float*, float*, float*, const float*, const float*,
                                               const float*, const float*, const float*,
                                               const float*, int, int, int, int, int, int, void*,
                                               cudaStream_t);
extern template void attention_backward<__nv_bfloat16>(__nv_bfloat16*, __nv_bfloat16*,
                                                       __nv_bfloat16*, const __nv_bfloat16*,
                                                       const __nv_bfloat16*, const __nv_bfloat16*,
                                                       const __nv_bfloat16*, const __nv_bfloat16*,
                                                       const float*, int, int, int, int, int, int,
                                                       void*, cudaStream_t);

}  // namespace lmtrain::cuda
