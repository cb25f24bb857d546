// CUDA error reporting that kernel files can include. nvcc cannot compile core/error.h (fmt's
// compile-time format strings), so the throwing half lives in cuda_check.cpp, built by the host
// compiler into the same library, and raises lmtrain::Error with the operation named.
#pragma once

#include <cuda_runtime.h>

namespace lmtrain::cuda {

// Throws lmtrain::Error("CUDA error in <what>: <cudaGetErrorString(status)>").
[[noreturn]] void cuda_fail(const char* what, cudaError_t status);

inline void cuda_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) cuda_fail(what, status);
}

// Call after every kernel launch. A bad launch configuration is reported here, naming `what`.
// A fault inside a kernel surfaces only at the next synchronizing call, naming that call; with
// LMTRAIN_CUDA_SYNC=1 in the environment the stream is synchronized here, so every fault is
// reported by the kernel that caused it (slow: for debugging).
void launch_check(const char* what, cudaStream_t stream);

}  // namespace lmtrain::cuda
