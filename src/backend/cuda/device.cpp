// What the CUDA runtime says about the GPUs of this machine.
#include "backend/cuda/device.h"

#include <cuda_runtime.h>

#include <string>

#include "core/error.h"

namespace lmtrain::cuda {

int device_count() {
  int count = 0;
  // No driver or no GPU both mean "no CUDA device here": the CPU backend is used.
  if (cudaGetDeviceCount(&count) != cudaSuccess) return 0;
  return count;
}

void set_device(int device) {
  const cudaError_t status = cudaSetDevice(device);
  check(status == cudaSuccess, "cannot select GPU {}: {}", device, cudaGetErrorString(status));
}

std::string device_name(int device) {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) return "unknown";
  return prop.name;
}

double dense_bf16_peak_flops(const std::string& name) {
  // Dense (not sparse) bf16 tensor-core peaks from the vendor's data sheets.
  struct Entry {
    const char* key;
    double flops;
  };
  static const Entry table[] = {{"H200", 989e12}, {"H100", 989e12}, {"A100", 312e12},
                                {"L40S", 362e12}, {"A10", 125e12},  {"4090", 165e12}};
  for (const auto& e : table) {
    if (name.find(e.key) != std::string::npos) return e.flops;
  }
  return 0.0;
}

}  // namespace lmtrain::cuda
