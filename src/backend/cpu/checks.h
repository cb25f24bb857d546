// Argument checks shared by the CPU backend's ops that read host data.
#pragma once

#include <initializer_list>

#include "backend/backend.h"

namespace lmtrain::cpu {

// Every id in tokens names a row of table. Checked before the OpenMP loops, which must not throw.
inline void check_token_ids(const char* op, Tensor table, Tensor tokens) {
  const int32_t* ids = tokens.i32();
  for (int64_t n = 0; n < tokens.numel(); ++n)
    check(ids[n] >= 0 && ids[n] < table.dim(0),
          "{}: token id {} at position {} is outside the table of {} rows", op, ids[n], n,
          table.dim(0));
}

// Tensors the op reads as dense arrays: a band (core/tensor.h) is refused here, before the
// OpenMP loops, where Tensor::f32()'s own refusal could not be caught.
inline void require_dense(const char* op, std::initializer_list<Tensor> tensors) {
  for (const Tensor& t : tensors)
    check(t.dense(), "{}: needs dense tensors, got a band {} with rows {} apart", op, t.shape.str(),
          t.row_stride);
}

}  // namespace lmtrain::cpu
