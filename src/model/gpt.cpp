#include "model/gpt.h"

#include <cmath>

#include "backend/tensor_plan.h"
#include "core/rng.h"

namespace lmtrain {

Gpt::Gpt(Backend& backend, const GptShape& shape, int batch)
    : backend_(backend), shape_(shape), table_(shape), batch_(batch) {
  check(batch >= 1, "model: batch must be >= 1, got {}", batch);
  const int64_t N = int64_t(batch) * shape.seq_len, C = shape.width, T = shape.seq_len;
  const int64_t H = shape.n_head, Hkv = shape.n_kv_head, D = shape.head_dim;
  const DType act = backend.activation_dtype(), f32 = DType::f32;

  param_memory_ = backend.allocate(table_.total * sizeof(float));
  grad_memory_ = backend.allocate(table_.total * sizeof(float));
  params_ = param_memory_.tensor({int64_t(table_.total)}, f32);
  grads_ = grad_memory_.tensor({int64_t(table_.total)}, f32);
  if (act == f32) {
    weights_ = params_;
  } else {
    weight_memory_ = backend.allocate(table_.total * dtype_size(act));
    weights_ = weight_memory_.tensor({int64_t(table_.total)}, act);
  }

  TensorPlan plan;
  plan.add(tokens_, {N}, DType::i32);
  plan.add(targets_, {N}, DType::i32);
  plan.add(emb_, {N, C}, act);
  plan.add(rstd_emb_, {N}, f32);
  plan.add(x0_, {N, C}, act);
  plan.add(xf_, {N, C}, act);
  plan.add(rstd_f_, {N}, f32);
  plan.add(logits_, {N, shape.padded_vocab}, act);
  plan.add(losses_, {N}, f32);
  plan.add(rope_cos_, {T, D / 2}, f32);
  plan.add(rope_sin_, {T, D / 2}, f32);
  layers_.resize(shape.depth);
  for (int i = 0; i < shape.depth; ++i) {
    LayerActs& a = layers_[i];
    plan.add(a.x_mix, {N, C}, act);
    plan.add(a.xn1, {N, C}, act);
    plan.add(a.rstd1, {N}, f32);
    plan.add(a.q_raw, {batch, T, H, D}, act);
    plan.add(a.rstd_q, {N * H}, f32);
    plan.add(a.q, {batch, T, H, D}, act);
    plan.add(a.k_raw, {batch, T, Hkv, D}, act);
    plan.add(a.rstd_k, {N * Hkv}, f32);
    plan.add(a.k, {batch, T, Hkv, D}, act);
    plan.add(a.v, {batch, T, Hkv, D}, act);
    if (shape.value_embed[i]) {
      plan.add(a.ve, {N, Hkv * D}, act);
      plan.add(a.gate, {N, Hkv}, f32);
    }
    plan.add(a.y, {batch, T, H, D}, act);
    plan.add(a.lse, {batch, H, T}, f32);
    plan.add(a.x_mid, {N, C}, act);
    plan.add(a.xn2, {N, C}, act);
    plan.add(a.rstd2, {N}, f32);
    plan.add(a.fc, {N, 4 * C}, act);
    plan.add(a.act, {N, 4 * C}, act);
    plan.add(a.x_out, {N, C}, act);
  }
  plan.add(dx_, {N, C}, act);
  plan.add(dx0_, {N, C}, act);
  plan.add(dtmp_, {N, C}, act);
  plan.add(dxmid_, {N, C}, act);
  plan.add(dxn_, {N, C}, act);
  plan.add(dhidden_, {N, 4 * C}, act);
  plan.add(dy_, {batch, T, H, D}, act);
  plan.add(dq_, {batch, T, H, D}, act);
  plan.add(dk_, {batch, T, Hkv, D}, act);
  plan.add(dv_, {batch, T, Hkv, D}, act);
  plan.add(dve_, {N, Hkv * D}, act);
  // Say what does not fit before trying: the activations scale with the batch.
  const size_t free = backend.free_bytes();
  check(plan.bytes() <= free,
        "out of memory: batch.device_batch {} x sequence_len {} needs {:.2f} GiB of activations, "
        "the {} device has {:.2f} GiB free after {:.2f} GiB of parameters, gradients and weights; "
        "lower batch.device_batch (gradient accumulation keeps the global batch)",
        batch, shape.seq_len, plan.bytes() / 1073741824.0, backend.name(), free / 1073741824.0,
        backend.bytes_in_use() / 1073741824.0);
  act_memory_ = plan.allocate(backend);

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
  backend.upload(rope_cos_, cos_table.data());
  backend.upload(rope_sin_, sin_table.data());
  host_tokens_.resize(N);
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

Gpt::Loss Gpt::forward(std::span<const int32_t> tokens, std::span<const int32_t> targets,
                       bool need_grad, float loss_scale) {
  const int64_t N = tokens_.numel();
  check(int64_t(tokens.size()) == N && int64_t(targets.size()) == N,
        "model: expected {} tokens and targets (batch {} x T {}), got {} and {}", N, batch_,
        shape_.seq_len, tokens.size(), targets.size());
  Backend& b = backend_;
  const int vocab = shape_.vocab;
  Loss loss;
  for (size_t i = 0; i < tokens.size(); ++i) {
    check(tokens[i] >= 0 && tokens[i] < vocab, "model: token id {} outside the vocabulary of {}",
          tokens[i], vocab);
    check(targets[i] >= -1 && targets[i] < vocab,
          "model: target id {} outside the vocabulary of {}", targets[i], vocab);
    loss.count += targets[i] != -1;
  }
  b.upload(tokens_, tokens.data());
  b.upload(targets_, targets.data());
  host_tokens_.assign(tokens.begin(), tokens.end());

  const Tensor resid = param("resid_lambdas"), x0l = param("x0_lambdas");
  b.embedding_forward(emb_, weight("transformer.wte.weight"), tokens_);
  b.rmsnorm_forward(x0_, rstd_emb_, emb_);
  Tensor x = x0_;
  for (int i = 0; i < shape_.depth; ++i) {
    LayerActs& a = layers_[i];
    a.x_in = x;
    b.residual_mix_forward(a.x_mix, x, x0_, resid, x0l, i);
    b.rmsnorm_forward(a.xn1, a.rstd1, a.x_mix);
    // Attention: project, rotate, normalise q and k per head, gate in value embeddings.
    b.matmul(a.q_raw.view({N, shape_.q_dim()}), a.xn1, w(i, "attn.c_q.weight"), false, true, false);
    b.matmul(a.k_raw.view({N, shape_.kv_dim()}), a.xn1, w(i, "attn.c_k.weight"), false, true,
             false);
    b.matmul(a.v.view({N, shape_.kv_dim()}), a.xn1, w(i, "attn.c_v.weight"), false, true, false);
    if (shape_.value_embed[i]) {
      b.embedding_forward(a.ve, weight("value_embeds." + std::to_string(i) + ".weight"), tokens_);
      b.value_gate_forward(a.v.view({N, shape_.kv_dim()}), a.gate, a.xn1,
                           w(i, "attn.ve_gate.weight"), a.ve);
    }
    b.rope_forward(a.q_raw, rope_cos_, rope_sin_, 0);
    b.rope_forward(a.k_raw, rope_cos_, rope_sin_, 0);
    b.rmsnorm_forward(a.q, a.rstd_q, a.q_raw);
    b.rmsnorm_forward(a.k, a.rstd_k, a.k_raw);
    b.attention_forward(a.y, a.lse, a.q, a.k, a.v, shape_.windows[i], 0);
    b.copy(a.x_mid, a.x_mix);
    b.matmul(a.x_mid, a.y.view({N, shape_.q_dim()}), w(i, "attn.c_proj.weight"), false, true, true);
    // MLP with ReLU squared.
    b.rmsnorm_forward(a.xn2, a.rstd2, a.x_mid);
    b.matmul(a.fc, a.xn2, w(i, "mlp.c_fc.weight"), false, true, false);
    b.relu2_forward(a.act, a.fc);
    b.copy(a.x_out, a.x_mid);
    b.matmul(a.x_out, a.act, w(i, "mlp.c_proj.weight"), false, true, true);
    x = a.x_out;
  }
  b.rmsnorm_forward(xf_, rstd_f_, x);
  b.matmul(logits_, xf_, weight("lm_head.weight"), false, true, false);
  float grad_scale = need_grad && loss.count > 0 ? loss_scale / float(loss.count) : 0.f;
  b.softcap_cross_entropy(logits_, losses_, targets_, vocab, float(shape_.softcap), grad_scale);

  std::vector<float> host_losses(N);
  b.download(host_losses.data(), losses_);
  for (float l : host_losses) loss.sum += l;
  return loss;
}

void Gpt::backward(const GradsReady& ready) {
  Backend& b = backend_;
  const int64_t N = tokens_.numel();
  const Tensor resid = param("resid_lambdas"), x0l = param("x0_lambdas");
  const Tensor dresid = grad(table_.find("resid_lambdas")), dx0l = grad(table_.find("x0_lambdas"));

  // logits_ holds dlogits after the fused softcapped cross-entropy.
  b.matmul(grad(table_.find("lm_head.weight")), logits_, xf_, true, false, true);
  b.matmul(dtmp_, logits_, weight("lm_head.weight"), false, false, false);
  b.rmsnorm_backward(dx_, dtmp_, layers_.back().x_out, rstd_f_);
  b.fill(dx0_, 0.f);

  for (int i = shape_.depth - 1; i >= 0; --i) {
    LayerActs& a = layers_[i];
    // MLP: x_out = x_mid + act @ Wproj^T, act = relu2(norm(x_mid) @ Wfc^T). dx_ is d(x_out),
    // which is also the gradient of the MLP branch.
    b.matmul(dw(i, "mlp.c_proj.weight"), dx_, a.act, true, false, true);
    b.matmul(dhidden_, dx_, w(i, "mlp.c_proj.weight"), false, false, false);
    b.relu2_backward(dhidden_, dhidden_, a.fc);
    b.matmul(dw(i, "mlp.c_fc.weight"), dhidden_, a.xn2, true, false, true);
    b.matmul(dxn_, dhidden_, w(i, "mlp.c_fc.weight"), false, false, false);
    b.rmsnorm_backward(dxmid_, dxn_, a.x_mid, a.rstd2);
    b.add(dxmid_, dx_);
    // Attention output projection.
    b.matmul(dw(i, "attn.c_proj.weight"), dxmid_, a.y.view({N, shape_.q_dim()}), true, false, true);
    b.matmul(dy_.view({N, shape_.q_dim()}), dxmid_, w(i, "attn.c_proj.weight"), false, false,
             false);
    b.attention_backward(dq_, dk_, dv_, dy_, a.q, a.k, a.v, a.y, a.lse, shape_.windows[i]);
    b.rmsnorm_backward(dq_, dq_, a.q_raw, a.rstd_q);
    b.rmsnorm_backward(dk_, dk_, a.k_raw, a.rstd_k);
    b.rope_backward(dq_, rope_cos_, rope_sin_, 0);
    b.rope_backward(dk_, rope_cos_, rope_sin_, 0);
    const Tensor dq2 = dq_.view({N, shape_.q_dim()}), dk2 = dk_.view({N, shape_.kv_dim()});
    const Tensor dv2 = dv_.view({N, shape_.kv_dim()});
    b.matmul(dw(i, "attn.c_q.weight"), dq2, a.xn1, true, false, true);
    b.matmul(dw(i, "attn.c_k.weight"), dk2, a.xn1, true, false, true);
    b.matmul(dw(i, "attn.c_v.weight"), dv2, a.xn1, true, false, true);
    b.matmul(dxn_, dq2, w(i, "attn.c_q.weight"), false, false, false);
    b.matmul(dxn_, dk2, w(i, "attn.c_k.weight"), false, false, true);
    b.matmul(dxn_, dv2, w(i, "attn.c_v.weight"), false, false, true);
    if (shape_.value_embed[i]) {
      b.value_gate_backward(dxn_, dw(i, "attn.ve_gate.weight"), dve_, dv2, a.xn1,
                            w(i, "attn.ve_gate.weight"), a.ve, a.gate);
      b.embedding_backward(grad(table_.find("value_embeds." + std::to_string(i) + ".weight")), dve_,
                           tokens_);
    }
    b.rmsnorm_backward(dx_, dxn_, a.x_mix, a.rstd1);
    b.add(dx_, dxmid_);
    // Residual mix: dx_ now holds d(x_mix); turn it into d(x_in), accumulating into dx0.
    b.residual_mix_backward(dx_, dx0_, dresid, dx0l, dx_, a.x_in, x0_, resid, x0l, i);
    if (ready) ready(i);
  }
  // x0 = norm(wte[tokens]), and layer 0's x_in is x0 as well.
  b.add(dx_, dx0_);
  b.rmsnorm_backward(dtmp_, dx_, emb_, rstd_emb_);
  b.embedding_backward(grad(table_.find("transformer.wte.weight")), dtmp_, tokens_);
  if (ready) ready(-1);
}

}  // namespace lmtrain
