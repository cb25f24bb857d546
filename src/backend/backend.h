// The op interface the model and optimizers are written against. The CPU backend is the fp32
// reference implementation; the CUDA backend implements the same ops in bf16 with fp32 masters.
//
// Conventions, shared by every op:
// - Tensors are dense and row-major. Token ids are i32; statistics (rstd, lse, losses) are f32;
//   activations are in activation_dtype(); parameters, gradients and optimizer state are f32.
// - Where an op says so, a tensor may instead be a band of a wider array (core/tensor.h): q, k
//   and v are column bands of one packed (N, q_dim + 2 kv_dim) projection, so that a single
//   matmul makes them and a single one takes their gradients back. The other ops refuse bands.
// - Activation gradients are overwritten (dx = ...); parameter gradients are accumulated
//   (dW += ...), so micro-batches add up without extra passes. Where an op differs it says so.
// - Row-wise and elementwise ops (rmsnorm, norm_rope, relu2) may run in place: out may alias x in
//   the forward and dx may alias dout in the backward.
// - Shapes are checked by the backend and a mismatch throws lmtrain::Error naming the op.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "core/tensor.h"

namespace lmtrain {

// Owning memory from one backend. Move-only; freed by the deleter the backend supplied.
class Buffer {
 public:
  Buffer() = default;
  Buffer(void* ptr, size_t bytes, std::function<void(void*)> release)
      : ptr_(ptr, std::move(release)), bytes_(bytes) {}

  void* data() const { return ptr_.get(); }
  size_t bytes() const { return bytes_; }
  // A view of `shape` elements of `dtype` starting `offset_bytes` into the buffer.
  Tensor tensor(Shape shape, DType dtype, size_t offset_bytes = 0) const;

 private:
  std::unique_ptr<void, std::function<void(void*)>> ptr_;
  size_t bytes_ = 0;
};

struct AdamWHyper {
  float lr, beta1, beta2, eps, weight_decay;
  int step;  // 1-based, for bias correction
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual DType activation_dtype() const = 0;

  // ---- memory ----
  // Every Buffer comes from allocate(); implementations wrap their allocations with track().
  virtual Buffer allocate(size_t bytes) = 0;
  // Bytes the device can still hand out (the CPU reports no limit).
  virtual size_t free_bytes() const { return SIZE_MAX; }
  // Bytes held in this backend's Buffers now, and the most held at any one time.
  size_t bytes_in_use() const { return usage_->in_use; }
  size_t peak_bytes() const { return usage_->peak; }
  virtual void upload(Tensor dst, const void* host) = 0;  // dst.bytes() from host
  virtual void download(void* host, Tensor src) = 0;      // src.bytes() to host
  virtual void synchronize() {}

  // ---- elementwise utilities ----
  virtual void fill(Tensor x, float value) = 0;
  // Same numel; converts dtype. Without converting, dst and src may be bands with the same rows.
  virtual void copy(Tensor dst, Tensor src) = 0;
  virtual void add(Tensor y, Tensor x, float alpha = 1.f) = 0;  // y += alpha * x
  virtual void scale(Tensor x, float alpha) = 0;                // x *= alpha
  // out (one f32 element, e.g. a slot of a vector) = sum of x^2, accumulated in double.
  // Asynchronous like every other op: many sums go into one vector, read back by one download.
  virtual void sum_squares(Tensor out, Tensor x) = 0;

  // ---- matmul: out = alpha * op(a) @ op(b) (+ out when accumulate) ----
  // Rank 2: a (M,K) [or (K,M) with trans_a], b (K,N) [or (N,K) with trans_b], out (M,N); any of
  // the three may be a band. Rank 3: the same, dense, batched over the leading dimension.
  virtual void matmul(Tensor out, Tensor a, Tensor b, bool trans_a, bool trans_b, bool accumulate,
                      float alpha = 1.f) = 0;
  // out = alpha * op(a) @ op(b) + beta * addend, addend of out's shape and dtype (both dense): a
  // residual connection (or a polynomial's lower terms) in one pass, where copying addend into out
  // and accumulating would take two or three.
  virtual void matmul_add(Tensor out, Tensor a, Tensor b, bool trans_a, bool trans_b, Tensor addend,
                          float alpha = 1.f, float beta = 1.f) = 0;

  // ---- embedding: out (N,C) = table[tokens]; dtable[tokens] += dout ----
  virtual void embedding_forward(Tensor out, Tensor table, Tensor tokens) = 0;
  virtual void embedding_backward(Tensor dtable, Tensor dout, Tensor tokens) = 0;

  // ---- RMSNorm without weight over the last dimension; rstd (rows) f32 is saved ----
  virtual void rmsnorm_forward(Tensor out, Tensor rstd, Tensor x) = 0;
  // dx = the gradient through the norm, plus `residual` unless it is empty: the gradient of a
  // skip connection around the norm's branch, joined in the same pass. dx may alias dout or
  // residual.
  virtual void rmsnorm_backward(Tensor dx, Tensor dout, Tensor x, Tensor rstd, Tensor residual) = 0;

  // ---- per-head RMSNorm, then rotary embedding (half-split), on queries or keys ----
  // x (B,T,H,D): out = rope(x * rstd) with rstd (B*T*H) f32 saved; cos/sin are (T_max, D/2) f32
  // tables and row t sits at position pos0 + t. The rotation keeps norms, so this is RMSNorm of
  // the rotated x in one pass. out may alias x; dx may alias dout. Every (B,T,H,D) tensor may be
  // a band over (B, T).
  virtual void norm_rope_forward(Tensor out, Tensor rstd, Tensor x, Tensor cos, Tensor sin,
                                 int pos0) = 0;
  virtual void norm_rope_backward(Tensor dx, Tensor dout, Tensor x, Tensor rstd, Tensor cos,
                                  Tensor sin, int pos0) = 0;

  // ---- causal attention with a sliding window, GQA ----
  // q (B,Tq,H,D), k/v (B,Tk,Hkv,D), out (B,Tq,H,D), lse (B,H,Tq) f32. Query t sits at absolute
  // position q_offset + t and sees keys j with pos - window <= j <= pos. Scale 1/sqrt(D). q, k,
  // v, out and their gradients may be bands over (B, T).
  virtual void attention_forward(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v, int window,
                                 int q_offset) = 0;
  // dq, dk, dv overwritten (Tq == Tk, q_offset 0: training only).
  virtual void attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor q, Tensor k,
                                  Tensor v, Tensor out, Tensor lse, int window) = 0;
  // Bytes of device scratch that training attention (Tq == Tk == T) takes at this shape, with
  // dense tensors or as the model passes them (v, dq, dk, dv bands of the packed projection), so
  // that a model counts them before it runs: cuDNN's workspace on the CUDA backend (B·H·T² · 2
  // bytes for the deterministic backward on Hopper), 0 where the ops need none.
  virtual size_t attention_scratch_bytes(int B, int T, int H, int Hkv, int D, int window) = 0;

  // ---- ReLU squared: out = max(x, 0)^2 ----
  virtual void relu2_forward(Tensor out, Tensor x) = 0;
  // dx = 2 sqrt(out) dout, from the forward's output rather than its input: max(x, 0) is
  // sqrt(out), so the forward may run in place and the model keeps one hidden buffer, not two.
  virtual void relu2_backward(Tensor dx, Tensor dout, Tensor out) = 0;
  // The MLP's ends around it, which a backend may fuse with it so that the activation costs no
  // pass of its own: out = relu2(x @ w^T), and dx = relu2_backward(dout @ w, out) (x, dout, out,
  // dx dense rank 2; w the (out features, in features) weight). Here: the matmul, then the op.
  // For training's few fixed shapes: a backend may build and time a fused kernel per shape, so
  // the generator, whose row count changes every call, keeps the two ops.
  virtual void matmul_relu2_forward(Tensor out, Tensor x, Tensor w) {
    matmul(out, x, w, false, true, false);
    relu2_forward(out, out);
  }
  virtual void matmul_relu2_backward(Tensor dx, Tensor dout, Tensor w, Tensor out) {
    matmul(dx, dout, w, false, false, false);
    relu2_backward(dx, dx, out);
  }
  // Whether the two above may run as one kernel here (else they are the matmul and the op).
  virtual bool fuses_matmul_relu2() const { return false; }

  // ---- residual mix, then RMSNorm: the top of every block ----
  // mixed = resid[layer] * x + x0l[layer] * x0; normed = rmsnorm(mixed) with rstd saved. mixed
  // may not alias x or x0.
  virtual void residual_mix_norm_forward(Tensor mixed, Tensor normed, Tensor rstd, Tensor x,
                                         Tensor x0, Tensor resid, Tensor x0l, int layer) = 0;
  // Backward through both. dmixed is the gradient mixed receives besides the norm (the block's
  // skip connection): g = rmsnorm_backward(dnormed) + dmixed, dx = resid[layer] * g (overwritten),
  // dx0 += x0l[layer] * g, dresid[layer] += sum(g * x), dx0l[layer] += sum(g * x0). mixed is
  // recomputed from x and x0 rather than read. dx may alias dnormed or dmixed.
  virtual void residual_mix_norm_backward(Tensor dx, Tensor dx0, Tensor dresid, Tensor dx0l,
                                          Tensor dnormed, Tensor dmixed, Tensor x, Tensor x0,
                                          Tensor rstd, Tensor resid, Tensor x0l, int layer) = 0;

  // ---- value-embedding gate: v (N,Hkv*D) += gate * ve, gate = 2*sigmoid(xn[:, :G] @ gate_w^T)
  // ---- ve is row tokens[n] of table (V,Hkv*D), read in place (no gathered copy); xn (N,C),
  // gate_w (Hkv,G), gate (N,Hkv) f32 saved for backward. Backward: dxn[:, :G] += ...;
  // dgate_w += ...; dve = gate * dv (overwritten): the gradient of the gathered rows, which
  // embedding_backward scatters into the table's gradient. v and dv may be bands.
  virtual void value_gate_forward(Tensor v, Tensor gate, Tensor xn, Tensor gate_w, Tensor table,
                                  Tensor tokens) = 0;
  virtual void value_gate_backward(Tensor dxn, Tensor dgate_w, Tensor dve, Tensor dv, Tensor xn,
                                   Tensor gate_w, Tensor table, Tensor tokens, Tensor gate) = 0;

  // ---- softcapped cross-entropy over the first `vocab` columns of logits (N,Vp) ----
  // losses (N) f32 gets -log softmax(cap*tanh(z/cap))[target], 0 where target == -1.
  // When grad_scale != 0, logits are overwritten with d(grad_scale * sum(losses))/dz
  // (padded columns and ignored rows get 0).
  virtual void softcap_cross_entropy(Tensor logits, Tensor losses, Tensor targets, int vocab,
                                     float softcap, float grad_scale) = 0;

  // ---- optimizers (f32 param, grad and state) ----
  // AdamW with decoupled weight decay and bias correction, as torch.optim.AdamW.
  virtual void adamw_update(Tensor param, Tensor grad, Tensor m, Tensor v, const AdamWHyper& h) = 0;

  // Muon momentum over a stack (K,m,n). lerp: buf = lerp(buf, g, 1-mu), u = nesterov ?
  // lerp(g, buf, mu) : buf. classic: buf = mu*buf + g, u = nesterov ? g + mu*buf : buf.
  virtual void muon_momentum(Tensor u, Tensor buf, Tensor grad, float mu, bool lerp,
                             bool nesterov) = 0;
  // Per matrix of x (K,m,n) f32: out = x / (||x||_F * norm_mult + eps), out (K,m,n) or, with
  // transpose, (K,n,m), in f32 or the activation dtype (the orthogonalizer's work dtype): the
  // copy into the work buffer in the same pass. out may alias x when neither transposed nor
  // converted.
  virtual void normalize_matrices(Tensor out, Tensor x, float norm_mult, float eps,
                                  bool transpose) = 0;
  // out (K,n,m) f32 = the transpose of each matrix of x (K,m,n), x in f32 or the activation dtype.
  virtual void transpose_matrices(Tensor out, Tensor x) = 0;
  // NorMuon's second moment, in place on x (K,m,n): state (K,m) tracks mean(x^2) per row, or
  // state (K,n) per column; state = lerp(state, mean, 1-beta2); x *= rsqrt(max(state, 1e-10));
  // then each matrix is rescaled to the Frobenius norm it had on entry.
  virtual void normuon_second_moment(Tensor x, Tensor state, float beta2) = 0;
  // The Muon update of one matrix. cautious: p -= lr*x + decay*p where x*p >= 0;
  // otherwise: p = p*(1 - decay) - lr*x.
  virtual void muon_apply(Tensor param, Tensor update, float lr, float decay, bool cautious) = 0;

  // ---- timing points: device-side timestamps for the op profile (backend/timed_backend.h) ----
  // A TimingEvent is a point in this backend's queue of work: record_timing_event() places it
  // after everything queued so far, and once synchronize() has returned after two were recorded,
  // elapsed_ms() gives the time the device took from the first to the second. The CPU runs each
  // op before returning and reads the host clock; the CUDA backend records a cudaEvent_t on its
  // stream, taken from a pool that the event returns to when destroyed. An event is used only
  // with the backend that made it.
  class TimingEvent {
   public:
    // What a backend keeps per event (a host time, a pooled CUDA event); released with it.
    struct State {
      virtual ~State() = default;
    };
    TimingEvent() = default;
    explicit TimingEvent(std::unique_ptr<State> state) : state_(std::move(state)) {}
    State* state() const { return state_.get(); }

   private:
    std::unique_ptr<State> state_;  // move-only
  };
  virtual TimingEvent make_timing_event() = 0;
  virtual void record_timing_event(TimingEvent& event) = 0;
  virtual double elapsed_ms(const TimingEvent& start, const TimingEvent& end) = 0;

 protected:
  // For a decorator that allocates through the backend it wraps (TimedBackend): its
  // bytes_in_use() and peak_bytes() then read the wrapped backend's counts, the true ones.
  void share_usage(const Backend& inner) { usage_ = inner.usage_; }
  // A Buffer over a fresh allocation whose release also updates the byte counts.
  Buffer track(void* ptr, size_t bytes, std::function<void(void*)> release);

 private:
  struct Usage {
    size_t in_use = 0, peak = 0;
  };
  // Shared with the deleters, so a Buffer outliving its backend stays safe.
  std::shared_ptr<Usage> usage_ = std::make_shared<Usage>();
};

}  // namespace lmtrain
