#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdint>
#include <filesystem>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "core/error.h"
#include "data/loader.h"
#include "data/shard.h"
#include "test_support.h"

namespace fs = std::filesystem;
using namespace lmtrain;
using lmtrain::test_support::TempDir;

namespace {

// Distinct random tokens from [base, base + n), so a token identifies its position in the stream.
std::vector<uint32_t> distinct_tokens(size_t n, uint64_t seed, uint32_t base = 1000) {
  std::vector<uint32_t> tokens(n);
  std::iota(tokens.begin(), tokens.end(), base);
  std::shuffle(tokens.begin(), tokens.end(), std::mt19937_64(seed));
  return tokens;
}

struct Batch {
  std::vector<int32_t> inputs, targets;
  bool operator==(const Batch&) const = default;
};

Batch next(TokenLoader& loader, const LoaderOptions& o) {
  Batch b{std::vector<int32_t>(size_t(o.batch) * o.seq),
          std::vector<int32_t>(size_t(o.batch) * o.seq)};
  loader.next_batch(b.inputs, b.targets);
  return b;
}

// Documents for best-fit tests: doc i is [BOS, i + 1, random body], bodies never contain BOS (0).
constexpr int32_t kBos = 0;
std::vector<std::vector<uint32_t>> make_docs(size_t count, size_t max_len, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::vector<uint32_t>> docs(count);
  for (size_t i = 0; i < count; ++i) {
    docs[i] = {uint32_t(kBos), uint32_t(i + 1)};
    const size_t body = rng() % max_len;
    for (size_t j = 0; j < body; ++j) docs[i].push_back(1 + uint32_t(rng() % 50000));
  }
  return docs;
}

std::string write_docs(const TempDir& dir, const std::string& name,
                       const std::vector<std::vector<uint32_t>>& docs, size_t first, size_t last) {
  std::vector<uint32_t> tokens;
  for (size_t i = first; i < last; ++i) tokens.insert(tokens.end(), docs[i].begin(), docs[i].end());
  write_shard(dir / name, tokens);
  return dir / name;
}

}  // namespace

TEST_CASE("contiguous batches are llm.c's overlapping windows", "[data][loader]") {
  TempDir dir;
  const auto tokens = distinct_tokens(10000, 1);
  write_shard(dir / "train_000000.bin", tokens);
  LoaderOptions o{.shards = {dir / "train_000000.bin"}, .batch = 4, .seq = 16, .seed = 3};
  TokenLoader loader(o);
  const size_t bt = 64, batches_per_epoch = (tokens.size() - 1) / bt;
  for (size_t k = 0; k < batches_per_epoch + 3; ++k) {
    const Batch b = next(loader, o);
    const size_t start =
        (k % batches_per_epoch) * bt;  // wraps to the start after the last full batch
    for (size_t i = 0; i < bt; ++i) {
      REQUIRE(b.inputs[i] == int32_t(tokens[start + i]));
      REQUIRE(b.targets[i] == int32_t(tokens[start + i + 1]));
    }
  }
}

TEST_CASE("contiguous ranks read disjoint batches that cover the data", "[data][loader]") {
  TempDir dir;
  const auto tokens = distinct_tokens(3 * 10 * 32 + 1, 2);  // exactly 30 batches of B*T = 32
  write_shard(dir / "train_000000.bin", tokens);
  std::map<int32_t, int> first_tokens;  // a batch's first input identifies it
  const int world = 3;
  for (int rank = 0; rank < world; ++rank) {
    LoaderOptions o{
        .shards = {dir / "train_000000.bin"}, .batch = 2, .seq = 16, .rank = rank, .world = world};
    TokenLoader loader(o);
    for (int k = 0; k < 10; ++k) {
      const Batch b = next(loader, o);
      const size_t start = size_t(rank + k * world) * 32;
      REQUIRE(b.inputs.front() == int32_t(tokens[start]));
      ++first_tokens[b.inputs.front()];
    }
    CHECK(next(loader, o).inputs.front() == int32_t(tokens[size_t(rank) * 32]));  // next epoch
  }
  CHECK(first_tokens.size() == 30);
  CHECK(std::all_of(first_tokens.begin(), first_tokens.end(),
                    [](const auto& kv) { return kv.second == 1; }));
}

TEST_CASE("contiguous loader skips short shard tails and visits every shard each epoch",
          "[data][loader]") {
  TempDir dir;
  std::vector<std::string> paths;
  std::vector<std::vector<uint32_t>> data;
  for (int s = 0; s < 3; ++s) {
    data.push_back(distinct_tokens(100 + 37 * s, 10 + s, 1000 * (s + 1)));
    paths.push_back(dir / fmt::format("train_{:06d}.bin", s));
    write_shard(paths.back(), data.back());
  }
  LoaderOptions o{.shards = paths, .batch = 3, .seq = 10, .seed = 7};
  TokenLoader loader(o);
  std::vector<int> shard_of_batch;
  for (int k = 0; k < 3 * 8; ++k) {
    const Batch b = next(loader, o);
    for (int s = 0; s < 3; ++s) {
      const auto it = std::find(data[s].begin(), data[s].end(), uint32_t(b.inputs.front()));
      if (it == data[s].end()) continue;
      const size_t start = size_t(it - data[s].begin());
      CHECK(start % 30 == 0);
      CHECK(start + 31 <= data[s].size());
      shard_of_batch.push_back(s);
    }
  }
  // Batches of 31 tokens every 30: the shards of 100, 137 and 174 tokens hold 3, 4 and 5, so an
  // epoch is 12 batches and reads each shard's batches in one run.
  REQUIRE(shard_of_batch.size() == 24);
  for (int epoch = 0; epoch < 2; ++epoch) {
    std::map<int, int> counts;
    for (int i = 0; i < 12; ++i) {
      const int s = shard_of_batch[size_t(epoch * 12 + i)];
      ++counts[s];
      if (i > 0 && s != shard_of_batch[size_t(epoch * 12 + i - 1)]) CHECK(counts[s] == 1);
    }
    CHECK(counts == std::map<int, int>{{0, 3}, {1, 4}, {2, 5}});
  }
}

TEST_CASE("bos_bestfit rows start with BOS and lose only cropped tokens", "[data][loader]") {
  TempDir dir;
  const auto docs = make_docs(6000, 100, 4);
  const std::vector<std::string> paths = {write_docs(dir, "train_000000.bin", docs, 0, 3000),
                                          write_docs(dir, "train_000001.bin", docs, 3000, 6000)};
  const int world = 2;
  for (int rank = 0; rank < world; ++rank) {
    LoaderOptions o{.shards = paths,
                    .packing = Packing::bos_bestfit,
                    .batch = 8,
                    .seq = 64,
                    .rank = rank,
                    .world = world,
                    .bos_id = kBos,
                    .shuffle = false};
    TokenLoader loader(o);
    std::set<size_t> used;
    size_t placed = 0, cropped = 0, lone_bos = 0;
    for (int k = 0; k < 20; ++k) {
      const Batch b = next(loader, o);
      for (int r = 0; r < o.batch; ++r) {
        std::vector<int32_t> row(b.inputs.begin() + r * o.seq, b.inputs.begin() + (r + 1) * o.seq);
        row.push_back(b.targets[size_t(r + 1) * o.seq - 1]);
        REQUIRE(std::equal(b.inputs.begin() + r * o.seq + 1, b.inputs.begin() + (r + 1) * o.seq,
                           b.targets.begin() + r * o.seq));
        REQUIRE(row.front() == kBos);
        for (size_t begin = 0; begin < row.size();) {
          size_t end = begin + 1;
          while (end < row.size() && row[end] != kBos) ++end;
          const bool last = end == row.size();
          REQUIRE((end - begin >= 2 || last));  // a lone BOS can only be a crop at the row's end
          lone_bos += end - begin == 1;
          if (end - begin >= 2) {
            const size_t id = size_t(row[begin + 1] - 1);
            REQUIRE(id % world == size_t(rank));  // file order: rank r takes documents r, r+W, ...
            REQUIRE(used.insert(id).second);      // no document twice within the first epoch
            const auto& doc = docs[id];
            REQUIRE(end - begin <= doc.size());
            REQUIRE(std::equal(row.begin() + begin, row.begin() + end, doc.begin()));
            REQUIRE(
                (end - begin == doc.size() || last));  // only the row's last document is cropped
            (end - begin == doc.size() ? placed : cropped) += 1;
          }
          begin = end;
        }
      }
    }
    // Every document read so far is either in a row or still waiting in the buffer.
    const auto state = loader.state();
    std::set<std::pair<size_t, size_t>> pending;  // (shard, begin)
    for (const auto& d : state["buffer"]) pending.emplace(d[0].get<size_t>(), d[1].get<size_t>());
    const size_t read = state["documents"].get<size_t>();  // by all ranks
    CHECK(pending.size() + 1 >= TokenLoader::kBufferDocs);
    CHECK(used.size() + lone_bos + pending.size() == (read - rank + world - 1) / world);
    CHECK(cropped <= size_t(20 * o.batch));
    CHECK(placed > cropped);
  }
}

TEST_CASE("bos_bestfit is deterministic for a seed", "[data][loader]") {
  TempDir dir;
  const auto docs = make_docs(900, 300, 5);
  const std::vector<std::string> paths = {write_docs(dir, "a.bin", docs, 0, 300),
                                          write_docs(dir, "b.bin", docs, 300, 600),
                                          write_docs(dir, "c.bin", docs, 600, 900)};
  LoaderOptions o{
      .shards = paths, .packing = Packing::bos_bestfit, .batch = 4, .seq = 128, .seed = 11};
  TokenLoader a(o), b(o);
  for (int k = 0; k < 50; ++k) REQUIRE(next(a, o) == next(b, o));
}

TEST_CASE("a restored loader continues with the same batches", "[data][loader]") {
  TempDir dir;
  const auto docs = make_docs(400, 200, 6);
  const std::vector<std::string> paths = {write_docs(dir, "train_000000.bin", docs, 0, 150),
                                          write_docs(dir, "train_000001.bin", docs, 150, 400)};
  for (Packing packing : {Packing::contiguous, Packing::bos_bestfit}) {
    LoaderOptions o{.shards = paths,
                    .packing = packing,
                    .batch = 4,
                    .seq = 32,
                    .rank = 1,
                    .world = 2,
                    .seed = 9,
                    .bos_id = kBos};
    TokenLoader original(o);
    for (int k = 0; k < 37; ++k) next(original, o);
    const std::string saved = original.state().dump();
    std::vector<Batch> expected;
    for (int k = 0; k < 200; ++k) expected.push_back(next(original, o));  // crosses epochs

    TokenLoader resumed(o);
    next(resumed, o);
    resumed.restore(nlohmann::json::parse(saved));
    for (const auto& batch : expected) REQUIRE(next(resumed, o) == batch);

    LoaderOptions other = o;
    other.seq = 16;
    TokenLoader mismatched(other);
    CHECK_THROWS_WITH(
        mismatched.restore(nlohmann::json::parse(saved)),
        "data loader: cannot restore a state saved with a different seq: saved 32, now 16");
  }
}

TEST_CASE("impossible loader shapes fail clearly", "[data][loader]") {
  TempDir dir;
  const auto tokens = distinct_tokens(100, 8);
  write_shard(dir / "train_000000.bin", tokens);
  const std::string path = dir / "train_000000.bin";
  CHECK_THROWS_WITH(TokenLoader(LoaderOptions{.shards = {path}, .batch = 0, .seq = 8}),
                    "data loader: batch size and sequence length must be positive, got B=0 T=8");
  CHECK_THROWS_WITH(
      TokenLoader(LoaderOptions{.shards = {path}, .batch = 1, .seq = 8, .rank = 2, .world = 2}),
      "data loader: rank 2 is not in [0, world size 2)");
  CHECK_THROWS_WITH(
      TokenLoader(LoaderOptions{.shards = {path}, .batch = 4, .seq = 16, .rank = 1, .world = 2}),
      path +
          ": a contiguous batch of B=4 T=16 for rank 1 of 2 needs a shard of at least 129 tokens, "
          "but the largest of 1 shard(s) (this one) holds 100");
  CHECK_THROWS_WITH(
      TokenLoader(
          LoaderOptions{.shards = {path}, .packing = Packing::bos_bestfit, .batch = 1, .seq = 8}),
      path + ": bos_bestfit packing needs shards that start with the BOS token 0, found " +
          std::to_string(tokens[0]));
  CHECK_THROWS_WITH(parse_packing("padded"),
                    "unknown packing 'padded', expected contiguous or bos_bestfit");

  // One document shared by two ranks: rank 1 never gets one.
  const std::vector<uint32_t> one_doc = {0, 5, 6, 7};
  write_shard(dir / "one.bin", one_doc);
  LoaderOptions o{.shards = {dir / "one.bin"},
                  .packing = Packing::bos_bestfit,
                  .batch = 1,
                  .seq = 4,
                  .rank = 1,
                  .world = 2};
  TokenLoader starved(o);
  CHECK_THROWS_WITH(next(starved, o),
                    "data loader: rank 1 of 2 got no document in a whole pass over 1 shard(s)");
}
