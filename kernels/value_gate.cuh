// Value-embedding gate: v[n,h] += gate[n,h] * ve[n,h] with gate = 2 sigmoid(xn[n,:G] . gate_w[h])
// and ve[n] = table[tokens[n]]. xn (N,C), gate_w (Hkv,G), v (N,Hkv*D), table (V,Hkv*D) in T;
// gate (N,Hkv) f32. Rows of v (and dv) start `pitch` elements apart: Hkv*D when dense, more in a
// band of a packed q|k|v projection. A token id outside [0, V) traps the kernel after printing it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace lmtrain::cuda {

struct ValueGateShape {
  int64_t N, C, Hkv, G, D, V, pitch;
};

template <typename T>
void value_gate_forward(T* v, float* gate, const T* xn, const T* gate_w, const T* table,
                        const int32_t* tokens, const ValueGateShape& s, cudaStream_t stream);

// Device scratch (bytes) that value_gate_backward needs.
size_t value_gate_backward_scratch_bytes(const ValueGateShape& s);
// dxn[:, :G] += da @ gate_w; dgate_w (f32) += da^T @ xn[:, :G]; dve = gate * dv (overwritten),
// with da = (dv . ve) * gate * (1 - gate / 2). Deterministic: dgate_w adds fixed chunks of rows in
// a fixed order.
template <typename T>
void value_gate_backward(T* dxn, float* dgate_w, T* dve, const T* dv, const T* xn, const T* gate_w,
                         const T* table, const int32_t* tokens, const float* gate,
                         const ValueGateShape& s, void* scratch, cudaStream_t stream);

}  // namespace lmtrain::cuda
