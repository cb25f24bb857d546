// What the cuDNN paths (attention_cudnn.cpp, matmul_relu2_cudnn.cpp) share: loading cuDNN, a
// handle on the backend's stream, and turning a frontend graph into an executable plan. Included
// by their .cpp files alone, so that no other header sees a cuDNN type.
#pragma once

#ifdef LMTRAIN_HAVE_CUDNN
// The frontend reaches cuDNN (and NVRTC, for engines that compile their kernels at run time)
// through dlopen: no link-time dependency, and a machine without cuDNN runs our own kernels.
#define NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING
#include <cuda_runtime.h>
#include <cudnn.h>
#include <cudnn_frontend.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/error.h"

namespace lmtrain::cuda {

namespace fe = cudnn_frontend;

// The mode an environment variable picks (LMTRAIN_CUDNN_ATTENTION, LMTRAIN_CUDNN_MLP): unset or
// empty gives `fallback`; a value not among `choices` is an error listing them (a misspelt
// setting must not run a benchmark with the default unnoticed).
template <class Mode>
Mode env_mode(const char* variable, Mode fallback,
              std::initializer_list<std::pair<const char*, Mode>> choices) {
  const char* value = std::getenv(variable);
  if (!value || !*value) return fallback;
  std::string names;
  for (const auto& [name, mode] : choices) {
    if (std::string(value) == name) return mode;
    names += (names.empty() ? "" : ", ") + std::string(name);
  }
  fail("{}={} is not one of {}", variable, value, names);
}

// A cuDNN handle whose work goes onto one stream. The first one loads libcudnn.so.9, from which
// the frontend's shim resolves every cuDNN symbol (fe::cudnn_dlhandle, defined in
// attention_cudnn.cpp). Throws Error saying what failed.
class CudnnHandle {
 public:
  explicit CudnnHandle(cudaStream_t stream) {
    if (!fe::cudnn_dlhandle) {
      for (const char* lib : {"libcudnn.so.9", "libcudnn.so"})
        if ((fe::cudnn_dlhandle = dlopen(lib, RTLD_NOW | RTLD_LOCAL))) break;
      const char* why = fe::cudnn_dlhandle ? nullptr : dlerror();
      check(fe::cudnn_dlhandle != nullptr, "cannot load libcudnn.so.9 ({})",
            why ? why : "not found");
    }
    // The shim also loads the CUDA runtime by name: point it at the major version we run on.
    ::setenv("CUDNN_FRONTEND_CUDART_LIB_NAME",
             fmt::format("libcudart.so.{}", CUDART_VERSION / 1000).c_str(), /*overwrite=*/0);
    version_ = fe::detail::get_backend_version();
    const cudnnStatus_t created = fe::detail::create_handle(&handle_);
    check(created == CUDNN_STATUS_SUCCESS, "cudnnCreate: status {}", int(created));
    const cudnnStatus_t bound = fe::detail::set_stream(handle_, stream);
    if (bound != CUDNN_STATUS_SUCCESS) {
      fe::detail::destroy_handle(handle_);
      fail("cudnnSetStream: status {}", int(bound));
    }
  }
  ~CudnnHandle() { fe::detail::destroy_handle(handle_); }
  CudnnHandle(const CudnnHandle&) = delete;
  CudnnHandle& operator=(const CudnnHandle&) = delete;

  cudnnHandle_t get() const { return handle_; }
  size_t version() const { return version_; }  // of the library loaded, e.g. 91000

 private:
  cudnnHandle_t handle_ = nullptr;
  size_t version_ = 0;
};

// A graph ready to execute and the workspace bytes it needs; no graph: cuDNN cannot run it.
struct CudnnPlan {
  std::shared_ptr<fe::graph::Graph> graph;
  int64_t workspace = 0;
};

// validate -> operation graph -> heuristics (`modes`, in order) -> support check -> plan build,
// then the plan's workspace size. With `deterministic_only`, engines cuDNN notes as
// nondeterministic (a split reduction through atomics) are left out, so that repeats of a run
// stay bit-identical. Returns "" and sets `plan` when the graph is ready to execute, else the
// first failing step and cuDNN's message (frontend exceptions included).
inline std::string build_cudnn_plan(std::shared_ptr<fe::graph::Graph> g, cudnnHandle_t handle,
                                    const std::vector<fe::HeurMode_t>& modes,
                                    bool deterministic_only, CudnnPlan& plan) {
  try {
    auto failed = [](const char* what, fe::error_t status) {
      return status.is_good() ? std::string()
                              : fmt::format("{} failed ({})", what, status.get_message());
    };
    int64_t workspace = 0;
    std::string why = failed("validate", g->validate());
    if (why.empty()) why = failed("build_operation_graph", g->build_operation_graph(handle));
    if (why.empty()) why = failed("create_execution_plans", g->create_execution_plans(modes));
    if (why.empty() && deterministic_only)
      g->deselect_numeric_notes({fe::NumericalNote_t::NONDETERMINISTIC});
    if (why.empty()) why = failed("check_support", g->check_support(handle));
    if (why.empty()) why = failed("build_plans", g->build_plans(handle));
    if (why.empty()) why = failed("get_workspace_size", g->get_workspace_size(workspace));
    if (why.empty()) plan = {std::move(g), workspace};
    return why;
  } catch (const std::exception& e) {
    return e.what();
  }
}

// Whether every pointer of a variant pack is 16-byte aligned, as cuDNN's engines need.
inline bool aligned_16(const std::unordered_map<int64_t, void*>& pack) {
  for (const auto& [uid, p] : pack)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

}  // namespace lmtrain::cuda

#endif
