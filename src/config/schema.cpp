#include "config/schema.h"

#include <algorithm>

namespace lmtrain::config {

std::string closest_key(const std::string& key, const std::vector<std::string>& candidates) {
  auto distance = [](const std::string& a, const std::string& b) {
    std::vector<size_t> row(b.size() + 1);
    for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
    for (size_t i = 1; i <= a.size(); ++i) {
      size_t diagonal = row[0];
      row[0] = i;
      for (size_t j = 1; j <= b.size(); ++j) {
        size_t up = row[j];
        row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] != b[j - 1])});
        diagonal = up;
      }
    }
    return row[b.size()];
  };
  std::string best;
  size_t best_distance = SIZE_MAX;
  for (const auto& c : candidates) {
    size_t d = distance(key, c);
    if (d < best_distance) best_distance = d, best = c;
  }
  return best;
}

std::string describe(const json& value) {
  // A --set value may hold any bytes: dump() throws on invalid UTF-8 unless told to replace it.
  if (value.is_string())
    return "the string " + value.dump(-1, ' ', false, json::error_handler_t::replace);
  if (value.is_boolean()) return "the boolean " + value.dump();
  if (value.is_number_integer()) return "the integer " + value.dump();
  if (value.is_number()) return "the number " + value.dump();
  if (value.is_array()) return "an array";
  if (value.is_object()) return "an object";
  return "null";
}

const std::string* Source::set_of(std::span<const std::string_view> paths) const {
  for (auto it = sets.rbegin(); it != sets.rend(); ++it) {
    const std::string key = it->substr(0, it->find('='));
    for (std::string_view path : paths) {
      if (path == key || path.starts_with(key + ".") || path.starts_with(key + "[") ||
          std::string_view(key).starts_with(std::string(path) + "."))
        return &*it;
    }
  }
  return nullptr;
}

std::string Source::at(std::span<const std::string_view> paths) const {
  const std::string* set = set_of(paths);
  if (!set) return file;
  // A --set value is whatever bytes the shell passed (invalid UTF-8, line breaks, bidirectional
  // overrides): quoted with everything outside printable ASCII escaped.
  return fmt::format("{} with --set {}", file, escape_unprintable(*set));
}

void Reader::expect(bool ok, const std::string& path, const char* what, const json& value) const {
  if (ok) return;
  // --set reads a value as JSON first, so --set run.name=123 gives a number, not a string.
  const std::string* set = source_.set_of(path);
  const bool quote_hint = set && set->starts_with(path + "=") &&
                          std::string_view(what).starts_with("a string") &&
                          (value.is_number() || value.is_boolean() || value.is_null());
  fail("{}: {}: expected {}, got {}{}", source_.at(path), path, what, describe(value),
       quote_hint ? fmt::format(" (quote it: --set {}='\"{}\"')", path, value.dump()) : "");
}

void Reader::reject_unknown() const {
  for (const auto& [key, value] : object_.items()) {
    if (std::find(seen_.begin(), seen_.end(), key) != seen_.end()) continue;
    std::string where = path_.empty() ? key : path_ + "." + key;
    // A NUL would cut the message short.
    if (key.find('\0') != std::string::npos)
      fail("{}: {}expected keys without NUL characters", source_.at(where),
           path_.empty() ? "" : path_ + ": ");
    std::string hint = closest_key(key, seen_);
    if (!hint.empty() && !path_.empty()) hint = path_ + "." + hint;
    fail("{}: unknown key '{}'{}", source_.at(where), where,
         hint.empty() ? "" : fmt::format(" (did you mean '{}'?)", hint));
  }
}

void apply_override(json& document, const std::string& assignment, const std::string& source) {
  auto eq = assignment.find('=');
  check(eq != std::string::npos && eq > 0, "--set {}: expected key.path=value", assignment);
  std::string path = assignment.substr(0, eq), text = assignment.substr(eq + 1);
  json value = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (value.is_discarded()) value = text;

  // A section the file gives as something else ("run": 5) is an error, not replaced: without
  // --set the reader refuses it, and a --set must not hide that.
  check(document.is_object(), "{}: expected a JSON object at the top level", source);
  json* node = &document;
  std::string at;  // the key path of `node`
  for (size_t start = 0;;) {
    const size_t dot = path.find('.', start);
    const std::string part = path.substr(start, dot == std::string::npos ? dot : dot - start);
    check(!part.empty(), "--set {}: empty key in path", assignment);
    if (dot == std::string::npos) {
      (*node)[part] = value;
      return;
    }
    at += (at.empty() ? "" : ".") + part;
    if (!node->contains(part)) (*node)[part] = json::object();
    node = &(*node)[part];
    if (!node->is_object()) fail("{}: {}: expected an object, got {}", source, at, describe(*node));
    start = dot + 1;
  }
}

}  // namespace lmtrain::config
