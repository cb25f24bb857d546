// The dimensions of a GPT and its parameter table: names, shapes and optimizer groups, laid out
// in one flat f32 array. Names and shapes are nanochat's state_dict keys, Linear weights as
// (out_features, in_features), so checkpoints load into that PyTorch model directly.
#pragma once

#include <string>
#include <vector>

#include "config/config.h"
#include "core/tensor.h"

namespace lmtrain {

// Channels of the normalised attention input that drive the value-embedding gate.
constexpr int kValueGateChannels = 32;
// 2^44 parameters are 64 TiB of fp32 weights, beyond any machine: a config past it is a typo.
constexpr double kMaxParams = 17592186044416.0;

struct GptShape {
  int depth = 0, width = 0, n_head = 0, n_kv_head = 0, head_dim = 0, seq_len = 0;
  int vocab = 0, padded_vocab = 0;
  double softcap = 15.0, rope_base = 10000.0;
  std::vector<int> windows;       // per layer, in tokens
  std::vector<bool> value_embed;  // per layer: has a value embedding and gate

  static GptShape from(const ModelConfig& config, int vocab);
  int q_dim() const { return n_head * head_dim; }
  int kv_dim() const { return n_kv_head * head_dim; }
  // ParamCounts::total, by arithmetic: needs only the dimensions, not windows or a table.
  double param_count() const;
  // nanochat's estimate: 6 x matmul weights (lm_head included, embeddings and scalars not)
  // plus 12 * n_head * head_dim * min(window, T) per layer for attention.
  double flops_per_token() const;
};

enum class ParamGroup { embedding, value_embeds, unembedding, resid, x0, matrix };
const char* group_name(ParamGroup group);
constexpr int kNumParamGroups = 6;

struct ParamSpec {
  std::string name;
  Shape shape;
  ParamGroup group;
  size_t offset = 0;  // in elements, into the flat parameter array
};

// Block matrices of one shape (m, n), laid out back to back so that the optimizer can treat
// them as one (K, m, n) tensor.
struct MatrixStack {
  int64_t rows = 0, cols = 0;
  std::vector<size_t> members;  // indices into ParamTable::specs, in table order
  size_t offset = 0;            // of the first member, in elements
  int64_t count() const { return int64_t(members.size()); }
};

// Elements between the starts of tensors (and stacks) in the flat array: 256 bytes of f32,
// 128 of bf16.
constexpr size_t kParamAlignment = 64;

struct ParamTable {
  std::vector<ParamSpec> specs;  // nanochat's state_dict order
  std::vector<MatrixStack> stacks;
  size_t total = 0;  // elements of the flat array, the alignment gaps (zeros) included

  explicit ParamTable(const GptShape& shape);
  const ParamSpec& find(const std::string& name) const;
  size_t count(ParamGroup group) const;
};

// Parameter counts as `lmtrain info` reports them.
struct ParamCounts {
  size_t wte, value_embeds, lm_head, transformer_matrices, scalars, total;
  // Parameters that enter the tokens-per-parameter horizon: matrices + lm_head.
  size_t scaling() const { return transformer_matrices + lm_head; }
};
ParamCounts count_params(const ParamTable& table);

}  // namespace lmtrain
