#include "core/utf8.h"

#include <cstdint>

namespace lmtrain {
namespace {

// What a lead byte starts: the sequence's length (0: it cannot lead) and the range its second
// byte must lie in (Unicode's table 3-7; later bytes are 80..BF).
struct Lead {
  int length;
  uint8_t low = 0x80, high = 0xBF;
};

Lead lead_of(uint8_t byte) {
  if (byte < 0x80) return {1};
  if (byte >= 0xC2 && byte <= 0xDF) return {2};
  if (byte == 0xE0) return {3, 0xA0};        // no overlong forms
  if (byte == 0xED) return {3, 0x80, 0x9F};  // no surrogates
  if (byte >= 0xE1 && byte <= 0xEF) return {3};
  if (byte == 0xF0) return {4, 0x90};        // no overlong forms
  if (byte == 0xF4) return {4, 0x80, 0x8F};  // nothing past U+10FFFF
  if (byte >= 0xF1 && byte <= 0xF3) return {4};
  return {0};  // a continuation byte, C0, C1 or F5..FF
}

// The length of the well-formed sequence at text[at], or, negated, the length of the maximal
// subpart that is ill-formed there: the lead and the continuation bytes that could still have
// completed it (at least 1).
int sequence_at(std::string_view text, size_t at) {
  const Lead lead = lead_of(uint8_t(text[at]));
  if (lead.length == 0) return -1;
  for (int k = 1; k < lead.length; ++k) {
    if (at + size_t(k) >= text.size()) return -k;
    const auto next = uint8_t(text[at + size_t(k)]);
    if (next < (k == 1 ? lead.low : 0x80) || next > (k == 1 ? lead.high : 0xBF)) return -k;
  }
  return lead.length;
}

}  // namespace

bool is_utf8(std::string_view text) {
  for (size_t at = 0; at < text.size();) {
    const int length = sequence_at(text, at);
    if (length < 0) return false;
    at += size_t(length);
  }
  return true;
}

std::string utf8_lossy(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (size_t at = 0; at < text.size();) {
    const int length = sequence_at(text, at);
    if (length > 0)
      out.append(text.substr(at, size_t(length)));
    else
      out.append("\xEF\xBF\xBD");  // U+FFFD
    at += size_t(length > 0 ? length : -length);
  }
  return out;
}

}  // namespace lmtrain
