#include "backend/timed_backend.h"

#include <algorithm>
#include <type_traits>

namespace lmtrain {

namespace {

const std::string kNoKey;

// The bytes of `tensors`: callers list each input once, each output once, a tensor updated in
// place twice (see OpStats::bytes). An empty Tensor (an optional argument left out) counts 0; a
// band counts its elements, not the gaps between its rows.
double bytes_of(std::initializer_list<Tensor> tensors) {
  double total = 0;
  for (const Tensor& t : tensors)
    total += t.data ? double(t.numel()) * double(dtype_size(t.dtype)) : 0.0;
  return total;
}

// Shapes as backend.h defines them: out (M,N), op(a) (M,K), op(b) (K,N), or a batch of them.
int64_t batch_of(Tensor out) { return out.shape.rank == 3 ? out.dim(0) : 1; }
int64_t inner_dim(Tensor a, bool trans_a) { return trans_a ? a.dim(-2) : a.dim(-1); }

double matmul_flops(Tensor out, Tensor a, bool trans_a) {
  return 2.0 * double(batch_of(out)) * double(out.dim(-2)) * double(out.dim(-1)) *
         double(inner_dim(a, trans_a));
}

// "MxNxK NT bf16" (op(a) is MxK, op(b) KxN), "->f32" when out's dtype differs, the batch of a
// rank-3 matmul, "+=" when accumulating.
std::string matmul_key(Tensor out, Tensor a, bool trans_a, bool trans_b, bool accumulate) {
  std::string key = fmt::format("{}x{}x{} {}{} {}", out.dim(-2), out.dim(-1), inner_dim(a, trans_a),
                                trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', dtype_name(a.dtype));
  if (out.dtype != a.dtype) key += fmt::format("->{}", dtype_name(out.dtype));
  if (out.shape.rank == 3) key += fmt::format(" batch {}", out.dim(0));
  if (accumulate) key += " +=";
  return key;
}

// q (B,Tq,H,D), k (B,Tk,Hkv,D).
std::string attention_key(Tensor q, Tensor k, int window) {
  std::string key = fmt::format("B{} T{} H{} D{}", q.dim(0), q.dim(1), q.dim(2), q.dim(3));
  if (k.dim(1) != q.dim(1)) key += fmt::format(" Tk{}", k.dim(1));
  if (k.dim(2) != q.dim(2)) key += fmt::format(" Hkv{}", k.dim(2));
  return key + fmt::format(" window {}", window);
}

// GptShape::flops_per_token's convention: QK^T and PV over the whole window, min(window, Tk)
// keys per query (not the causal half), 2 FLOPs per multiply-add; the backward is twice this.
double attention_forward_flops(Tensor q, Tensor k, int window) {
  return 4.0 * double(q.dim(0)) * double(q.dim(1)) * double(q.dim(2)) * double(q.dim(3)) *
         double(std::min<int64_t>(window, k.dim(1)));
}

}  // namespace

TimedBackend::TimedBackend(Backend& inner) : inner_(inner) { share_usage(inner); }

void TimedBackend::begin_step(int step) {
  check(!timing_, "op profile: step {} begins while step {} is still being timed", step,
        current_step_);
  timing_ = true;
  current_step_ = step;
  phase_ = "other";
}

void TimedBackend::end_step(double wall_ms) {
  check(timing_, "op profile: end_step without begin_step");
  timing_ = false;
  inner_.synchronize();
  double step_ms = 0;
  for (const Pending& p : pending_) {
    const double ms = inner_.elapsed_ms(p.start, p.end);
    profile_.ops[p.label].ms += ms;
    step_ms += ms;
  }
  pending_.clear();  // the events go back to the wrapped backend's pool
  profile_.steps.push_back({current_step_, wall_ms, step_ms});
}

size_t TimedBackend::label(const char* op, const std::string& key) {
  std::string id = phase_;
  id += '\x1f';
  id += op;
  id += '\x1f';
  id += key;
  const auto [it, added] = labels_.try_emplace(std::move(id), profile_.ops.size());
  if (added) profile_.ops.push_back({phase_, op, key});
  return it->second;
}

template <class F>
auto TimedBackend::timed(const char* op, const std::string& key, Cost cost, F&& f)
    -> decltype(f()) {
  if (!timing_) return f();
  const size_t at = pending_.size();
  const size_t l = label(op, key);
  OpStats& stats = profile_.ops[l];
  ++stats.calls;
  stats.flops += cost.flops;
  stats.bytes += cost.bytes;
  pending_.push_back({l, inner_.make_timing_event(), inner_.make_timing_event()});
  inner_.record_timing_event(pending_[at].start);
  if constexpr (std::is_void_v<decltype(f())>) {
    f();
    inner_.record_timing_event(pending_[at].end);
  } else {
    auto result = f();
    inner_.record_timing_event(pending_[at].end);
    return result;
  }
}

// ---- elementwise utilities ----

void TimedBackend::fill(Tensor x, float value) {
  timed("fill", kNoKey, {0, bytes_of({x})}, [&] { inner_.fill(x, value); });
}

void TimedBackend::copy(Tensor dst, Tensor src) {
  timed("copy", kNoKey, {0, bytes_of({dst, src})}, [&] { inner_.copy(dst, src); });
}

void TimedBackend::add(Tensor y, Tensor x, float alpha) {
  timed("add", kNoKey, {0, bytes_of({y, y, x})}, [&] { inner_.add(y, x, alpha); });
}

void TimedBackend::scale(Tensor x, float alpha) {
  timed("scale", kNoKey, {0, bytes_of({x, x})}, [&] { inner_.scale(x, alpha); });
}

void TimedBackend::sum_squares(Tensor out, Tensor x) {
  timed("sum_squares", kNoKey, {0, bytes_of({x, out})}, [&] { inner_.sum_squares(out, x); });
}

// ---- matmul ----

void TimedBackend::matmul(Tensor out, Tensor a, Tensor b, bool trans_a, bool trans_b,
                          bool accumulate, float alpha) {
  auto run = [&] { inner_.matmul(out, a, b, trans_a, trans_b, accumulate, alpha); };
  if (!timing_) return run();
  timed("matmul", matmul_key(out, a, trans_a, trans_b, accumulate),
        {matmul_flops(out, a, trans_a), 0}, run);
}

void TimedBackend::matmul_add(Tensor out, Tensor a, Tensor b, bool trans_a, bool trans_b,
                              Tensor addend, float alpha, float beta) {
  auto run = [&] { inner_.matmul_add(out, a, b, trans_a, trans_b, addend, alpha, beta); };
  if (!timing_) return run();
  timed("matmul_add", matmul_key(out, a, trans_a, trans_b, false),
        {matmul_flops(out, a, trans_a), 0}, run);
}

// ---- embedding: the rows gathered or scattered, not the whole table ----

void TimedBackend::embedding_forward(Tensor out, Tensor table, Tensor tokens) {
  timed("embedding_forward", kNoKey, {0, bytes_of({out, out, tokens})},
        [&] { inner_.embedding_forward(out, table, tokens); });
}

void TimedBackend::embedding_backward(Tensor dtable, Tensor dout, Tensor tokens) {
  const double rows = double(tokens.numel()) * double(dtable.dim(-1) * dtype_size(dtable.dtype));
  timed("embedding_backward", kNoKey, {0, 2 * rows + bytes_of({dout, tokens})},
        [&] { inner_.embedding_backward(dtable, dout, tokens); });
}

// ---- normalisation and rotary embedding ----

void TimedBackend::rmsnorm_forward(Tensor out, Tensor rstd, Tensor x) {
  timed("rmsnorm_forward", kNoKey, {0, bytes_of({out, rstd, x})},
        [&] { inner_.rmsnorm_forward(out, rstd, x); });
}

void TimedBackend::rmsnorm_backward(Tensor dx, Tensor dout, Tensor x, Tensor rstd,
                                    Tensor residual) {
  timed("rmsnorm_backward", kNoKey, {0, bytes_of({dx, dout, x, rstd, residual})},
        [&] { inner_.rmsnorm_backward(dx, dout, x, rstd, residual); });
}

void TimedBackend::norm_rope_forward(Tensor out, Tensor rstd, Tensor x, Tensor cos, Tensor sin,
                                     int pos0) {
  timed("norm_rope_forward", kNoKey, {0, bytes_of({out, rstd, x})},
        [&] { inner_.norm_rope_forward(out, rstd, x, cos, sin, pos0); });
}

void TimedBackend::norm_rope_backward(Tensor dx, Tensor dout, Tensor x, Tensor rstd, Tensor cos,
                                      Tensor sin, int pos0) {
  timed("norm_rope_backward", kNoKey, {0, bytes_of({dx, dout, x, rstd})},
        [&] { inner_.norm_rope_backward(dx, dout, x, rstd, cos, sin, pos0); });
}

// ---- attention ----

void TimedBackend::attention_forward(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v,
                                     int window, int q_offset) {
  auto run = [&] { inner_.attention_forward(out, lse, q, k, v, window, q_offset); };
  if (!timing_) return run();
  timed("attention_forward", attention_key(q, k, window),
        {attention_forward_flops(q, k, window), 0}, run);
}

void TimedBackend::attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor q,
                                      Tensor k, Tensor v, Tensor out, Tensor lse, int window) {
  auto run = [&] { inner_.attention_backward(dq, dk, dv, dout, q, k, v, out, lse, window); };
  if (!timing_) return run();
  timed("attention_backward", attention_key(q, k, window),
        {2 * attention_forward_flops(q, k, window), 0}, run);
}

// ---- elementwise layers ----

void TimedBackend::relu2_forward(Tensor out, Tensor x) {
  timed("relu2_forward", kNoKey, {0, bytes_of({out, x})}, [&] { inner_.relu2_forward(out, x); });
}

void TimedBackend::relu2_backward(Tensor dx, Tensor dout, Tensor out) {
  timed("relu2_backward", kNoKey, {0, bytes_of({dx, dout, out})},
        [&] { inner_.relu2_backward(dx, dout, out); });
}

// Where the wrapped backend does not fuse them, the matmul and the relu2 op are timed apart, as
// the base class runs them through this wrapper. Fused, the call is one op, labelled and costed
// as the matmul inside (the activation adds no FLOPs worth counting).
void TimedBackend::matmul_relu2_forward(Tensor out, Tensor x, Tensor w) {
  if (!inner_.fuses_matmul_relu2()) return Backend::matmul_relu2_forward(out, x, w);
  auto run = [&] { inner_.matmul_relu2_forward(out, x, w); };
  if (!timing_) return run();
  timed("matmul_relu2_forward", matmul_key(out, x, false, true, false),
        {matmul_flops(out, x, false), 0}, run);
}

void TimedBackend::matmul_relu2_backward(Tensor dx, Tensor dout, Tensor w, Tensor out) {
  if (!inner_.fuses_matmul_relu2()) return Backend::matmul_relu2_backward(dx, dout, w, out);
  auto run = [&] { inner_.matmul_relu2_backward(dx, dout, w, out); };
  if (!timing_) return run();
  timed("matmul_relu2_backward", matmul_key(dx, dout, false, false, false),
        {matmul_flops(dx, dout, false), 0}, run);
}

void TimedBackend::residual_mix_norm_forward(Tensor mixed, Tensor normed, Tensor rstd, Tensor x,
                                             Tensor x0, Tensor resid, Tensor x0l, int layer) {
  timed("residual_mix_norm_forward", kNoKey, {0, bytes_of({mixed, normed, rstd, x, x0})},
        [&] { inner_.residual_mix_norm_forward(mixed, normed, rstd, x, x0, resid, x0l, layer); });
}

void TimedBackend::residual_mix_norm_backward(Tensor dx, Tensor dx0, Tensor dresid, Tensor dx0l,
                                              Tensor dnormed, Tensor dmixed, Tensor x, Tensor x0,
                                              Tensor rstd, Tensor resid, Tensor x0l, int layer) {
  const double bytes = bytes_of({dx, dx0, dx0, dnormed, dmixed, x, x0, rstd});
  timed("residual_mix_norm_backward", kNoKey, {0, bytes}, [&] {
    inner_.residual_mix_norm_backward(dx, dx0, dresid, dx0l, dnormed, dmixed, x, x0, rstd, resid,
                                      x0l, layer);
  });
}

// The gathered table rows count as much as v (as the embedding's gathered rows do).
void TimedBackend::value_gate_forward(Tensor v, Tensor gate, Tensor xn, Tensor gate_w, Tensor table,
                                      Tensor tokens) {
  timed("value_gate_forward", kNoKey, {0, bytes_of({v, v, gate, v, tokens})},
        [&] { inner_.value_gate_forward(v, gate, xn, gate_w, table, tokens); });
}

void TimedBackend::value_gate_backward(Tensor dxn, Tensor dgate_w, Tensor dve, Tensor dv, Tensor xn,
                                       Tensor gate_w, Tensor table, Tensor tokens, Tensor gate) {
  timed("value_gate_backward", kNoKey, {0, bytes_of({dve, dv, dv, tokens, gate})}, [&] {
    inner_.value_gate_backward(dxn, dgate_w, dve, dv, xn, gate_w, table, tokens, gate);
  });
}

void TimedBackend::softcap_cross_entropy(Tensor logits, Tensor losses, Tensor targets, int vocab,
                                         float softcap, float grad_scale) {
  // The logits are read, and overwritten with their gradient when grad_scale != 0.
  const double bytes = bytes_of({logits, losses, targets}) + (grad_scale != 0 ? logits.bytes() : 0);
  timed("softcap_cross_entropy", kNoKey, {0, bytes},
        [&] { inner_.softcap_cross_entropy(logits, losses, targets, vocab, softcap, grad_scale); });
}

// ---- optimizers: parameters, gradients and state read, and written where updated ----

void TimedBackend::adamw_update(Tensor param, Tensor grad, Tensor m, Tensor v,
                                const AdamWHyper& h) {
  timed("adamw_update", kNoKey, {0, bytes_of({param, param, grad, m, m, v, v})},
        [&] { inner_.adamw_update(param, grad, m, v, h); });
}

void TimedBackend::muon_momentum(Tensor u, Tensor buf, Tensor grad, float mu, bool lerp,
                                 bool nesterov) {
  timed("muon_momentum", kNoKey, {0, bytes_of({u, buf, buf, grad})},
        [&] { inner_.muon_momentum(u, buf, grad, mu, lerp, nesterov); });
}

void TimedBackend::normalize_matrices(Tensor out, Tensor x, float norm_mult, float eps,
                                      bool transpose) {
  timed("normalize_matrices", kNoKey, {0, bytes_of({x, x, out})},
        [&] { inner_.normalize_matrices(out, x, norm_mult, eps, transpose); });
}

void TimedBackend::transpose_matrices(Tensor out, Tensor x) {
  timed("transpose_matrices", kNoKey, {0, bytes_of({out, x})},
        [&] { inner_.transpose_matrices(out, x); });
}

void TimedBackend::normuon_second_moment(Tensor x, Tensor state, float beta2) {
  timed("normuon_second_moment", kNoKey, {0, bytes_of({x, x, x, state, state})},
        [&] { inner_.normuon_second_moment(x, state, beta2); });
}

void TimedBackend::muon_apply(Tensor param, Tensor update, float lr, float decay, bool cautious) {
  timed("muon_apply", kNoKey, {0, bytes_of({param, param, update})},
        [&] { inner_.muon_apply(param, update, lr, decay, cautious); });
}

}  // namespace lmtrain
