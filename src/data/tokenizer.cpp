#include "data/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/utf8.h"
#include "io/json_reason.h"

namespace lmtrain {

namespace {

// GPT-2's pre-tokenizer split, which HF's ByteLevel pre-tokenizer uses when use_regex is true.
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
constexpr size_t kMaxCachedWords = size_t{1} << 20;

using nlohmann::json;

// One JSON string, quoted and escaped, so that a token in a message keeps it on one line.
std::string quoted(const std::string& text) { return json(text).dump(); }

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
    check(it != to_byte.end(), "{}: vocab entry {} is not byte-level (code point U+{:04X})", path,
          quoted(entry), uint32_t(cp));
    out.push_back(char(it->second));
  }
  return out;
}

// A value of tokenizer.json with its path there ("model.vocab", "added_tokens[2].id"), so that a
// missing key or a wrong type is one line naming the file, the path and what was expected.
class Field {
 public:
  using Is = bool (json::*)() const noexcept;  // a type test such as &json::is_array

  Field(const json* value, const std::string& file, std::string path)
      : value_(value), file_(&file), path_(std::move(path)) {}

  bool absent() const { return value_ == nullptr; }
  // tokenizers reads an absent part as null.
  bool is_null() const { return absent() || value_->is_null(); }
  bool is(Is type) const { return value_ && (value_->*type)(); }
  const std::string& file() const { return *file_; }
  std::string dump() const { return value_ ? value_->dump() : "null"; }

  // Throws unless `ok`; `what` is what was expected ("an array of added tokens").
  void expect(bool ok, std::string_view what) const {
    if (ok) return;
    check(value_ != nullptr, "{}: key '{}' is missing, expected {}", *file_, path_, what);
    const auto got = value_->is_structured() ? std::string(value_->type_name()) : dump();
    fail("{}: {}{}expected {}, got {}", *file_, path_, path_.empty() ? "" : ": ", what, got);
  }
  const json& as(Is type, std::string_view what) const {
    expect(is(type), what);
    return *value_;
  }
  const std::string& text(std::string_view what) const {
    return as(&json::is_string, what).get_ref<const std::string&>();
  }
  // A boolean option that may be left out.
  bool flag(bool absent_value) const {
    return absent() ? absent_value : as(&json::is_boolean, "true or false").get<bool>();
  }

  // The member `key` of this object, absent if it has none.
  Field operator[](const std::string& key) const {
    const auto& object = as(&json::is_object, "an object");
    const auto it = object.find(key);
    return {it == object.end() ? nullptr : &*it, *file_, path_.empty() ? key : path_ + "." + key};
  }
  std::vector<Field> elements(std::string_view what) const {
    std::vector<Field> out;
    for (const auto& value : as(&json::is_array, what))
      out.emplace_back(&value, *file_, fmt::format("{}[{}]", path_, out.size()));
    return out;
  }
  std::vector<std::pair<std::string, Field>> members(std::string_view what) const {
    std::vector<std::pair<std::string, Field>> out;
    for (const auto& [key, value] : as(&json::is_object, what).items())
      out.emplace_back(key, Field(&value, *file_, fmt::format("{}[{}]", path_, quoted(key))));
    return out;
  }

 private:
  const json* value_;  // null when the key is absent
  const std::string* file_;
  std::string path_;
};

// A part's "type" ("BPE", "ByteLevel"), or "null" for a part that is null or absent.
std::string type_of(const Field& part) {
  return part.is_null() ? "null" : part["type"].text("a string");
}

bool is_null_or_empty(const Field& field) {
  return field.is_null() || (field.is(&json::is_string) && field.text("a string").empty());
}

// Ids must be dense, so none can reach the number of entries.
int32_t read_id(const Field& id, size_t entries) {
  const auto what = fmt::format("an integer id in [0, {})", entries);
  const auto& value = id.as(&json::is_number_integer, what);
  id.expect(value.get<int64_t>() >= 0 && value.get<int64_t>() < int64_t(entries), what);
  return value.get<int32_t>();
}

// Merges come as "left right" strings (older files) or [left, right] pairs; rank = position.
std::pair<std::string, std::string> read_merge(const Field& merge) {
  constexpr std::string_view what = R"(a merge "a b" or ["a", "b"])";
  if (merge.is(&json::is_string)) {
    const auto& text = merge.text(what);
    const auto space = text.find(' ');
    merge.expect(space != std::string::npos && text.find(' ', space + 1) == std::string::npos,
                 what);
    return {text.substr(0, space), text.substr(space + 1)};
  }
  const auto& pair = merge.as(&json::is_array, what);
  merge.expect(pair.size() == 2 && pair[0].is_string() && pair[1].is_string(), what);
  return {pair[0].get<std::string>(), pair[1].get<std::string>()};
}

// Only what prepare_data.py writes: byte-level BPE with no normalizer or template processing.
void check_supported(const Field& root) {
  const std::string& path = root.file();
  const Field model = root["model"];
  model.expect(model.is(&json::is_object), "an object");
  const auto model_type = type_of(model);
  check(model_type == "BPE", "{}: unsupported model type '{}', expected BPE", path, model_type);
  const auto normalizer = type_of(root["normalizer"]);
  check(normalizer == "null", "{}: unsupported normalizer '{}'", path, normalizer);
  const Field pre = root["pre_tokenizer"];
  check(type_of(pre) == "ByteLevel" && !pre["add_prefix_space"].flag(false) &&
            pre["use_regex"].flag(true),
        "{}: unsupported pre_tokenizer {}, expected ByteLevel with add_prefix_space false and "
        "use_regex true",
        path, pre.dump());
  for (const char* key : {"decoder", "post_processor"}) {
    const auto part = type_of(root[key]);
    check(part == "null" || part == "ByteLevel", "{}: unsupported {} '{}'", path, key, part);
  }
  check(model["dropout"].is_null() && !model["byte_fallback"].flag(false) &&
            is_null_or_empty(model["continuing_subword_prefix"]) &&
            is_null_or_empty(model["end_of_word_suffix"]),
        "{}: unsupported BPE options (dropout, byte_fallback or subword affixes)", path);
}

// Checks each added token; `entries` bounds the ids.
std::vector<std::pair<std::string, int32_t>> read_added_tokens(const std::vector<Field>& list,
                                                               size_t entries) {
  std::vector<std::pair<std::string, int32_t>> tokens;
  for (const Field& added : list) {
    const int32_t id = read_id(added["id"], entries);
    // An empty token would match at every position, so encode() would never advance.
    const Field field = added["content"];
    const auto what = fmt::format("a non-empty string for token id {}", id);
    const std::string& content = field.text(what);
    field.expect(!content.empty(), what);
    check(!added["lstrip"].flag(false) && !added["rstrip"].flag(false) &&
              !added["single_word"].flag(false),
          "{}: added token {} uses lstrip, rstrip or single_word, which are unsupported",
          added.file(), quoted(content));
    tokens.emplace_back(content, id);
  }
  return tokens;
}

pcre2_code* compile_gpt2_pattern() {
  int error = 0;
  PCRE2_SIZE offset = 0;
  pcre2_code* code =
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(kGpt2Pattern), PCRE2_ZERO_TERMINATED,
                    PCRE2_UTF | PCRE2_UCP, &error, &offset, nullptr);
  check(code != nullptr, "pcre2: cannot compile the GPT-2 pattern (error {})", error);
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // optional speed-up; falls back to the interpreter
  return code;
}

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
  return from_json(parse_json(file, path), path);
}

Tokenizer Tokenizer::from_json(const nlohmann::json& j, const std::string& path) {
  const Field root(&j, path, "");
  check_supported(root);
  const Field model = root["model"];
  Tokenizer tok;
  tok.ignore_merges_ = model["ignore_merges"].flag(false);
  const auto vocab = model["vocab"].members("an object of token -> id");
  const Field added_list = root["added_tokens"];
  const auto added =
      added_list.absent() ? std::vector<Field>() : added_list.elements("an array of added tokens");
  const size_t entries = vocab.size() + added.size();
  std::unordered_map<std::string, int32_t> by_entry;  // vocab entry as written -> id
  int32_t max_id = -1;
  for (const auto& [entry, id] : vocab) {
    by_entry[entry] = read_id(id, entries);
    max_id = std::max(max_id, by_entry[entry]);
  }
  tok.added_tokens_ = read_added_tokens(added, entries);
  for (const auto& [content, id] : tok.added_tokens_) max_id = std::max(max_id, id);

  tok.bytes_.resize(size_t(max_id + 1));
  tok.added_.assign(size_t(max_id + 1), false);
  std::vector<bool> seen(size_t(max_id + 1), false);
  const auto to_byte = unicode_to_byte();
  for (const auto& [entry, id] : by_entry) {
    check(!seen[size_t(id)], "{}: token id {} is used by two vocab entries", path, id);
    tok.bytes_[size_t(id)] = vocab_bytes(entry, to_byte, path);
    tok.vocab_[tok.bytes_[size_t(id)]] = id;
    seen[size_t(id)] = true;
  }
  for (const auto& [content, id] : tok.added_tokens_) {
    tok.bytes_[size_t(id)] = content;
    tok.added_[size_t(id)] = true;
    seen[size_t(id)] = true;
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

  // An empty array is a valid BPE (bytes only); anything else but an array is refused.
  int32_t rank = 0;
  for (const Field& merge :
       model["merges"].elements(R"(an array of merges ("a b" or ["a", "b"]))")) {
    const auto [left, right] = read_merge(merge);
    const auto l = by_entry.find(left), r = by_entry.find(right), m = by_entry.find(left + right);
    check(l != by_entry.end() && r != by_entry.end() && m != by_entry.end(),
          "{}: merge {} refers to tokens not in the vocab", path, quoted(left + " " + right));
    const uint64_t key = uint64_t(uint32_t(l->second)) << 32 | uint32_t(r->second);
    tok.merges_.emplace(key, Merge{rank++, m->second});
  }

  tok.regex_ = std::make_shared<Regex>();
  tok.regex_->code = compile_gpt2_pattern();
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
  std::string bytes;
  for (int32_t id : ids) {
    check_id(id);
    bytes += bytes_[size_t(id)];
  }
  // A model may emit a character's bytes in the wrong order or stop inside one.
  return utf8_lossy(bytes);
}

int Tokenizer::token_byte_length(int32_t id) const {
  check_id(id);
  return added_[size_t(id)] ? 0 : static_cast<int>(bytes_[size_t(id)].size());
}

}  // namespace lmtrain
