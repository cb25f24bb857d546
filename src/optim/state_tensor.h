// A named optimizer-state tensor, saved per parameter in checkpoints.
#pragma once

#include <string>

#include "core/tensor.h"

namespace lmtrain {

struct StateTensor {
  std::string name;  // "<state>.<parameter name>"
  Tensor tensor;
  // Rows [row_begin, row_begin + tensor rows) of a tensor with rows_total rows when the state is
  // sharded by rows across ranks; rows_total 0 means the whole tensor.
  int64_t row_begin = 0, rows_total = 0;
  // Identical on every rank (state of an all-reduced parameter): saved once, by rank 0.
  bool replicated = false;
};

}  // namespace lmtrain
