// nlohmann's error messages as one clean line for our own: without the "[json.exception.
// parse_error.101] " prefix, and with every byte outside printable ASCII written \xNN (its
// "last read: ..." quotes the input, which may be ill-formed UTF-8 or a control character).
#pragma once

#include <fmt/format.h>

#include <nlohmann/json.hpp>
#include <string>

namespace lmtrain {

inline std::string json_reason(const nlohmann::json::exception& e) {
  const std::string what = e.what();
  const size_t end = what.find("] ");
  std::string out;
  for (const char c : end == std::string::npos ? what : what.substr(end + 2)) {
    const auto byte = static_cast<unsigned char>(c);
    out += byte >= 0x20 && byte < 0x7f ? std::string(1, c) : fmt::format("\\x{:02x}", byte);
  }
  return out;
}

}  // namespace lmtrain
