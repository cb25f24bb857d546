// The bf16 training attention through cuDNN's fused SDPA (flash attention) graphs, built with the
// cuDNN frontend and cached per shape. Same semantics as kernels/attention.cuh with q_offset 0 and
// Tq == Tk: q (B,T,H,D), k/v (B,T,Hkv,D), out (B,T,H,D) bf16 row-major; lse (B,H,T) f32, the
// natural-log log-sum-exp of the scaled scores (cuDNN's softmax "Stats"); scale 1/sqrt(D); query i
// sees keys i - window <= j <= i (window >= T - 1: plain causal); query head h reads kv head
// h / (H / Hkv). Any of the (B,T,heads,D) tensors may be a band (AttentionPitches).
//
// No cuDNN type appears here, so the backend's header stays free of cuDNN; without
// LMTRAIN_HAVE_CUDNN (no cuDNN or no frontend headers at build time) create() returns null.
// docs/CUDA.md, "Attention kernels", says when this path runs.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace lmtrain::cuda {

// Elements between consecutive tokens (b, t) of each tensor; 0: dense, heads * D. A tensor
// with more is a band of a packed q|k|v projection (or of its gradient).
struct AttentionPitches {
  int64_t q = 0, k = 0, v = 0, out = 0, dq = 0, dk = 0, dv = 0, dout = 0;
  auto operator<=>(const AttentionPitches&) const = default;
};

struct AttentionShape {
  int B, T, H, Hkv, D, window;
  AttentionPitches pitch{};
};

class CudnnAttention {
 public:
  // Device memory for a graph's workspace (the backend's grow-only scratch); valid until the
  // next call.
  using Workspace = std::function<void*(size_t bytes)>;

  // Null when cuDNN is not compiled in, LMTRAIN_CUDNN_ATTENTION=0 turns it off, or no cuDNN
  // handle can be made (the reason is logged once). Work goes onto `stream`.
  static std::unique_ptr<CudnnAttention> create(cudaStream_t stream);
  ~CudnnAttention();
  CudnnAttention(const CudnnAttention&) = delete;
  CudnnAttention& operator=(const CudnnAttention&) = delete;

  // bf16 tensors (as void*), lse f32. Return false, doing nothing, when cuDNN has no engine for
  // the shape or a pointer is not 16-byte aligned (logged once per shape); the caller then runs
  // our own kernel, which reads and writes lse the same way, so the two paths mix freely.
  bool forward(void* out, float* lse, const void* q, const void* k, const void* v,
               const AttentionShape& s, const Workspace& workspace);
  bool backward(void* dq, void* dk, void* dv, const void* dout, const void* q, const void* k,
                const void* v, const void* out, const float* lse, const AttentionShape& s,
                const Workspace& workspace);

  // The workspace bytes of the shape's forward or backward graph (built now if need be, then
  // cached for the calls above), or -1 when cuDNN has no graph for it.
  int64_t workspace_bytes(const AttentionShape& s, bool backward);

  // Whether the backward graphs ask cuDNN for its deterministic algorithm (the default;
  // LMTRAIN_CUDNN_ATTENTION=nondeterministic trades that for speed and memory).
  bool deterministic() const;

 private:
  struct Impl;
  explicit CudnnAttention(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace lmtrain::cuda
