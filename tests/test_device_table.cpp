// The dense bf16 peaks behind MFU, by device name (a pure table: no GPU needed, only a CUDA
// build). The first matching entry wins, so the PCIe and NVL parts must not read as SXM ones.
#include <catch2/catch.hpp>

#ifdef LMTRAIN_HAVE_CUDA
#include "backend/cuda/device.h"

TEST_CASE("MFU peaks follow the device name with PCIe and NVL parts before SXM", "[cuda]") {
  using lmtrain::cuda::dense_bf16_peak_flops;
  CHECK(dense_bf16_peak_flops("NVIDIA H100 80GB HBM3") == 989e12);
  CHECK(dense_bf16_peak_flops("NVIDIA H100 PCIe") == 756e12);
  CHECK(dense_bf16_peak_flops("NVIDIA H100 NVL") == 835e12);
  CHECK(dense_bf16_peak_flops("NVIDIA H200") == 989e12);
  CHECK(dense_bf16_peak_flops("NVIDIA GH200 480GB") == 989e12);
  CHECK(dense_bf16_peak_flops("NVIDIA H200 NVL") == 835e12);
  CHECK(dense_bf16_peak_flops("NVIDIA H800") == 989e12);
  CHECK(dense_bf16_peak_flops("NVIDIA H800 PCIe") == 756e12);
  CHECK(dense_bf16_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12);
  CHECK(dense_bf16_peak_flops("NVIDIA A10") == 125e12);
  CHECK(dense_bf16_peak_flops("NVIDIA A10G") == 0.0);  // another part, not listed
  CHECK(dense_bf16_peak_flops("NVIDIA A100 80GB PCIe") == 312e12);
  CHECK(dense_bf16_peak_flops("NVIDIA GeForce RTX 4090") == 165e12);
  CHECK(dense_bf16_peak_flops("Some Future GPU") == 0.0);  // unknown: MFU reads n/a
}
#endif
