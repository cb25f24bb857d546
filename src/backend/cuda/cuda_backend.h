// The GPU backend: the op interface of backend.h on one CUDA device and one stream, with kernels
// from kernels/ and matmuls through cuBLASLt. docs/CUDA.md describes the design.
//
// Dtypes: activations, their gradients, the model's weight copies and the logits are in the
// activation dtype (f32 for exact comparison with the CPU backend, bf16 for training); rstd,
// lse, gate and losses are f32; parameters, parameter gradients and optimizer state are f32.
// All arithmetic inside kernels is fp32.
//
// Everything is asynchronous on the backend's stream except download() and synchronize(), which
// wait for it. Ops with reductions are deterministic: the same inputs give
// bit-identical outputs on the same GPU.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/matmul_relu2_cudnn.h"
#include "backend/matmul_table.h"

namespace lmtrain {

namespace cuda {
class CudnnAttention;  // attention_cudnn.h
}

class CudaBackend final : public Backend {
 public:
  // Uses the current CUDA device. `activation` is DType::f32 or DType::bf16.
  explicit CudaBackend(DType activation);
  ~CudaBackend() override;
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  std::string name() const override { return "cuda"; }
  DType activation_dtype() const override { return activation_; }
  const std::string& device_name() const { return device_name_; }
  // The one stream every op runs on; NCCL's collectives run on a stream of their own, ordered
  // against this one with events (src/dist/nccl/).
  cudaStream_t stream() const { return stream_.get(); }

  Buffer allocate(size_t bytes) override;
  size_t free_bytes() const override;
  void upload(Tensor dst, const void* host) override;
  void download(void* host, Tensor src) override;
  void synchronize() override;

  void fill(Tensor x, float value) override;
  void copy(Tensor dst, Tensor src) override;
  void add(Tensor y, Tensor x, float alpha = 1.f) override;
  void scale(Tensor x, float alpha) override;
  void sum_squares(Tensor out, Tensor x) override;

  void matmul(Tensor out, Tensor a, Tensor b, bool trans_a, bool trans_b, bool accumulate,
              float alpha = 1.f) override;
  void matmul_add(Tensor out, Tensor a, Tensor b, bool trans_a, bool trans_b, Tensor addend,
                  float alpha = 1.f, float beta = 1.f) override;

  void embedding_forward(Tensor out, Tensor table, Tensor tokens) override;
  void embedding_backward(Tensor dtable, Tensor dout, Tensor tokens) override;

  void rmsnorm_forward(Tensor out, Tensor rstd, Tensor x) override;
  void rmsnorm_backward(Tensor dx, Tensor dout, Tensor x, Tensor rstd, Tensor residual) override;

  void norm_rope_forward(Tensor out, Tensor rstd, Tensor x, Tensor cos, Tensor sin,
                         int pos0) override;
  void norm_rope_backward(Tensor dx, Tensor dout, Tensor x, Tensor rstd, Tensor cos, Tensor sin,
                          int pos0) override;

  void attention_forward(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v, int window,
                         int q_offset) override;
  void attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor q, Tensor k,
                          Tensor v, Tensor out, Tensor lse, int window) override;
  size_t attention_scratch_bytes(int B, int T, int H, int Hkv, int D, int window) override;

  void relu2_forward(Tensor out, Tensor x) override;
  void relu2_backward(Tensor dx, Tensor dout, Tensor out) override;
  void matmul_relu2_forward(Tensor out, Tensor x, Tensor w) override;
  void matmul_relu2_backward(Tensor dx, Tensor dout, Tensor w, Tensor out) override;
  bool fuses_matmul_relu2() const override { return cudnn_matmul_relu2_ != nullptr; }
  // Whether the shape's calls run as one cuDNN graph (true) or as cuBLASLt and the relu2 kernel
  // (false); none before its first bf16 call that could take the graph.
  std::optional<bool> matmul_relu2_fused(const cuda::MatmulRelu2Shape& s) const;

  void residual_mix_norm_forward(Tensor mixed, Tensor normed, Tensor rstd, Tensor x, Tensor x0,
                                 Tensor resid, Tensor x0l, int layer) override;
  void residual_mix_norm_backward(Tensor dx, Tensor dx0, Tensor dresid, Tensor dx0l, Tensor dnormed,
                                  Tensor dmixed, Tensor x, Tensor x0, Tensor rstd, Tensor resid,
                                  Tensor x0l, int layer) override;

  void value_gate_forward(Tensor v, Tensor gate, Tensor xn, Tensor gate_w, Tensor table,
                          Tensor tokens) override;
  void value_gate_backward(Tensor dxn, Tensor dgate_w, Tensor dve, Tensor dv, Tensor xn,
                           Tensor gate_w, Tensor table, Tensor tokens, Tensor gate) override;

  void softcap_cross_entropy(Tensor logits, Tensor losses, Tensor targets, int vocab, float softcap,
                             float grad_scale) override;

  void adamw_update(Tensor param, Tensor grad, Tensor m, Tensor v, const AdamWHyper& h) override;
  void muon_momentum(Tensor u, Tensor buf, Tensor grad, float mu, bool lerp,
                     bool nesterov) override;
  void normalize_matrices(Tensor out, Tensor x, float norm_mult, float eps,
                          bool transpose) override;
  void transpose_matrices(Tensor out, Tensor x) override;
  void normuon_second_moment(Tensor x, Tensor state, float beta2) override;
  void muon_apply(Tensor param, Tensor update, float lr, float decay, bool cautious) override;

 private:
  template <typename T, auto destroy>
  struct Destroy {
    void operator()(T handle) const { destroy(handle); }
  };
  template <typename T, auto destroy>
  using Handle = std::unique_ptr<std::remove_pointer_t<T>, Destroy<T, destroy>>;
  using Stream = Handle<cudaStream_t, cudaStreamDestroy>;
  using LtHandle = Handle<cublasLtHandle_t, cublasLtDestroy>;
  using MatmulDesc = Handle<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy>;
  using Layout = Handle<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy>;

  struct MatmulPlan {
    MatmulDesc desc;
    Layout a, b, out;  // cuBLASLt's A, B and C/D (A is our b, B is our a: see matmul.cpp)
    cublasLtMatmulAlgo_t algo;
    // cuBLASLt's suggestions still to be timed on the shape's first call (tuning on), or none.
    std::vector<cublasLtMatmulAlgo_t> untimed;
  };
  MatmulPlan& matmul_plan(const MatmulShape& key);
  cublasStatus_t lt_matmul(const MatmulPlan& plan, const cublasLtMatmulAlgo_t& algo, const void* a,
                           const void* b, const void* c, void* d, float alpha, float beta);
  // Reads LMTRAIN_MATMUL_TUNING and LMTRAIN_MATMUL_TABLE, and loads the table they ask for.
  void configure_matmul_tuning();
  void tune_matmul(MatmulPlan& plan, const MatmulShape& key, const void* a, const void* b,
                   const void* c, Tensor out, float alpha, float beta);
  // out = alpha * op(a) @ op(b) + beta * addend, or + 0 when addend is empty: cuBLASLt's C is
  // addend and its D is out, which may be the same memory.
  void gemm(Tensor out, Tensor a, Tensor b, bool trans_a, bool trans_b, Tensor addend, float alpha,
            float beta);

  // The matmul with its relu2 as one cuDNN graph where that was chosen for the shape (see
  // matmul_relu2.cpp), else `unfused`: the matmul, then the relu2 kernel.
  void matmul_relu2(const cuda::MatmulRelu2Shape& s, bool shapes_fit, Tensor out, Tensor a,
                    Tensor w, Tensor hidden, const std::function<void()>& unfused);
  bool choose_fused_relu2(const cuda::MatmulRelu2Shape& s, const std::function<bool()>& fused,
                          const std::function<void()>& unfused);

  // Device scratch for the ops that need temporary memory. There is one stream, so ops never
  // overlap and can share it; it grows on demand and never shrinks.
  void* scratch(size_t bytes);

  DType activation_;
  int device_ = 0;
  std::string device_name_;
  Stream stream_;
  LtHandle lt_;
  Buffer lt_workspace_, scratch_;
  std::unordered_map<MatmulShape, MatmulPlan, MatmulShapeHash> matmul_plans_;
  // How a shape's algorithm is chosen (LMTRAIN_MATMUL_TUNING, see matmul.cpp).
  enum class MatmulTuning { heuristic, table, measure };
  MatmulTuning matmul_tuning_ = MatmulTuning::table;
  // The algorithms read from a table, and in measure mode also those timed in this process.
  std::optional<MatmulTable> matmul_table_;
  // LMTRAIN_MATMUL_TABLE in measure mode: the file rewritten after each newly timed shape.
  std::string matmul_table_out_;
  // cuDNN's fused attention with its per-shape graphs, in bf16 mode when cuDNN is available;
  // null otherwise (our own kernel runs). Declared after stream_, so it is destroyed first.
  std::unique_ptr<cuda::CudnnAttention> cudnn_attention_;
  // The MLP's matmul and relu2 as one cuDNN graph (bf16 with cuDNN, when LMTRAIN_CUDNN_MLP asks
  // for it), and per shape whether it runs rather than cuBLASLt and the relu2 kernel.
  std::unique_ptr<cuda::CudnnMatmulRelu2> cudnn_matmul_relu2_;
  std::map<cuda::MatmulRelu2Shape, bool> matmul_relu2_fused_;

  // ---- timing points (timing.cpp): cudaEvent_t recorded on stream_ ----
 public:
  TimingEvent make_timing_event() override;
  void record_timing_event(TimingEvent& event) override;
  double elapsed_ms(const TimingEvent& start, const TimingEvent& end) override;
  // CUDA events created for timing so far. A TimingEvent gives its event back to the pool when
  // destroyed and make_timing_event() takes from the pool first, so a profiled step creates
  // events only while the pool is smaller than the step needs: in its first step.
  size_t timing_events_created() const;

 private:
  struct EventPool;    // idle events; shared with the TimingEvents, which may outlive this
  struct PooledEvent;  // a TimingEvent's state: one event and the pool it returns to
  // Declared last: destroyed first, after the destructor has synchronized the stream.
  std::shared_ptr<EventPool> event_pool_;
};

}  // namespace lmtrain
