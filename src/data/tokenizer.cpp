#include "data/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"

namespace lmtrain {

namespace {

// GPT-2's pre-tokenizer split, which HF's ByteLevel pre-tokenizer uses when use_regex is true.
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr size_t kMaxCachedWords = size_t{1} << 20;

// GPT-2 shows each byte as a printable code point so vocab entries are readable strings: printable
// Latin-1 bytes stand for themselves, the rest are shifted to 256 and up. Returns the inverse map.
std::unordered_map<char32_t, uint8_t> unicode_to_byte() {
  std::unordered_map<char32_t, uint8_t> map;
  char32_t shifted = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable =
        (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    map[printable ? char32_t(b) : shifted++] = uint8_t(b);
  }
  return map;
}

// Converts a vocab entry (UTF-8 of byte-standing code points) to the raw bytes it stands for.
std::string vocab_bytes(const std::string& entry,
                        const std::unordered_map<char32_t, uint8_t>& to_byte,
                        const std::string& path) {
  std::string out;
  for (size_t i = 0; i < entry.size();) {
    const auto lead = uint8_t(entry[i]);
    const int extra = lead < 0x80 ? 0 : lead < 0xE0 ? 1 : lead < 0xF0 ? 2 : 3;
    char32_t cp = extra == 0 ? lead : lead & (0x3F >> extra);
    for (int k = 1; k <= extra && i + k < entry.size(); ++k)
      cp = (cp << 6) | (uint8_t(entry[i + k]) & 0x3F);
    i += size_t(extra) + 1;
    const auto it = to_byte.find(cp);
    check(it != to_byte.end(), "{}: vocab entry '{}' is not byte-level (code point U+{:04X})", path,
          entry, uint32_t(cp));
    out.push_back(char(it->second));
  }
  return out;
}

bool is_null_or_empty(const nlohmann::json& j, const char* key) {
  return !j.contains(key) || j[key].is_null() ||
         (j[key].is_string() && j[key].get<std::string>().empty());
}

std::string type_of(const nlohmann::json& j) { return j.is_null() ? "null" : j.value("type", "?"); }

}  // namespace

struct Tokenizer::Regex {
  pcre2_code* code = nullptr;
  ~Regex() { pcre2_code_free(code); }
};

Tokenizer::Tokenizer() = default;

Tokenizer Tokenizer::load(const std::string& path) {
  check(!std::filesystem::is_directory(path), "{}: is a directory, expected a tokenizer.json",
        path);
  std::ifstream file(path);
  check(file.good(), "{}: cannot open tokenizer", path);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(file);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: not valid JSON: {}", path, e.what());
  }

  // A missing key or a value of the wrong type surfaces as a json exception: name the file.
  try {
    return from_json(j, path);
  } catch (const nlohmann::json::exception& e) {
    fail("{}: unsupported tokenizer structure: {}", path, e.what());
  }
}

Tokenizer Tokenizer::from_json(const nlohmann::json& j, const std::string& path) {
  // Only what prepare_data.py writes: byte-level BPE with no normalizer or template processing.
  const auto& model = j.at("model");
  check(type_of(model) == "BPE", "{}: unsupported model type '{}', expected BPE", path,
        type_of(model));
  check(j.value("normalizer", nlohmann::json()).is_null(), "{}: unsupported normalizer '{}'", path,
        type_of(j["normalizer"]));
  const auto pre = j.value("pre_tokenizer", nlohmann::json());
  check(type_of(pre) == "ByteLevel" && !pre.value("add_prefix_space", false) &&
            pre.value("use_regex", true),
        "{}: unsupported pre_tokenizer {}, expected ByteLevel with add_prefix_space false and "
        "use_regex true",
        path, pre.dump());
  for (const char* key : {"decoder", "post_processor"}) {
    const auto part = j.value(key, nlohmann::json());
    check(part.is_null() || type_of(part) == "ByteLevel", "{}: unsupported {} '{}'", path, key,
          type_of(part));
  }
  check(model.value("dropout", nlohmann::json()).is_null() &&
            !model.value("byte_fallback", false) &&
            is_null_or_empty(model, "continuing_subword_prefix") &&
            is_null_or_empty(model, "end_of_word_suffix"),
        "{}: unsupported BPE options (dropout, byte_fallback or subword affixes)", path);

  Tokenizer tok;
  tok.ignore_merges_ = model.value("ignore_merges", false);
  const auto to_byte = unicode_to_byte();
  std::unordered_map<std::string, int32_t> by_entry;  // vocab entry as written -> id
  int32_t max_id = -1;
  // Every id in [0, max_id] must be present, so none can reach the number of entries.
  const size_t entries =
      model.at("vocab").size() + j.value("added_tokens", nlohmann::json::array()).size();
  auto checked_id = [&](const nlohmann::json& id, const std::string& entry) {
    check(id.is_number_integer() && id.get<int64_t>() >= 0 && id.get<int64_t>() < int64_t(entries),
          "{}: token '{}' has id {}, expected an integer in [0, {})", path, entry, id.dump(),
          entries);
    return id.get<int32_t>();
  };
  for (const auto& [entry, id] : model.at("vocab").items()) {
    by_entry[entry] = checked_id(id, entry);
    max_id = std::max(max_id, by_entry[entry]);
  }
  for (const auto& added : j.value("added_tokens", nlohmann::json::array()))
    max_id = std::max(max_id, checked_id(added.at("id"), added.value("content", "?")));
  tok.bytes_.resize(size_t(max_id + 1));
  tok.added_.assign(size_t(max_id + 1), false);
  std::vector<bool> seen(size_t(max_id + 1), false);
  for (const auto& [entry, id] : by_entry) {
    check(!seen[size_t(id)], "{}: token id {} is used by two vocab entries", path, id);
    tok.bytes_[size_t(id)] = vocab_bytes(entry, to_byte, path);
    tok.vocab_[tok.bytes_[size_t(id)]] = id;
    seen[size_t(id)] = true;
  }

  const auto added_tokens = j.value("added_tokens", nlohmann::json::array());
  for (size_t i = 0; i < added_tokens.size(); ++i) {
    const auto& added = added_tokens[i];
    const auto content = added.at("content").get<std::string>();
    const auto id = added.at("id").get<int32_t>();
    // An empty token would match at every position, so encode() would never advance.
    check(!content.empty(),
          "{}: added_tokens[{}].content: expected a non-empty string for token id {}, got \"\"",
          path, i, id);
    check(!added.value("lstrip", false) && !added.value("rstrip", false) &&
              !added.value("single_word", false),
          "{}: added token '{}' uses lstrip, rstrip or single_word, which are unsupported", path,
          content);
    tok.bytes_[size_t(id)] = content;
    tok.added_[size_t(id)] = true;
    seen[size_t(id)] = true;
    tok.added_tokens_.emplace_back(content, id);
  }
  std::stable_sort(tok.added_tokens_.begin(), tok.added_tokens_.end(),
                   [](const auto& a, const auto& b) { return a.first.size() > b.first.size(); });
  const auto missing = std::find(seen.begin(), seen.end(), false);
  check(missing == seen.end(), "{}: token id {} is missing from the vocab", path,
        missing - seen.begin());
  for (const char* name : {"<|bos|>", "<|endoftext|>"}) {
    const auto it = std::find_if(tok.added_tokens_.begin(), tok.added_tokens_.end(),
                                 [&](const auto& t) { return t.first == name; });
    if (it != tok.added_tokens_.end() && tok.bos_id_ < 0) tok.bos_id_ = it->second;
  }
  check(tok.bos_id_ >= 0, "{}: no <|bos|> or <|endoftext|> added token to use as BOS", path);

  for (int b = 0; b < 256; ++b) {
    const auto it = tok.vocab_.find(std::string(1, char(b)));
    check(it != tok.vocab_.end(), "{}: byte 0x{:02X} has no token, so some text cannot be encoded",
          path, b);
    tok.byte_ids_[size_t(b)] = it->second;
  }

  // Merges come as "left right" strings (older files) or [left, right] pairs.
  int32_t rank = 0;
  for (const auto& merge : model.at("merges")) {
    std::string left, right;
    if (merge.is_array()) {
      left = merge.at(0).get<std::string>();
      right = merge.at(1).get<std::string>();
    } else {
      const auto text = merge.get<std::string>();
      const auto space = text.find(' ');
      check(space != std::string::npos, "{}: malformed merge '{}'", path, text);
      left = text.substr(0, space);
      right = text.substr(space + 1);
    }
    const auto l = by_entry.find(left), r = by_entry.find(right), m = by_entry.find(left + right);
    check(l != by_entry.end() && r != by_entry.end() && m != by_entry.end(),
          "{}: merge '{} {}' refers to tokens not in the vocab", path, left, right);
    const uint64_t key = uint64_t(uint32_t(l->second)) << 32 | uint32_t(r->second);
    tok.merges_.emplace(key, Merge{rank++, m->second});
  }

  tok.regex_ = std::make_shared<Regex>();
  int error = 0;
  PCRE2_SIZE offset = 0;
  tok.regex_->code =
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(kGpt2Pattern), PCRE2_ZERO_TERMINATED,
                    PCRE2_UTF | PCRE2_UCP, &error, &offset, nullptr);
  check(tok.regex_->code != nullptr, "pcre2: cannot compile the GPT-2 pattern (error {})", error);
  pcre2_jit_compile(tok.regex_->code,
                    PCRE2_JIT_COMPLETE);  // optional speed-up; falls back to the interpreter
  return tok;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3);
  // Split out added tokens first, leftmost then longest, as HF does; BPE the text between them.
  std::vector<size_t> next(added_tokens_.size());
  for (size_t k = 0; k < next.size(); ++k) next[k] = text.find(added_tokens_[k].first);
  size_t pos = 0;
  for (;;) {
    size_t best = next.size();
    for (size_t k = 0; k < next.size(); ++k)
      if (next[k] != std::string_view::npos && (best == next.size() || next[k] < next[best]))
        best = k;
    if (best == next.size()) break;
    encode_ordinary(text.substr(pos, next[best] - pos), out);
    out.push_back(added_tokens_[best].second);
    pos = next[best] + added_tokens_[best].first.size();
    for (size_t k = 0; k < next.size(); ++k)
      if (next[k] != std::string_view::npos && next[k] < pos)
        next[k] = text.find(added_tokens_[k].first, pos);
  }
  encode_ordinary(text.substr(pos), out);
  return out;
}

void Tokenizer::encode_ordinary(std::string_view text, std::vector<int32_t>& out) const {
  if (text.empty()) return;
  std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> match(
      pcre2_match_data_create_from_pattern(regex_->code, nullptr), &pcre2_match_data_free);
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  // The first match validates the whole text as UTF-8; later ones skip the check (else quadratic).
  uint32_t options = 0;
  for (size_t pos = 0; pos < text.size(); options = PCRE2_NO_UTF_CHECK) {
    const int rc =
        pcre2_match(regex_->code, subject, text.size(), pos, options, match.get(), nullptr);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    check(rc > 0,
          "tokenizer: cannot encode text that is not valid UTF-8 (pcre2 error {} near byte {})", rc,
          pcre2_get_startchar(match.get()));
    const PCRE2_SIZE* span = pcre2_get_ovector_pointer(match.get());
    check(span[1] > span[0], "tokenizer: empty pre-token at byte {}", span[0]);
    encode_word(text.substr(span[0], span[1] - span[0]), out);
    pos = span[1];
  }
}

void Tokenizer::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  const std::string key(word);
  if (const auto hit = cache_.find(key); hit != cache_.end()) {
    out.insert(out.end(), hit->second.begin(), hit->second.end());
    return;
  }
  std::vector<int32_t> ids;
  if (const auto whole = vocab_.find(key); ignore_merges_ && whole != vocab_.end()) {
    ids.push_back(whole->second);
  } else {
    for (char c : word) ids.push_back(byte_ids_[uint8_t(c)]);
    // GPT-2's loop: merge every occurrence of the lowest-ranked adjacent pair until none is left.
    for (;;) {
      const Merge* best = nullptr;
      uint64_t best_key = 0;
      for (size_t i = 0; i + 1 < ids.size(); ++i) {
        const uint64_t k = uint64_t(uint32_t(ids[i])) << 32 | uint32_t(ids[i + 1]);
        const auto it = merges_.find(k);
        if (it != merges_.end() && (!best || it->second.rank < best->rank)) {
          best = &it->second;
          best_key = k;
        }
      }
      if (!best) break;
      size_t w = 0;
      for (size_t i = 0; i < ids.size(); ++i, ++w) {
        const bool hit = i + 1 < ids.size() &&
                         (uint64_t(uint32_t(ids[i])) << 32 | uint32_t(ids[i + 1])) == best_key;
        ids[w] = hit ? best->id : ids[i];
        i += hit;
      }
      ids.resize(w);
    }
  }
  out.insert(out.end(), ids.begin(), ids.end());
  if (cache_.size() >= kMaxCachedWords) cache_.clear();
  cache_.emplace(key, std::move(ids));
}

void Tokenizer::check_id(int32_t id) const {
  check(id >= 0 && id < vocab_size(), "tokenizer: token id {} is outside the vocabulary [0, {})",
        id, vocab_size());
}

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  std::string text;
  for (int32_t id : ids) {
    check_id(id);
    text += bytes_[size_t(id)];
  }
  return text;
}

int Tokenizer::token_byte_length(int32_t id) const {
  check_id(id);
  return added_[size_t(id)] ? 0 : static_cast<int>(bytes_[size_t(id)].size());
}

}  // namespace lmtrain
