// cuDNN graphs for the MLP's matmul with its ReLU squared (interface in matmul_relu2_cudnn.h).
//
// The mapping onto cuDNN's matmul, which is batched over a leading dimension (here 1):
//   - A is x or dout, (1, M, K) row-major.
//   - B is the (K, N) operand: w^T in the forward, w (N,K) row-major read with strides (1, K); w
//     itself in the backward, (K,N) row-major.
//   - the product stays a virtual fp32 tensor; the pointwise ops read it and only their result,
//     (1, M, N) bf16 row-major, is stored.
//   - forward: r = relu(acc), out = r * r. backward: s = sqrt(hidden), dx = acc * (s + s): the
//     factor 2 as an addition, so that the graph needs no scalar operand.
#include "backend/cuda/matmul_relu2_cudnn.h"

#include <spdlog/spdlog.h>

#include <string>

#include "backend/cuda/cudnn_common.h"

#ifdef LMTRAIN_HAVE_CUDNN
#include <map>
#include <unordered_map>
#endif

namespace lmtrain::cuda {

#ifdef LMTRAIN_HAVE_CUDNN

namespace {

enum class Mode { off, automatic, always };

// LMTRAIN_CUDNN_MLP: unset, "0" or "off": never; "1" or "on": wherever cuDNN has a graph;
// "auto": timed against the unfused path per shape.
Mode mode_from_env() {
  return env_mode("LMTRAIN_CUDNN_MLP", Mode::off,
                  {{"0", Mode::off},
                   {"off", Mode::off},
                   {"1", Mode::always},
                   {"on", Mode::always},
                   {"auto", Mode::automatic}});
}

// Tensor uids of the variant pack.
enum Uid : int64_t { kA = 1, kW, kHidden, kOut };

std::shared_ptr<fe::graph::Tensor_attributes> bf16_tensor(fe::graph::Graph& g, const char* name,
                                                          int64_t uid, int64_t rows, int64_t cols,
                                                          int64_t row_stride, int64_t col_stride) {
  return g.tensor(fe::graph::Tensor_attributes()
                      .set_name(name)
                      .set_uid(uid)
                      .set_data_type(fe::DataType_t::BFLOAT16)
                      .set_dim({1, rows, cols})
                      .set_stride({rows * cols, row_stride, col_stride}));
}

fe::graph::Pointwise_attributes pointwise(const char* name, fe::PointwiseMode_t mode) {
  return fe::graph::Pointwise_attributes().set_name(name).set_mode(mode).set_compute_data_type(
      fe::DataType_t::FLOAT);
}

std::string describe(const MatmulRelu2Shape& s) {
  return fmt::format("{} {}x{}x{}", s.backward ? "backward" : "forward", s.M, s.N, s.K);
}

}  // namespace

struct CudnnMatmulRelu2::Impl {
  using Plan = CudnnPlan;

  // Declared before the plans: destroyed after them, whose cuDNN descriptors it made.
  std::unique_ptr<CudnnHandle> handle;
  bool always = false;
  std::map<MatmulRelu2Shape, Plan> plans;

  Plan build(const MatmulRelu2Shape& s) {
    const int64_t M = s.M, K = s.K, N = s.N;
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    auto a = bf16_tensor(*g, "a", kA, M, K, K, 1);
    auto w =
        s.backward ? bf16_tensor(*g, "w", kW, K, N, N, 1) : bf16_tensor(*g, "w_t", kW, K, N, 1, K);
    auto acc = g->matmul(a, w,
                         fe::graph::Matmul_attributes().set_name("matmul").set_compute_data_type(
                             fe::DataType_t::FLOAT));
    acc->set_data_type(fe::DataType_t::FLOAT);
    std::shared_ptr<fe::graph::Tensor_attributes> out;
    if (!s.backward) {
      auto r = g->pointwise(acc, pointwise("relu", fe::PointwiseMode_t::RELU_FWD));
      out = g->pointwise(r, r, pointwise("square", fe::PointwiseMode_t::MUL));
    } else {
      auto hidden = bf16_tensor(*g, "hidden", kHidden, M, N, N, 1);
      auto root = g->pointwise(hidden, pointwise("sqrt", fe::PointwiseMode_t::SQRT));
      auto twice = g->pointwise(root, root, pointwise("twice", fe::PointwiseMode_t::ADD));
      out = g->pointwise(acc, twice, pointwise("chain", fe::PointwiseMode_t::MUL));
    }
    out->set_output(true)
        .set_uid(kOut)
        .set_data_type(fe::DataType_t::BFLOAT16)
        .set_dim({1, M, N})
        .set_stride({M * N, N, 1});
    Plan plan;
    // Mode A's engines first, then the fallback list: a pointwise op on a side input (the
    // backward's sqrt) may have no engine under A alone. A split-K engine adding its partial
    // products with atomics would make repeats differ: deterministic engines only.
    const std::string why =
        build_cudnn_plan(g, handle->get(), {fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK},
                         /*deterministic_only=*/true, plan);
    if (!why.empty())
      spdlog::warn("cuDNN matmul + relu2 {}: {}; using cuBLASLt and the relu2 kernel for it",
                   describe(s), why);
    else
      spdlog::debug("cuDNN matmul + relu2 {}: graph built, workspace {} bytes", describe(s),
                    plan.workspace);
    return plan;
  }

  const Plan& plan(const MatmulRelu2Shape& s) {
    auto it = plans.find(s);
    if (it == plans.end()) it = plans.emplace(s, build(s)).first;
    return it->second;
  }
};

std::unique_ptr<CudnnMatmulRelu2> CudnnMatmulRelu2::create(cudaStream_t stream) {
  const Mode mode = mode_from_env();
  if (mode == Mode::off) return nullptr;
  auto impl = std::make_unique<Impl>();
  impl->always = mode == Mode::always;
  try {
    impl->handle = std::make_unique<CudnnHandle>(stream);
  } catch (const std::exception& e) {
    spdlog::warn("cuDNN matmul + relu2 unavailable ({}): cuBLASLt and the relu2 kernel", e.what());
    return nullptr;
  }
  spdlog::info("cuDNN matmul + relu2: {} (LMTRAIN_CUDNN_MLP)",
               impl->always ? "wherever cuDNN has a graph" : "where faster, timed per shape");
  return std::unique_ptr<CudnnMatmulRelu2>(new CudnnMatmulRelu2(std::move(impl)));
}

bool CudnnMatmulRelu2::run(const MatmulRelu2Shape& s, void* out, const void* a, const void* w,
                           const void* hidden, void* workspace, size_t workspace_bytes) {
  std::unordered_map<int64_t, void*> pack{
      {kOut, out}, {kA, const_cast<void*>(a)}, {kW, const_cast<void*>(w)}};
  if (s.backward) pack.emplace(kHidden, const_cast<void*>(hidden));
  check(aligned_16(pack), "cuDNN matmul + relu2 {}: a tensor is not 16-byte aligned", describe(s));
  const Impl::Plan& p = impl_->plan(s);
  if (!p.graph) return false;
  if (size_t(p.workspace) > workspace_bytes) {
    spdlog::warn(
        "cuDNN matmul + relu2 {}: the graph needs {} bytes of workspace, more than the {} "
        "at hand; using cuBLASLt and the relu2 kernel",
        describe(s), p.workspace, workspace_bytes);
    return false;
  }
  fe::error_t status = p.graph->execute(impl_->handle->get(), pack, workspace);
  check(status.is_good(), "cuDNN matmul + relu2 {}: execute failed: {}", describe(s),
        status.get_message());
  return true;
}

bool CudnnMatmulRelu2::always() const { return impl_->always; }

#else  // no cuDNN at build time: cuBLASLt and the relu2 kernel do everything.

struct CudnnMatmulRelu2::Impl {};

std::unique_ptr<CudnnMatmulRelu2> CudnnMatmulRelu2::create(cudaStream_t) { return nullptr; }

bool CudnnMatmulRelu2::run(const MatmulRelu2Shape&, void*, const void*, const void*, const void*,
                           void*, size_t) {
  return false;
}

bool CudnnMatmulRelu2::always() const { return false; }

#endif

CudnnMatmulRelu2::CudnnMatmulRelu2(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudnnMatmulRelu2::~CudnnMatmulRelu2() = default;

}  // namespace lmtrain::cuda
