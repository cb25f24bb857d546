#include <charconv>
#include <cmath>
#include <optional>

#include "cli/commands.h"

namespace lmtrain {

namespace {

// The whole text as a T, or nothing: no sign for unsigned, no blanks, no trailing characters.
template <class T>
std::optional<T> parse_whole(const std::string& text) {
  T value{};
  const char* end = text.data() + text.size();
  const auto [stop, error] = std::from_chars(text.data(), end, value);
  if (error != std::errc() || stop != end) return std::nullopt;
  return value;
}

}  // namespace

CLI::Validator integer_in(int64_t lo, int64_t hi) {
  return CLI::Validator(
      [lo, hi](std::string& text) -> std::string {
        const auto value = parse_whole<int64_t>(text);
        if (value && *value >= lo && *value <= hi) return "";
        return fmt::format("expected an integer in [{}, {}], got '{}'", lo, hi, text);
      },
      fmt::format("INT in [{}, {}]", lo, hi));
}

CLI::Validator unsigned_integer() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        if (parse_whole<uint64_t>(text)) return "";
        return fmt::format("expected an integer in [0, {}], got '{}'", UINT64_MAX, text);
      },
      "");
}

CLI::Validator finite_number_at_least(double lo) {
  return CLI::Validator(
      [lo](std::string& text) -> std::string {
        const auto value = parse_whole<double>(text);
        if (value && std::isfinite(*value) && *value >= lo) return "";
        return fmt::format("expected a finite number >= {}, got '{}'", lo, text);
      },
      fmt::format("FINITE >= {}", lo));
}

CLI::Validator non_empty(const std::string& expected) {
  return CLI::Validator(
      [expected](std::string& text) -> std::string {
        return text.empty() ? fmt::format("expected {}, got ''", expected) : "";
      },
      "");
}

}  // namespace lmtrain
