// The optimizer ops on the CUDA backend: f32 parameters, gradients and state throughout.
#include "adamw.cuh"
#include "backend/cuda/checks.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/op_checks.h"
#include "muon.cuh"

namespace lmtrain {

using namespace cuda_ops;

namespace {

void check_stack(const char* op, Tensor x) {
  check(x.dtype == DType::f32 && x.shape.rank == 3,
        "{}: expected an f32 stack (K, m, n), got {} {}", op, x.shape.str(), dtype_name(x.dtype));
  // The stack kernels put the matrix index and a side's 32-wide tiles in grid.y / grid.z.
  constexpr int64_t kGridLimit = 65535;
  check(x.dim(0) <= kGridLimit && x.dim(1) <= 32 * kGridLimit && x.dim(2) <= 32 * kGridLimit,
        "{}: stack {} exceeds the kernels' launch limits ({} matrices, sides of {})", op,
        x.shape.str(), kGridLimit, 32 * kGridLimit);
}

}  // namespace

void CudaBackend::adamw_update(Tensor param, Tensor grad, Tensor m, Tensor v, const AdamWHyper& h) {
  for (Tensor t : {param, grad, m, v})
    check(t.dtype == DType::f32 && t.shape == param.shape,
          "adamw_update: param {}, grad, m and v must all be f32 of that shape, got {} {}",
          param.shape.str(), t.shape.str(), dtype_name(t.dtype));
  check(h.step >= 1, "adamw_update: step {} must be 1-based", h.step);
  const cuda::AdamWArgs args{h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.step};
  cuda::adamw_update(ptr<float>(param), ptr<float>(grad), ptr<float>(m), ptr<float>(v),
                     param.numel(), args, stream_.get());
}

void CudaBackend::muon_momentum(Tensor u, Tensor buf, Tensor grad, float mu, bool lerp,
                                bool nesterov) {
  for (Tensor t : {u, buf, grad})
    check(t.dtype == DType::f32 && t.numel() == grad.numel(),
          "muon_momentum: u, buf and grad must be f32 of {} elements, got {} {}", grad.numel(),
          t.shape.str(), dtype_name(t.dtype));
  cuda::muon_momentum(ptr<float>(u), ptr<float>(buf), ptr<float>(grad), grad.numel(), mu, lerp,
                      nesterov, stream_.get());
}

void CudaBackend::normalize_matrices(Tensor out, Tensor x, float norm_mult, float eps,
                                     bool transpose) {
  const char* op = "normalize_matrices";
  check_stack(op, x);
  check_stack_pair(op, out, x, transpose);
  check(out.dtype == DType::f32 || out.dtype == activation_, "{}: out must be f32 or {}, got {}",
        op, dtype_name(activation_), dtype_name(out.dtype));
  check(out.data != x.data || out.dtype == DType::f32, "{}: out may alias x only in f32", op);
  const int64_t K = x.dim(0), rows = x.dim(1), cols = x.dim(2);
  void* work = scratch(cuda::muon_scratch_bytes(K, rows, cols));
  dispatch(op, out.dtype, [&](auto tag) {
    using T = decltype(tag);
    cuda::normalize_matrices(ptr<T>(out), ptr<float>(x), K, rows, cols, transpose, norm_mult, eps,
                             work, stream_.get());
  });
}

void CudaBackend::transpose_matrices(Tensor out, Tensor x) {
  const char* op = "transpose_matrices";
  check_stack(op, out);
  check_stack_pair(op, out, x, true);
  check(x.dtype == DType::f32 || x.dtype == activation_, "{}: x must be f32 or {}, got {}", op,
        dtype_name(activation_), dtype_name(x.dtype));
  dispatch(op, x.dtype, [&](auto tag) {
    using T = decltype(tag);
    cuda::transpose_matrices(ptr<float>(out), ptr<T>(x), x.dim(0), x.dim(1), x.dim(2),
                             stream_.get());
  });
}

void CudaBackend::normuon_second_moment(Tensor x, Tensor state, float beta2) {
  check_stack("normuon_second_moment", x);
  const int64_t K = x.dim(0), rows = x.dim(1), cols = x.dim(2);
  const int64_t slots = rows >= cols ? rows : cols;
  check(state.dtype == DType::f32 && state.numel() == K * slots,
        "normuon_second_moment: state must be f32 (K, {}) = {} elements for x {}, got {}", slots,
        K * slots, x.shape.str(), state.shape.str());
  void* work = scratch(cuda::muon_scratch_bytes(K, rows, cols));
  cuda::normuon_second_moment(ptr<float>(x), ptr<float>(state), K, rows, cols, beta2, work,
                              stream_.get());
}

void CudaBackend::muon_apply(Tensor param, Tensor update, float lr, float decay, bool cautious) {
  check(param.dtype == DType::f32 && update.dtype == DType::f32 && param.numel() == update.numel(),
        "muon_apply: param {} and update {} must be f32 of one size", param.shape.str(),
        update.shape.str());
  cuda::muon_apply(ptr<float>(param), ptr<float>(update), param.numel(), lr, decay, cautious,
                   stream_.get());
}

}  // namespace lmtrain
