// The fp32 reference backend: OpenBLAS for matmuls, OpenMP loops for everything else.
// Each op's forward and backward live together in their own file in this directory.
#pragma once

#include "backend/backend.h"

namespace lmtrain {

class CpuBackend : public Backend {
 public:
  std::string name() const override { return "cpu"; }
  DType activation_dtype() const override { return DType::f32; }

  Buffer allocate(size_t bytes) override;
  void upload(Tensor dst, const void* host) override;
  void download(void* host, Tensor src) override;

  void fill(Tensor x, float value) override;
  void copy(Tensor dst, Tensor src) override;
  void add(Tensor y, Tensor x, float alpha = 1.f) override;
  void scale(Tensor x, float alpha) override;
  void sum_squares(Tensor out, Tensor x) override;

  void matmul_add(Tensor out, Tensor a, Tensor b, bool trans_a, bool trans_b, Tensor addend,
                  float alpha = 1.f, float beta = 1.f) override;
  void matmul(Tensor out, Tensor a, Tensor b, bool trans_a, bool trans_b, bool accumulate,
              float alpha = 1.f) override;

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
  size_t attention_scratch_bytes(int, int, int, int, int, int) override { return 0; }

  void relu2_forward(Tensor out, Tensor x) override;
  void relu2_backward(Tensor dx, Tensor dout, Tensor out) override;

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

  // ---- timing points (timing.cpp): the host clock, since every op has finished on return ----
  TimingEvent make_timing_event() override;
  void record_timing_event(TimingEvent& event) override;
  double elapsed_ms(const TimingEvent& start, const TimingEvent& end) override;
};

}  // namespace lmtrain
