#include "backend/factory.h"

#include <cstdlib>

#include "backend/cpu/cpu_backend.h"
#ifdef LMTRAIN_HAVE_CUDA
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/device.h"
#endif

namespace lmtrain {

namespace {

#ifdef LMTRAIN_HAVE_CUDA
std::unique_ptr<Backend> make_cuda(const std::string& dtype, int device) {
  check(dtype == "bf16" || dtype == "fp32", "run.dtype: expected bf16 or fp32, got \"{}\"", dtype);
  const int count = cuda::device_count();
  // A rank whose CUDA_VISIBLE_DEVICES shows a single GPU was given its own (set per rank, or by
  // Slurm's --gpus-per-task=1): that one, whatever its local rank.
  if (count == 1 && std::getenv("CUDA_VISIBLE_DEVICES")) device = 0;
  check(device < count, "run.backend: local rank {} has no GPU of its own ({} visible)", device,
        count);
  cuda::set_device(device);
  return std::make_unique<CudaBackend>(dtype == "bf16" ? DType::bf16 : DType::f32);
}
#endif

}  // namespace

std::unique_ptr<Backend> make_backend(const std::string& name, const std::string& dtype,
                                      int device) {
  if (name == "cpu") return std::make_unique<CpuBackend>();
#ifdef LMTRAIN_HAVE_CUDA
  if (name == "cuda") {
    check(cuda::device_count() > 0, "cuda requested but no GPU is visible");
    return make_cuda(dtype, device);
  }
  if (name == "auto") {
    if (cuda::device_count() > 0) return make_cuda(dtype, device);
    return std::make_unique<CpuBackend>();
  }
  fail("unknown backend \"{}\" (available: cpu, cuda, auto)", name);
#else
  (void)device;
  if (name == "auto") return std::make_unique<CpuBackend>();
  if (name == "cuda") fail("cuda requested but this build has no CUDA support");
  fail("unknown backend \"{}\" (available: cpu, auto; this build has no CUDA)", name);
#endif
}

double peak_flops(const Backend& backend) {
#ifdef LMTRAIN_HAVE_CUDA
  if (const auto* gpu = dynamic_cast<const CudaBackend*>(&backend))
    return cuda::dense_bf16_peak_flops(gpu->device_name());
#endif
  (void)backend;
  return 0.0;
}

}  // namespace lmtrain
