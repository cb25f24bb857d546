// Validation: mean loss and bits per byte over contiguous windows of the validation shards.
#pragma once

#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "model/gpt.h"

namespace lmtrain {

struct EvalResult {
  double loss = 0;  // mean nats per counted token
  double bpb = 0;   // bits per byte of the targets' text (special tokens excluded)
  int64_t tokens = 0;
};

// Evaluates on up to `max_tokens` tokens (whole batches, at least one), always from the start of
// the shards so that every evaluation sees the same text. `rank`/`world` split the windows.
EvalResult evaluate(Gpt& model, const std::vector<std::string>& shards, const Tokenizer& tokenizer,
                    int64_t max_tokens, int rank = 0, int world = 1);

}  // namespace lmtrain
