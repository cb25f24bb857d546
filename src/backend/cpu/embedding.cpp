// Token embedding: out[n] = table[tokens[n]]; backward scatters dout rows back into the table.
#include <algorithm>
#include <cstring>

#include "backend/cpu/checks.h"
#include "backend/cpu/cpu_backend.h"

namespace lmtrain {

namespace {

// Shapes and token ids are checked up front: an exception cannot leave an OpenMP loop.
void check_embedding(const char* op, Tensor rows, Tensor table, Tensor tokens) {
  check(rows.dtype == DType::f32 && table.dtype == DType::f32 && tokens.dtype == DType::i32,
        "{}: rows and table must be f32 and tokens i32, got {}, {}, {}", op, dtype_name(rows.dtype),
        dtype_name(table.dtype), dtype_name(tokens.dtype));
  check(table.shape.rank == 2 && rows.shape.rank >= 1 && rows.dim(-1) == table.dim(1) &&
            rows.rows() == tokens.numel(),
        "{}: rows {} do not fit table {} and tokens {}", op, rows.shape.str(), table.shape.str(),
        tokens.shape.str());
  cpu::check_token_ids(op, table, tokens);
}

}  // namespace

void CpuBackend::embedding_forward(Tensor out, Tensor table, Tensor tokens) {
  cpu::require_dense("embedding_forward", {out, table, tokens});
  check_embedding("embedding_forward", out, table, tokens);
  int64_t N = out.rows(), C = table.dim(1);
  const int32_t* ids = tokens.i32();
#pragma omp parallel for
  for (int64_t n = 0; n < N; ++n)
    std::memcpy(out.f32() + n * C, table.f32() + int64_t(ids[n]) * C, size_t(C) * sizeof(float));
}

// Repeated ids make rows collide, so threads split the channels instead of the tokens: each
// element is then summed by one thread in token order, race-free and deterministic.
void CpuBackend::embedding_backward(Tensor dtable, Tensor dout, Tensor tokens) {
  cpu::require_dense("embedding_backward", {dtable, dout, tokens});
  check_embedding("embedding_backward", dout, dtable, tokens);
  int64_t N = dout.rows(), C = dtable.dim(1);
  const int32_t* ids = tokens.i32();
  constexpr int64_t kBlock = 64;
#pragma omp parallel for
  for (int64_t c0 = 0; c0 < C; c0 += kBlock) {
    int64_t c1 = std::min(C, c0 + kBlock);
    for (int64_t n = 0; n < N; ++n) {
      float* dst = dtable.f32() + int64_t(ids[n]) * C;
      const float* src = dout.f32() + n * C;
      for (int64_t c = c0; c < c1; ++c) dst[c] += src[c];
    }
  }
}

}  // namespace lmtrain
