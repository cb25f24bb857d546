#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "test_support.h"

namespace fs = std::filesystem;
using namespace lmtrain;
using lmtrain::test_support::TempDir;

namespace {

// The default corpus as prepared by scripts/prepare_data.py (the Makefile runs it before tests).
const fs::path kData = fs::path(LMTRAIN_SOURCE_DIR) / "data" / "tiny";

// make test prepares it; without it these tests fail rather than pass having checked nothing.
bool data_prepared() {
  for (const char* name :
       {"meta.json", "tokenizer.json", "val_text.jsonl", "tokenizer_cases.jsonl"})
    if (!fs::exists(kData / name)) {
      UNSCOPED_INFO((kData / name).string() << " is missing: run make data");
      return false;
    }
  return true;
}

std::vector<nlohmann::json> read_jsonl(const fs::path& path) {
  std::ifstream in(path);
  std::vector<nlohmann::json> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
  return lines;
}

nlohmann::json read_json(const fs::path& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

}  // namespace

TEST_CASE("C++ tokenizer reproduces Python's ids on the whole validation text",
          "[data][tokenizer]") {
  REQUIRE(data_prepared());
  const auto tok = Tokenizer::load((kData / "tokenizer.json").string());
  const auto meta = read_json(kData / "meta.json");
  CHECK(tok.vocab_size() == meta["vocab_size"].get<int>());
  CHECK(tok.bos_id() == meta["bos_id"].get<int32_t>());

  // The val shards hold [BOS] + ids for each document of val_text.jsonl, in order.
  std::vector<int32_t> expected;
  for (const auto& path : list_shards(kData.string(), "val")) {
    TokenShard shard(path);
    const size_t old = expected.size();
    expected.resize(old + shard.size());
    shard.copy(0, std::span(expected).subspan(old));
  }
  size_t at = 0;
  for (const auto& doc : read_jsonl(kData / "val_text.jsonl")) {
    const auto text = doc["text"].get<std::string>();
    const auto ids = tok.encode(text);
    REQUIRE(at + 1 + ids.size() <= expected.size());
    REQUIRE(expected[at] == tok.bos_id());
    REQUIRE(std::equal(ids.begin(), ids.end(), expected.begin() + std::ptrdiff_t(at + 1)));
    REQUIRE(tok.decode(ids) == text);
    at += 1 + ids.size();
  }
  CHECK(at == expected.size());
}

TEST_CASE("C++ tokenizer reproduces Python's ids on edge cases", "[data][tokenizer]") {
  REQUIRE(data_prepared());
  const auto tok = Tokenizer::load((kData / "tokenizer.json").string());
  for (const auto& c : read_jsonl(kData / "tokenizer_cases.jsonl")) {
    const auto text = c["text"].get<std::string>();
    INFO(text);
    CHECK(tok.encode(text) == c["ids"].get<std::vector<int32_t>>());
  }
}

TEST_CASE("tokenizer round-trips text and counts bytes", "[data][tokenizer]") {
  REQUIRE(data_prepared());
  const auto tok = Tokenizer::load((kData / "tokenizer.json").string());
  const std::vector<std::string> cases = {
      "To be, or not to be: that is the question.",
      "   \n\n\t  spaces\tand\r\nnewlines \n",
      "Zürich, Ærøskøbing, Kraków — 東京, Москва, القاهرة",
      "emoji 🙂🚀 family 👨‍👩‍👧‍👦 flag 🇳🇿",
      "<|bos|>prompt<|bos|><|bos|>",
      "<|bos",
      "x",
  };
  for (const auto& text : cases) {
    INFO(text);
    const auto ids = tok.encode(text);
    CHECK(tok.decode(ids) == text);
    size_t bytes = 0, specials = 0;
    for (int32_t id : ids) {
      bytes += size_t(tok.token_byte_length(id));
      specials += id == tok.bos_id();
    }
    CHECK(bytes + specials * std::string("<|bos|>").size() == text.size());
  }
  CHECK(tok.encode("<|bos|>") == std::vector<int32_t>{tok.bos_id()});
  CHECK(tok.token_byte_length(tok.bos_id()) == 0);
  CHECK(tok.encode("").empty());
  CHECK_THROWS_AS(tok.encode("bad \xff\xfe utf-8"), Error);
  CHECK_THROWS_WITH(tok.decode(std::vector<int32_t>{tok.vocab_size()}),
                    fmt::format("tokenizer: token id {} is outside the vocabulary [0, {})",
                                tok.vocab_size(), tok.vocab_size()));
}

TEST_CASE("tokenizer.json outside the supported subset is rejected", "[data][tokenizer]") {
  REQUIRE(data_prepared());
  const auto original = read_json(kData / "tokenizer.json");
  TempDir tmp;
  const fs::path path = tmp.path() / "tokenizer_unsupported.json";
  auto rejects = [&](nlohmann::json j, const std::string& message) {
    std::ofstream(path) << j.dump();
    CHECK_THROWS_WITH(Tokenizer::load(path.string()), path.string() + ": " + message);
  };
  auto j = original;
  j["normalizer"] = {{"type", "NFC"}};
  rejects(j, "unsupported normalizer 'NFC'");
  j = original;
  j["model"]["type"] = "WordPiece";
  rejects(j, "unsupported model type 'WordPiece', expected BPE");
  j = original;
  j["pre_tokenizer"]["add_prefix_space"] = true;
  rejects(j, "unsupported pre_tokenizer " + j["pre_tokenizer"].dump() +
                 ", expected ByteLevel with add_prefix_space false and use_regex true");
  j = original;
  j["added_tokens"] = nlohmann::json::array();
  rejects(j, "no <|bos|> or <|endoftext|> added token to use as BOS");
  CHECK_THROWS_WITH(Tokenizer::load("no/such/tokenizer.json"),
                    "no/such/tokenizer.json: cannot open tokenizer");
}

// An empty added token would match at every position, so encode() would never advance.
TEST_CASE("tokenizer.json with an empty added token is rejected", "[data][tokenizer]") {
  REQUIRE(data_prepared());
  auto j = read_json(kData / "tokenizer.json");
  const int id = j["model"]["vocab"].size();
  j["added_tokens"].push_back({{"id", id}, {"content", ""}, {"special", true}});
  TempDir tmp;
  const fs::path path = tmp.path() / "tokenizer.json";
  std::ofstream(path) << j.dump();
  CHECK_THROWS_WITH(Tokenizer::load(path.string()),
                    fmt::format("{}: added_tokens[1].content: expected a non-empty string for "
                                "token id {}, got \"\"",
                                path.string(), id));
}
