#include "model/gpt_shape.h"

#include <algorithm>

namespace lmtrain {

GptShape GptShape::from(const ModelConfig& c, int vocab) {
  check(vocab >= 2, "model.vocab_size: expected at least 2 tokens, got {}", vocab);
  GptShape s;
  s.depth = c.depth;
  s.head_dim = c.head_dim;
  s.width = (c.depth * c.aspect_ratio + c.head_dim - 1) / c.head_dim * c.head_dim;
  s.n_head = s.width / c.head_dim;
  s.n_kv_head = c.n_kv_head == 0 ? s.n_head : c.n_kv_head;
  check(s.n_head % s.n_kv_head == 0, "model.n_kv_head: {} does not divide n_head = {}", s.n_kv_head,
        s.n_head);
  check(s.width >= kValueGateChannels, "model: width {} is below the {} value-gate channels",
        s.width, kValueGateChannels);
  s.seq_len = c.sequence_len;
  s.vocab = vocab;
  s.padded_vocab = (vocab + 63) / 64 * 64;
  // Refused before the per-layer vectors and the table are built: depth 16777215 spent 5 GB
  // and 22 s on them before failing.
  const double params = s.param_count();
  check(params <= kMaxParams,
        "model: {:.3g} parameters (depth {}, width {}, vocab {}) are more than 2^44 = {:.3g}, "
        "expected a model a machine can hold; lower model.depth, model.aspect_ratio or "
        "model.vocab_size",
        params, s.depth, s.width, s.vocab, kMaxParams);
  s.softcap = c.softcap;
  s.rope_base = c.rope_base;
  for (int i = 0; i < s.depth; ++i) {
    char kind = c.window_pattern[i % c.window_pattern.size()];
    bool long_window = kind == 'L' || i == s.depth - 1;
    s.windows.push_back(long_window ? s.seq_len : s.seq_len / 2);
    s.value_embed.push_back(i % 2 == (s.depth - 1) % 2);
  }
  return s;
}

double GptShape::param_count() const {
  const double C = width, q = q_dim(), kv = kv_dim(), V = padded_vocab;
  const double value_embed_layers = (depth + 1) / 2;  // every other layer, ending at the last
  const double per_layer = 2 * q * C + 2 * kv * C + 8 * C * C;  // attention and MLP
  const double per_value_embed = V * kv + double(n_kv_head) * kValueGateChannels;
  return depth * per_layer + value_embed_layers * per_value_embed + 2 * V * C + 2.0 * depth;
}

double GptShape::flops_per_token() const {
  ParamTable table(*this);
  ParamCounts n = count_params(table);
  double flops = 6.0 * double(n.transformer_matrices + n.lm_head);
  for (int w : windows) flops += 12.0 * n_head * head_dim * std::min(w, seq_len);
  return flops;
}

const char* group_name(ParamGroup group) {
  switch (group) {
    case ParamGroup::embedding:
      return "embedding";
    case ParamGroup::value_embeds:
      return "value_embeds";
    case ParamGroup::unembedding:
      return "unembedding";
    case ParamGroup::resid:
      return "resid";
    case ParamGroup::x0:
      return "x0";
    case ParamGroup::matrix:
      return "matrix";
  }
  return "?";
}

ParamTable::ParamTable(const GptShape& s) {
  auto add = [&](std::string name, Shape shape, ParamGroup group) {
    specs.push_back({std::move(name), shape, group, 0});
  };
  const int64_t C = s.width;
  add("transformer.wte.weight", {s.padded_vocab, C}, ParamGroup::embedding);
  for (int i = 0; i < s.depth; ++i) {
    std::string p = "transformer.h." + std::to_string(i) + ".";
    add(p + "attn.c_q.weight", {s.q_dim(), C}, ParamGroup::matrix);
    add(p + "attn.c_k.weight", {s.kv_dim(), C}, ParamGroup::matrix);
    add(p + "attn.c_v.weight", {s.kv_dim(), C}, ParamGroup::matrix);
    add(p + "attn.c_proj.weight", {C, s.q_dim()}, ParamGroup::matrix);
    if (s.value_embed[i])
      add(p + "attn.ve_gate.weight", {s.n_kv_head, kValueGateChannels}, ParamGroup::matrix);
    add(p + "mlp.c_fc.weight", {4 * C, C}, ParamGroup::matrix);
    add(p + "mlp.c_proj.weight", {C, 4 * C}, ParamGroup::matrix);
  }
  for (int i = 0; i < s.depth; ++i) {
    if (s.value_embed[i]) {
      add("value_embeds." + std::to_string(i) + ".weight", {s.padded_vocab, s.kv_dim()},
          ParamGroup::value_embeds);
    }
  }
  add("resid_lambdas", {s.depth}, ParamGroup::resid);
  add("x0_lambdas", {s.depth}, ParamGroup::x0);
  add("lm_head.weight", {s.padded_vocab, C}, ParamGroup::unembedding);

  // Memory layout: embeddings, then the matrices stack by stack, then the rest.
  for (size_t i = 0; i < specs.size(); ++i) {
    if (specs[i].group != ParamGroup::matrix) continue;
    auto it = std::find_if(stacks.begin(), stacks.end(), [&](const MatrixStack& m) {
      return m.rows == specs[i].shape[0] && m.cols == specs[i].shape[1];
    });
    if (it == stacks.end())
      it = stacks.insert(stacks.end(), {specs[i].shape[0], specs[i].shape[1], {}, 0});
    it->members.push_back(i);
  }
  // Each tensor and each stack starts on a kParamAlignment boundary: the scalars before the
  // lm_head would otherwise leave its bf16 copy 8-byte aligned at some depths (26: 104 bytes
  // of lambdas), and cuBLASLt's fastest kernels need 16 bytes. A stack's members stay back to
  // back.
  auto align = [&] { total = (total + kParamAlignment - 1) / kParamAlignment * kParamAlignment; };
  auto place = [&](size_t i) {
    specs[i].offset = total;
    total += specs[i].shape.numel();
  };
  for (size_t i = 0; i < specs.size(); ++i) {
    if (specs[i].group == ParamGroup::embedding || specs[i].group == ParamGroup::value_embeds)
      align(), place(i);
  }
  for (auto& stack : stacks) {
    align();
    stack.offset = total;
    for (size_t i : stack.members) place(i);
  }
  for (size_t i = 0; i < specs.size(); ++i) {
    ParamGroup g = specs[i].group;
    if (g == ParamGroup::resid || g == ParamGroup::x0 || g == ParamGroup::unembedding)
      align(), place(i);
  }
  align();
}

const ParamSpec& ParamTable::find(const std::string& name) const {
  for (const auto& spec : specs)
    if (spec.name == name) return spec;
  fail("no parameter named '{}' in this model", name);
}

size_t ParamTable::count(ParamGroup group) const {
  size_t n = 0;
  for (const auto& spec : specs)
    if (spec.group == group) n += spec.shape.numel();
  return n;
}

ParamCounts count_params(const ParamTable& t) {
  ParamCounts n{};
  n.wte = t.count(ParamGroup::embedding);
  n.value_embeds = t.count(ParamGroup::value_embeds);
  n.lm_head = t.count(ParamGroup::unembedding);
  n.transformer_matrices = t.count(ParamGroup::matrix);
  n.scalars = t.count(ParamGroup::resid) + t.count(ParamGroup::x0);
  n.total = n.wte + n.value_embeds + n.lm_head + n.transformer_matrices + n.scalars;
  return n;
}

}  // namespace lmtrain
