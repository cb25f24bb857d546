// The CPU backend's memory and elementwise utilities.
#include <cstdint>
#include <cstring>

#include "op_check.h"

using namespace lmtrain;
using namespace op_check;

TEST_CASE("cpu allocate is 64-byte aligned and round-trips data", "[ops]") {
  CpuBackend cpu;
  for (size_t bytes : {size_t(0), size_t(4), size_t(100), size_t(4096)}) {
    Buffer buf = cpu.allocate(bytes);
    CHECK(buf.bytes() == bytes);
    CHECK(reinterpret_cast<uintptr_t>(buf.data()) % 64 == 0);
  }
  std::mt19937 rng(1);
  std::vector<float> host = randn(25, rng), back(25);
  Buffer buf = cpu.allocate(host.size() * sizeof(float));
  Tensor t = buf.tensor({5, 5}, DType::f32);
  cpu.upload(t, host.data());
  cpu.download(back.data(), t);
  CHECK(back == host);
}

TEST_CASE("cpu fill, copy, add, scale, sum_squares", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(2);
  std::vector<float> x = randn(40000, rng), y = randn(40000, rng), y0 = y;

  cpu.add(f32(y, {200, 200}), f32(x, {40000}), -0.5f);
  std::vector<double> want(y.size());
  for (size_t i = 0; i < y.size(); ++i) want[i] = y0[i] - 0.5 * x[i];
  require_close("add", y, want, 1e-6);

  cpu.scale(f32(y, {40000}), 3.f);
  for (size_t i = 0; i < y.size(); ++i) want[i] *= 3.0;
  require_close("scale", y, want, 1e-6);

  double ss = 0.0;
  for (float v : x) ss += double(v) * v;
  std::vector<float> sums = {-1.f, -1.f};
  cpu.sum_squares(f32(sums, {2}).slice(1, 1), f32(x, {40000}));
  CHECK(sums[0] == -1.f);  // only the slot asked for is written
  CHECK(sums[1] == Approx(ss).epsilon(1e-7));
  CHECK_THROWS_WITH(cpu.sum_squares(f32(sums, {2}), f32(x, {40000})),
                    Catch::Contains("out must have one element"));

  cpu.copy(f32(y, {40000}), f32(x, {200, 200}));
  CHECK(y == x);
  std::vector<int32_t> a{1, -2, 3}, b(3);
  cpu.copy(i32(b, {3}), i32(a, {3}));
  CHECK(b == a);

  cpu.fill(f32(y, {40000}), 0.25f);
  CHECK(std::all_of(y.begin(), y.end(), [](float v) { return v == 0.25f; }));
}

TEST_CASE("cpu elementwise utilities reject bad dtypes and sizes", "[ops]") {
  CpuBackend cpu;
  std::vector<float> x(6), y(5);
  std::vector<int32_t> ids(6);
  CHECK_THROWS_AS(cpu.copy(f32(y, {5}), f32(x, {6})), Error);
  CHECK_THROWS_AS(cpu.copy(i32(ids, {6}), f32(x, {6})), Error);
  CHECK_THROWS_AS(cpu.add(f32(y, {5}), f32(x, {6}), 1.f), Error);
  CHECK_THROWS_AS(cpu.fill(i32(ids, {6}), 1.f), Error);
  CHECK_THROWS_AS(cpu.copy(Tensor{x.data(), {6}, DType::bf16}, Tensor{x.data(), {6}, DType::bf16}),
                  Error);
  // add: x may be y itself, not a view that overlaps it in part.
  std::vector<float> z = {1, 2, 3, 4, 5, 6};
  cpu.add(f32(z, {6}), f32(z, {6}), 1.f);
  CHECK(z == std::vector<float>{2, 4, 6, 8, 10, 12});
  CHECK_THROWS_WITH(
      cpu.add(Tensor{z.data() + 1, {4}, DType::f32}, Tensor{z.data(), {4}, DType::f32}, 1.f),
      "add: y (4) and x (4) overlap (only the same tensor may be both)");
  CHECK(z == std::vector<float>{2, 4, 6, 8, 10, 12});  // refused before writing
}

// The backend cannot tell what an allocation is for: its error names the keys that size them.
TEST_CASE("cpu allocate beyond memory says what to change", "[ops]") {
  CpuBackend cpu;
  CHECK_THROWS_WITH(cpu.allocate(size_t(1) << 62),
                    Catch::Contains("out of host memory for 4611686018427387904 bytes") &&
                        Catch::Contains("lmtrain info") && Catch::Contains("batch.device_batch") &&
                        Catch::Contains("model.vocab_size"));
}
