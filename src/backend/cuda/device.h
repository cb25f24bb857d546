// GPU discovery for backend selection and MFU. Compiled only when the CUDA toolkit is present.
#pragma once

#include <string>

namespace lmtrain::cuda {

int device_count();
// Makes `device` current for this process; throws on failure.
void set_device(int device);
std::string device_name(int device);
// Dense bf16 peak FLOP/s for a device name (H100 and H200: 989e12); 0 when unknown.
double dense_bf16_peak_flops(const std::string& name);

}  // namespace lmtrain::cuda
