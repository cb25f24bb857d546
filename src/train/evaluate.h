// Validation: mean loss and bits per byte over contiguous windows of the validation shards.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "data/loader.h"
#include "data/tokenizer.h"
#include "model/gpt.h"

namespace lmtrain {

struct EvalResult {
  // Sums over the evaluated targets, which add up across ranks.
  double nats = 0, text_nats = 0, bytes = 0, tokens = 0;
  double loss() const { return nats / std::max(tokens, 1.0); }  // mean nats per counted token
  // Bits per byte of the targets' text (special tokens, which have no bytes, left out).
  double bpb() const { return bytes > 0 ? text_nats / (std::log(2.0) * bytes) : 0.0; }
};

// The batches of B x T tokens an evaluation of up to `max_tokens` reads per rank: whole batches,
// at least one, no more than the shards hold without wrapping (`capped` when they hold fewer than
// asked). Throws naming the shards when they hold less than one batch per rank.
struct EvalBatches {
  int64_t count = 0;
  bool capped = false;
};
EvalBatches eval_batches(const std::vector<std::string>& shards, int B, int T, int64_t max_tokens,
                         int world);

// Reads every window an evaluation of up to `max_tokens` reads on this rank, so that a run finds
// validation data too small for one batch per rank, or holding ids outside the vocabulary,
// before it trains rather than at its first evaluation. Returns the batches it read.
EvalBatches check_eval_data(const std::vector<std::string>& shards, int B, int T,
                            int64_t max_tokens, int rank, int world, int32_t bos_id, int32_t vocab);

// Evaluates on up to `max_tokens` tokens (whole batches, at least one), always from the start of
// the shards so that every evaluation sees the same text. `rank`/`world` split the windows.
EvalResult evaluate(Gpt& model, const std::vector<std::string>& shards, const Tokenizer& tokenizer,
                    int64_t max_tokens, int rank = 0, int world = 1);

}  // namespace lmtrain
