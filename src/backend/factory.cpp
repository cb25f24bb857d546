#include "backend/factory.h"

#include "backend/cpu/cpu_backend.h"

namespace lmtrain {

std::unique_ptr<Backend> make_backend(const std::string& name, const std::string& /*dtype*/) {
  if (name == "cpu" || name == "auto") return std::make_unique<CpuBackend>();
  fail("run.backend: \"{}\" is not available in this build (available: cpu, auto)", name);
}

double peak_flops(const Backend& /*backend*/) { return 0.0; }

}  // namespace lmtrain
