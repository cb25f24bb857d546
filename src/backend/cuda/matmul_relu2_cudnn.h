// The MLP's matmul and its ReLU squared as one cuDNN graph each way, so that the activation costs
// no pass of its own over the (rows, 4C) hidden tensor: the matmul's fp32 accumulator goes
// through the pointwise ops before the one bf16 store.
//   forward:  out = relu(x @ w^T)^2          x (M,K), w (N,K), out (M,N)
//   backward: dx = (dout @ w) * 2 sqrt(out)   dout (M,K), w (K,N), out and dx (M,N)
// All bf16, dense, row-major. One graph per shape and direction, built on first use and kept; a
// shape cuDNN has no engine for is remembered and logged once. docs/CUDA.md, "MLP activation",
// says when the backend takes this path.
#pragma once

#include <cuda_runtime.h>

#include <compare>
#include <cstddef>
#include <cstdint>
#include <memory>

namespace lmtrain::cuda {

struct MatmulRelu2Shape {
  int64_t M, K, N;
  bool backward;
  auto operator<=>(const MatmulRelu2Shape&) const = default;
};

class CudnnMatmulRelu2 {
 public:
  // Null unless LMTRAIN_CUDNN_MLP asks for it (1, on or auto), and when cuDNN is not compiled in
  // or no cuDNN handle can be made (the reason is logged). Work goes onto `stream`.
  static std::unique_ptr<CudnnMatmulRelu2> create(cudaStream_t stream);
  ~CudnnMatmulRelu2();
  CudnnMatmulRelu2(const CudnnMatmulRelu2&) = delete;
  CudnnMatmulRelu2& operator=(const CudnnMatmulRelu2&) = delete;

  // out = the forward's or dx = the backward's result (see above); `hidden` is the forward's out,
  // read by the backward only. Every pointer must be 16-byte aligned (an Error if not). Returns
  // false, doing nothing, when cuDNN has no graph for the shape or the graph needs more than
  // `workspace_bytes` of workspace; the caller then runs the matmul and the relu2 kernel.
  bool run(const MatmulRelu2Shape& s, void* out, const void* a, const void* w, const void* hidden,
           void* workspace, size_t workspace_bytes);

  // LMTRAIN_CUDNN_MLP=1: take the graph wherever cuDNN has one. With "auto" the backend times
  // both paths on a shape's first call and keeps the faster.
  bool always() const;

 private:
  struct Impl;
  explicit CudnnMatmulRelu2(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace lmtrain::cuda
