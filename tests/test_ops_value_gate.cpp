// The value-embedding gate v += 2 sigmoid(xn[:, :G] @ gate_w^T) * ve.
#include "op_check.h"

using namespace lmtrain;
using namespace op_check;

namespace {

struct GateCase {
  int64_t N = 5, C = 9, Hkv = 2, G = 6, D = 3;
  std::vector<float> v, xn, gate_w, ve;

  explicit GateCase(std::mt19937& rng)
      : v(randn(N * Hkv * D, rng)),
        xn(randn(N * C, rng)),
        gate_w(randn(Hkv * G, rng)),
        ve(randn(N * Hkv * D, rng)) {}
};

}  // namespace

TEST_CASE("value_gate forward matches the formula", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(19);
  GateCase c(rng);
  std::vector<float> v = c.v, gate(c.N * c.Hkv);
  cpu.value_gate_forward(f32(v, {c.N, c.Hkv * c.D}), f32(gate, {c.N, c.Hkv}), f32(c.xn, {c.N, c.C}),
                         f32(c.gate_w, {c.Hkv, c.G}), f32(c.ve, {c.N, c.Hkv * c.D}));
  std::vector<double> want_v(v.size()), want_gate(gate.size());
  for (int64_t n = 0; n < c.N; ++n)
    for (int64_t h = 0; h < c.Hkv; ++h) {
      double a = 0.0;
      for (int64_t g = 0; g < c.G; ++g) a += double(c.xn[n * c.C + g]) * c.gate_w[h * c.G + g];
      double s = 2.0 / (1.0 + std::exp(-a));
      want_gate[n * c.Hkv + h] = s;
      for (int64_t d = 0; d < c.D; ++d) {
        int64_t i = (n * c.Hkv + h) * c.D + d;
        want_v[i] = c.v[i] + s * c.ve[i];
      }
    }
  require_close("v", v, want_v, 1e-6);
  require_close("gate", gate, want_gate, 1e-6);
}

TEST_CASE("value_gate backward matches finite differences and accumulates", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(20);
  GateCase c(rng);
  Shape vs{c.N, c.Hkv * c.D}, xs{c.N, c.C}, ws{c.Hkv, c.G}, gs{c.N, c.Hkv};
  std::vector<float> w = randn(c.v.size(), rng), v = c.v, gate(c.N * c.Hkv);
  cpu.value_gate_forward(f32(v, vs), f32(gate, gs), f32(c.xn, xs), f32(c.gate_w, ws),
                         f32(c.ve, vs));
  // dxn and dgate_w accumulate onto what is there; dve is overwritten.
  std::vector<float> dxn_init = randn(c.xn.size(), rng), dw_init = randn(c.gate_w.size(), rng);
  std::vector<float> dxn = dxn_init, dgate_w = dw_init, dve = randn(c.ve.size(), rng);
  cpu.value_gate_backward(f32(dxn, xs), f32(dgate_w, ws), f32(dve, vs), f32(w, vs), f32(c.xn, xs),
                          f32(c.gate_w, ws), f32(c.ve, vs), f32(gate, gs));
  for (size_t i = 0; i < dxn.size(); ++i) dxn[i] -= dxn_init[i];
  for (size_t i = 0; i < dgate_w.size(); ++i) dgate_w[i] -= dw_init[i];

  auto loss = [&] {
    v = c.v;
    cpu.value_gate_forward(f32(v, vs), f32(gate, gs), f32(c.xn, xs), f32(c.gate_w, ws),
                           f32(c.ve, vs));
    return weighted_sum(w, v);
  };
  check_gradient("xn", c.xn, dxn, loss);  // columns past G get exactly 0 both ways
  check_gradient("gate_w", c.gate_w, dgate_w, loss);
  check_gradient("ve", c.ve, dve, loss);
}

TEST_CASE("value_gate rejects inconsistent shapes", "[ops]") {
  CpuBackend cpu;
  std::vector<float> v(24), gate(8), xn(16), gate_w(6), ve(24);
  // G = 6 exceeds the 4 channels of xn.
  CHECK_THROWS_AS(cpu.value_gate_forward(f32(v, {4, 6}), f32(gate, {4, 2}), f32(xn, {4, 4}),
                                         f32(gate_w, {1, 6}), f32(ve, {4, 6})),
                  Error);
  CHECK_THROWS_AS(cpu.value_gate_forward(f32(v, {4, 6}), f32(gate, {4, 2}), f32(xn, {4, 4}),
                                         f32(gate_w, {2, 3}), f32(ve, {6, 4})),
                  Error);
}
