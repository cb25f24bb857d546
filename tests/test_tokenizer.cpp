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
  for (const char* name : {"meta.json", "tokenizer.json", "val_text.jsonl", "tokenizer_cases.jsonl",
                           "tokenizer_decode_cases.jsonl"})
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

// Writes `j` as tokenizer.json in `dir` and returns the file's path.
std::string write_tokenizer(const TempDir& dir, const nlohmann::json& j) {
  const fs::path path = dir.path() / "tokenizer.json";
  std::ofstream(path) << j.dump();
  return path.string();
}

// The tokenizer with ids below `n` only and the merges among them, quicker to load many times.
nlohmann::json first_tokens(nlohmann::json j, int n) {
  auto& model = j["model"];
  nlohmann::json vocab = nlohmann::json::object(), merges = nlohmann::json::array();
  for (const auto& [entry, id] : model["vocab"].items())
    if (id.get<int>() < n) vocab[entry] = id;
  for (const auto& merge : model["merges"]) {
    const auto left = merge[0].get<std::string>(), right = merge[1].get<std::string>();
    if (vocab.contains(left) && vocab.contains(right) && vocab.contains(left + right))
      merges.push_back(merge);
  }
  model["vocab"] = vocab;
  model["merges"] = merges;
  return j;
}

// JSON pointers to a tokenizer.json's values, of vocab and merges only the first.
void value_pointers(const nlohmann::json& j, const nlohmann::json::json_pointer& at,
                    std::vector<nlohmann::json::json_pointer>& out) {
  out.push_back(at);
  const bool bulk = at.to_string() == "/model/vocab" || at.to_string() == "/model/merges";
  if (j.is_object())
    for (const auto& [key, value] : j.items()) {
      value_pointers(value, at / key, out);
      if (bulk) break;
    }
  if (j.is_array())
    for (size_t i = 0; i < j.size() && !(bulk && i > 0); ++i) value_pointers(j[i], at / i, out);
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

// A model may emit a character's bytes cut short, out of order or beside a BOS; the text must
// still be UTF-8, and the same as Python's (one U+FFFD per ill-formed subpart).
TEST_CASE("C++ tokenizer decodes ids that do not make UTF-8 as Python does", "[data][tokenizer]") {
  REQUIRE(data_prepared());
  const auto tok = Tokenizer::load((kData / "tokenizer.json").string());
  const auto cases = read_jsonl(kData / "tokenizer_decode_cases.jsonl");
  size_t repaired = 0;
  for (const auto& c : cases) {
    const auto text = c["text"].get<std::string>();
    INFO(text);
    CHECK(tok.decode(c["ids"].get<std::vector<int32_t>>()) == text);
    repaired += text.find("\xef\xbf\xbd") != std::string::npos;
  }
  CHECK(repaired >= cases.size() / 2);  // the cases do hold ill-formed bytes
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
  auto rejects = [&](const nlohmann::json& j, const std::string& message) {
    const auto path = write_tokenizer(tmp, j);
    CHECK_THROWS_WITH(Tokenizer::load(path), path + ": " + message);
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
  const auto path = write_tokenizer(tmp, j);
  CHECK_THROWS_WITH(Tokenizer::load(path),
                    fmt::format("{}: added_tokens[1].content: expected a non-empty string for "
                                "token id {}, got \"\"",
                                path, id));
}

// tokenizers reads every part but the model as null when its key is absent.
TEST_CASE("tokenizer.json without its optional parts reads them as null", "[data][tokenizer]") {
  REQUIRE(data_prepared());
  const auto original = read_json(kData / "tokenizer.json");
  const auto reference = Tokenizer::load((kData / "tokenizer.json").string());
  TempDir tmp;
  auto j = original;
  for (const char* key :
       {"version", "truncation", "padding", "normalizer", "post_processor", "decoder"})
    j.erase(key);
  const auto tok = Tokenizer::load(write_tokenizer(tmp, j));
  for (const char* text : {"To be, or not to be", "<|bos|>Zürich 東京 🙂", ""})
    CHECK(tok.encode(text) == reference.encode(text));

  j = original;
  j.erase("added_tokens");
  auto path = write_tokenizer(tmp, j);
  CHECK_THROWS_WITH(Tokenizer::load(path),
                    path + ": no <|bos|> or <|endoftext|> added token to use as BOS");
  j = original;
  j.erase("pre_tokenizer");
  path = write_tokenizer(tmp, j);
  CHECK_THROWS_WITH(Tokenizer::load(path),
                    path +
                        ": unsupported pre_tokenizer null, expected ByteLevel with "
                        "add_prefix_space false and use_regex true");
}

TEST_CASE("tokenizer.json values of the wrong type are named by their path", "[data][tokenizer]") {
  REQUIRE(data_prepared());
  const auto original = read_json(kData / "tokenizer.json");
  const size_t entries = original["model"]["vocab"].size() + original["added_tokens"].size();
  TempDir tmp;
  auto rejects = [&](const std::string& pointer, const nlohmann::json& value,
                     const std::string& message) {
    auto j = original;
    j[nlohmann::json::json_pointer(pointer)] = value;
    const auto path = write_tokenizer(tmp, j);
    CHECK_THROWS_WITH(Tokenizer::load(path), path + ": " + message);
  };
  rejects("", nlohmann::json::array(), "expected an object, got array");
  rejects("/model/vocab", nlohmann::json::array(),
          "model.vocab: expected an object of token -> id, got array");
  rejects("/model/type", 5, "model.type: expected a string, got 5");
  rejects("/model/byte_fallback", nullptr, "model.byte_fallback: expected true or false, got null");
  rejects("/pre_tokenizer/use_regex", "yes",
          "pre_tokenizer.use_regex: expected true or false, got \"yes\"");
  rejects("/decoder", nlohmann::json::array(), "decoder: expected an object, got array");
  rejects("/added_tokens", nlohmann::json::object(),
          "added_tokens: expected an array of added tokens, got object");
  rejects("/added_tokens/0", 7, "added_tokens[0]: expected an object, got 7");
  rejects("/added_tokens/0/id", "0",
          fmt::format("added_tokens[0].id: expected an integer id in [0, {}), got \"0\"", entries));
  rejects("/model/vocab/a", -1,
          fmt::format("model.vocab[\"a\"]: expected an integer id in [0, {}), got -1", entries));
  rejects("/model/merges/0", 5,
          "model.merges[0]: expected a merge \"a b\" or [\"a\", \"b\"], got 5");
  rejects("/model/merges/0", {"a"},
          "model.merges[0]: expected a merge \"a b\" or [\"a\", \"b\"], got array");
  auto j = original;
  j.erase("model");
  const auto path = write_tokenizer(tmp, j);
  CHECK_THROWS_WITH(Tokenizer::load(path), path + ": key 'model' is missing, expected an object");
}

// Every value replaced by one of another type, or removed: loaded, or refused in one line that
// names the file, never with a json library message.
TEST_CASE("tokenizer.json with any value retyped or removed loads or is refused in one line",
          "[data][tokenizer]") {
  REQUIRE(data_prepared());
  const auto original = first_tokens(read_json(kData / "tokenizer.json"), 300);
  REQUIRE(original["model"]["merges"].size() > 1);
  std::vector<nlohmann::json::json_pointer> pointers;
  value_pointers(original, nlohmann::json::json_pointer(), pointers);
  const std::vector<nlohmann::json> others = {
      nullptr, 0, -1, "", "x", true, nlohmann::json::array(), nlohmann::json::object()};
  TempDir tmp;
  for (const auto& pointer : pointers) {
    for (size_t k = 0; k <= others.size(); ++k) {
      if (k == others.size() && pointer.empty()) continue;  // the document cannot be removed
      auto j = original;
      if (k < others.size()) {
        j[pointer] = others[k];
      } else if (auto& parent = j[pointer.parent_pointer()]; parent.is_object()) {
        parent.erase(pointer.back());
      } else if (parent.is_array()) {
        parent.erase(std::stoul(pointer.back()));
      }
      INFO(pointer.to_string() << (k < others.size() ? " = " + others[k].dump() : " removed"));
      const auto path = write_tokenizer(tmp, j);
      try {
        Tokenizer::load(path).encode("<|bos|>To be");
      } catch (const Error& e) {
        const std::string message = e.what();
        CHECK(message.rfind(path + ": ", 0) == 0);
        CHECK(message.find('\n') == std::string::npos);
        CHECK(message.find("json.exception") == std::string::npos);
      } catch (const std::exception& e) {
        FAIL_CHECK("not an lmtrain::Error: " << e.what());
      }
    }
  }
}

// A BPE model without merges would encode byte by byte.
TEST_CASE("tokenizer.json merges must be an array in either format", "[data][tokenizer]") {
  REQUIRE(data_prepared());
  const auto original = read_json(kData / "tokenizer.json");
  const auto reference = Tokenizer::load((kData / "tokenizer.json").string());
  TempDir tmp;
  const std::string expected = "expected an array of merges (\"a b\" or [\"a\", \"b\"])";
  for (const nlohmann::json& merges : {nlohmann::json(), nlohmann::json::object()}) {
    auto j = original;
    j["model"]["merges"] = merges;
    const auto path = write_tokenizer(tmp, j);
    CHECK_THROWS_WITH(Tokenizer::load(path), fmt::format("{}: model.merges: {}, got {}", path,
                                                         expected, merges.type_name()));
  }
  auto j = original;
  j["model"].erase("merges");
  auto path = write_tokenizer(tmp, j);
  CHECK_THROWS_WITH(Tokenizer::load(path), path + ": key 'model.merges' is missing, " + expected);

  // "a b" strings, as older tokenizers write them, rank the same as [a, b] pairs.
  j = original;
  for (auto& merge : j["model"]["merges"])
    merge = merge[0].get<std::string>() + " " + merge[1].get<std::string>();
  const auto strings = Tokenizer::load(write_tokenizer(tmp, j));
  const std::string text = "To be, or not to be: that is the question.";
  CHECK(strings.encode(text) == reference.encode(text));

  // No merges at all is a valid (byte-level) BPE.
  j["model"]["merges"] = nlohmann::json::array();
  const auto bytes = Tokenizer::load(write_tokenizer(tmp, j));
  CHECK(bytes.encode(text).size() == text.size());
}
