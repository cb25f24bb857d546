// Streams (B, T) training batches out of token shards, in one of two packings:
//
// contiguous (llm.c): a batch is B*T+1 consecutive tokens of one shard; row b is tokens
//   [b*T, b*T+T) and its targets are the same span shifted by one, so consecutive rows overlap by
//   one token and no token is skipped inside a batch. Rank r of W reads the batches starting at
//   (r + k*W) * B*T; a shard's tail too short for this rank's next batch is skipped.
// bos_bestfit (nanochat): documents (a BOS and the tokens up to the next BOS) are read in order,
//   rank r taking documents r, r+W, r+2W, ... of each epoch, into a buffer of kBufferDocs
//   documents. Each row of T+1 tokens is filled with the largest buffered document that fits the
//   remaining space, again and again; when none fits, the shortest one is cropped to fill the row
//   exactly and its rest is dropped. Every row starts with BOS and there is no padding. Shards must
//   start with BOS.
//
// Both walk the shards in a per-epoch order (a permutation drawn from seed and epoch when
// shuffle is on, else file order) and wrap around forever. state()/restore() capture the exact
// position, so a restored loader yields the same batches bit for bit.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "data/shard.h"

namespace lmtrain {

enum class Packing { contiguous, bos_bestfit };

// "contiguous" or "bos_bestfit"; anything else throws.
Packing parse_packing(std::string_view name);

struct LoaderOptions {
  std::vector<std::string> shards;
  Packing packing = Packing::contiguous;
  int batch = 0;  // B
  int seq = 0;    // T
  int rank = 0;
  int world = 1;
  uint64_t seed = 0;
  int32_t bos_id = 0;
  bool shuffle = true;  // shard order per epoch; evaluation wants file order
  int32_t vocab = 0;    // token ids must be below it (0: unchecked), so a bad id names its shard
};

class TokenLoader {
 public:
  // Documents buffered for best-fit packing (nanochat's size): more gives fuller rows, less
  // cropping.
  static constexpr size_t kBufferDocs = 1000;

  explicit TokenLoader(LoaderOptions options);

  // Fills B*T inputs and B*T targets, row-major (B, T); targets are the inputs shifted by one.
  void next_batch(std::span<int32_t> inputs, std::span<int32_t> targets);

  nlohmann::json state() const;
  void restore(const nlohmann::json& state);
  // What is structurally wrong with a saved state (missing keys, wrong types), or "" if nothing.
  static std::string state_problem(const nlohmann::json& state);

 private:
  struct Doc {
    size_t shard;  // index into options_.shards
    size_t begin;
    size_t length;
  };

  const TokenShard& current() const { return shards_[order_[cursor_]]; }
  size_t first_position() const;  // where this rank starts in a shard
  void start_epoch(uint64_t epoch);
  void advance_shard();
  void fill_contiguous(std::span<int32_t> tokens);
  void fill_row_bestfit(std::span<int32_t> row);
  Doc next_document();
  nlohmann::json fingerprint() const;

  LoaderOptions options_;
  std::vector<TokenShard> shards_;
  std::vector<size_t> order_;  // this epoch's shard order
  uint64_t epoch_ = 0;
  size_t cursor_ = 0;       // position in order_
  size_t position_ = 0;     // contiguous: next batch start; bestfit: next document start
  uint64_t documents_ = 0;  // bestfit: documents read this epoch, by all ranks
  std::vector<Doc> buffer_;
  std::vector<int32_t> scratch_;
};

}  // namespace lmtrain
