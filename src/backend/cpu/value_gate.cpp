// Value-embedding gate: v[n, h] += gate[n, h] * table[tokens[n], h], gate = 2 sigmoid(xn[n, :G] .
// gate_w[h]). Each kv head gets one scalar gate per token from the first G channels of the
// normed input; the value embeddings are read from the table, never gathered into a copy. v
// and dv may be bands (the values inside a packed q|k|v projection).
#include <cmath>
#include <vector>

#include "backend/cpu/checks.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/op_checks.h"

namespace lmtrain {

namespace {

const float* table_row(Tensor table, Tensor tokens, int64_t n) {
  return table.f32() + int64_t(tokens.i32()[n]) * table.dim(1);
}

}  // namespace

void CpuBackend::value_gate_forward(Tensor v, Tensor gate, Tensor xn, Tensor gate_w, Tensor table,
                                    Tensor tokens) {
  cpu::require_dense("value_gate_forward", {gate, xn, gate_w, table, tokens});
  const char* op = "value_gate_forward";
  const int64_t D = check_value_gate_args(op, v, gate, xn, gate_w, table, tokens, DType::f32);
  const int64_t N = xn.rows(), C = xn.dim(-1), Hkv = gate_w.dim(0), G = gate_w.dim(1);
  cpu::check_token_ids(op, table, tokens);
  const int64_t v_pitch = v.pitch(1);
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    const float* ve = table_row(table, tokens, n);
    for (int64_t h = 0; h < Hkv; ++h) {
      float a = 0.f;
      for (int64_t g = 0; g < G; ++g) a += xn.f32()[n * C + g] * gate_w.f32()[h * G + g];
      float s = 2.f / (1.f + std::exp(-a));
      gate.f32()[n * Hkv + h] = s;
      float* vr = v.f32_rows() + n * v_pitch + h * D;
      const float* er = ve + h * D;
      for (int64_t d = 0; d < D; ++d) vr[d] += s * er[d];
    }
  }
}

// dgate = dv . ve and, with gate = 2 sigmoid(a), dgate/da = gate (1 - gate / 2). The logit
// gradients da are gathered first; dgate_w then reduces them over tokens with one thread per
// weight, in token order, so the parameter gradient is deterministic.
void CpuBackend::value_gate_backward(Tensor dxn, Tensor dgate_w, Tensor dve, Tensor dv, Tensor xn,
                                     Tensor gate_w, Tensor table, Tensor tokens, Tensor gate) {
  cpu::require_dense("value_gate_backward", {dxn, dgate_w, dve, xn, gate_w, table, tokens, gate});
  const char* op = "value_gate_backward";
  const int64_t D = check_value_gate_args(op, dv, gate, xn, gate_w, table, tokens, DType::f32);
  check(dxn.dtype == DType::f32 && dxn.shape == xn.shape, "{}: dxn {} {} must be f32 like xn {}",
        op, dxn.shape.str(), dtype_name(dxn.dtype), xn.shape.str());
  check(dgate_w.dtype == DType::f32 && dgate_w.shape == gate_w.shape,
        "{}: dgate_w {} {} must be f32 like gate_w {}", op, dgate_w.shape.str(),
        dtype_name(dgate_w.dtype), gate_w.shape.str());
  check(dve.dtype == DType::f32 && dve.shape == dv.shape, "{}: dve {} {} must be f32 like dv {}",
        op, dve.shape.str(), dtype_name(dve.dtype), dv.shape.str());
  const int64_t N = xn.rows(), C = xn.dim(-1), Hkv = gate_w.dim(0), G = gate_w.dim(1);
  cpu::check_token_ids(op, table, tokens);
  std::vector<double> da(N * Hkv);
  const int64_t dv_pitch = dv.pitch(1);

#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    const float* ve = table_row(table, tokens, n);
    for (int64_t h = 0; h < Hkv; ++h) {
      const float* gr = dv.f32_rows() + n * dv_pitch + h * D;
      const float* er = ve + h * D;
      float* der = dve.f32() + (n * Hkv + h) * D;
      float s = gate.f32()[n * Hkv + h];
      double dgate = 0.0;
      for (int64_t d = 0; d < D; ++d) dgate += double(gr[d]) * er[d];
      for (int64_t d = 0; d < D; ++d) der[d] = s * gr[d];
      da[n * Hkv + h] = dgate * s * (1.0 - 0.5 * s);
    }
    for (int64_t g = 0; g < G; ++g) {
      double acc = 0.0;
      for (int64_t h = 0; h < Hkv; ++h) acc += da[n * Hkv + h] * gate_w.f32()[h * G + g];
      dxn.f32()[n * C + g] += float(acc);
    }
  }

#pragma omp parallel for collapse(2)
  for (int64_t h = 0; h < Hkv; ++h) {
    for (int64_t g = 0; g < G; ++g) {
      double acc = 0.0;
      for (int64_t n = 0; n < N; ++n) acc += da[n * Hkv + h] * xn.f32()[n * C + g];
      dgate_w.f32()[h * G + g] += float(acc);
    }
  }
}

}  // namespace lmtrain
