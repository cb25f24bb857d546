// The README's configuration reference is the one the code generates.
#include <catch2/catch.hpp>
#include <fstream>
#include <sstream>

#include "config/config.h"
#include "test_support.h"

TEST_CASE("README lists every config key as the code defines it", "[docs]") {
  std::ifstream in(lmtrain::test_support::source_path("README.md"));
  std::stringstream text;
  text << in.rdbuf();
  INFO("regenerate the table with: lmtrain info --keys");
  CHECK(text.str().find(lmtrain::config_reference()) != std::string::npos);
}
