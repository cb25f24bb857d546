// The host-compiled half of cuda_check.cuh: this file may use fmt, the .cu files may not.
#include "cuda_check.cuh"

#include <cstdlib>
#include <cstring>

#include "core/error.h"

namespace lmtrain::cuda {

void cuda_fail(const char* what, cudaError_t status) {
  fail("CUDA error in {}: {} ({})", what, cudaGetErrorString(status), cudaGetErrorName(status));
}

void launch_check(const char* what, cudaStream_t stream) {
  static const bool sync_each = [] {
    const char* env = std::getenv("LMTRAIN_CUDA_SYNC");
    return env != nullptr && std::strcmp(env, "0") != 0 && env[0] != '\0';
  }();
  cuda_check(cudaGetLastError(), what);
  if (sync_each) cuda_check(cudaStreamSynchronize(stream), what);
}

}  // namespace lmtrain::cuda
