// Autoregressive generation with a KV cache: the prompt is run once, then one token at a time,
// each step attending to the cached keys and values of all earlier positions.
#pragma once

#include <span>
#include <vector>

#include "core/rng.h"
#include "model/gpt.h"

namespace lmtrain {

struct SampleOptions {
  int max_tokens = 64;
  double temperature = 0.8;  // 0: greedy
  int top_k = 50;            // 0: all tokens
  uint64_t seed = 42;
  // Samples only ids below this: the tokenizer's vocabulary, which a model.vocab_size above it
  // leaves smaller than the model's (0: the model's).
  int vocab_limit = 0;
};

struct Generation {
  std::vector<int32_t> tokens;  // the new tokens, without the stop token
  enum class End { max_tokens, stop_token, sequence_len } end = End::max_tokens;
};

class Generator {
 public:
  explicit Generator(const Gpt& model);
  // Continues `prompt` (non-empty) by up to max_tokens tokens, stopping early when it picks
  // `stop_token` (when >= 0; the end of a document) or at the model's sequence length.
  Generation generate(std::span<const int32_t> prompt, const SampleOptions& options,
                      int32_t stop_token = -1);

 private:
  // Runs tokens at positions [pos, pos + n) and leaves the last position's logits in logits_.
  void run(std::span<const int32_t> tokens, int pos);
  int32_t pick(Rng& rng, const SampleOptions& options);

  const Gpt& model_;
  Backend& backend_;
  const GptShape& shape_;
  Buffer memory_;
  std::vector<Tensor> k_cache_, v_cache_;  // per layer (1, T, Hkv, D)
  Tensor tokens_, x0_, x_, x_mix_, xn_, rstd_, q_, rstd_q_, k_, rstd_k_, v_, gate_, y_, lse_,
      hidden_, logits_;
};

}  // namespace lmtrain
