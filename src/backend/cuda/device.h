// GPU discovery for backend selection and MFU. Compiled only when the CUDA toolkit is present.
#pragma once

#include <string>

namespace lmtrain::cuda {

// GPUs visible to this process; 0 without a GPU or without a driver. Throws when a driver is
// there but cannot be used (too old for this build, a broken install).
int device_count();
// Makes `device` current for this process; throws on failure.
void set_device(int device);
std::string device_name(int device);
// Dense bf16 peak FLOP/s for a device name (H100 SXM and H200: 989e12); 0 when unknown.
double dense_bf16_peak_flops(const std::string& name);

}  // namespace lmtrain::cuda
