#include "model/generator.h"

#include <algorithm>
#include <cmath>

#include "backend/tensor_plan.h"

namespace lmtrain {

Generator::Generator(const Gpt& model)
    : model_(model), backend_(const_cast<Gpt&>(model).backend()), shape_(model.shape()) {
  const int64_t T = shape_.seq_len, C = shape_.width, H = shape_.n_head, Hkv = shape_.n_kv_head;
  const int64_t D = shape_.head_dim;
  const DType act = backend_.activation_dtype(), f32 = DType::f32;
  TensorPlan plan;
  k_cache_.resize(shape_.depth);
  v_cache_.resize(shape_.depth);
  for (int i = 0; i < shape_.depth; ++i) {
    plan.add(k_cache_[i], {1, T, Hkv, D}, act);
    plan.add(v_cache_[i], {1, T, Hkv, D}, act);
  }
  plan.add(tokens_, {T}, DType::i32);
  for (Tensor* t : {&x0_, &x_, &x_mix_, &xn_}) plan.add(*t, {T, C}, act);
  plan.add(rstd_, {T}, f32);
  plan.add(q_, {1, T, H, D}, act);
  plan.add(rstd_q_, {T * H}, f32);
  plan.add(k_, {1, T, Hkv, D}, act);
  plan.add(rstd_k_, {T * Hkv}, f32);
  plan.add(v_, {1, T, Hkv, D}, act);
  plan.add(gate_, {T, Hkv}, f32);
  plan.add(y_, {1, T, H, D}, act);
  plan.add(lse_, {1, H, T}, f32);
  plan.add(hidden_, {T, 4 * C}, act);
  plan.add(logits_, {1, shape_.padded_vocab}, f32);
  memory_ = plan.allocate(backend_);
}

void Generator::run(std::span<const int32_t> tokens, int pos) {
  Backend& b = backend_;
  const int64_t n = int64_t(tokens.size()), C = shape_.width, H = shape_.n_head;
  const int64_t Hkv = shape_.n_kv_head, D = shape_.head_dim, end = pos + n;
  auto rows = [n](Tensor t) { return t.slice(0, n * t.shape[-1]).view({n, t.shape[-1]}); };
  auto heads = [n](Tensor t, int64_t h, int64_t d) {
    return t.slice(0, n * h * d).view({1, n, h, d});
  };
  auto w = [&](int i, const char* suffix) {
    return model_.weight("transformer.h." + std::to_string(i) + "." + suffix);
  };

  Tensor tok = tokens_.slice(0, n);
  b.upload(tok, tokens.data());
  Tensor x0 = rows(x0_), x = rows(x_), x_mix = rows(x_mix_), xn = rows(xn_);
  Tensor rstd = rstd_.slice(0, n), hidden = rows(hidden_);
  Tensor q = heads(q_, H, D), k = heads(k_, Hkv, D), v = heads(v_, Hkv, D), y = heads(y_, H, D);
  b.embedding_forward(xn, model_.weight("transformer.wte.weight"), tok);
  b.rmsnorm_forward(x0, rstd, xn);
  b.copy(x, x0);
  const Tensor resid = model_.param("resid_lambdas"), x0l = model_.param("x0_lambdas");
  for (int i = 0; i < shape_.depth; ++i) {
    b.residual_mix_norm_forward(x_mix, xn, rstd, x, x0, resid, x0l, i);
    b.matmul(q.view({n, H * D}), xn, w(i, "attn.c_q.weight"), false, true, false);
    b.matmul(k.view({n, Hkv * D}), xn, w(i, "attn.c_k.weight"), false, true, false);
    b.matmul(v.view({n, Hkv * D}), xn, w(i, "attn.c_v.weight"), false, true, false);
    if (shape_.value_embed[i]) {
      b.value_gate_forward(v.view({n, Hkv * D}), gate_.slice(0, n * Hkv).view({n, Hkv}), xn,
                           w(i, "attn.ve_gate.weight"), model_.weight(Gpt::value_embeds_name(i)),
                           tok);
    }
    b.norm_rope_forward(q, rstd_q_.slice(0, n * H), q, model_.rope_cos(), model_.rope_sin(), pos);
    // Normalised keys and the values go straight into the cache at their positions.
    Tensor k_slot = k_cache_[i].slice(pos * Hkv * D, n * Hkv * D).view({1, n, Hkv, D});
    Tensor v_slot = v_cache_[i].slice(pos * Hkv * D, n * Hkv * D).view({1, n, Hkv, D});
    b.norm_rope_forward(k_slot, rstd_k_.slice(0, n * Hkv), k, model_.rope_cos(), model_.rope_sin(),
                        pos);
    b.copy(v_slot, v);
    Tensor k_all = k_cache_[i].slice(0, end * Hkv * D).view({1, end, Hkv, D});
    Tensor v_all = v_cache_[i].slice(0, end * Hkv * D).view({1, end, Hkv, D});
    b.attention_forward(y, lse_.slice(0, H * n).view({1, H, n}), q, k_all, v_all, shape_.windows[i],
                        pos);
    b.matmul(x_mix, y.view({n, H * D}), w(i, "attn.c_proj.weight"), false, true, true);
    b.rmsnorm_forward(xn, rstd, x_mix);
    b.matmul(hidden, xn, w(i, "mlp.c_fc.weight"), false, true, false);
    b.relu2_forward(hidden, hidden);
    b.matmul_add(x, hidden, w(i, "mlp.c_proj.weight"), false, true, x_mix);
  }
  Tensor last = x.slice((n - 1) * C, C).view({1, C});
  Tensor last_normed = xn.slice(0, C).view({1, C});
  b.rmsnorm_forward(last_normed, rstd.slice(0, 1), last);
  b.matmul(logits_, last_normed, model_.weight("lm_head.weight"), false, true, false);
}

int32_t Generator::pick(Rng& rng, const SampleOptions& o) {
  std::vector<float> logits(shape_.padded_vocab);
  backend_.download(logits.data(), logits_);
  logits.resize(o.vocab_limit > 0 ? std::min(o.vocab_limit, shape_.vocab) : shape_.vocab);
  const double cap = shape_.softcap;
  for (float& z : logits) z = float(cap * std::tanh(z / cap));
  std::vector<int32_t> order(logits.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int32_t(i);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  if (o.temperature <= 0) return order[0];
  size_t k = o.top_k > 0 ? std::min<size_t>(o.top_k, order.size()) : order.size();
  std::vector<double> weights(k);
  double total = 0;
  for (size_t i = 0; i < k; ++i) {
    weights[i] = std::exp((logits[order[i]] - logits[order[0]]) / o.temperature);
    total += weights[i];
  }
  double r = rng.uniform() * total;
  for (size_t i = 0; i < k; ++i) {
    if ((r -= weights[i]) <= 0) return order[i];
  }
  return order[k - 1];
}

Generation Generator::generate(std::span<const int32_t> prompt, const SampleOptions& o,
                               int32_t stop_token) {
  check(!prompt.empty(), "sample: the prompt must hold at least one token");
  check(int(prompt.size()) < shape_.seq_len,
        "sample: the prompt has {} tokens; the model's sequence length is {}", prompt.size(),
        shape_.seq_len);
  Rng rng(o.seed);
  Generation out;
  run(prompt, 0);
  int pos = int(prompt.size());
  while (int(out.tokens.size()) < o.max_tokens) {
    int32_t next = pick(rng, o);
    if (next == stop_token) return {std::move(out.tokens), Generation::End::stop_token};
    out.tokens.push_back(next);
    if (int(out.tokens.size()) == o.max_tokens) break;
    if (pos >= shape_.seq_len) return {std::move(out.tokens), Generation::End::sequence_len};
    run(std::span<const int32_t>(&out.tokens.back(), 1), pos++);
  }
  return out;
}

}  // namespace lmtrain
