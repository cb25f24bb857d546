// Turns CUDA runtime errors into lmtrain::Error with the operation named.
#pragma once

#include <cuda_runtime.h>

#include "core/error.h"

namespace lmtrain::cuda {

inline void cuda_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) fail("CUDA error in {}: {}", what, cudaGetErrorString(status));
}

}  // namespace lmtrain::cuda
