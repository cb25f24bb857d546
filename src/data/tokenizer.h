// Byte-level BPE (GPT-2 style) read from a Hugging Face tokenizer.json, encoding exactly as the
// `tokenizers` library does for the subset prepare_data.py writes (docs/FORMATS.md "Tokenizer").
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace lmtrain {

class Tokenizer {
 public:
  // Throws lmtrain::Error naming the file for anything outside the supported subset.
  static Tokenizer load(const std::string& tokenizer_json);

  // Added tokens (e.g. <|bos|>) written in the text map to their ids. Caches words, so one
  // Tokenizer must not encode on two threads at once (copies may).
  std::vector<int32_t> encode(std::string_view text) const;
  // Added tokens decode to their text, so decode(encode(x)) == x. Bytes that do not form UTF-8
  // become U+FFFD, as in Hugging Face's decoder, so the text is always valid UTF-8.
  std::string decode(std::span<const int32_t> ids) const;

  int vocab_size() const { return static_cast<int>(bytes_.size()); }
  // <|bos|> if the tokenizer has it, else <|endoftext|> (GPT-2).
  int32_t bos_id() const { return bos_id_; }
  // Bytes of text the token stands for, 0 for added (special) tokens: bits-per-byte denominators.
  int token_byte_length(int32_t id) const;

 private:
  struct Merge {
    int32_t rank;
    int32_t id;  // the merged token
  };
  struct Regex;  // the compiled PCRE2 pre-tokenizer, kept out of the header

  Tokenizer();
  // load() after parsing; checks every value it reads, naming the file and the value's path.
  static Tokenizer from_json(const nlohmann::json& j, const std::string& path);
  void encode_ordinary(std::string_view text, std::vector<int32_t>& out) const;
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;
  void check_id(int32_t id) const;

  std::vector<std::string> bytes_;                  // id -> raw bytes (added tokens: their content)
  std::vector<bool> added_;                         // id -> is an added token
  std::unordered_map<std::string, int32_t> vocab_;  // raw bytes -> id, for ignore_merges
  std::unordered_map<uint64_t, Merge> merges_;      // (left id << 32 | right id) -> merge
  std::array<int32_t, 256> byte_ids_{};             // id of each single byte
  std::vector<std::pair<std::string, int32_t>> added_tokens_;  // longest first
  bool ignore_merges_ = false;
  int32_t bos_id_ = -1;
  std::shared_ptr<Regex> regex_;  // shared: Tokenizer stays copyable, the regex is read-only
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;  // word -> ids
};

}  // namespace lmtrain
