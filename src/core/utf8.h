// Well-formed UTF-8 (Unicode 15, table 3-7) and its lossy repair, for text whose bytes come from
// outside: --set values, and the bytes a byte-level tokenizer decodes a model's tokens to.
#pragma once

#include <string>
#include <string_view>

namespace lmtrain {

// Whether `text` is well-formed UTF-8: no stray or missing continuation bytes, overlong forms,
// surrogates or code points past U+10FFFF.
bool is_utf8(std::string_view text);

// `text` with each maximal ill-formed subpart replaced by U+FFFD, as Python's
// bytes.decode("utf-8", "replace") and Rust's String::from_utf8_lossy do (so Hugging Face's
// byte-level decoder too). Well-formed text comes back unchanged.
std::string utf8_lossy(std::string_view text);

}  // namespace lmtrain
