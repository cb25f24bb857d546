// A named optimizer-state tensor, saved per parameter in checkpoints.
#pragma once

#include <string>

#include "core/tensor.h"

namespace lmtrain {

struct StateTensor {
  std::string name;  // "<state>.<parameter name>"
  Tensor tensor;
};

}  // namespace lmtrain
