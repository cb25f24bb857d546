// Embedding lookup and its scatter-add backward.
#include "op_check.h"

using namespace lmtrain;
using namespace op_check;

TEST_CASE("embedding forward gathers rows, backward adds repeated ids up", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(4);
  const int64_t V = 6, C = 130;  // C spans more than one channel block of the backward
  std::vector<int32_t> tokens{3, 1, 3, 0, 3, 5, 1};
  const int64_t N = int64_t(tokens.size());
  std::vector<float> table = randn(V * C, rng), out(N * C);
  cpu.embedding_forward(f32(out, {N, C}), f32(table, {V, C}), i32(tokens, {N}));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) REQUIRE(out[n * C + c] == table[tokens[n] * C + c]);

  std::vector<float> dout = randn(N * C, rng), dtable = randn(V * C, rng);
  std::vector<double> want(dtable.begin(), dtable.end());  // accumulates onto what is there
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) want[tokens[n] * C + c] += dout[n * C + c];
  cpu.embedding_backward(f32(dtable, {V, C}), f32(dout, {1, N, C}), i32(tokens, {1, N}));
  require_close("dtable", dtable, want, 1e-6);
}

TEST_CASE("embedding backward matches finite differences", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(5);
  const int64_t V = 5, C = 4;
  std::vector<int32_t> tokens{2, 2, 0, 4, 2, 1};
  const int64_t N = int64_t(tokens.size());
  std::vector<float> table = randn(V * C, rng), w = randn(N * C, rng), out(N * C);
  std::vector<float> dtable(V * C, 0.f);
  cpu.embedding_backward(f32(dtable, {V, C}), f32(w, {N, C}), i32(tokens, {N}));
  check_gradient("table", table, dtable, [&] {
    cpu.embedding_forward(f32(out, {N, C}), f32(table, {V, C}), i32(tokens, {N}));
    return weighted_sum(w, out);
  });
}

TEST_CASE("embedding rejects bad shapes and token ids", "[ops]") {
  CpuBackend cpu;
  std::vector<float> table(12), out(8);
  std::vector<int32_t> tokens{0, 1}, bad{0, 3};
  CHECK_THROWS_AS(cpu.embedding_forward(f32(out, {2, 4}), f32(table, {4, 3}), i32(tokens, {2})),
                  Error);
  CHECK_THROWS_AS(cpu.embedding_forward(f32(out, {2, 4}), f32(table, {3, 4}), i32(bad, {2})),
                  Error);
  CHECK_THROWS_AS(cpu.embedding_backward(f32(table, {3, 4}), f32(out, {2, 4}), i32(bad, {2})),
                  Error);
}
