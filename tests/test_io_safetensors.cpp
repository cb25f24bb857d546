#include <sys/wait.h>

#include <catch2/catch.hpp>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "core/error.h"
#include "io/atomic_dir.h"
#include "io/safetensors.h"
#include "test_support.h"

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using lmtrain::SafetensorsFile;
using lmtrain::SafetensorsWriter;
using lmtrain::test_support::TempDir;

namespace {

// A file in the on-disk layout with an arbitrary (possibly broken) header and data section.
void write_raw(const std::string& path, const std::string& header, size_t data_bytes) {
  std::string bytes(8, '\0');
  const uint64_t n = header.size();
  std::memcpy(bytes.data(), &n, 8);
  bytes += header;
  bytes.append(data_bytes, '\x01');
  lmtrain::write_file_synced(path, bytes);
}

const std::vector<float> kWeights = {0.0f, 0.5f, -1.0f, 1.5f, 3.25f, -0.125f};
const std::vector<uint16_t> kBf16 = {0x3F80, 0xC000, 0x4040};  // 1.0, -2.0, 3.0
const std::vector<int64_t> kSteps = {-1, int64_t{1} << 40};

void write_sample(const std::string& path) {
  SafetensorsWriter w;
  w.add("model.wte", "F32", {2, 3}, kWeights.data(), kWeights.size() * 4);
  w.add("model.scale", "BF16", {3}, kBf16.data(), kBf16.size() * 2);
  w.add("state.steps", "I64", {2}, kSteps.data(), kSteps.size() * 8);
  w.add("empty", "I32", {0, 4}, nullptr, 0);
  w.set_metadata("format", "lmtrain");
  w.set_metadata("step", "7");
  w.write(path);
}

bool python_safetensors_available() {
  return std::system("python3 -c 'import safetensors, numpy' >/dev/null 2>&1") == 0;
}

// Runs a Python snippet with `arg` as sys.argv[1]; returns its exit status and captures output.
int run_python(const TempDir& tmp, const std::string& script, const std::string& arg,
               std::string* output) {
  lmtrain::write_file_synced(tmp / "script.py", script);
  const int status = std::system(
      fmt::format("python3 '{}' '{}' >'{}' 2>&1", tmp / "script.py", arg, tmp / "py.log").c_str());
  *output = lmtrain::read_file(tmp / "py.log");
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace

TEST_CASE("safetensors round-trips tensors, dtypes and metadata", "[io]") {
  TempDir tmp;
  const std::string path = tmp / "model.safetensors";
  write_sample(path);
  const std::string bytes = lmtrain::read_file(path);
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  CHECK(header_len % 8 == 0);  // padded so the data section is 8-byte aligned

  SafetensorsFile f = SafetensorsFile::open(path);
  REQUIRE(f.tensors().size() == 4);
  CHECK(f.tensors()[0].name == "model.wte");  // file order = insertion order
  CHECK(f.metadata() == std::map<std::string, std::string>{{"format", "lmtrain"}, {"step", "7"}});
  CHECK(f.contains("state.steps"));
  CHECK_FALSE(f.contains("nope"));

  CHECK(f.info("model.wte").shape == std::vector<int64_t>{2, 3});
  CHECK(f.read_f32("model.wte") == kWeights);
  std::vector<uint16_t> bf16(3);
  f.read("model.scale", bf16.data(), 6);
  CHECK(bf16 == kBf16);
  std::vector<int64_t> steps(2);
  f.read("state.steps", steps.data(), 16);
  CHECK(steps == kSteps);
  CHECK(f.info("empty").bytes == 0);
  CHECK(f.info("empty").dtype == "I32");
}

TEST_CASE("safetensors lookups and reads check names, sizes and dtypes", "[io]") {
  TempDir tmp;
  const std::string path = tmp / "model.safetensors";
  write_sample(path);
  SafetensorsFile f = SafetensorsFile::open(path);
  CHECK_THROWS_WITH(f.info("lm_head.weight"), Contains(path) && Contains("'lm_head.weight'"));
  std::vector<float> small(5);
  CHECK_THROWS_WITH(f.read("model.wte", small.data(), 20),
                    Contains(path) && Contains("holds 24 bytes, caller expected 20"));
  CHECK_THROWS_WITH(f.read_f32("model.scale"), Contains("dtype BF16, expected F32"));
}

TEST_CASE("SafetensorsWriter rejects inconsistent tensors", "[io]") {
  SafetensorsWriter w;
  const float x[4] = {};
  CHECK_THROWS_WITH(w.add("a", "F32", {2, 3}, x, 16), Contains("needs 24"));
  CHECK_THROWS_WITH(w.add("a", "F31", {4}, x, 16), Contains("unknown dtype 'F31'"));
  CHECK_THROWS_WITH(w.add("a", "F32", {-4}, x, 16), Contains("'a'"));
  CHECK_THROWS_WITH(w.add("__metadata__", "F32", {4}, x, 16), Contains("invalid tensor name"));
  w.add("a", "F32", {4}, x, 16);
  CHECK_THROWS_WITH(w.add("a", "F32", {4}, x, 16), Contains("added twice"));
}

TEST_CASE("safetensors open reports corrupt files in one line naming the file", "[io]") {
  TempDir tmp;
  const std::string path = tmp / "bad.safetensors";
  auto open_error = [&]() -> std::string {
    try {
      SafetensorsFile::open(path);
    } catch (const lmtrain::Error& e) {
      return e.what();
    }
    return "(no error)";
  };
  auto expect = [&](const std::string& fragment) {
    const std::string msg = open_error();
    INFO(msg);
    CHECK(msg.rfind(path + ": ", 0) == 0);
    CHECK(msg.find('\n') == std::string::npos);
    CHECK_THAT(msg, Contains(fragment));
  };

  lmtrain::write_file_synced(path, "abc");
  expect("expected at least 8");
  lmtrain::write_file_synced(path, std::string("\x40\0\0\0\0\0\0\0{}", 10));
  expect("header length 64 exceeds the 2 bytes after it");
  write_raw(path, "{\"a\": ", 0);
  expect("not valid JSON");
  write_raw(path, "[]", 0);
  expect("must be a JSON object");
  write_raw(path, "\xEF\xBB\xBF{}", 0);  // a byte-order mark
  expect("padded with spaces only");
  write_raw(path, std::string("{}\0\0", 4), 0);
  expect("padded with spaces only");
  write_raw(path, "{\"a\": 1e999}", 0);
  expect("not valid JSON");
  write_raw(path, R"({"a": {"shape": [1], "data_offsets": [0, 4]}})", 4);
  expect("tensor 'a': missing \"dtype\"");
  write_raw(path, R"({"a": {"dtype": "F32", "data_offsets": [0, 4]}})", 4);
  expect("missing \"shape\"");
  write_raw(path, R"({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}})", 4);
  expect("unknown dtype 'Q7'");
  write_raw(path, R"({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", 4);
  expect("non-negative");
  write_raw(path, R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})", 4);
  expect("span 4 bytes but F32 [2] needs 8");
  write_raw(path, R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}})", 4);
  expect("end before they begin");
  write_raw(path,
            R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
            8);
  expect("tensors 'a' and 'b' overlap");
  write_raw(path, R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})", 8);
  expect("4 unused bytes before tensor 'a'");
  write_raw(path, R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", 6);
  expect("2 unexpected bytes after the last tensor");
  write_raw(path, R"({"__metadata__": {"step": 7}})", 0);
  expect("must be a string");

  // Not corrupt: an empty tensor may share its offset with the tensor after it.
  write_raw(path,
            R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "e": {"dtype": "I32", "shape": [0], "data_offsets": [0, 0]}})",
            4);
  CHECK(SafetensorsFile::open(path).tensors().size() == 2);

  write_sample(path);
  fs::resize_file(path, fs::file_size(path) - 10);
  expect("truncated: tensor 'state.steps' ends at byte 46 but data holds 36 bytes");
}

TEST_CASE("safetensors files are interchangeable with the Python package", "[io]") {
  if (!python_safetensors_available()) {
    WARN("python3 with safetensors and numpy not found; skipping interop test");
    return;
  }
  TempDir tmp;
  std::string log;

  SECTION("Python reads what C++ wrote") {
    write_sample(tmp / "cpp.safetensors");
    const int rc = run_python(tmp, R"(
import sys, struct, numpy as np
from safetensors import deserialize, safe_open
path = sys.argv[1]
raw = {name: t for name, t in deserialize(open(path, "rb").read())}
assert raw["model.scale"]["dtype"] == "BF16", raw["model.scale"]
assert raw["model.scale"]["shape"] == [3]
assert struct.unpack("<3H", bytes(raw["model.scale"]["data"])) == (0x3F80, 0xC000, 0x4040)
with safe_open(path, framework="numpy") as f:
    assert f.metadata() == {"format": "lmtrain", "step": "7"}, f.metadata()
    w = f.get_tensor("model.wte")
    assert w.dtype == np.float32 and w.shape == (2, 3)
    assert w.ravel().tolist() == [0.0, 0.5, -1.0, 1.5, 3.25, -0.125], w
    assert f.get_tensor("state.steps").tolist() == [-1, 1 << 40]
    e = f.get_tensor("empty")
    assert e.dtype == np.int32 and e.shape == (0, 4)
)",
                              tmp / "cpp.safetensors", &log);
    INFO(log);
    CHECK(rc == 0);
  }

  SECTION("C++ reads what Python wrote") {
    const int rc = run_python(tmp, R"(
import sys, numpy as np
from safetensors.numpy import save_file
save_file({
    "w": np.arange(6, dtype=np.float32).reshape(2, 3) * 0.5,
    "i": np.array([[1, -2], [3, 4]], dtype=np.int32),
    "d": np.array([1.5], dtype=np.float64),
    "h": np.array([1, 2, 3], dtype=np.float16),
}, sys.argv[1], metadata={"origin": "python"})
)",
                              tmp / "py.safetensors", &log);
    INFO(log);
    REQUIRE(rc == 0);
    SafetensorsFile f = SafetensorsFile::open(tmp / "py.safetensors");
    CHECK(f.metadata().at("origin") == "python");
    CHECK(f.read_f32("w") == std::vector<float>{0, 0.5, 1, 1.5, 2, 2.5});
    std::vector<int32_t> i(4);
    f.read("i", i.data(), 16);
    CHECK(i == std::vector<int32_t>{1, -2, 3, 4});
    double d = 0;
    f.read("d", &d, 8);
    CHECK(d == 1.5);
    CHECK(f.info("h").dtype == "F16");
    CHECK(f.info("h").shape == std::vector<int64_t>{3});
  }
}
