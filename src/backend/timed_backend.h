// A Backend decorator that times every op of the backend it wraps, for the op profile of
// `run.profile_steps` (train/op_profile.h writes it out).
//
// Every op is forwarded unchanged, so results are bit-identical with and without it. Between
// begin_step() and end_step(), each op is bracketed by two timing points of the wrapped backend
// (Backend::TimingEvent) and filed under a label: the phase the caller set, the op, and for
// matmuls and attention the shape. end_step() synchronizes, reads the device time between each
// pair of points and adds it to the label's totals, with the op's FLOPs (matmul, attention) or
// the bytes it moves at least (the rest). Outside a profiled step an op costs one branch.
// Memory functions (allocate, upload, download, synchronize) are forwarded untimed; buffers come
// from the wrapped backend, whose byte counts bytes_in_use() and peak_bytes() read.
#pragma once

#include <string>
#include <unordered_map>
#include <vector>

#include "backend/backend.h"

namespace lmtrain {

// The totals of one label over the profiled steps.
struct OpStats {
  std::string phase, op, key;  // key: the shape of a matmul or attention call, else empty
  int64_t calls = 0;
  double ms = 0;  // device time between the op's two timing points, summed
  // matmul: 2*M*N*K*batch; attention: GptShape::flops_per_token's convention (forward
  // 4*B*Tq*H*D*min(window, Tk), backward twice that); 0 for the rest.
  double flops = 0;
  // The other ops: the least memory traffic they need (each input read once, each output
  // written once, both for a tensor updated in place; embeddings count the rows they gather or
  // scatter, not the table); 0 for matmul and attention.
  double bytes = 0;
};

struct OpProfile {
  struct Step {
    int step;        // 1-based, as given to begin_step()
    double wall_ms;  // as given to end_step()
    double op_ms;    // the summed time of its ops
  };
  std::vector<Step> steps;   // the profiled steps
  std::vector<OpStats> ops;  // one per label, in the order the labels first ran
};

class TimedBackend final : public Backend {
 public:
  explicit TimedBackend(Backend& inner);
  Backend& inner() const { return inner_; }

  // Starts timing the ops of step `step` (1-based, for the report) under phase "other".
  void begin_step(int step);
  // Files the ops from now on under `phase` ("forward", "backward", "optimizer", ...).
  void set_phase(const std::string& phase) { phase_ = phase; }
  // Synchronizes, reads the times of the step's ops and stops timing; `wall_ms` is the step's
  // wall time as the caller measured it, kept beside the summed op time.
  void end_step(double wall_ms);
  bool timing() const { return timing_; }
  const OpProfile& profile() const { return profile_; }

  std::string name() const override { return inner_.name(); }
  DType activation_dtype() const override { return inner_.activation_dtype(); }

  Buffer allocate(size_t bytes) override { return inner_.allocate(bytes); }
  size_t free_bytes() const override { return inner_.free_bytes(); }
  void upload(Tensor dst, const void* host) override { inner_.upload(dst, host); }
  void download(void* host, Tensor src) override { inner_.download(host, src); }
  void synchronize() override { inner_.synchronize(); }

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
  size_t attention_scratch_bytes(int B, int T, int H, int Hkv, int D, int window) override {
    return inner_.attention_scratch_bytes(B, T, H, Hkv, D, window);
  }

  void relu2_forward(Tensor out, Tensor x) override;
  void relu2_backward(Tensor dx, Tensor dout, Tensor out) override;
  void matmul_relu2_forward(Tensor out, Tensor x, Tensor w) override;
  void matmul_relu2_backward(Tensor dx, Tensor dout, Tensor w, Tensor out) override;
  bool fuses_matmul_relu2() const override { return inner_.fuses_matmul_relu2(); }

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

  // Timing points are the wrapped backend's.
  TimingEvent make_timing_event() override { return inner_.make_timing_event(); }
  void record_timing_event(TimingEvent& event) override { inner_.record_timing_event(event); }
  double elapsed_ms(const TimingEvent& start, const TimingEvent& end) override {
    return inner_.elapsed_ms(start, end);
  }

 private:
  // What one call costs: FLOPs for matmul and attention, bytes (see OpStats) for the rest.
  struct Cost {
    double flops = 0, bytes = 0;
  };
  // Runs `f` (the forwarded op), bracketed by timing points under (phase, op, key) when timing.
  template <class F>
  auto timed(const char* op, const std::string& key, Cost cost, F&& f) -> decltype(f());
  // The index in profile_.ops of (phase_, op, key), added on first use.
  size_t label(const char* op, const std::string& key);

  Backend& inner_;
  bool timing_ = false;
  int current_step_ = 0;
  std::string phase_ = "other";
  OpProfile profile_;
  std::unordered_map<std::string, size_t> labels_;  // "phase\x1fop\x1fkey" -> profile_.ops
  // The current step's timing points per op call; cleared (their events back to the wrapped
  // backend's pool) once end_step() has read them.
  struct Pending {
    size_t label;
    TimingEvent start, end;
  };
  std::vector<Pending> pending_;
};

}  // namespace lmtrain
