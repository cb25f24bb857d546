#include "train/evaluate.h"

#include <algorithm>
#include <cmath>

#include "data/loader.h"

namespace lmtrain {

EvalBatches eval_batches(const std::vector<std::string>& shards, int B, int T, int64_t max_tokens,
                         int world) {
  const int64_t batch_tokens = int64_t(B) * T;
  // Windows the shards hold for this rank without wrapping around to their start.
  int64_t available = 0;
  for (const auto& path : shards)
    available += (int64_t(TokenShard(path).size()) - 1) / batch_tokens;
  available /= world;
  check(available >= 1, "{}: validation data too small for one batch of {} x {} tokens per rank",
        shards.front(), B, T);
  const int64_t asked = max_tokens / batch_tokens;
  return {std::clamp<int64_t>(asked, 1, available), asked > available};
}

namespace {

// The loader an evaluation reads with: contiguous windows from the shards' start, in file order,
// this rank's share.
TokenLoader eval_loader(const std::vector<std::string>& shards, int B, int T, int rank, int world,
                        int32_t bos_id, int32_t vocab) {
  return TokenLoader({shards, Packing::contiguous, B, T, rank, world, 0, bos_id, false, vocab});
}

}  // namespace

EvalBatches check_eval_data(const std::vector<std::string>& shards, int B, int T,
                            int64_t max_tokens, int rank, int world, int32_t bos_id,
                            int32_t vocab) {
  const EvalBatches batches = eval_batches(shards, B, T, max_tokens, world);
  TokenLoader loader = eval_loader(shards, B, T, rank, world, bos_id, vocab);
  std::vector<int32_t> inputs(size_t(B) * T), targets(size_t(B) * T);
  for (int64_t i = 0; i < batches.count; ++i) loader.next_batch(inputs, targets);
  return batches;
}

EvalResult evaluate(Gpt& model, const std::vector<std::string>& shards, const Tokenizer& tokenizer,
                    int64_t max_tokens, int rank, int world) {
  const int B = model.batch(), T = model.shape().seq_len;
  const int64_t batch_tokens = int64_t(B) * T;
  const int64_t batches = eval_batches(shards, B, T, max_tokens, world).count;

  TokenLoader loader =
      eval_loader(shards, B, T, rank, world, tokenizer.bos_id(), model.shape().vocab);
  std::vector<int32_t> inputs(batch_tokens), targets(batch_tokens);
  std::vector<float> losses(batch_tokens);
  EvalResult result;
  for (int64_t i = 0; i < batches; ++i) {
    loader.next_batch(inputs, targets);
    Gpt::Loss loss = model.forward(inputs, targets, /*need_grad=*/false);
    result.nats += loss.sum;
    result.tokens += double(loss.count);
    model.backend().download(losses.data(), model.token_losses());
    for (int64_t j = 0; j < batch_tokens; ++j) {
      int n = targets[j] < 0 ? 0 : tokenizer.token_byte_length(targets[j]);
      if (n == 0) continue;
      result.text_nats += losses[j];
      result.bytes += n;
    }
  }
  return result;
}

}  // namespace lmtrain
