// The elementwise and per-matrix pieces of the Muon family; the orthogonalizers' matmuls go
// through matmul(). Per-matrix reductions are summed in double in a fixed order.
#include <cmath>

#include "backend/cpu/checks.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/op_checks.h"

namespace lmtrain {

namespace {

void check_stack(const char* op, Tensor x) {
  check(x.dtype == DType::f32 && x.shape.rank == 3,
        "{}: expected an f32 stack (K, m, n), got {} {}", op, x.shape.str(), dtype_name(x.dtype));
}

double frobenius(const float* x, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += double(x[i]) * x[i];
  return std::sqrt(s);
}

}  // namespace

void CpuBackend::muon_momentum(Tensor u, Tensor buf, Tensor grad, float mu, bool lerp,
                               bool nesterov) {
  cpu::require_dense("muon_momentum", {u, buf, grad});
  for (Tensor t : {u, buf})
    check(t.dtype == DType::f32 && t.numel() == grad.numel(),
          "muon_momentum: u, buf and grad must be f32 of {} elements", grad.numel());
  float* up = u.f32();
  float* bp = buf.f32();
  const float* gp = grad.f32();
  const int64_t n = grad.numel();
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) {
    float g = gp[i], b = bp[i];
    if (lerp) {
      b = b + (1.f - mu) * (g - b);
      up[i] = nesterov ? g + mu * (b - g) : b;
    } else {
      b = mu * b + g;
      up[i] = nesterov ? g + mu * b : b;
    }
    bp[i] = b;
  }
}

void CpuBackend::normalize_matrices(Tensor out, Tensor x, float norm_mult, float eps,
                                    bool transpose) {
  cpu::require_dense("normalize_matrices", {out, x});
  check_stack("normalize_matrices", x);
  check_stack("normalize_matrices", out);
  check_stack_pair("normalize_matrices", out, x, transpose);
  const int64_t K = x.dim(0), rows = x.dim(1), cols = x.dim(2), size = rows * cols;
#pragma omp parallel for
  for (int64_t k = 0; k < K; ++k) {
    const float* m = x.f32() + k * size;
    float* o = out.f32() + k * size;
    const float scale = float(1.0 / (frobenius(m, size) * norm_mult + eps));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        o[transpose ? c * rows + r : r * cols + c] = m[r * cols + c] * scale;
  }
}

void CpuBackend::transpose_matrices(Tensor out, Tensor x) {
  cpu::require_dense("transpose_matrices", {out, x});
  check_stack("transpose_matrices", x);
  check_stack("transpose_matrices", out);
  check_stack_pair("transpose_matrices", out, x, true);
  const int64_t K = x.dim(0), rows = x.dim(1), cols = x.dim(2);
#pragma omp parallel for collapse(2)
  for (int64_t k = 0; k < K; ++k)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        out.f32()[(k * cols + c) * rows + r] = x.f32()[(k * rows + r) * cols + c];
}

void CpuBackend::normuon_second_moment(Tensor x, Tensor state, float beta2) {
  cpu::require_dense("normuon_second_moment", {x, state});
  check_stack("normuon_second_moment", x);
  const int64_t K = x.dim(0), rows = x.dim(1), cols = x.dim(2), size = rows * cols;
  const bool per_row = rows >= cols;
  const int64_t slots = per_row ? rows : cols;
  check(state.dtype == DType::f32 && state.numel() == K * slots,
        "normuon_second_moment: state must be f32 (K, {}) = {} elements for x {}, got {}", slots,
        K * slots, x.shape.str(), state.shape.str());
#pragma omp parallel for
  for (int64_t k = 0; k < K; ++k) {
    float* m = x.f32() + k * size;
    float* s = state.f32() + k * slots;
    const double norm_before = frobenius(m, size);
    std::vector<double> mean(slots, 0.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        mean[per_row ? r : c] += double(m[r * cols + c]) * m[r * cols + c];
    for (int64_t j = 0; j < slots; ++j) {
      float v = float(mean[j] / double(per_row ? cols : rows));
      s[j] = s[j] + (1.f - beta2) * (v - s[j]);
    }
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        m[r * cols + c] *= 1.f / std::sqrt(std::max(s[per_row ? r : c], 1e-10f));
    const double norm_after = frobenius(m, size);
    const float rescale = float(norm_before / std::max(norm_after, 1e-10));
    for (int64_t i = 0; i < size; ++i) m[i] *= rescale;
  }
}

void CpuBackend::muon_apply(Tensor param, Tensor update, float lr, float decay, bool cautious) {
  cpu::require_dense("muon_apply", {param, update});
  check(param.dtype == DType::f32 && update.dtype == DType::f32 && param.numel() == update.numel(),
        "muon_apply: param {} and update {} must be f32 of one size", param.shape.str(),
        update.shape.str());
  float* p = param.f32();
  const float* x = update.f32();
  const int64_t n = param.numel();
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) {
    if (cautious) {
      const float mask = x[i] * p[i] >= 0.f ? 1.f : 0.f;
      p[i] = p[i] - lr * x[i] - decay * p[i] * mask;
    } else {
      p[i] = p[i] * (1.f - decay) - lr * x[i];
    }
  }
}

}  // namespace lmtrain
