// Value-embedding gate: v[n, h] += gate[n, h] * ve[n, h], gate = 2 sigmoid(xn[n, :G] . gate_w[h]).
// Each kv head gets one scalar gate per token from the first G channels of the normed input.
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_backend.h"

namespace lmtrain {

namespace {

// Returns D, the per-head width of v and ve.
int64_t check_value_gate(const char* op, Tensor v, Tensor gate, Tensor xn, Tensor gate_w,
                         Tensor ve) {
  for (Tensor t : {v, gate, xn, gate_w, ve})
    check(t.dtype == DType::f32, "{}: every tensor must be f32, got {}", op, dtype_name(t.dtype));
  check(gate_w.shape.rank == 2 && xn.shape.rank >= 1 && gate_w.dim(1) <= xn.dim(-1),
        "{}: gate_w {} must be (Hkv, G) with G at most the width of xn {}", op, gate_w.shape.str(),
        xn.shape.str());
  int64_t N = xn.rows(), Hkv = gate_w.dim(0);
  check(gate.numel() == N * Hkv, "{}: gate {} must hold (N, Hkv) = ({}, {})", op, gate.shape.str(),
        N, Hkv);
  check(ve.shape == v.shape && N * Hkv > 0 && v.numel() % (N * Hkv) == 0,
        "{}: v {} and ve {} must be the same (N, Hkv * D) with N = {}, Hkv = {}", op, v.shape.str(),
        ve.shape.str(), N, Hkv);
  return v.numel() / (N * Hkv);
}

}  // namespace

void CpuBackend::value_gate_forward(Tensor v, Tensor gate, Tensor xn, Tensor gate_w, Tensor ve) {
  int64_t D = check_value_gate("value_gate_forward", v, gate, xn, gate_w, ve);
  int64_t N = xn.rows(), C = xn.dim(-1), Hkv = gate_w.dim(0), G = gate_w.dim(1);
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t h = 0; h < Hkv; ++h) {
      float a = 0.f;
      for (int64_t g = 0; g < G; ++g) a += xn.f32()[n * C + g] * gate_w.f32()[h * G + g];
      float s = 2.f / (1.f + std::exp(-a));
      gate.f32()[n * Hkv + h] = s;
      float* vr = v.f32() + (n * Hkv + h) * D;
      const float* er = ve.f32() + (n * Hkv + h) * D;
      for (int64_t d = 0; d < D; ++d) vr[d] += s * er[d];
    }
  }
}

// dgate = dv . ve and, with gate = 2 sigmoid(a), dgate/da = gate (1 - gate / 2). The logit
// gradients da are gathered first; dgate_w then reduces them over tokens with one thread per
// weight, in token order, so the parameter gradient is deterministic.
void CpuBackend::value_gate_backward(Tensor dxn, Tensor dgate_w, Tensor dve, Tensor dv, Tensor xn,
                                     Tensor gate_w, Tensor ve, Tensor gate) {
  const char* op = "value_gate_backward";
  int64_t D = check_value_gate(op, dv, gate, xn, gate_w, ve);
  check(dxn.dtype == DType::f32 && dxn.shape == xn.shape, "{}: dxn {} {} must be f32 like xn {}",
        op, dxn.shape.str(), dtype_name(dxn.dtype), xn.shape.str());
  check(dgate_w.dtype == DType::f32 && dgate_w.shape == gate_w.shape,
        "{}: dgate_w {} {} must be f32 like gate_w {}", op, dgate_w.shape.str(),
        dtype_name(dgate_w.dtype), gate_w.shape.str());
  check(dve.dtype == DType::f32 && dve.shape == ve.shape, "{}: dve {} {} must be f32 like ve {}",
        op, dve.shape.str(), dtype_name(dve.dtype), ve.shape.str());
  int64_t N = xn.rows(), C = xn.dim(-1), Hkv = gate_w.dim(0), G = gate_w.dim(1);
  std::vector<double> da(N * Hkv);

#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t h = 0; h < Hkv; ++h) {
      const float* gr = dv.f32() + (n * Hkv + h) * D;
      const float* er = ve.f32() + (n * Hkv + h) * D;
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
