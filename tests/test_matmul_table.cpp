// Tables of matmul algorithms (backend/matmul_table.h): written and read back unchanged, looked up
// by every field of the shape, merged into a file by several writers, refused with one line naming
// the file and key when malformed, found by GPU and library in a directory, and the tables under
// configs/matmul/ all readable and each found for its own GPU and library.
#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "backend/matmul_table.h"
#include "test_support.h"

namespace fs = std::filesystem;
using lmtrain::DType;
using lmtrain::MatmulChoice;
using lmtrain::MatmulDevice;
using lmtrain::MatmulShape;
using lmtrain::MatmulTable;
using lmtrain::test_support::TempDir;

namespace {

const MatmulDevice kH100{"NVIDIA H100 80GB HBM3", 132, 130200};

MatmulShape random_shape(std::mt19937_64& rng) {
  auto pick = [&](int64_t lo, int64_t hi) {
    return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
  };
  MatmulShape s;
  s.m = pick(1, 1 << 17), s.n = pick(1, 4096), s.k = pick(1, 4096), s.batch = pick(1, 12);
  s.trans_a = pick(0, 1), s.trans_b = pick(0, 1);
  s.ld_a = (s.trans_a ? s.m : s.k) + pick(0, 64);
  s.ld_b = (s.trans_b ? s.k : s.n) + pick(0, 64);
  s.ld_out = s.n + pick(0, 64);
  s.in = pick(0, 1) ? DType::bf16 : DType::f32;
  s.out = s.in == DType::f32 || pick(0, 1) ? DType::f32 : DType::bf16;
  s.tf32 = s.in == DType::f32 && pick(0, 1);
  if (s.batch > 1) s.ld_a = s.trans_a ? s.m : s.k, s.ld_b = s.trans_b ? s.k : s.n, s.ld_out = s.n;
  s.align_a = 1 << pick(0, 8), s.align_b = 1 << pick(0, 8), s.align_out = 1 << pick(0, 8);
  return s;
}

MatmulChoice random_choice(std::mt19937_64& rng) {
  MatmulChoice c;
  for (auto& word : c.algo) word = rng();
  c.ms = std::uniform_real_distribution<double>(0.01, 10)(rng);
  c.heuristic_ms = c.ms * std::uniform_real_distribution<double>(1, 1.3)(rng);
  return c;
}

void write(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

// A valid one-row table's text with `row_edit` replacing part of the row.
std::string one_row(const std::string& row_edit = "") {
  const std::string row = R"("m": 64, "n": 32, "k": 16, "batch": 1, "ld_a": 16, "ld_b": 32, )"
                          R"("ld_out": 32, "trans_a": false, "trans_b": false, "in": "bf16", )"
                          R"("out": "bf16", "compute": "32F", "align_a": 256, "align_b": 256, )"
                          R"("align_out": 256, "ms": 0.5, "heuristic_ms": 0.6, "algo": )"
                          R"(["0000000000000001", "0000000000000002", "0000000000000003", )"
                          R"("0000000000000004", "0000000000000005", "0000000000000006", )"
                          R"("0000000000000007", "00000000000000ff"])";
  return R"({"device": "GPU X", "sm_count": 132, "cublaslt_version": 130200, "matmuls": [{)" + row +
         row_edit + "}]}";
}

}  // namespace

TEST_CASE("A matmul table reads back what was written, rows in a fixed order", "[matmul_table]") {
  TempDir tmp;
  std::mt19937_64 rng(20261124);
  MatmulTable table(kH100);
  std::vector<std::pair<MatmulShape, MatmulChoice>> rows;
  for (int i = 0; i < 20; ++i) {
    rows.emplace_back(random_shape(rng), random_choice(rng));
    table.put(rows.back().first, rows.back().second);
  }
  const std::string path = tmp / "table.json";
  table.save(path);
  // The rename left no staging file behind.
  CHECK(std::distance(fs::directory_iterator(tmp.path()), fs::directory_iterator()) == 1);

  const MatmulTable back = MatmulTable::load(path);
  CHECK(back.device() == kH100);
  CHECK(back.source() == path);
  REQUIRE(back.size() == rows.size());
  for (const auto& [shape, choice] : rows) {
    const MatmulChoice* found = back.find(shape);
    REQUIRE(found);
    CHECK(found->algo == choice.algo);
    CHECK(found->ms == choice.ms);  // JSON keeps a double's 17 digits
    CHECK(found->heuristic_ms == choice.heuristic_ms);
  }
  CHECK(back.dump() == table.dump());

  // The same rows put in another order dump to the same text.
  MatmulTable reversed(kH100);
  for (auto it = rows.rbegin(); it != rows.rend(); ++it) reversed.put(it->first, it->second);
  CHECK(reversed.dump() == table.dump());

  // Saving over an existing table replaces it.
  MatmulTable smaller(kH100);
  smaller.put(rows[0].first, rows[0].second);
  smaller.save(path);
  CHECK(MatmulTable::load(path).size() == 1);
}

TEST_CASE("A matmul table finds a shape only when every field matches", "[matmul_table]") {
  std::mt19937_64 rng(7);
  const MatmulShape shape = random_shape(rng);
  MatmulTable table(kH100);
  table.put(shape, random_choice(rng));
  REQUIRE(table.find(shape));
  const std::vector<void (*)(MatmulShape&)> edits = {
      [](MatmulShape& s) { s.m += 1; },
      [](MatmulShape& s) { s.n += 1; },
      [](MatmulShape& s) { s.k += 1; },
      [](MatmulShape& s) { s.batch += 1; },
      [](MatmulShape& s) { s.ld_a += 1; },
      [](MatmulShape& s) { s.ld_b += 1; },
      [](MatmulShape& s) { s.ld_out += 1; },
      [](MatmulShape& s) { s.trans_a = !s.trans_a; },
      [](MatmulShape& s) { s.trans_b = !s.trans_b; },
      [](MatmulShape& s) { s.in = s.in == DType::f32 ? DType::bf16 : DType::f32; },
      [](MatmulShape& s) { s.out = s.out == DType::f32 ? DType::bf16 : DType::f32; },
      [](MatmulShape& s) { s.tf32 = !s.tf32; },
      [](MatmulShape& s) { s.align_a = s.align_a == 256 ? 128 : s.align_a * 2; },
      [](MatmulShape& s) { s.align_b = s.align_b == 256 ? 128 : s.align_b * 2; },
      [](MatmulShape& s) { s.align_out = s.align_out == 256 ? 128 : s.align_out * 2; }};
  for (size_t i = 0; i < edits.size(); ++i) {
    MatmulShape other = shape;
    edits[i](other);
    INFO("field " << i);
    CHECK(!table.find(other));
  }
}

TEST_CASE("A malformed matmul table is refused in one line naming the file and key",
          "[matmul_table]") {
  TempDir tmp;
  const std::string path = tmp / "bad.json";
  write(path, one_row());
  CHECK(MatmulTable::load(path).size() == 1);  // the base text is valid

  // The base text with one piece replaced.
  auto edited = [&](const std::string& from, const std::string& to) {
    std::string text = one_row();
    const size_t at = text.find(from);
    REQUIRE(at != std::string::npos);
    text.replace(at, from.size(), to);
    return text;
  };
  const std::string row = path + ": matmuls[0]";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {edited(R"("ms": 0.5, )", R"("ms": 0.5, "ms_heuristic": 1, )"),
       path + ": unknown key 'matmuls[0].ms_heuristic' (did you mean 'matmuls[0].heuristic_ms'?)"},
      {edited(R"("m": 64)", R"("m": "64")"),
       path + ": matmuls[0].m: expected an integer, got the string \"64\""},
      {edited(R"("m": 64, )", ""), row + ": missing key 'm'"},
      {edited(R"("m": 64)", R"("m": 0)"), row + ".m: expected an integer >= 1, got 0"},
      {edited(R"("batch": 1)", R"("batch": 0)"), row + ".batch: expected an integer >= 1, got 0"},
      {edited(R"("ld_a": 16)", R"("ld_a": 15)"),
       row + ": expected ld_a, ld_b and ld_out at least their rows' lengths (16, 32, 32), got 15, "
             "32, 32"},
      {edited(R"("in": "bf16")", R"("in": "fp16")"),
       row + ".in: expected \"bf16\" or \"f32\", got \"fp16\""},
      {edited(R"("compute": "32F")", R"("compute": "16F")"),
       row + ".compute: expected \"32F\" or \"32F_FAST_TF32\", got \"16F\""},
      {edited(R"("align_b": 256)", R"("align_b": 48)"),
       row + ".align_b: expected a power of two from 1 to 256, got 48"},
      {edited(R"("0000000000000001", )", ""), row + ".algo: expected 8 hex strings, got 7"},
      {edited(R"("00000000000000ff")", R"("00000000000000FF")"),
       row + ".algo[7]: expected 16 lowercase hex digits, got \"00000000000000FF\""},
      {edited(R"("0000000000000001")", R"("1")"),
       row + ".algo[0]: expected 16 lowercase hex digits, got \"1\""},
      {edited(R"("ms": 0.5)", R"("ms": 0)"), row + ".ms: expected a time in ms above 0, got 0"},
      {edited(R"("in": "bf16", "out": "bf16")", R"("in": "f32", "out": "bf16")"),
       row + ": expected out \"f32\" with in \"f32\""},
      {edited(R"("compute": "32F")", R"("compute": "32F_FAST_TF32")"),
       row + ": expected compute \"32F\" with in \"bf16\""},
      {edited(R"("batch": 1, "ld_a": 16)", R"("batch": 2, "ld_a": 24)"),
       row + ": expected ld_a, ld_b and ld_out equal to their rows' lengths with batch 2"},
      {edited(R"("sm_count": 132, )", ""), path + ": missing key 'sm_count'"},
      {edited(R"("sm_count": 132)", R"("sm_count": 0)"),
       path + ": sm_count: expected the GPU's number of SMs"},
      {edited(R"("device": "GPU X", )", ""), path + ": missing key 'device'"},
      {edited(R"("GPU X")", R"("")"), path + ": device: expected the GPU's name"},
      {edited(R"("cublaslt_version": 130200)", R"("cublaslt_version": -1)"),
       path + ": cublaslt_version: expected an integer in [0, 18446744073709551615], got -1"},
      {edited(R"("cublaslt_version": 130200)", R"("cublaslt_version": 0)"),
       path + ": cublaslt_version: expected cublasLtGetVersion()'s value"},
      {edited(R"("ms": 0.5, )", ""), row + ": missing key 'ms'"},
      {R"([1, 2])", path + ": expected a JSON object at the top level"},
  };
  for (const auto& [text, message] : cases) {
    write(path, text);
    INFO(text);
    CHECK_THROWS_WITH(MatmulTable::load(path), message);
  }

  // The same shape twice.
  std::string twice = one_row();
  const size_t open = twice.find('{', 1), close = twice.rfind('}', twice.size() - 2);
  const std::string row_text = twice.substr(open, close - open + 1);
  twice.insert(close + 1, ", " + row_text);
  write(path, twice);
  CHECK_THROWS_WITH(MatmulTable::load(path),
                    Catch::Matchers::StartsWith(path + ": matmuls[1]: the shape 64x32x16") &&
                        Catch::Matchers::EndsWith("appears twice; keep one"));

  // Cut short, and missing.
  write(path, one_row().substr(0, 100));
  CHECK_THROWS_WITH(MatmulTable::load(path),
                    Catch::Matchers::StartsWith(path + ": not valid JSON"));
  CHECK_THROWS_WITH(MatmulTable::load(tmp / "none.json"), tmp / "none.json" + ": cannot open");
}

TEST_CASE("Every table under configs/matmul reads, and is the one taken for its GPU",
          "[matmul_table]") {
  const fs::path dir = lmtrain::test_support::source_path("configs/matmul");
  std::vector<MatmulDevice> seen;
  if (fs::is_directory(dir)) {
    for (const auto& entry : fs::directory_iterator(dir)) {
      if (entry.path().extension() != ".json") continue;
      INFO(entry.path().string());
      const MatmulTable table = MatmulTable::load(entry.path().string());
      CHECK(table.size() > 0);
      // One table per GPU and library: find_for() takes the first, so a second would be dead.
      const MatmulDevice key = table.device();
      CHECK(std::find(seen.begin(), seen.end(), key) == seen.end());
      seen.push_back(key);
      const auto found = MatmulTable::find_for(table.device(), MatmulTable::builtin_dir());
      REQUIRE(found);
      CHECK(found->dump() == table.dump());
    }
  }
  CHECK(MatmulTable::builtin_dir() == dir.string());
}

TEST_CASE("Several writers merge their rows into one table file", "[matmul_table]") {
  TempDir tmp;
  const std::string path = tmp / "table.json";
  std::mt19937_64 rng(3);
  const MatmulShape a = random_shape(rng), b = random_shape(rng), c = random_shape(rng);
  const MatmulChoice first = random_choice(rng), second = random_choice(rng),
                     third = random_choice(rng);

  MatmulTable one(kH100);
  one.put(a, first);
  one.put(b, first);
  one.merge_into(path);  // no file yet: made
  MatmulTable other(kH100);
  other.put(b, second);  // timed again elsewhere: the file keeps the first writer's
  other.put(c, third);
  other.merge_into(path);

  const MatmulTable merged = MatmulTable::load(path);
  REQUIRE(merged.size() == 3);
  CHECK(merged.find(a)->algo == first.algo);
  CHECK(merged.find(b)->algo == first.algo);
  CHECK(merged.find(c)->algo == third.algo);
  CHECK(fs::exists(path + ".lock"));

  MatmulTable elsewhere(MatmulDevice{"NVIDIA H200", 132, 130200});
  CHECK_THROWS_WITH(elsewhere.merge_into(path),
                    path +
                        ": a table for NVIDIA H100 80GB HBM3 (132 SMs) with cuBLASLt 130200, "
                        "but this is NVIDIA H200 (132 SMs) with cuBLASLt 130200");
  CHECK(MatmulTable::load(path).size() == 3);  // refused: the file is as it was
}

TEST_CASE("A directory's table is found by GPU name, SM count and library", "[matmul_table]") {
  TempDir tmp;
  std::mt19937_64 rng(11);
  auto save = [&](const std::string& name, const MatmulDevice& device, int rows) {
    MatmulTable table(device);
    for (int i = 0; i < rows; ++i) table.put(random_shape(rng), random_choice(rng));
    table.save(tmp / name);
  };
  save("a_other_version.json", MatmulDevice{kH100.name, 132, 120900}, 1);
  save("b_h100.json", kH100, 2);
  save("c_h100_too.json", kH100, 3);  // after b by name: never taken
  save("d_mig.json", MatmulDevice{kH100.name, 16, kH100.cublaslt_version}, 4);
  write(tmp / "e_broken.json", "{\"device\": ");
  write(tmp / "notes.txt", "not a table");

  const auto h100 = MatmulTable::find_for(kH100, tmp.path().string());
  REQUIRE(h100);
  CHECK(h100->size() == 2);
  CHECK(h100->source() == tmp / "b_h100.json");
  const auto mig = MatmulTable::find_for(MatmulDevice{kH100.name, 16, kH100.cublaslt_version},
                                         tmp.path().string());
  REQUIRE(mig);
  CHECK(mig->size() == 4);
  // Only another version, or nothing at all: none (with a warning for the first).
  CHECK(!MatmulTable::find_for(MatmulDevice{kH100.name, 132, 130300}, tmp.path().string()));
  CHECK(!MatmulTable::find_for(MatmulDevice{"no such GPU", 1, 1}, tmp.path().string()));
  CHECK(!MatmulTable::find_for(kH100, tmp / "missing"));
}
