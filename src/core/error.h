// Errors are exceptions carrying one line of context; main() prints the line and exits non-zero.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

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
