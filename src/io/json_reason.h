// nlohmann's error messages as one clean line for our own: without the "[json.exception.
// parse_error.101] " prefix, and with every byte outside printable ASCII written \xNN (its
// "last read: ..." quotes the input, which may be ill-formed UTF-8 or a control character).
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "core/error.h"

namespace lmtrain {

inline std::string json_reason(const nlohmann::json::exception& e) {
  const std::string what = e.what();
  const size_t end = what.find("] ");
  return escape_unprintable(end == std::string::npos ? what : what.substr(end + 2));
}

}  // namespace lmtrain
