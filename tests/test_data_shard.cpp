#include <catch2/catch.hpp>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "data/shard.h"
#include "test_support.h"

namespace fs = std::filesystem;
using namespace lmtrain;
using lmtrain::test_support::TempDir;

namespace {

std::vector<uint32_t> random_tokens(size_t n, uint32_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint32_t> tokens(n);
  for (auto& t : tokens) t = static_cast<uint32_t>(rng() % vocab);
  return tokens;
}

void write_raw(const std::string& path, const std::vector<int32_t>& header, size_t payload_bytes) {
  std::vector<int32_t> full(kShardHeaderInts, 0);
  std::copy(header.begin(), header.end(), full.begin());
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(full.data()),
            static_cast<std::streamsize>(full.size() * 4));
  const std::vector<char> payload(payload_bytes, 7);
  out.write(payload.data(), static_cast<std::streamsize>(payload.size()));
}

void write_text(const std::string& file, const std::string& text) { std::ofstream(file) << text; }

std::string error_of(const std::string& path) {
  try {
    TokenShard shard(path);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("shards round-trip uint16 and uint32 tokens", "[data][shard]") {
  TempDir dir;
  for (uint32_t vocab : {50257u, 100277u}) {
    const auto tokens = random_tokens(12345, vocab, vocab);
    const std::string path = dir / "train_000000.bin";
    write_shard(path, tokens);
    TokenShard shard(path);
    REQUIRE(shard.size() == tokens.size());
    CHECK(shard.version() == (vocab <= 65536 ? 1 : 2));
    CHECK(fs::file_size(path) == kShardHeaderInts * 4 + tokens.size() * (vocab <= 65536 ? 2 : 4));
    for (size_t i = 0; i < tokens.size(); ++i) REQUIRE(shard.token(i) == tokens[i]);
    std::vector<int32_t> range(100);
    shard.copy(777, range);
    for (size_t i = 0; i < range.size(); ++i)
      REQUIRE(range[i] == static_cast<int32_t>(tokens[777 + i]));
    CHECK_THROWS_AS(shard.copy(tokens.size() - 10, range), Error);
  }
}

TEST_CASE("corrupt shards are rejected with one line naming the file", "[data][shard]") {
  TempDir dir;
  const std::string path = dir / "bad.bin";

  write_raw(path, {kShardMagic, 1, 1000}, 1500);
  CHECK(error_of(path) ==
        path +
            ": truncated shard: header says 1000 tokens (2000 bytes) but file holds 1500 "
            "bytes after the header");
  write_raw(path, {kShardMagic, 2, 10}, 44);
  CHECK(error_of(path) ==
        path +
            ": oversized shard: header says 10 tokens (40 bytes) but file holds 44 bytes "
            "after the header");
  write_raw(path, {12345, 1, 0}, 0);
  CHECK(error_of(path) == path + ": not a token shard: magic 12345, expected 20240520");
  write_raw(path, {kShardMagic, 3, 0}, 0);
  CHECK(error_of(path) ==
        path + ": unknown shard version 3, expected 1 (uint16 tokens) or 2 (uint32 tokens)");
  { std::ofstream(path, std::ios::binary | std::ios::trunc) << "short"; }
  CHECK(error_of(path) ==
        path + ": not a token shard: 5 bytes is shorter than the 1024-byte header");
  CHECK(error_of(dir / "missing.bin").starts_with((dir / "missing.bin") + ": cannot open shard"));
}

TEST_CASE("list_shards accepts a file, a directory or a prefix", "[data][shard]") {
  TempDir dir;
  const auto tokens = random_tokens(10, 100, 1);
  for (const char* name : {"train_000001.bin", "train_000000.bin", "val_000000.bin"})
    write_shard(dir / name, tokens);

  CHECK(list_shards(dir.path().string(), "train") ==
        std::vector<std::string>{dir / "train_000000.bin", dir / "train_000001.bin"});
  CHECK(list_shards(dir.path().string(), "val") ==
        std::vector<std::string>{dir / "val_000000.bin"});
  CHECK(list_shards(dir / "train_000001.bin", "val") ==
        std::vector<std::string>{dir / "train_000001.bin"});
  CHECK(list_shards(dir / "train_", "ignored").size() == 2);

  TempDir empty;
  CHECK_THROWS_WITH(list_shards(empty.path().string(), "train"),
                    empty.path().string() + ": no train_*.bin shards in this directory");
  CHECK_THROWS_WITH(list_shards(dir / "nope_", "train"),
                    (dir / "nope_") + ": no such shard file, directory or shard prefix");
}

// A shard that prepare_data.py's meta.json lists (an incomplete copy) is refused when it is
// gone, in the selection it belongs to only; shards it does not list are taken as they are.
TEST_CASE("list_shards refuses a selection missing a shard that meta.json lists", "[data][shard]") {
  TempDir dir;
  const auto tokens = random_tokens(10, 100, 1);
  for (const char* name : {"train_000000.bin", "train_000002.bin", "val_000000.bin"})
    write_shard(dir / name, tokens);
  const std::string meta = dir / "meta.json";
  write_text(meta, R"({"vocab_size": 100, "bos_id": 0, "sha256": {
      "tokenizer.json": "00", "train_000000.bin": "01", "train_000001.bin": "02",
      "train_000002.bin": "03", "train_000003.bin": "04", "train_000004.bin": "05",
      "train_000005.bin": "06", "val_000000.bin": "07", "val_text.jsonl": "08"}})");
  CHECK_THROWS_WITH(list_shards(dir.path().string(), "train"),
                    dir.path().string() + ": 4 shards that " + meta +
                        " lists are missing (train_000001.bin, train_000003.bin, "
                        "train_000004.bin, ...); an incomplete copy? Copy them, or remove "
                        "their names from its \"sha256\" to use the shards that are there");
  CHECK_THROWS_WITH(list_shards(dir / "train_00000", "ignored"),
                    Catch::Contains("train_000001.bin, train_000003.bin"));
  CHECK(list_shards(dir.path().string(), "val").size() == 1);         // complete
  CHECK(list_shards(dir / "train_000002.bin", "train").size() == 1);  // one file: as asked

  write_text(meta, R"({"vocab_size": 100, "bos_id": 0, "sha256": {"train_000001.bin": "02"}})");
  CHECK_THROWS_WITH(
      list_shards(dir.path().string(), "train"),
      Catch::Contains(": 1 shard that " + meta + " lists is missing (train_000001.bin)"));
  write_shard(dir / "train_000001.bin", tokens);
  CHECK(list_shards(dir.path().string(), "train").size() == 3);  // extra shards are welcome
  write_text(meta, R"({"vocab_size": 100, "bos_id": 0})");       // no list: nothing to check
  std::filesystem::remove(dir / "train_000001.bin");
  CHECK(list_shards(dir.path().string(), "train").size() == 2);
}

// Listing opens each shard, so a damaged validation shard is refused before a run trains.
TEST_CASE("list_shards rejects a damaged shard, naming it", "[data][shard]") {
  TempDir dir;
  write_shard(dir / "val_000000.bin", random_tokens(10, 100, 1));
  write_raw(dir / "val_000001.bin", {12345, 1, 0}, 0);
  CHECK_THROWS_WITH(
      list_shards(dir.path().string(), "val"),
      (dir / "val_000001.bin") + ": not a token shard: magic 12345, expected 20240520");
  CHECK_THROWS_WITH(list_shards(dir / "val_000001.bin", "val"),
                    Catch::StartsWith(dir / "val_000001.bin"));
  // A dangling link is that shard, not a missing one.
  fs::remove(dir / "val_000001.bin");
  fs::create_symlink(dir / "gone.bin", dir / "val_000001.bin");
  CHECK_THROWS_WITH(list_shards(dir.path().string(), "val"),
                    Catch::StartsWith(dir / "val_000001.bin"));
}

// A uint32 id above INT32_MAX would turn into a negative id, and an id outside the model's
// vocabulary would fail in the model far from its source: the shard and position are named.
TEST_CASE("token ids outside int32 or the vocabulary are rejected naming the shard",
          "[data][shard]") {
  TempDir dir;
  const std::string path = dir / "train_000000.bin";
  write_shard(path, std::vector<uint32_t>{1, 2, 0x80000005u, 3, 9000});
  TokenShard shard(path);
  std::vector<int32_t> out(3);
  CHECK_THROWS_WITH(shard.copy(0, out),
                    path + ": token 2 has id 2147483653, outside the range of int32");
  CHECK_THROWS_WITH(shard.copy(2, out, 8192),
                    path + ": token 2 has id 2147483653, outside the model's vocabulary of 8192");
  std::vector<int32_t> two(2);
  CHECK_THROWS_WITH(shard.copy(3, two, 8192),
                    path + ": token 4 has id 9000, outside the model's vocabulary of 8192");
  shard.copy(0, two, 8192);
  CHECK(two == std::vector<int32_t>{1, 2});
}

// The start-up scan reads a whole shard and reports its first bad id in copy()'s words, wherever
// it is: here at the very end, which a run would reach last.
TEST_CASE("check_ids finds an id outside the vocabulary at a shard's very end", "[data][shard]") {
  const uint64_t seed = std::random_device{}();
  CAPTURE(seed);
  TempDir dir;
  const std::string path = dir / "train_000000.bin";
  for (const uint32_t vocab : {8192u, 100000u}) {  // uint16 and uint32 shards
    auto tokens = random_tokens(50000, vocab, seed);
    const uint32_t bad = vocab + uint32_t(seed % 1000);
    tokens.back() = bad;
    write_shard(path, tokens);
    const TokenShard shard(path);
    std::vector<int32_t> last(1);
    CHECK_THROWS_WITH(shard.copy(tokens.size() - 1, last, int32_t(vocab)),
                      path + ": token 49999 has id " + std::to_string(bad) +
                          ", outside the model's vocabulary of " + std::to_string(vocab));
    CHECK_THROWS_WITH(shard.check_ids(int32_t(vocab)),
                      path + ": token 49999 has id " + std::to_string(bad) +
                          ", outside the model's vocabulary of " + std::to_string(vocab));
    CHECK(shard.check_ids(int32_t(bad + 1)));
  }
  write_shard(path, std::vector<uint32_t>{3, 0x80000000u, 5, 0x90000000u});
  CHECK_THROWS_WITH(TokenShard(path).check_ids(0),
                    path + ": token 1 has id 2147483648, outside the range of int32");
}

// The ranks split the shards' tokens, laid end to end, into equal contiguous ranges: together
// they read every token once, each about as many, and a bad id is found by the one rank whose
// range holds it, named by its shard and its position there.
TEST_CASE("check_shard_ids splits the tokens over the ranks", "[data][shard]") {
  const uint64_t seed = std::random_device{}();
  CAPTURE(seed);
  TempDir dir;
  constexpr int32_t kVocab = 8192;
  std::vector<std::string> shards;
  std::vector<uint64_t> starts;  // each shard's first token in the order laid end to end
  uint64_t total = 0;
  for (int i = 0; i < 4; ++i) {  // unequal sizes: one shard holds most tokens
    shards.push_back(dir / fmt::format("train_{:06d}.bin", i));
    const auto tokens = random_tokens((i == 1 ? 9000 : 500) + seed % 1000, kVocab, seed + i);
    write_shard(shards.back(), tokens);
    starts.push_back(total);
    total += tokens.size();
  }
  auto range = [&](int rank, int world) {
    return std::pair{total * rank / world, total * (rank + 1) / world};
  };
  for (int world = 1; world <= 6; ++world) {  // up to more ranks than shards
    CAPTURE(world);
    uint64_t read = 0;
    for (int rank = 0; rank < world; ++rank) {
      const IdCheck done = check_shard_ids(shards, kVocab, rank, world);
      const auto [begin, end] = range(rank, world);
      CHECK(done.tokens == end - begin);
      read += done.tokens;
    }
    CHECK(read == total);
  }

  std::mt19937_64 rng(seed);
  for (int trial = 0; trial < 12; ++trial) {
    // Shard boundaries first, then random positions.
    const size_t s = size_t(trial) % shards.size();
    std::vector<uint32_t> tokens;
    {
      const TokenShard before(shards[s]);  // unmapped before the file is rewritten
      for (size_t i = 0; i < before.size(); ++i) tokens.push_back(before.token(i));
    }
    const size_t local = trial < 4 ? 0 : trial < 8 ? tokens.size() - 1 : rng() % tokens.size();
    const uint32_t good = tokens[local];
    tokens[local] = kVocab + uint32_t(rng() % 100);
    write_shard(shards[s], tokens);
    const uint64_t global = starts[s] + local;
    for (int world = 1; world <= 6; ++world) {
      for (int rank = 0; rank < world; ++rank) {
        CAPTURE(s, local, world, rank);
        const auto [begin, end] = range(rank, world);
        if (begin <= global && global < end) {
          CHECK_THROWS_WITH(check_shard_ids(shards, kVocab, rank, world),
                            shards[s] + ": token " + std::to_string(local) + " has id " +
                                std::to_string(tokens[local]) +
                                ", outside the model's vocabulary of 8192");
        } else {
          CHECK_NOTHROW(check_shard_ids(shards, kVocab, rank, world));
        }
      }
    }
    tokens[local] = good;
    write_shard(shards[s], tokens);
  }
}

// No uint16 id reaches a vocabulary of 65536 or more, so those shards are not read at all; a
// vocabulary of 65535 can still be exceeded, and uint32 shards always can.
TEST_CASE("check_shard_ids skips uint16 shards when the vocabulary is 65536 or more",
          "[data][shard]") {
  const uint64_t seed = std::random_device{}();
  CAPTURE(seed);
  TempDir dir;
  const std::string narrow = dir / "train_000000.bin", wide = dir / "train_000001.bin";
  auto tokens = random_tokens(3000, 65535, seed);
  tokens.back() = 65535;
  write_shard(narrow, tokens);
  REQUIRE(TokenShard(narrow).version() == 1);
  CHECK_FALSE(TokenShard(narrow).check_ids(65536));
  CHECK_THROWS_WITH(TokenShard(narrow).check_ids(65535),
                    narrow + ": token 2999 has id 65535, outside the model's vocabulary of 65535");

  auto wide_tokens = random_tokens(4000, 70000, seed + 1);
  wide_tokens[0] = 65536;  // a uint32 shard
  write_shard(wide, wide_tokens);
  const IdCheck done = check_shard_ids({narrow, wide}, 70000, 0, 1);
  CHECK(done.skipped == 1);
  CHECK(done.shards == 1);
  CHECK(done.tokens == wide_tokens.size());
  wide_tokens.back() = 70000;
  write_shard(wide, wide_tokens);
  CHECK_THROWS_WITH(check_shard_ids({narrow, wide}, 70000, 0, 1),
                    wide + ": token 3999 has id 70000, outside the model's vocabulary of 70000");
}

// prepare_data.py's meta.json beside the shards says which tokenizer made them.
TEST_CASE("check_shard_meta compares meta.json with the tokenizer", "[data][shard]") {
  TempDir dir;
  write_shard(dir / "train_000000.bin", random_tokens(100, 8192, std::random_device{}()));
  const std::string meta = dir / "meta.json";
  const std::string shard = list_shards(dir / "train_", "train").front();  // a prefix: its dir
  auto write_meta = [&](const std::string& text) { write_text(meta, text); };

  CHECK_NOTHROW(check_shard_meta(shard, "tok.json", 8192, 0));  // no meta.json: llm.c's shards
  write_meta(R"({"tokenizer": "bpe", "vocab_size": 8192, "bos_id": 0, "bos_token": "<|bos|>"})");
  CHECK_NOTHROW(check_shard_meta(shard, "tok.json", 8192, 0));
  CHECK_THROWS_WITH(check_shard_meta(shard, "gpt2/tokenizer.json", 50257, 50256),
                    meta +
                        ": the shards beside it were made with vocab_size 8192 and bos_id 0, but "
                        "the tokenizer gpt2/tokenizer.json has vocab_size 50257 and bos_id 50256");
  CHECK_THROWS_WITH(check_shard_meta(shard, "tok.json", 8192, 1),
                    Catch::Contains("bos_id 0") && Catch::Contains("bos_id 1"));

  write_meta(R"({"vocab_size": 8192, "bos_id": 0)");
  CHECK_THROWS_WITH(check_shard_meta(shard, "tok.json", 8192, 0),
                    Catch::StartsWith(meta + ": not valid JSON: parse error at line 1, column 33"));
  write_meta(R"({"vocab_size": 1e999, "bos_id": 0})");  // beyond a double: nlohmann's other error
  CHECK_THROWS_WITH(check_shard_meta(shard, "tok.json", 8192, 0),
                    Catch::StartsWith(meta + ": not valid JSON: number overflow"));
  write_meta(R"([8192, 0])");
  CHECK_THROWS_WITH(check_shard_meta(shard, "tok.json", 8192, 0),
                    meta + ": not a JSON object, expected scripts/prepare_data.py's meta.json");
  write_meta(R"({"vocab_size": "8192", "bos_id": 0})");
  CHECK_THROWS_WITH(check_shard_meta(shard, "tok.json", 8192, 0),
                    meta +
                        ": expected an integer 'vocab_size' (as scripts/prepare_data.py writes), "
                        "got \"8192\"");
  write_meta(R"({"vocab_size": 8192})");
  CHECK_THROWS_WITH(check_shard_meta(shard, "tok.json", 8192, 0),
                    Catch::Contains("'bos_id'") && Catch::EndsWith("got none"));

  // The tokenizer.json beside the shards: the same one (as JSON, or the file itself) passes,
  // one of the same size and BOS with another merge does not.
  write_meta(R"({"vocab_size": 8192, "bos_id": 0})");
  TempDir other;
  const std::string beside = dir / "tokenizer.json", configured = other / "tokenizer.json";
  write_text(beside, R"({"model": {"type": "BPE", "merges": [["a", "b"], ["ab", "c"]]}})");
  write_text(configured,
             "{ \"model\" : {\"merges\": [[\"a\",\"b\"], [\"ab\",\"c\"]],\n"
             "  \"type\": \"BPE\"} }");
  CHECK_NOTHROW(check_shard_meta(shard, configured, 8192, 0));
  CHECK_NOTHROW(check_shard_meta(shard, beside, 8192, 0));
  write_text(configured, R"({"model": {"type": "BPE", "merges": [["a", "b"], ["b", "c"]]}})");
  CHECK_THROWS_WITH(check_shard_meta(shard, configured, 8192, 0),
                    beside +
                        ": the tokenizer the shards beside it were made with differs from "
                        "the tokenizer " +
                        configured + " (the same vocab_size and bos_id, other contents)");
  write_text(beside, "{");
  CHECK_THROWS_WITH(check_shard_meta(shard, configured, 8192, 0),
                    Catch::StartsWith(beside + ": not valid JSON: parse error at line 1"));
}
