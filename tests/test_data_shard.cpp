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
