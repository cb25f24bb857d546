#include "model/gpt.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/rng.h"

namespace lmtrain {

namespace {

// A block's attention input projections, in the order of the packed q|k|v columns.
constexpr const char* kQkvWeights[] = {"attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight"};

// Rows [begin, begin + n) of a tensor viewed as (rows, last dimension).
Tensor rows(Tensor t, int64_t begin, int64_t n) {
  const int64_t width = t.shape[-1];
  return t.slice(begin * width, n * width).view({n, width});
}

// Rows per chunk of the fused lm_head and loss: the option, or what fits in kLossChunkBytes.
int64_t loss_chunk_rows(const GptShape& shape, int64_t N, DType act, const GptOptions& options) {
  check(options.loss_chunk_rows >= 0, "model: loss_chunk_rows must be >= 0, got {}",
        options.loss_chunk_rows);
  if (options.loss_chunk_rows > 0) return std::min(options.loss_chunk_rows, N);
  // Whole multiples of 128 rows keep the matmul tiles full.
  const int64_t fit =
      int64_t(Gpt::kLossChunkBytes / (size_t(shape.padded_vocab) * dtype_size(act)));
  return std::min(N, std::max<int64_t>(128, fit / 128 * 128));
}

}  // namespace

TensorPlan Gpt::plan(Activations& a, const GptShape& shape, int batch, DType act,
                     const GptOptions& options) {
  const int64_t N = int64_t(batch) * shape.seq_len, C = shape.width, T = shape.seq_len;
  const int64_t H = shape.n_head, Hkv = shape.n_kv_head, D = shape.head_dim;
  const DType f32 = DType::f32;
  TensorPlan plan;
  plan.add(a.tokens, {N}, DType::i32);
  plan.add(a.targets, {N}, DType::i32);
  plan.add(a.emb, {N, C}, act);
  plan.add(a.rstd_emb, {N}, f32);
  plan.add(a.x0, {N, C}, act);
  plan.add(a.xf, {N, C}, act);
  plan.add(a.rstd_f, {N}, f32);
  plan.add(a.x_mix, {N, C}, act);
  plan.add(a.logits, {loss_chunk_rows(shape, N, act, options), shape.padded_vocab}, act);
  plan.add(a.losses, {N}, f32);
  plan.add(a.rope_cos, {T, D / 2}, f32);
  plan.add(a.rope_sin, {T, D / 2}, f32);
  const bool shared = options.recompute_activations;
  a.blocks.resize(shared ? 1 : shape.depth);
  for (size_t i = 0; i < a.blocks.size(); ++i) {
    BlockActs& set = a.blocks[i];
    plan.add(set.xn1, {N, C}, act);
    plan.add(set.rstd1, {N}, f32);
    plan.add(set.qkv, {N, (H + 2 * Hkv) * D}, act);
    plan.add(set.rstd_q, {N * H}, f32);
    plan.add(set.q, {batch, T, H, D}, act);
    plan.add(set.rstd_k, {N * Hkv}, f32);
    plan.add(set.k, {batch, T, Hkv, D}, act);
    const auto& ve = shape.value_embed;
    if (shared ? std::ranges::find(ve, true) != ve.end() : bool(ve[i])) {
      plan.add(set.gate, {N, Hkv}, f32);
    }
    plan.add(set.y, {batch, T, H, D}, act);
    plan.add(set.lse, {batch, H, T}, f32);
    plan.add(set.x_mid, {N, C}, act);
    plan.add(set.xn2, {N, C}, act);
    plan.add(set.rstd2, {N}, f32);
    plan.add(set.hidden, {N, 4 * C}, act);
  }
  a.block_out.resize(shape.depth);
  for (Tensor& out : a.block_out) plan.add(out, {N, C}, act);
  for (Tensor* t : {&a.dx, &a.dx0, &a.dxf, &a.dxmid, &a.dxn}) plan.add(*t, {N, C}, act);
  plan.add(a.dhidden, {N, 4 * C}, act);
  plan.add(a.dy, {batch, T, H, D}, act);
  plan.add(a.dqkv, {N, (H + 2 * Hkv) * D}, act);
  plan.add(a.dve, {N, Hkv * D}, act);
  return plan;
}

size_t Gpt::activation_bytes(const GptShape& shape, int batch, DType dtype,
                             const GptOptions& options) {
  Activations a;
  return plan(a, shape, batch, dtype, options).bytes();
}

Gpt::Gpt(Backend& backend, const GptShape& shape, int batch, const GptOptions& options)
    : backend_(backend), shape_(shape), table_(shape), batch_(batch), options_(options) {
  check(batch >= 1, "model: batch must be >= 1, got {}", batch);
  const int64_t T = shape.seq_len, D = shape.head_dim;
  const DType act = backend.activation_dtype(), f32 = DType::f32;

  param_memory_ = backend.allocate(table_.total * sizeof(float));
  grad_memory_ = backend.allocate(table_.total * sizeof(float));
  params_ = param_memory_.tensor({int64_t(table_.total)}, f32);
  grads_ = grad_memory_.tensor({int64_t(table_.total)}, f32);
  backend.fill(params_, 0.f);  // the alignment gaps between tensors stay zero
  if (act == f32) {
    weights_ = params_;
  } else {
    weight_memory_ = backend.allocate(table_.total * dtype_size(act));
    weights_ = weight_memory_.tensor({int64_t(table_.total)}, act);
  }

  const TensorPlan planned = plan(acts_, shape, batch, act, options);
  check_fits(planned.bytes(), attention_scratch_bytes());
  act_memory_ = planned.allocate(backend);

  // RoPE tables in fp32: inv_freq = base^(-2i/D), angle = t * inv_freq.
  std::vector<float> cos_table(T * (D / 2)), sin_table(T * (D / 2));
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < D / 2; ++i) {
      float inv_freq = 1.0f / std::pow(float(shape.rope_base), float(2 * i) / float(D));
      float angle = float(t) * inv_freq;
      cos_table[t * (D / 2) + i] = std::cos(angle);
      sin_table[t * (D / 2) + i] = std::sin(angle);
    }
  }
  backend.upload(acts_.rope_cos, cos_table.data());
  backend.upload(acts_.rope_sin, sin_table.data());
}

size_t Gpt::attention_scratch_bytes() const {
  size_t most = 0;
  for (int window : shape_.windows) {
    most = std::max(most, backend_.attention_scratch_bytes(
                              batch_, int(shape_.seq_len), int(shape_.n_head),
                              int(shape_.n_kv_head), int(shape_.head_dim), window));
  }
  return most;
}

// Says what does not fit before trying: the activations and the attention's scratch scale with
// the batch.
void Gpt::check_fits(size_t bytes, size_t scratch) const {
  const size_t free = backend_.free_bytes();
  if (bytes + scratch <= free) return;
  constexpr double GiB = 1073741824.0;
  std::string remedy = "lower batch.device_batch (gradient accumulation keeps the global batch)";
  if (!options_.recompute_activations) {
    GptOptions recompute = options_;
    recompute.recompute_activations = true;
    const size_t recomputed =
        activation_bytes(shape_, batch_, backend_.activation_dtype(), recompute);
    remedy += fmt::format(
        " or set run.recompute_activations=true ({:.2f} GiB: one block's activations, "
        "recomputed in the backward)",
        recomputed / GiB);
  }
  fail(
      "out of memory: batch.device_batch {} x sequence_len {} needs {:.2f} GiB of activations "
      "and {:.2f} GiB of attention workspace, the {} device has {:.2f} GiB free after {:.2f} GiB "
      "of parameters, gradients and weights; {}",
      batch_, shape_.seq_len, bytes / GiB, scratch / GiB, backend_.name(), free / GiB,
      backend_.bytes_in_use() / GiB, remedy);
}

Tensor Gpt::w(int layer, const char* suffix) const {
  return weight("transformer.h." + std::to_string(layer) + "." + suffix);
}

void Gpt::refresh_weights() {
  if (weights_.data != params_.data) backend_.copy(weights_, params_);
}

Tensor Gpt::dw(int layer, const char* suffix) const {
  return grad(table_.find("transformer.h." + std::to_string(layer) + "." + suffix));
}

Tensor Gpt::part(Tensor packed, Part which) const {
  const int64_t H = shape_.n_head, Hkv = shape_.n_kv_head, D = shape_.head_dim;
  const int64_t first[] = {0, H, H + Hkv}, heads = which == Part::q ? H : Hkv;
  return packed.columns(first[int(which)] * D, heads * D).view({batch_, shape_.seq_len, heads, D});
}

Tensor Gpt::qkv_matrix(Tensor flat, int layer) const {
  const std::string prefix = "transformer.h." + std::to_string(layer) + ".";
  const ParamSpec &q = table_.find(prefix + kQkvWeights[0]),
                  &k = table_.find(prefix + kQkvWeights[1]),
                  &v = table_.find(prefix + kQkvWeights[2]);
  const size_t q_size = size_t(q.shape.numel()), kv_size = size_t(k.shape.numel());
  if (k.offset != q.offset + q_size || v.offset != k.offset + kv_size) return {};
  return flat.slice(int64_t(q.offset), int64_t(q_size + 2 * kv_size))
      .view({shape_.q_dim() + 2 * shape_.kv_dim(), shape_.width});
}

void Gpt::init_weights(uint64_t seed) {
  Rng rng(seed);
  std::vector<float> host(table_.total);
  const double bound = std::sqrt(3.0 / shape_.width);
  for (const auto& spec : table_.specs) {
    float* p = host.data() + spec.offset;
    const int64_t n = spec.shape.numel();
    const std::string& name = spec.name;
    auto ends_with = [&](const char* s) { return name.ends_with(s); };
    for (int64_t j = 0; j < n; ++j) {
      if (spec.group == ParamGroup::embedding) {
        p[j] = float(rng.normal());
      } else if (spec.group == ParamGroup::unembedding) {
        p[j] = float(0.001 * rng.normal());
      } else if (spec.group == ParamGroup::resid) {
        p[j] = 1.0f;
      } else if (spec.group == ParamGroup::x0) {
        p[j] = 0.1f;
      } else if (ends_with("c_proj.weight") || ends_with("ve_gate.weight")) {
        p[j] = 0.0f;  // output projections and gates start at zero: each block starts as identity
      } else {
        p[j] = float(rng.uniform(-bound, bound));  // c_q, c_k, c_v, c_fc, value embeddings
      }
    }
  }
  backend_.upload(params_, host.data());
  refresh_weights();
}

Gpt::Loss Gpt::upload_batch(std::span<const int32_t> tokens, std::span<const int32_t> targets) {
  const int64_t N = acts_.tokens.numel();
  check(int64_t(tokens.size()) == N && int64_t(targets.size()) == N,
        "model: expected {} tokens and targets (batch {} x T {}), got {} and {}", N, batch_,
        shape_.seq_len, tokens.size(), targets.size());
  const int vocab = shape_.vocab;
  Loss loss;
  for (size_t i = 0; i < tokens.size(); ++i) {
    check(tokens[i] >= 0 && tokens[i] < vocab, "model: token id {} outside the vocabulary of {}",
          tokens[i], vocab);
    check(targets[i] >= -1 && targets[i] < vocab,
          "model: target id {} outside the vocabulary of {}", targets[i], vocab);
    loss.count += targets[i] != -1;
  }
  backend_.upload(acts_.tokens, tokens.data());
  backend_.upload(acts_.targets, targets.data());
  return loss;
}

Gpt::Loss Gpt::forward(std::span<const int32_t> tokens, std::span<const int32_t> targets,
                       bool need_grad, float loss_scale) {
  Backend& b = backend_;
  Loss loss = upload_batch(tokens, targets);
  b.embedding_forward(acts_.emb, weight("transformer.wte.weight"), acts_.tokens);
  b.rmsnorm_forward(acts_.x0, acts_.rstd_emb, acts_.emb);
  for (int i = 0; i < shape_.depth; ++i) forward_block(i, /*with_output=*/true);
  b.rmsnorm_forward(acts_.xf, acts_.rstd_f, acts_.block_out.back());
  head_and_loss(need_grad, need_grad && loss.count > 0 ? loss_scale / float(loss.count) : 0.f);

  std::vector<float> host_losses(acts_.losses.numel());
  b.download(host_losses.data(), acts_.losses);
  for (float l : host_losses) loss.sum += l;
  return loss;
}

// Block i from block_in(i) into block(i). backward() recomputes a block without its output
// (the MLP's output projection), which the forward kept.
void Gpt::forward_block(int i, bool with_output) {
  Backend& b = backend_;
  const int64_t N = acts_.tokens.numel();
  const Tensor resid = param("resid_lambdas"), x0l = param("x0_lambdas");
  BlockActs& a = block(i);
  b.residual_mix_norm_forward(acts_.x_mix, a.xn1, a.rstd1, block_in(i), acts_.x0, resid, x0l, i);
  // Attention: project (one matmul where c_q, c_k and c_v lie back to back), normalise q and k
  // per head and rotate them, gate in value embeddings.
  if (const Tensor w_qkv = qkv_matrix(weights_, i); !w_qkv.empty()) {
    b.matmul(a.qkv, a.xn1, w_qkv, false, true, false);
  } else {
    int64_t column = 0;
    for (const char* name : kQkvWeights) {
      const Tensor wp = w(i, name);
      b.matmul(a.qkv.columns(column, wp.dim(0)), a.xn1, wp, false, true, false);
      column += wp.dim(0);
    }
  }
  const Tensor v = part(a.qkv, Part::v);
  if (shape_.value_embed[i]) {
    b.value_gate_forward(v.view({N, shape_.kv_dim()}), a.gate, a.xn1, w(i, "attn.ve_gate.weight"),
                         weight(value_embeds_name(i)), acts_.tokens);
  }
  b.norm_rope_forward(a.q, a.rstd_q, part(a.qkv, Part::q), acts_.rope_cos, acts_.rope_sin, 0);
  b.norm_rope_forward(a.k, a.rstd_k, part(a.qkv, Part::k), acts_.rope_cos, acts_.rope_sin, 0);
  b.attention_forward(a.y, a.lse, a.q, a.k, v, shape_.windows[i], 0);
  b.matmul_add(a.x_mid, a.y.view({N, shape_.q_dim()}), w(i, "attn.c_proj.weight"), false, true,
               acts_.x_mix);
  // MLP with ReLU squared.
  b.rmsnorm_forward(a.xn2, a.rstd2, a.x_mid);
  b.matmul_relu2_forward(a.hidden, a.xn2, w(i, "mlp.c_fc.weight"));
  if (!with_output) return;
  b.matmul_add(acts_.block_out[i], a.hidden, w(i, "mlp.c_proj.weight"), false, true, a.x_mid);
}

// The lm_head and the softcapped cross-entropy, a chunk of rows at a time. With a gradient, a
// chunk's logits turn into dlogits in place and go through the lm_head's backward at once:
// d(lm_head) += dlogits^T xf, d(xf) = dlogits lm_head.
void Gpt::head_and_loss(bool need_grad, float grad_scale) {
  Backend& b = backend_;
  const int64_t N = acts_.tokens.numel(), chunk = acts_.logits.dim(0);
  const Tensor head = weight("lm_head.weight"), dhead = grad(table_.find("lm_head.weight"));
  for (int64_t r = 0; r < N; r += chunk) {
    const int64_t n = std::min(chunk, N - r);
    const Tensor logits = rows(acts_.logits, 0, n), xf = rows(acts_.xf, r, n);
    b.matmul(logits, xf, head, false, true, false);
    b.softcap_cross_entropy(logits, acts_.losses.slice(r, n), acts_.targets.slice(r, n),
                            shape_.vocab, float(shape_.softcap), grad_scale);
    if (grad_scale == 0.f) continue;
    b.matmul(dhead, logits, xf, true, false, true);
    b.matmul(rows(acts_.dxf, r, n), logits, head, false, false, false);
  }
  if (need_grad && grad_scale == 0.f) b.fill(acts_.dxf, 0.f);  // no counted target: no gradient
}

void Gpt::logits(Tensor out) {
  backend_.matmul(out, acts_.xf, weight("lm_head.weight"), false, true, false);
}

int Gpt::grads_final_after(const ParamSpec& spec) const {
  for (const char* prefix : {"transformer.h.", "value_embeds."}) {
    if (spec.name.starts_with(prefix)) return std::stoi(spec.name.substr(std::strlen(prefix)));
  }
  return spec.group == ParamGroup::unembedding ? shape_.depth : -1;
}

void Gpt::backward(const GradsReady& ready) {
  Backend& b = backend_;
  b.rmsnorm_backward(acts_.dx, acts_.dxf, acts_.block_out.back(), acts_.rstd_f, {});
  b.fill(acts_.dx0, 0.f);
  for (int i = shape_.depth - 1; i >= 0; --i) {
    // The shared set still holds the last block's activations from the forward.
    if (options_.recompute_activations && i < shape_.depth - 1) forward_block(i, false);
    backward_block(i);
    if (ready) ready(i);
  }
  // x0 = norm(wte[tokens]), and block 0's input is x0 as well.
  b.add(acts_.dx, acts_.dx0);
  b.rmsnorm_backward(acts_.dx, acts_.dx, acts_.emb, acts_.rstd_emb, {});
  b.embedding_backward(grad(table_.find("transformer.wte.weight")), acts_.dx, acts_.tokens);
  if (ready) ready(-1);
}

// Block i's backward: acts_.dx holds d(block output) on entry and d(block input) on exit;
// d(x0) accumulates into acts_.dx0.
void Gpt::backward_block(int i) {
  Backend& b = backend_;
  const int64_t N = acts_.tokens.numel();
  const Tensor resid = param("resid_lambdas"), x0l = param("x0_lambdas");
  const Tensor dresid = grad(table_.find("resid_lambdas")), dx0l = grad(table_.find("x0_lambdas"));
  const BlockActs& a = block(i);
  Activations& d = acts_;  // the activation gradients live beside the activations
  // MLP: x_out = x_mid + hidden @ Wproj^T, hidden = relu2(norm(x_mid) @ Wfc^T). dx is d(x_out),
  // which is also the gradient of the MLP branch.
  b.matmul(dw(i, "mlp.c_proj.weight"), d.dx, a.hidden, true, false, true);
  b.matmul_relu2_backward(d.dhidden, d.dx, w(i, "mlp.c_proj.weight"), a.hidden);
  b.matmul(dw(i, "mlp.c_fc.weight"), d.dhidden, a.xn2, true, false, true);
  b.matmul(d.dxn, d.dhidden, w(i, "mlp.c_fc.weight"), false, false, false);
  b.rmsnorm_backward(d.dxmid, d.dxn, a.x_mid, a.rstd2, d.dx);  // + the MLP's skip connection
  // Attention output projection.
  b.matmul(dw(i, "attn.c_proj.weight"), d.dxmid, a.y.view({N, shape_.q_dim()}), true, false, true);
  b.matmul(d.dy.view({N, shape_.q_dim()}), d.dxmid, w(i, "attn.c_proj.weight"), false, false,
           false);
  // The gradients of q, k and v land in the packed dqkv, the raw q's and k's in place, so that
  // the projection's backward is one matmul each for the weights and the input.
  const Tensor dq = part(d.dqkv, Part::q), dk = part(d.dqkv, Part::k);
  const Tensor dv = part(d.dqkv, Part::v);
  b.attention_backward(dq, dk, dv, d.dy, a.q, a.k, part(a.qkv, Part::v), a.y, a.lse,
                       shape_.windows[i]);
  b.norm_rope_backward(dq, dq, part(a.qkv, Part::q), a.rstd_q, d.rope_cos, d.rope_sin, 0);
  b.norm_rope_backward(dk, dk, part(a.qkv, Part::k), a.rstd_k, d.rope_cos, d.rope_sin, 0);
  if (const Tensor w_qkv = qkv_matrix(weights_, i); !w_qkv.empty()) {
    b.matmul(qkv_matrix(grads_, i), d.dqkv, a.xn1, true, false, true);
    b.matmul(d.dxn, d.dqkv, w_qkv, false, false, false);
  } else {
    int64_t column = 0;
    for (const char* name : kQkvWeights) {
      const Tensor wp = w(i, name), dpart = d.dqkv.columns(column, wp.dim(0));
      b.matmul(dw(i, name), dpart, a.xn1, true, false, true);
      b.matmul(d.dxn, dpart, wp, false, false, /*accumulate=*/column > 0);
      column += wp.dim(0);
    }
  }
  if (shape_.value_embed[i]) {
    b.value_gate_backward(d.dxn, dw(i, "attn.ve_gate.weight"), d.dve, dv.view({N, shape_.kv_dim()}),
                          a.xn1, w(i, "attn.ve_gate.weight"), weight(value_embeds_name(i)),
                          d.tokens, a.gate);
    b.embedding_backward(grad(table_.find(value_embeds_name(i))), d.dve, d.tokens);
  }
  // The attention's norm, its skip connection and the residual mix: d(block input) into dx,
  // accumulating into dx0.
  b.residual_mix_norm_backward(d.dx, d.dx0, dresid, dx0l, d.dxn, d.dxmid, block_in(i), d.x0,
                               a.rstd1, resid, x0l, i);
}

}  // namespace lmtrain
