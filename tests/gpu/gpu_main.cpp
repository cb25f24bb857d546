// Catch2's main() for the GPU tests. Without a visible CUDA device it stops with one line
// instead of failing every test case with the same reason; listing tests and --help still work.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <cstdio>

#include "backend/cuda/device.h"

int main(int argc, char* argv[]) {
  Catch::Session session;
  if (const int rc = session.applyCommandLine(argc, argv); rc != 0) return rc;
  const Catch::ConfigData& c = session.configData();
  const bool runs_tests =
      !(c.showHelp || c.listTests || c.listTestNamesOnly || c.listTags || c.listReporters);
  if (runs_tests && lmtrain::cuda::device_count() == 0) {
    std::fprintf(stderr,
                 "lmtrain_gpu_tests: no CUDA device is visible; the GPU tests compare the CUDA "
                 "backend with the CPU and need one (check nvidia-smi and CUDA_VISIBLE_DEVICES)\n");
    return 1;
  }
  return session.run();
}
