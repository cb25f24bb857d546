// Argument checks shared by the CPU backend's ops that read host data.
#pragma once

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

}  // namespace lmtrain::cpu
