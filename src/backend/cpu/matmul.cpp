// out = alpha * op(a) @ op(b) (+ out), straight onto row-major cblas_sgemm (gemm.h). A batched
// (rank 3) matmul is a loop of plain ones: OpenBLAS already uses every core inside each call.
// Rank-2 operands may be bands (core/tensor.h); rank-3 ones are dense.
#include "backend/cpu/checks.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/gemm.h"
#include "backend/op_checks.h"

namespace lmtrain {

void CpuBackend::matmul(Tensor out, Tensor a, Tensor b, bool trans_a, bool trans_b, bool accumulate,
                        float alpha) {
  check(out.dtype == DType::f32 && a.dtype == DType::f32 && b.dtype == DType::f32,
        "matmul: out, a and b must be f32 on the cpu backend, got {}, {}, {}",
        dtype_name(out.dtype), dtype_name(a.dtype), dtype_name(b.dtype));
  int rank = out.shape.rank;
  check((rank == 2 || rank == 3) && a.shape.rank == rank && b.shape.rank == rank,
        "matmul: out {}, a {} and b {} must all be rank 2 or all rank 3", out.shape.str(),
        a.shape.str(), b.shape.str());
  int64_t batch = rank == 3 ? out.dim(0) : 1;
  int64_t M = trans_a ? a.dim(-1) : a.dim(-2);
  int64_t K = trans_a ? a.dim(-2) : a.dim(-1);
  int64_t N = trans_b ? b.dim(-2) : b.dim(-1);
  int64_t Kb = trans_b ? b.dim(-1) : b.dim(-2);
  check(K == Kb && out.dim(-2) == M && out.dim(-1) == N &&
            (rank == 2 || (a.dim(0) == batch && b.dim(0) == batch)),
        "matmul: a {}{} times b {}{} does not give out {}", a.shape.str(), trans_a ? "^T" : "",
        b.shape.str(), trans_b ? "^T" : "", out.shape.str());

  if (rank == 2) {
    // Leading dimensions are the row pitches, whatever the transposition: a rank-2 operand may
    // be a band of a wider array.
    gemm(trans_a, trans_b, M, N, K, alpha, a.f32_rows(), a.pitch(1), b.f32_rows(), b.pitch(1),
         accumulate ? 1.f : 0.f, out.f32_rows(), out.pitch(1));
    return;
  }
  for (int64_t i = 0; i < batch; ++i) {
    gemm(trans_a, trans_b, M, N, K, alpha, a.f32() + i * M * K, a.dim(-1), b.f32() + i * K * N,
         b.dim(-1), accumulate ? 1.f : 0.f, out.f32() + i * M * N, N);
  }
}

void CpuBackend::matmul_add(Tensor out, Tensor a, Tensor b, bool trans_a, bool trans_b,
                            Tensor addend, float alpha, float beta) {
  cpu::require_dense("matmul_add", {out, addend});
  check_matmul_addend(out, addend);
  if (out.data != addend.data) copy(out, addend);
  if (beta != 1.f) scale(out, beta);
  matmul(out, a, b, trans_a, trans_b, true, alpha);
}

}  // namespace lmtrain
