// Causal sliding-window attention with grouped-query heads, written as the plain math: one query
// row at a time, scores over its visible keys, a softmax, a weighted sum of values. Only the
// log-sum-exp of each row is saved; the backward recomputes the probabilities from it.
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/cpu_backend.h"

namespace lmtrain {

namespace {

void check_attention(const char* op, Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v,
                     int window) {
  for (Tensor t : {out, lse, q, k, v})
    check(t.dtype == DType::f32, "{}: every tensor must be f32, got {}", op, dtype_name(t.dtype));
  check(q.shape.rank == 4 && k.shape.rank == 4, "{}: q {} and k {} must be (B, T, heads, D)", op,
        q.shape.str(), k.shape.str());
  check(k.shape == v.shape, "{}: v {} does not match k {}", op, v.shape.str(), k.shape.str());
  check(out.shape == q.shape, "{}: out {} does not match q {}", op, out.shape.str(), q.shape.str());
  check(k.dim(0) == q.dim(0) && k.dim(3) == q.dim(3) && k.dim(2) > 0 && q.dim(2) % k.dim(2) == 0,
        "{}: k {} does not pair with q {} (same B and D, heads dividing the query heads)", op,
        k.shape.str(), q.shape.str());
  check(lse.shape == Shape{q.dim(0), q.dim(2), q.dim(1)}, "{}: lse {} must be (B, H, Tq) = {}", op,
        lse.shape.str(), Shape{q.dim(0), q.dim(2), q.dim(1)}.str());
  check(window >= 0, "{}: window {} must be non-negative", op, window);
}

float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

void CpuBackend::attention_forward(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v, int window,
                                   int q_offset) {
  check_attention("attention_forward", out, lse, q, k, v, window);
  int64_t B = q.dim(0), Tq = q.dim(1), H = q.dim(2), D = q.dim(3);
  int64_t Tk = k.dim(1), Hkv = k.dim(2), group = H / Hkv;
  check(q_offset >= 0 && q_offset + Tq <= Tk,
        "attention_forward: queries at positions [{}, {}) need keys up to there, have {}", q_offset,
        q_offset + Tq, Tk);
  float scale = 1.f / std::sqrt(float(D));

#pragma omp parallel
  {
    std::vector<float> p(Tk);
    std::vector<double> acc(D);
#pragma omp for collapse(3)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t t = 0; t < Tq; ++t) {
          int64_t pos = q_offset + t, lo = std::max<int64_t>(0, pos - window);
          const float* qr = q.f32() + ((b * Tq + t) * H + h) * D;
          const float* kb = k.f32() + (b * Tk * Hkv + h / group) * D;  // key j at kb + j*Hkv*D
          const float* vb = v.f32() + (b * Tk * Hkv + h / group) * D;

          float mx = -INFINITY;
          for (int64_t j = lo; j <= pos; ++j) {
            p[j] = dot(qr, kb + j * Hkv * D, D) * scale;
            mx = std::max(mx, p[j]);
          }
          double sum = 0.0;
          for (int64_t j = lo; j <= pos; ++j) {
            p[j] = std::exp(p[j] - mx);
            sum += p[j];
          }
          std::fill(acc.begin(), acc.end(), 0.0);
          for (int64_t j = lo; j <= pos; ++j) {
            const float* vr = vb + j * Hkv * D;
            for (int64_t d = 0; d < D; ++d) acc[d] += double(p[j]) * vr[d];
          }
          float* orow = out.f32() + ((b * Tq + t) * H + h) * D;
          for (int64_t d = 0; d < D; ++d) orow[d] = float(acc[d] / sum);
          lse.f32()[(b * H + h) * Tq + t] = mx + float(std::log(sum));
        }
      }
    }
  }
}

// With p = softmax(s), s = scale * q.k and delta = dout.out = sum_j p_j (dout.v_j):
//   ds_j = p_j (dout.v_j - delta),  dq = scale sum_j ds_j k_j,
//   dk_j = scale sum ds_j q,  dv_j = sum p_j dout  (sums over every query row that sees key j).
// Threads own a (batch, kv head) pair and every query head reading it, so the dk/dv sums have a
// single writer and a fixed order; they are kept in double because they run over group * T rows.
void CpuBackend::attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor q,
                                    Tensor k, Tensor v, Tensor out, Tensor lse, int window) {
  check_attention("attention_backward", out, lse, q, k, v, window);
  check(q.dim(1) == k.dim(1), "attention_backward: q {} and k {} must cover the same positions",
        q.shape.str(), k.shape.str());
  auto check_grad = [](const char* name, Tensor grad, Tensor like) {
    check(grad.dtype == DType::f32 && grad.shape == like.shape,
          "attention_backward: {} {} {} must be f32 {}", name, grad.shape.str(),
          dtype_name(grad.dtype), like.shape.str());
  };
  check_grad("dq", dq, q);
  check_grad("dk", dk, k);
  check_grad("dv", dv, v);
  check_grad("dout", dout, out);
  int64_t B = q.dim(0), T = q.dim(1), H = q.dim(2), D = q.dim(3);
  int64_t Hkv = k.dim(2), group = H / Hkv;
  float scale = 1.f / std::sqrt(float(D));

#pragma omp parallel
  {
    std::vector<double> dk_acc(T * D), dv_acc(T * D), dq_acc(D);
#pragma omp for collapse(2)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t g = 0; g < Hkv; ++g) {
        std::fill(dk_acc.begin(), dk_acc.end(), 0.0);
        std::fill(dv_acc.begin(), dv_acc.end(), 0.0);
        const float* kb = k.f32() + (b * T * Hkv + g) * D;  // key j at kb + j*Hkv*D
        const float* vb = v.f32() + (b * T * Hkv + g) * D;
        for (int64_t h = g * group; h < (g + 1) * group; ++h) {
          for (int64_t t = 0; t < T; ++t) {
            int64_t row = (b * T + t) * H + h, lo = std::max<int64_t>(0, t - window);
            const float* qr = q.f32() + row * D;
            const float* gr = dout.f32() + row * D;
            float delta = dot(gr, out.f32() + row * D, D);
            float row_lse = lse.f32()[(b * H + h) * T + t];
            std::fill(dq_acc.begin(), dq_acc.end(), 0.0);
            for (int64_t j = lo; j <= t; ++j) {
              const float* kr = kb + j * Hkv * D;
              float p = std::exp(dot(qr, kr, D) * scale - row_lse);
              float ds = p * (dot(gr, vb + j * Hkv * D, D) - delta);
              double* dkr = dk_acc.data() + j * D;
              double* dvr = dv_acc.data() + j * D;
              for (int64_t d = 0; d < D; ++d) {
                dq_acc[d] += double(ds) * kr[d];
                dkr[d] += double(ds) * qr[d];
                dvr[d] += double(p) * gr[d];
              }
            }
            for (int64_t d = 0; d < D; ++d) dq.f32()[row * D + d] = float(scale * dq_acc[d]);
          }
        }
        for (int64_t j = 0; j < T; ++j) {
          float* dkr = dk.f32() + ((b * T + j) * Hkv + g) * D;
          float* dvr = dv.f32() + ((b * T + j) * Hkv + g) * D;
          for (int64_t d = 0; d < D; ++d) {
            dkr[d] = float(scale * dk_acc[j * D + d]);
            dvr[d] = float(dv_acc[j * D + d]);
          }
        }
      }
    }
  }
}

}  // namespace lmtrain
