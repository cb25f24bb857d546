// Errors are exceptions carrying one line of context; main() prints the line and exits non-zero.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <string_view>

namespace lmtrain {

// A user-facing error: bad config, bad file, impossible shape. The message is the whole story.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

template <typename... Args>
void check(bool ok, fmt::format_string<Args...> format, Args&&... args) {
  if (!ok) throw Error(fmt::format(format, std::forward<Args>(args)...));
}

// `text` with every byte outside printable ASCII written \xNN, for quoting input that may be
// ill-formed UTF-8 or hold control characters in a one-line message.
inline std::string escape_unprintable(std::string_view text) {
  std::string out;
  for (const char c : text) {
    const auto byte = static_cast<unsigned char>(c);
    out += byte >= 0x20 && byte < 0x7f ? std::string(1, c) : fmt::format("\\x{:02x}", byte);
  }
  return out;
}

// Returns f(); an exception it throws becomes an Error with `context` in front ("config.json:
// data.train: ..."), so that a message about a file also names the setting or option that chose
// the file. Not only Errors: std::filesystem throws its own for a path the system refuses (a
// name too long).
template <typename F>
auto with_context(const std::string& context, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::exception& e) {
    throw Error(context + ": " + e.what());
  }
}

}  // namespace lmtrain
