// The value-embedding gate v += 2 sigmoid(xn[:, :G] @ gate_w^T) * table[tokens].
#include "op_check.h"

using namespace lmtrain;
using namespace op_check;

namespace {

// Tokens repeat (ids 1 and 3 twice each, id 0 never), so the table's gradient sums rows.
struct GateCase {
  int64_t N = 5, C = 9, Hkv = 2, G = 6, D = 3, V = 4;
  std::vector<float> v, xn, gate_w, table;
  std::vector<int32_t> tokens = {3, 1, 2, 1, 3};

  explicit GateCase(std::mt19937& rng)
      : v(randn(N * Hkv * D, rng)),
        xn(randn(N * C, rng)),
        gate_w(randn(Hkv * G, rng)),
        table(randn(V * Hkv * D, rng)) {}
  Shape vs() const { return {N, Hkv * D}; }
  Shape xs() const { return {N, C}; }
  Shape ws() const { return {Hkv, G}; }
  Shape gs() const { return {N, Hkv}; }
  Shape ts() const { return {V, Hkv * D}; }
};

}  // namespace

TEST_CASE("value_gate forward matches the formula", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(19);
  GateCase c(rng);
  std::vector<float> v = c.v, gate(c.N * c.Hkv);
  cpu.value_gate_forward(f32(v, c.vs()), f32(gate, c.gs()), f32(c.xn, c.xs()),
                         f32(c.gate_w, c.ws()), f32(c.table, c.ts()), i32(c.tokens, {c.N}));
  std::vector<double> want_v(v.size()), want_gate(gate.size());
  for (int64_t n = 0; n < c.N; ++n)
    for (int64_t h = 0; h < c.Hkv; ++h) {
      double a = 0.0;
      for (int64_t g = 0; g < c.G; ++g) a += double(c.xn[n * c.C + g]) * c.gate_w[h * c.G + g];
      double s = 2.0 / (1.0 + std::exp(-a));
      want_gate[n * c.Hkv + h] = s;
      for (int64_t d = 0; d < c.D; ++d) {
        int64_t i = (n * c.Hkv + h) * c.D + d;
        want_v[i] = c.v[i] + s * c.table[(c.tokens[n] * c.Hkv + h) * c.D + d];
      }
    }
  require_close("v", v, want_v, 1e-6);
  require_close("gate", gate, want_gate, 1e-6);
}

TEST_CASE("value_gate backward matches finite differences and accumulates", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(20);
  GateCase c(rng);
  std::vector<float> w = randn(c.v.size(), rng), v = c.v, gate(c.N * c.Hkv);
  cpu.value_gate_forward(f32(v, c.vs()), f32(gate, c.gs()), f32(c.xn, c.xs()),
                         f32(c.gate_w, c.ws()), f32(c.table, c.ts()), i32(c.tokens, {c.N}));
  // dxn and dgate_w accumulate onto what is there; dve is overwritten.
  std::vector<float> dxn_init = randn(c.xn.size(), rng), dw_init = randn(c.gate_w.size(), rng);
  std::vector<float> dxn = dxn_init, dgate_w = dw_init, dve = randn(c.v.size(), rng);
  cpu.value_gate_backward(f32(dxn, c.xs()), f32(dgate_w, c.ws()), f32(dve, c.vs()), f32(w, c.vs()),
                          f32(c.xn, c.xs()), f32(c.gate_w, c.ws()), f32(c.table, c.ts()),
                          i32(c.tokens, {c.N}), f32(gate, c.gs()));
  for (size_t i = 0; i < dxn.size(); ++i) dxn[i] -= dxn_init[i];
  for (size_t i = 0; i < dgate_w.size(); ++i) dgate_w[i] -= dw_init[i];
  // dve holds the gathered rows' gradient; the table's is its scatter over the tokens.
  std::vector<float> dtable(c.table.size(), 0.f);
  const int64_t width = c.Hkv * c.D;
  for (int64_t n = 0; n < c.N; ++n)
    for (int64_t j = 0; j < width; ++j) dtable[c.tokens[n] * width + j] += dve[n * width + j];

  auto loss = [&] {
    v = c.v;
    cpu.value_gate_forward(f32(v, c.vs()), f32(gate, c.gs()), f32(c.xn, c.xs()),
                           f32(c.gate_w, c.ws()), f32(c.table, c.ts()), i32(c.tokens, {c.N}));
    return weighted_sum(w, v);
  };
  check_gradient("xn", c.xn, dxn, loss);  // columns past G get exactly 0 both ways
  check_gradient("gate_w", c.gate_w, dgate_w, loss);
  check_gradient("table", c.table, dtable, loss);  // row 0 is never read: exactly 0
}

TEST_CASE("value_gate rejects inconsistent shapes and ids outside the table", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(21);
  GateCase c(rng);
  std::vector<float> v = c.v, gate(c.N * c.Hkv);
  auto forward = [&](Shape gate_w_shape, Shape table_shape) {
    cpu.value_gate_forward(f32(v, c.vs()), f32(gate, c.gs()), f32(c.xn, c.xs()),
                           f32(c.gate_w, gate_w_shape), f32(c.table, table_shape),
                           i32(c.tokens, {c.N}));
  };
  // G = 12 exceeds the 9 channels of xn.
  CHECK_THROWS_WITH(forward({1, 12}, c.ts()), Catch::Contains("at most the width of xn"));
  // Table rows of 4 for v's rows of 6.
  CHECK_THROWS_WITH(forward(c.ws(), {6, 4}), Catch::Contains("rows as wide as those of v"));
  c.tokens[2] = 4;  // V = 4
  CHECK_THROWS_WITH(forward(c.ws(), c.ts()),
                    Catch::Contains("token id 4 at position 2 is outside the table of 4 rows"));
}
