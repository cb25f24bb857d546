// c = alpha * op(a) * op(b) + beta * c on row-major matrices with leading dimensions (the
// stored row lengths), straight onto cblas_sgemm. Called inside an OpenMP loop, the OpenMP build
// of OpenBLAS runs it on the calling thread; outside, on every core.
#pragma once

#include <cblas.h>

#include <cstdint>

namespace lmtrain {

inline void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                 const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                 int64_t ldc) {
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, int(M), int(N), int(K), alpha, a, int(lda), b,
              int(ldb), beta, c, int(ldc));
}

}  // namespace lmtrain
