// A small reflection scheme for config structs: each struct lists its fields once, in a
// `visit` member, and reading JSON, writing JSON, unknown-key detection and the reference
// documentation all follow from that one list.
//
//   struct Batch {
//     int device_batch = 32;
//     template <class V> void visit(V& v) { v("device_batch", device_batch, "sequences per
//     micro-step"); }
//   };
#pragma once

#include <initializer_list>
#include <limits>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "core/error.h"
#include "core/utf8.h"

namespace lmtrain::config {

using nlohmann::json;

template <class T>
struct is_vector : std::false_type {};
template <class T>
struct is_vector<std::vector<T>> : std::true_type {};

// The closest of `candidates` to `key` by edit distance, for "did you mean" hints.
std::string closest_key(const std::string& key, const std::vector<std::string>& candidates);

// Human-readable type of a JSON value for error messages ("a string", "an integer", ...).
std::string describe(const json& value);

// Where a config's values came from: its file and the --set assignments applied over it, so
// that an error about a key a --set wrote names that --set rather than the file alone.
struct Source {
  std::string file;
  std::vector<std::string> sets;  // "key.path=value" as typed, in order
  // The last --set that wrote one of `paths`, a section holding one, or (for a path that is a
  // section, "model") a key inside it; nullptr when the file did.
  const std::string* set_of(std::span<const std::string_view> paths) const;
  // "<file>", or "<file> with --set key=value" for the last --set that wrote one of `paths`
  // (an error about several keys, such as a batch that does not divide, names any of them).
  std::string at(std::span<const std::string_view> paths) const;
  const std::string* set_of(std::initializer_list<std::string_view> paths) const {
    return set_of(std::span(paths.begin(), paths.size()));
  }
  std::string at(std::initializer_list<std::string_view> paths) const {
    return at(std::span(paths.begin(), paths.size()));
  }
  const std::string* set_of(std::string_view path) const { return set_of({path}); }
  std::string at(std::string_view path) const { return at({path}); }
};

// Reads fields from a JSON object; every key of the object must be visited.
class Reader {
 public:
  Reader(const json& object, std::string path, Source source)
      : object_(object), path_(std::move(path)), source_(std::move(source)) {}

  template <class T>
  void operator()(const char* key, T& field, const char* /*doc*/) {
    seen_.push_back(key);
    auto it = object_.find(key);
    if (it == object_.end()) return;  // keep the default
    read(*it, field, qualified(key));
  }

  // Call after visiting: an unknown key is an error naming it and the closest valid key.
  void reject_unknown() const;

  template <class T>
  void read(const json& value, T& field, const std::string& path) const {
    if constexpr (std::is_same_v<T, bool>) {
      expect(value.is_boolean(), path, "true or false", value);
      field = value.get<bool>();
    } else if constexpr (std::is_integral_v<T>) {
      expect(value.is_number_integer(), path, "an integer", value);
      // get<T>() would wrap a value outside T's range (depth 4294967297 -> 1, seed -1 -> 2^64-1).
      const int64_t i = value.get<int64_t>();
      const bool fits = value.is_number_unsigned() || i >= 0
                            ? value.get<uint64_t>() <= uint64_t(std::numeric_limits<T>::max())
                            : i >= int64_t(std::numeric_limits<T>::min());
      if (!fits) {
        fail("{}: {}: expected an integer in [{}, {}], got {}", source_.at(path), path,
             std::numeric_limits<T>::min(), std::numeric_limits<T>::max(), value.dump());
      }
      field = value.get<T>();
    } else if constexpr (std::is_floating_point_v<T>) {
      expect(value.is_number(), path, "a number", value);
      field = value.get<T>();
    } else if constexpr (std::is_same_v<T, std::string>) {
      expect(value.is_string(), path, "a string", value);
      field = value.get<std::string>();
      // A NUL would cut every message and path that later holds the value.
      if (field.find('\0') != std::string::npos)
        fail("{}: {}: expected a string without NUL characters", source_.at(path), path);
      // A file's strings are UTF-8 already (the parser checks them); a --set value is taken as
      // given, and invalid UTF-8 made a run directory before the config's JSON dump threw.
      if (!is_utf8(field)) fail("{}: {}: expected UTF-8 text", source_.at(path), path);
    } else if constexpr (is_vector<T>::value) {
      expect(value.is_array(), path, "an array", value);
      field.clear();
      for (size_t i = 0; i < value.size(); ++i) {
        read(value[i], field.emplace_back(), path + "[" + std::to_string(i) + "]");
      }
    } else {
      expect(value.is_object(), path, "an object", value);
      Reader nested(value, path, source_);
      field.visit(nested);
      nested.reject_unknown();
    }
  }

 private:
  std::string qualified(const char* key) const { return path_.empty() ? key : path_ + "." + key; }
  void expect(bool ok, const std::string& path, const char* what, const json& value) const;

  const json& object_;
  std::string path_;
  Source source_;
  std::vector<std::string> seen_;
};

// Writes every field, defaults included: the resolved config.
class Writer {
 public:
  json out = json::object();

  template <class T>
  void operator()(const char* key, const T& field, const char* /*doc*/) {
    out[key] = write(field);
  }

  template <class T>
  static json write(const T& field) {
    if constexpr (std::is_arithmetic_v<T> || std::is_same_v<T, std::string>) {
      return field;
    } else if constexpr (is_vector<T>::value) {
      json array = json::array();
      for (const auto& x : field) array.push_back(write(x));
      return array;
    } else {
      Writer nested;
      const_cast<T&>(field).visit(nested);
      return nested.out;
    }
  }
};

// Collects (key path, default value, doc) rows for the configuration reference.
class Documenter {
 public:
  struct Row {
    std::string key, value, doc;
  };
  std::vector<Row> rows;
  std::string prefix;

  template <class T>
  void operator()(const char* key, T& field, const char* doc) {
    std::string path = prefix.empty() ? key : prefix + "." + key;
    if constexpr (std::is_arithmetic_v<T> || std::is_same_v<T, std::string> ||
                  is_vector<T>::value) {
      rows.push_back({path, Writer::write(field).dump(), doc});
    } else {
      Documenter nested{{}, path};
      field.visit(nested);
      rows.insert(rows.end(), nested.rows.begin(), nested.rows.end());
    }
  }
};

// Every double-valued field with its key path, the elements of arrays of structs included.
class DoubleFields {
 public:
  std::vector<std::pair<std::string, double>> found;
  std::string prefix;

  template <class T>
  void operator()(const char* key, T& field, const char* /*doc*/) {
    add(prefix.empty() ? key : prefix + "." + key, field);
  }

 private:
  template <class T>
  void add(const std::string& path, T& field) {
    if constexpr (std::is_same_v<T, double>) {
      found.emplace_back(path, field);
    } else if constexpr (is_vector<T>::value) {
      for (size_t i = 0; i < field.size(); ++i) add(path + "[" + std::to_string(i) + "]", field[i]);
    } else if constexpr (std::is_class_v<T> && !std::is_same_v<T, std::string>) {
      DoubleFields nested{{}, path};
      field.visit(nested);
      found.insert(found.end(), nested.found.begin(), nested.found.end());
    }
  }
};

// Sets `dotted.key=value` in a JSON document read from `source`. The value is parsed as JSON
// when it is valid JSON (numbers, true/false, arrays) and taken as a string otherwise.
void apply_override(json& document, const std::string& assignment,
                    const std::string& source = "config");

}  // namespace lmtrain::config
