// Chooses the backend named by run.backend.
#pragma once

#include <memory>
#include <string>

#include "backend/backend.h"

namespace lmtrain {

// "cpu", "cuda" or "auto" (CUDA when this build has it and a GPU is present, else CPU).
// `dtype` ("bf16" | "fp32") is the CUDA backend's activation dtype; the CPU computes in fp32.
// `device` is the GPU to use (a rank's LOCAL_RANK; GPU 0 where CUDA_VISIBLE_DEVICES shows
// only one).
std::unique_ptr<Backend> make_backend(const std::string& name, const std::string& dtype,
                                      int device = 0);

// Dense bf16 peak FLOP/s of the device a backend runs on, for MFU; 0 when unknown (CPU).
double peak_flops(const Backend& backend);

}  // namespace lmtrain
