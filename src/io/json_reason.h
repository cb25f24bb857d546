// nlohmann's error messages as one clean line for our own: without the "[json.exception.
// parse_error.101] " prefix, and with every byte outside printable ASCII written \xNN (its
// "last read: ..." quotes the input, which may be ill-formed UTF-8 or a control character).
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <utility>

#include "core/error.h"

namespace lmtrain {

inline std::string json_reason(const nlohmann::json::exception& e) {
  const std::string what = e.what();
  const size_t end = what.find("] ");
  return escape_unprintable(end == std::string::npos ? what : what.substr(end + 2));
}

// The JSON document `text` (or stream), read from the file `path`: a parse error names the file
// and where the parse stopped; a number beyond a double (1e999) names the file too.
template <class Input>
nlohmann::json parse_json(Input&& text, const std::string& path) {
  try {
    return nlohmann::json::parse(std::forward<Input>(text));
  } catch (const nlohmann::json::exception& e) {
    fail("{}: not valid JSON: {}", path, json_reason(e));
  }
}

}  // namespace lmtrain
