// UTF-8 checks and repair (core/utf8.h). The repairs' expected bytes are Python's
// bytes.decode("utf-8", "replace") of the same input.
#include <catch2/catch.hpp>
#include <string>

#include "core/utf8.h"

using lmtrain::is_utf8;
using lmtrain::utf8_lossy;

TEST_CASE("is_utf8 accepts well-formed UTF-8 only", "[core][utf8]") {
  CHECK(is_utf8(""));
  CHECK(is_utf8("plain ASCII\n"));
  CHECK(is_utf8("\xc2\x80 \xdf\xbf \xe0\xa0\x80 \xef\xbf\xbf \xf0\x90\x80\x80 \xf4\x8f\xbf\xbf"));
  CHECK_FALSE(is_utf8("\x80"));              // a continuation byte alone
  CHECK_FALSE(is_utf8("\xc3"));              // cut after the lead
  CHECK_FALSE(is_utf8("\xe2\x82"));          // cut inside
  CHECK_FALSE(is_utf8("\xc3\x28"));          // a lead without its continuation
  CHECK_FALSE(is_utf8("\xc0\xaf"));          // overlong '/'
  CHECK_FALSE(is_utf8("\xe0\x80\xaf"));      // overlong '/' in three bytes
  CHECK_FALSE(is_utf8("\xed\xa0\x80"));      // a surrogate
  CHECK_FALSE(is_utf8("\xf4\x90\x80\x80"));  // past U+10FFFF
  CHECK_FALSE(is_utf8("\xf8\x88\x80\x80\x80"));
  CHECK_FALSE(is_utf8("\xff"));
}

TEST_CASE("utf8_lossy replaces each maximal ill-formed subpart with one U+FFFD", "[core][utf8]") {
  const std::string R = "\xef\xbf\xbd";  // U+FFFD
  const std::string valid =
      "plain \xc2\x80 \xdf\xbf \xe0\xa0\x80 \xef\xbf\xbf \xf0\x90\x80\x80 \xf4\x8f\xbf\xbf";
  CHECK(utf8_lossy(valid) == valid);
  CHECK(utf8_lossy("") == "");
  CHECK(utf8_lossy("\x80") == R);
  CHECK(utf8_lossy("\xc3") == R);          // cut after the lead
  CHECK(utf8_lossy("\xf0\x9f\x99") == R);  // cut inside: one replacement
  CHECK(utf8_lossy("\xf0\x9f\x99\x82\xf0\x9f") == "\xf0\x9f\x99\x82" + R);
  CHECK(utf8_lossy("\xc3\x28") == R + "(");                // the next byte is kept
  CHECK(utf8_lossy("\xc0\xaf") == R + R);                  // C0 cannot lead
  CHECK(utf8_lossy("\xe0\x80\xaf") == R + R + R);          // overlong: 80 cannot follow E0
  CHECK(utf8_lossy("\xed\xa0\x80") == R + R + R);          // a surrogate
  CHECK(utf8_lossy("\xf4\x90\x80\x80") == R + R + R + R);  // past U+10FFFF
  CHECK(utf8_lossy("\xf8\x88\x80\x80\x80") == R + R + R + R + R);
  // Unicode's own example (section 3.9, "U+FFFD Substitution of Maximal Subparts").
  CHECK(utf8_lossy("a\xf1\x80\x80\xe1\x80\xc2"
                   "b\x80"
                   "c\x80\xbf"
                   "d") == "a" + R + R + R + "b" + R + "c" + R + R + "d");
  CHECK(utf8_lossy("\xe1\x80\xe2\xf0\x91\x92\xf1\xbf"
                   "A") == R + R + R + R + "A");
  for (const char* bad : {"\x80", "\xe2\x82", "\xed\xa0\x80", "a\xf1\x80\x80\xe1"})
    CHECK(is_utf8(utf8_lossy(bad)));
}
