// Token shards in llm.c's layout: a 256 x int32 little-endian header (magic, version, token
// count, zeros), then the tokens as uint16 (version 1) or uint32 (version 2). docs/FORMATS.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace lmtrain {

inline constexpr int32_t kShardMagic = 20240520;
inline constexpr size_t kShardHeaderInts = 256;

// A read-only, memory-mapped shard. The constructor validates the header against the file size,
// so a TokenShard that exists is well formed.
class TokenShard {
 public:
  explicit TokenShard(std::string path);

  const std::string& path() const { return path_; }
  size_t size() const { return count_; }
  int version() const { return version_; }
  uint32_t token(size_t i) const {
    return version_ == 1 ? static_cast<const uint16_t*>(tokens_)[i]
                         : static_cast<const uint32_t*>(tokens_)[i];
  }
  // Copies tokens [begin, begin + out.size()) as int32; an id at or above `vocab` (when positive)
  // is an error naming the shard and the position.
  void copy(size_t begin, std::span<int32_t> out, int32_t vocab = 0) const;
  // Reads the ids of [begin, end) (clipped to the shard), on the OpenMP threads, and throws as
  // copy() does for the first one out of range. Returns false without reading when no id of the
  // shard's type can be out of range (uint16 ids against a vocabulary over 65535).
  bool check_ids(int32_t vocab, size_t begin = 0, size_t end = SIZE_MAX) const;

 private:
  [[noreturn]] void reject_id(size_t position, uint32_t id, int32_t vocab) const;

  struct Unmap {
    size_t bytes;
    void operator()(void* p) const;
  };

  std::string path_;
  std::unique_ptr<void, Unmap> map_{nullptr, Unmap{0}};
  const void* tokens_ = nullptr;
  size_t count_ = 0;
  int version_ = 0;
};

// Writes tokens as a shard: version 1 (uint16) if every token fits, else version 2 (uint32).
void write_shard(const std::string& path, std::span<const uint32_t> tokens);

// Resolves a shard argument to a sorted list of files: one file; a directory (its
// `<split>_*.bin` files); or a path prefix such as data/tiny/train_ (files starting with it,
// ending in .bin). Throws when nothing matches or a shard's header does not match its size.
std::vector<std::string> list_shards(const std::string& path_or_dir, const std::string& split);

// What check_shard_ids read on one rank.
struct IdCheck {
  size_t shards = 0, skipped = 0;  // shards read (in part); shards whose id type cannot exceed it
  uint64_t tokens = 0;             // tokens read
};

// Checks rank's share of the ids of `shards` against `vocab` (TokenShard::check_ids): the
// shards' tokens laid end to end, split into `world` contiguous ranges of equal length, so that
// the ranks together read every token once and none waits long for another (shards of unequal
// sizes, or fewer shards than ranks, split by shard would not do that).
IdCheck check_shard_ids(const std::vector<std::string>& shards, int32_t vocab, int rank, int world);

// prepare_data.py writes a meta.json beside its shards. When the directory holding `shard` has
// one, its vocab_size and bos_id must be those of the tokenizer `tokenizer_path` (which has
// `vocab_size` and `bos_id`): shards made with another tokenizer would train on garbage without
// any error. Shards without a meta.json (llm.c's) are taken as they are.
void check_shard_meta(const std::string& shard, const std::string& tokenizer_path, int vocab_size,
                      int32_t bos_id);

}  // namespace lmtrain
