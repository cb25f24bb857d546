// Causal sliding-window attention with grouped-query heads. Queries go in blocks of kBlock rows;
// a block's scores against every key one of its rows sees are one matrix product, masked to each
// row's window [pos - window, pos], softmaxed row by row and multiplied with the values. The
// products read q, k, v and their gradients in place through their row pitches (a head of
// (B, T, heads, D) is a (T, D) matrix whose rows are heads * D apart, or further in a band: every
// tensor may be a band over (B, T), such as q, k and v inside a packed projection). Only the
// log-sum-exp of each row is saved; the backward recomputes the probabilities from it. Masked
// entries are zeros in the products, so a NaN or Inf in q, k or v reaches every row of its block
// (the loss is NaN either way).
#include <algorithm>
#include <cmath>
#include <vector>

#include "backend/cpu/checks.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/gemm.h"

namespace lmtrain {

namespace {

constexpr int64_t kBlock = 64;

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

// The queries [t0, t0 + rows) at positions from `first` on, and the keys [lo, lo + keys) that
// any of them sees.
struct QueryBlock {
  int64_t t0, rows, first, lo, keys;
  QueryBlock(int64_t t0, int64_t Tq, int64_t q_offset, int window)
      : t0(t0),
        rows(std::min(kBlock, Tq - t0)),
        first(q_offset + t0),
        lo(std::max<int64_t>(0, first - window)),
        keys(first + rows - lo) {}
  // Row r sees the block's keys [begin(r), end(r)).
  int64_t begin(int64_t r, int window) const {
    return std::max<int64_t>(0, first + r - window) - lo;
  }
  int64_t end(int64_t r) const { return first + r + 1 - lo; }
};

}  // namespace

void CpuBackend::attention_forward(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v, int window,
                                   int q_offset) {
  cpu::require_dense("attention_forward", {lse});
  check_attention("attention_forward", out, lse, q, k, v, window);
  int64_t B = q.dim(0), Tq = q.dim(1), H = q.dim(2), D = q.dim(3);
  int64_t Tk = k.dim(1), Hkv = k.dim(2), group = H / Hkv;
  check(q_offset >= 0 && q_offset + Tq <= Tk,
        "attention_forward: queries at positions [{}, {}) need keys up to there, have {}", q_offset,
        q_offset + Tq, Tk);
  const float scale = 1.f / std::sqrt(float(D));
  const int64_t ldq = q.pitch(2), ldk = k.pitch(2), ldv = v.pitch(2), ldo = out.pitch(2);

#pragma omp parallel
  {
    std::vector<float> p;  // a block's probabilities, (rows, keys)
#pragma omp for collapse(2)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        const float* qh = q.f32_rows() + b * Tq * ldq + h * D;  // query t at qh + t*ldq
        const float* kg = k.f32_rows() + b * Tk * ldk + h / group * D;
        const float* vg = v.f32_rows() + b * Tk * ldv + h / group * D;
        float* oh = out.f32_rows() + b * Tq * ldo + h * D;
        float* lse_h = lse.f32() + (b * H + h) * Tq;
        for (int64_t t0 = 0; t0 < Tq; t0 += kBlock) {
          const QueryBlock blk(t0, Tq, q_offset, window);
          p.resize(size_t(blk.rows * blk.keys));
          gemm(false, true, blk.rows, blk.keys, D, scale, qh + t0 * ldq, ldq, kg + blk.lo * ldk,
               ldk, 0.f, p.data(), blk.keys);
          for (int64_t r = 0; r < blk.rows; ++r) {
            float* row = p.data() + r * blk.keys;
            const int64_t j0 = blk.begin(r, window), j1 = blk.end(r);
            const float mx = *std::max_element(row + j0, row + j1);
            double sum = 0.0;
            for (int64_t j = j0; j < j1; ++j) {
              row[j] = std::exp(row[j] - mx);
              sum += row[j];
            }
            const float inv = float(1.0 / sum);
            for (int64_t j = 0; j < blk.keys; ++j) row[j] = j >= j0 && j < j1 ? row[j] * inv : 0.f;
            lse_h[t0 + r] = mx + float(std::log(sum));
          }
          gemm(false, false, blk.rows, D, blk.keys, 1.f, p.data(), blk.keys, vg + blk.lo * ldv, ldv,
               0.f, oh + t0 * ldo, ldo);
        }
      }
    }
  }
}

// With p = softmax(s), s = scale * q.k and delta = dout.out = sum_j p_j (dout.v_j):
//   ds_j = p_j (dout.v_j - delta),  dq = scale sum_j ds_j k_j,
//   dk_j = scale sum ds_j q,  dv_j = sum p_j dout  (sums over every query row that sees key j).
// delta is summed from the same p_j and dout.v_j as ds_j, not read from out: a row that sees one
// key (window 0) then has ds = 0 exactly, as its true gradient is, and not rounding noise.
// Threads own a (batch, kv head) pair and every query head reading it, so dk and dv have a
// single writer, which adds the blocks in a fixed order.
void CpuBackend::attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor q,
                                    Tensor k, Tensor v, Tensor out, Tensor lse, int window) {
  cpu::require_dense("attention_backward", {lse});
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
  const float scale = 1.f / std::sqrt(float(D));
  const int64_t ldq = q.pitch(2), ldk = k.pitch(2), ldv = v.pitch(2), ldgo = dout.pitch(2);
  const int64_t lddq = dq.pitch(2), lddk = dk.pitch(2), lddv = dv.pitch(2);

#pragma omp parallel
  {
    std::vector<float> p, ds;  // a block's probabilities and score gradients, (rows, keys)
#pragma omp for collapse(2)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t g = 0; g < Hkv; ++g) {
        const float* kg = k.f32_rows() + b * T * ldk + g * D;  // key j at kg + j*ldk
        const float* vg = v.f32_rows() + b * T * ldv + g * D;
        float* dkg = dk.f32_rows() + b * T * lddk + g * D;
        float* dvg = dv.f32_rows() + b * T * lddv + g * D;
        for (int64_t j = 0; j < T; ++j) {
          std::fill_n(dkg + j * lddk, D, 0.f);
          std::fill_n(dvg + j * lddv, D, 0.f);
        }
        for (int64_t h = g * group; h < (g + 1) * group; ++h) {
          // Query row t of this head, in q, dout and dq.
          const float* qh = q.f32_rows() + b * T * ldq + h * D;
          const float* goh = dout.f32_rows() + b * T * ldgo + h * D;
          float* dqh = dq.f32_rows() + b * T * lddq + h * D;
          const float* lse_h = lse.f32() + (b * H + h) * T;
          for (int64_t t0 = 0; t0 < T; t0 += kBlock) {
            const QueryBlock blk(t0, T, 0, window);
            const int64_t rows = blk.rows, keys = blk.keys;
            p.resize(size_t(rows * keys));
            ds.resize(size_t(rows * keys));
            gemm(false, true, rows, keys, D, scale, qh + t0 * ldq, ldq, kg + blk.lo * ldk, ldk, 0.f,
                 p.data(), keys);
            gemm(false, true, rows, keys, D, 1.f, goh + t0 * ldgo, ldgo, vg + blk.lo * ldv, ldv,
                 0.f, ds.data(), keys);
            for (int64_t r = 0; r < rows; ++r) {
              const int64_t j0 = blk.begin(r, window), j1 = blk.end(r);
              float* pr = p.data() + r * keys;
              float* dsr = ds.data() + r * keys;  // dout.v_j until it becomes ds_j
              double delta = 0.0;
              for (int64_t j = 0; j < keys; ++j) {
                pr[j] = j >= j0 && j < j1 ? std::exp(pr[j] - lse_h[t0 + r]) : 0.f;
                delta += double(pr[j]) * dsr[j];
              }
              for (int64_t j = 0; j < keys; ++j) dsr[j] = pr[j] * (dsr[j] - float(delta));
            }
            gemm(false, false, rows, D, keys, scale, ds.data(), keys, kg + blk.lo * ldk, ldk, 0.f,
                 dqh + t0 * lddq, lddq);
            gemm(true, false, keys, D, rows, scale, ds.data(), keys, qh + t0 * ldq, ldq, 1.f,
                 dkg + blk.lo * lddk, lddk);
            gemm(true, false, keys, D, rows, 1.f, p.data(), keys, goh + t0 * ldgo, ldgo, 1.f,
                 dvg + blk.lo * lddv, lddv);
          }
        }
      }
    }
  }
}

}  // namespace lmtrain
