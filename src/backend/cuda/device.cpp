// What the CUDA runtime says about the GPUs of this machine.
#include "backend/cuda/device.h"

#include <cuda_runtime.h>

#include <cctype>
#include <cstring>
#include <string>

#include "core/error.h"

namespace lmtrain::cuda {

int device_count() {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status == cudaSuccess) return count;
  // No GPU, no driver at all (the runtime reports driver version 0) or only the toolkit's stub
  // of it: no CUDA device here.
  int driver = 0;
  if (status == cudaErrorNoDevice || status == cudaErrorStubLibrary ||
      cudaDriverGetVersion(&driver) != cudaSuccess || driver == 0)
    return 0;
  // A driver that is there but cannot be used is not "no GPU": training on the CPU instead
  // would be a silent hundredfold slowdown.
  int runtime = 0;
  cudaRuntimeGetVersion(&runtime);
  auto version = [](int v) { return fmt::format("{}.{}", v / 1000, v % 1000 / 10); };
  std::string remedy = "fix the driver installation";
  if (status == cudaErrorInsufficientDriver) {
    remedy =
        fmt::format("the driver supports CUDA up to {}, this build needs {}: update the driver",
                    version(driver), version(runtime));
  } else if (status == cudaErrorSystemDriverMismatch) {
    remedy = "the driver's kernel module and library differ: reboot after a driver update";
  }
  fail(
      "CUDA: cannot use the GPUs of this machine: {}; {}, or use the CPU backend "
      "(run.backend=cpu for train, --backend cpu for eval and sample)",
      cudaGetErrorString(status), remedy);
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
  // First match wins: the PCIe and NVL parts are slower than the SXM ones.
  static const Entry table[] = {{"H200 NVL", 835e12}, {"H200", 989e12}, {"H100 PCIe", 756e12},
                                {"H100 NVL", 835e12}, {"H100", 989e12}, {"H800 PCIe", 756e12},
                                {"H800", 989e12},     {"A100", 312e12}, {"L40S", 362e12},
                                {"A10", 125e12},      {"4090", 165e12}};
  // A key ends where the model number does: "A10" is not the A10G, whose peak is not listed.
  for (const auto& e : table) {
    const size_t at = name.find(e.key), end = at + std::strlen(e.key);
    if (at != std::string::npos && (end == name.size() || !std::isalnum(uint8_t(name[end]))))
      return e.flops;
  }
  return 0.0;
}

}  // namespace lmtrain::cuda
