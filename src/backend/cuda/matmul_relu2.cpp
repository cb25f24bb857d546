// The MLP's matmul with its ReLU squared on the CUDA backend: cuBLASLt and the relu2 kernel, or,
// when LMTRAIN_CUDNN_MLP asks for it, one cuDNN graph per direction (matmul_relu2_cudnn.h) that
// saves the relu2 kernel's pass over the hidden tensor but multiplies with cuDNN's matmul instead
// of the cuBLASLt algorithm the matmul table picked.
//
// LMTRAIN_CUDNN_MLP=1 takes the graph wherever cuDNN builds one. "auto" decides on a shape's
// first call: both paths are timed there, kRuns times each after a warm-up, and the faster is
// kept for the process, which gives up bit-identical repeats of a run (the choice may differ).
// Unset or 0: the unfused path, until measurements say which should be the default. Both compute
// in fp32; the graph rounds to bf16 once, the unfused path also rounds the matmul's output.
#include <spdlog/spdlog.h>

#include <cstdint>

#include "backend/cuda/cuda_backend.h"

namespace lmtrain {

namespace {

constexpr int kRuns = 5;

// What the graph takes: dense bf16 tensors at 16-byte aligned addresses. Checked per call and
// not remembered with the shape, so that one misaligned call does not keep the shape unfused.
bool graph_operands(std::initializer_list<Tensor> tensors) {
  for (const Tensor& t : tensors)
    if (t.dtype != DType::bf16 || !t.dense() || reinterpret_cast<uintptr_t>(t.data) % 16 != 0)
      return false;
  return true;
}

}  // namespace

void CudaBackend::matmul_relu2_forward(Tensor out, Tensor x, Tensor w) {
  const cuda::MatmulRelu2Shape s{x.dim(0), x.dim(-1), out.dim(-1), false};
  const bool shapes_fit = x.shape.rank == 2 && out.shape.rank == 2 && w.shape.rank == 2 &&
                          out.dim(0) == s.M && w.dim(0) == s.N && w.dim(1) == s.K;
  matmul_relu2(s, shapes_fit, out, x, w, Tensor{}, [&] {
    matmul(out, x, w, false, true, false);
    relu2_forward(out, out);
  });
}

void CudaBackend::matmul_relu2_backward(Tensor dx, Tensor dout, Tensor w, Tensor out) {
  const cuda::MatmulRelu2Shape s{dout.dim(0), dout.dim(-1), dx.dim(-1), true};
  const bool shapes_fit = dout.shape.rank == 2 && dx.shape.rank == 2 && w.shape.rank == 2 &&
                          out.shape == dx.shape && dx.dim(0) == s.M && w.dim(0) == s.K &&
                          w.dim(1) == s.N;
  matmul_relu2(s, shapes_fit, dx, dout, w, out, [&] {
    matmul(dx, dout, w, false, false, false);
    relu2_backward(dx, dx, out);
  });
}

void CudaBackend::matmul_relu2(const cuda::MatmulRelu2Shape& s, bool shapes_fit, Tensor out,
                               Tensor a, Tensor w, Tensor hidden,
                               const std::function<void()>& unfused) {
  // Shapes or dtypes that do not fit go the unfused way, whose ops report what is wrong.
  const bool eligible = cudnn_matmul_relu2_ && activation_ == DType::bf16 && shapes_fit &&
                        graph_operands({out, a, w}) && (!s.backward || graph_operands({hidden}));
  if (!eligible) return unfused();
  auto fused = [&] {
    return cudnn_matmul_relu2_->run(s, out.data, a.data, w.data, hidden.data, lt_workspace_.data(),
                                    lt_workspace_.bytes());
  };
  if (const auto it = matmul_relu2_fused_.find(s); it != matmul_relu2_fused_.end()) {
    if (!it->second || !fused()) unfused();
    return;
  }
  matmul_relu2_fused_[s] = choose_fused_relu2(s, fused, unfused);
}

std::optional<bool> CudaBackend::matmul_relu2_fused(const cuda::MatmulRelu2Shape& s) const {
  const auto it = matmul_relu2_fused_.find(s);
  if (it == matmul_relu2_fused_.end()) return std::nullopt;
  return it->second;
}

bool CudaBackend::choose_fused_relu2(const cuda::MatmulRelu2Shape& s,
                                     const std::function<bool()>& fused,
                                     const std::function<void()>& unfused) {
  // Whichever path is chosen has written the output when this returns.
  if (!fused()) {  // no graph for the shape: the graph's builder said why
    unfused();
    return false;
  }
  if (cudnn_matmul_relu2_->always()) return true;
  // Both paths overwrite the same output from the same inputs, so running them again is
  // harmless; the first unfused call builds its matmul plan outside the timed runs.
  unfused();
  TimingEvent start = make_timing_event(), between = make_timing_event(), end = make_timing_event();
  record_timing_event(start);
  for (int r = 0; r < kRuns; ++r) fused();
  record_timing_event(between);
  for (int r = 0; r < kRuns; ++r) unfused();
  record_timing_event(end);
  synchronize();
  const double fused_ms = elapsed_ms(start, between) / kRuns;
  const double unfused_ms = elapsed_ms(between, end) / kRuns;
  const bool faster = fused_ms < unfused_ms;
  spdlog::info(
      "matmul + relu2 {} {}x{}x{}: cuDNN graph {:.3f} ms, cuBLASLt + relu2 kernel {:.3f} ms: "
      "taking the {}",
      s.backward ? "backward" : "forward", s.M, s.N, s.K, fused_ms, unfused_ms,
      faster ? "graph" : "cuBLASLt path");
  if (faster) fused();  // the unfused runs wrote last
  return faster;
}

}  // namespace lmtrain
