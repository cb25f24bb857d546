// Row bands (core/tensor.h): views, the refusals, and every op that takes them giving on a band
// what it gives on a dense copy, without touching the columns between the band's rows.
#include "op_check.h"

using namespace lmtrain;
using namespace op_check;

namespace {

constexpr float kGap = 12345.f;  // the wider array's other columns, which no op may change

// `rows` rows of `width` elements at columns [offset, offset + width) of a wider array of
// `pitch` columns, the rest holding kGap.
struct Wide {
  int64_t rows, width, pitch, offset;
  std::vector<float> mem;

  Wide(int64_t rows, int64_t width, int64_t pitch, int64_t offset)
      : rows(rows), width(width), pitch(pitch), offset(offset), mem(size_t(rows * pitch), kGap) {}
  Wide(const std::vector<float>& dense, int64_t width, int64_t pitch, int64_t offset)
      : Wide(int64_t(dense.size()) / width, width, pitch, offset) {
    for (int64_t r = 0; r < rows; ++r)
      std::copy_n(dense.begin() + r * width, width, mem.begin() + r * pitch + offset);
  }
  Tensor band(Shape shape) {
    return Tensor{mem.data(), Shape{rows, pitch}, DType::f32}.columns(offset, width).view(shape);
  }
  std::vector<float> dense() const {
    std::vector<float> out(size_t(rows * width));
    for (int64_t r = 0; r < rows; ++r)
      std::copy_n(mem.begin() + r * pitch + offset, width, out.begin() + r * width);
    return out;
  }
  bool gaps_intact() const {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < pitch; ++c)
        if ((c < offset || c >= offset + width) && mem[size_t(r * pitch + c)] != kGap) return false;
    return true;
  }
};

}  // namespace

TEST_CASE("a band views, pitches and refuses what it cannot do", "[ops]") {
  std::vector<float> mem(6 * 10);
  const Tensor wide{mem.data(), {6, 10}, DType::f32};
  const Tensor band = wide.columns(4, 6);
  CHECK_FALSE(band.dense());
  CHECK(band.data == mem.data() + 4);
  CHECK(band.pitch(1) == 10);
  CHECK(wide.columns(0, 10).dense());  // all the columns: the tensor itself
  // (6, 6) as (B 2, T 3, heads 3, D 2): the rows are the (B, T) positions.
  const Tensor heads = band.view({2, 3, 3, 2});
  CHECK(heads.pitch(2) == 10);
  CHECK(heads.view({6, 6}).pitch(1) == 10);
  CHECK_THROWS_WITH(heads.pitch(1), Catch::Contains("rows over its first 2 dimensions"));
  CHECK_THROWS_WITH(band.view({36}), Catch::Contains("its rows do not split off"));
  CHECK_THROWS_WITH(band.view({3, 12}), Catch::Contains("its rows do not split off"));
  CHECK_THROWS_WITH(band.f32(), Catch::Contains("needs a dense tensor"));
  CHECK_THROWS_WITH(band.bytes(), Catch::Contains("no single byte range"));
  CHECK_THROWS_WITH(band.slice(0, 2), Catch::Contains("only dense tensors slice"));
  CHECK_THROWS_WITH(band[0], Catch::Contains("only dense tensors index"));
  CHECK_THROWS_WITH(wide.columns(8, 3), Catch::Contains("columns [8, 11) of (6, 10)"));
  // Ops that take no bands refuse them rather than read the gaps.
  CpuBackend cpu;
  CHECK_THROWS_WITH(cpu.relu2_forward(band, band), Catch::Contains("relu2_forward: needs dense"));
  CHECK_THROWS_WITH(cpu.fill(band, 0.f), Catch::Contains("fill: needs dense"));
  std::vector<float> addend(6 * 6);
  CHECK_THROWS_WITH(cpu.matmul_add(band, band, band, false, true, f32(addend, {6, 6})),
                    Catch::Contains("matmul_add: needs dense"));
}

TEST_CASE("copy moves rows into and out of bands", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(31);
  std::vector<float> src = randn(4 * 3, rng), back(src.size());
  Wide wide(4, 3, 7, 2);
  cpu.copy(wide.band({4, 3}), f32(src, {4, 3}));
  CHECK(wide.dense() == src);
  CHECK(wide.gaps_intact());
  cpu.copy(f32(back, {4, 3}), wide.band({4, 3}));
  CHECK(back == src);
  Wide other(4, 3, 5, 1);
  cpu.copy(other.band({4, 3}), wide.band({4, 3}));
  CHECK(other.dense() == src);
  CHECK(other.gaps_intact());
  CHECK_NOTHROW(cpu.copy(other.band({4, 3}), wide.band({2, 2, 3})));  // the same rows
  // Two bands of one array whose rows interleave: refused rather than copied row over row.
  CHECK_THROWS_WITH(cpu.copy(wide.band({4, 3}).view({4, 3}),
                             Tensor{wide.mem.data(), {4, 7}, DType::f32}.columns(0, 3)),
                    Catch::Contains("overlap"));
  Wide two_rows(2, 6, 9, 1);
  CHECK_THROWS_WITH(cpu.copy(two_rows.band({2, 6}), wide.band({4, 3})),
                    Catch::Contains("split into different rows"));
}

TEST_CASE("matmul reads and writes bands as their dense copies", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(32);
  const int64_t M = 5, N = 4, K = 3;
  for (bool trans_a : {false, true}) {
    INFO("trans_a " << trans_a);
    const Shape a_shape = trans_a ? Shape{K, M} : Shape{M, K};
    std::vector<float> a = randn(size_t(M * K), rng), b = randn(size_t(K * N), rng);
    std::vector<float> want(size_t(M * N));
    cpu.matmul(f32(want, {M, N}), f32(a, a_shape), f32(b, {N, K}), trans_a, true, false);
    Wide a_band(a, a_shape[1], a_shape[1] + 5, 3), out(M, N, N + 3, 1);
    cpu.matmul(out.band({M, N}), a_band.band(a_shape), f32(b, {N, K}), trans_a, true, false);
    require_close("out", out.dense(), want, 1e-6);
    CHECK(out.gaps_intact());
  }
}

TEST_CASE("norm_rope forward and backward on bands, the backward in place", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(33);
  const int64_t B = 2, T = 3, H = 2, D = 4, T_max = 5;
  const Shape shape{B, T, H, D};
  std::vector<float> cos = randn(size_t(T_max * D / 2), rng), sin = cos;
  for (size_t i = 0; i < cos.size(); ++i) cos[i] = std::cos(sin[i]), sin[i] = std::sin(sin[i]);
  const Tensor ct = f32(cos, {T_max, D / 2}), st = f32(sin, {T_max, D / 2});
  std::vector<float> x = randn(size_t(B * T * H * D), rng), g = randn(x.size(), rng);
  std::vector<float> y(x.size()), dx(x.size()), rstd(size_t(B * T * H));
  cpu.norm_rope_forward(f32(y, shape), f32(rstd, {B * T * H}), f32(x, shape), ct, st, 1);
  cpu.norm_rope_backward(f32(dx, shape), f32(g, shape), f32(x, shape), f32(rstd, {B * T * H}), ct,
                         st, 1);
  // x is the middle band of a packed row (as the raw keys are), y a band of another.
  Wide x_band(x, H * D, 3 * H * D, H * D), y_band(B * T, H * D, H * D + 4, 0);
  std::vector<float> rstd_band(rstd.size());
  cpu.norm_rope_forward(y_band.band(shape), f32(rstd_band, {B * T * H}), x_band.band(shape), ct, st,
                        1);
  CHECK(y_band.dense() == y);
  CHECK(rstd_band == rstd);
  Wide g_band(g, H * D, 3 * H * D, 0);
  cpu.norm_rope_backward(g_band.band(shape), g_band.band(shape), x_band.band(shape),
                         f32(rstd, {B * T * H}), ct, st, 1);
  CHECK(g_band.dense() == dx);
  CHECK((x_band.gaps_intact() && y_band.gaps_intact() && g_band.gaps_intact()));
  // In place means one tensor: the band's memory read as a dense tensor is refused.
  const Tensor same_start{g_band.mem.data(), shape, DType::f32};
  CHECK_THROWS_WITH(cpu.norm_rope_backward(same_start, g_band.band(shape), x_band.band(shape),
                                           f32(rstd, {B * T * H}), ct, st, 1),
                    Catch::Contains("norm_rope_backward: dx and dout start at the same element "
                                    "with different row pitches (0 and 24)"));
  CHECK_THROWS_WITH(
      cpu.norm_rope_forward(x_band.band(shape), f32(rstd_band, {B * T * H}),
                            Tensor{x_band.band(shape).data, shape, DType::f32}, ct, st, 1),
      Catch::Contains("norm_rope_forward: out and x start at the same element"));
}

TEST_CASE("value_gate updates a band of values and reads a band of their gradients", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(34);
  const int64_t N = 4, C = 6, Hkv = 2, G = 3, D = 2, V = 5;
  std::vector<float> v = randn(size_t(N * Hkv * D), rng), xn = randn(size_t(N * C), rng);
  std::vector<float> gate_w = randn(size_t(Hkv * G), rng), table = randn(size_t(V * Hkv * D), rng);
  std::vector<int32_t> tokens = {4, 0, 4, 2};
  const Shape vs{N, Hkv * D};
  auto run = [&](Tensor v_t, Tensor dv_t, std::vector<float>& gate, std::vector<float>& dxn,
                 std::vector<float>& dgw, std::vector<float>& dve) {
    cpu.value_gate_forward(v_t, f32(gate, {N, Hkv}), f32(xn, {N, C}), f32(gate_w, {Hkv, G}),
                           f32(table, {V, Hkv * D}), i32(tokens, {N}));
    cpu.value_gate_backward(f32(dxn, {N, C}), f32(dgw, {Hkv, G}), f32(dve, vs), dv_t,
                            f32(xn, {N, C}), f32(gate_w, {Hkv, G}), f32(table, {V, Hkv * D}),
                            i32(tokens, {N}), f32(gate, {N, Hkv}));
  };
  std::vector<float> dv = randn(v.size(), rng);
  std::vector<float> gate(size_t(N * Hkv)), dxn(xn.size()), dgw(gate_w.size()), dve(v.size());
  std::vector<float> v_dense = v;
  run(f32(v_dense, vs), f32(dv, vs), gate, dxn, dgw, dve);
  Wide v_band(v, Hkv * D, 3 * Hkv * D, 2 * Hkv * D), dv_band(dv, Hkv * D, 3 * Hkv * D, 2 * Hkv * D);
  std::vector<float> gate2(gate.size()), dxn2(dxn.size()), dgw2(dgw.size()), dve2(dve.size());
  run(v_band.band(vs), dv_band.band(vs), gate2, dxn2, dgw2, dve2);
  CHECK(v_band.dense() == v_dense);
  CHECK(gate2 == gate);
  CHECK(dxn2 == dxn);
  CHECK(dgw2 == dgw);
  CHECK(dve2 == dve);
  CHECK((v_band.gaps_intact() && dv_band.gaps_intact()));
  // v's rows are its N tokens: another shape of the same elements would give another pitch.
  CHECK_THROWS_WITH(
      cpu.value_gate_forward(f32(v_dense, {N, Hkv, D}), f32(gate, {N, Hkv}), f32(xn, {N, C}),
                             f32(gate_w, {Hkv, G}), f32(table, {V, Hkv * D}), i32(tokens, {N})),
      Catch::Contains("must be (N, Hkv * D)"));
}

TEST_CASE("attention forward and backward read and write bands of packed q/k/v", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(35);
  const int64_t B = 2, T = 5, H = 2, Hkv = 1, D = 4, W = (H + 2 * Hkv) * D;
  const int window = 2;
  const Shape qs{B, T, H, D}, kvs{B, T, Hkv, D};
  std::vector<float> q = randn(size_t(B * T * H * D), rng), k = randn(size_t(B * T * Hkv * D), rng);
  std::vector<float> v = randn(k.size(), rng), dout = randn(q.size(), rng);
  std::vector<float> out(q.size()), lse(size_t(B * H * T)), dq(q.size()), dk(k.size()),
      dv(v.size());
  cpu.attention_forward(f32(out, qs), f32(lse, {B, H, T}), f32(q, qs), f32(k, kvs), f32(v, kvs),
                        window, 0);
  cpu.attention_backward(f32(dq, qs), f32(dk, kvs), f32(dv, kvs), f32(dout, qs), f32(q, qs),
                         f32(k, kvs), f32(v, kvs), f32(out, qs), f32(lse, {B, H, T}), window);
  // q, k, v and their gradients each at its columns of a packed (B*T, W) row.
  Wide qb(q, H * D, W, 0), kb(k, Hkv * D, W, H * D), vb(v, Hkv * D, W, (H + Hkv) * D);
  Wide dqb(B * T, H * D, W, 0), dkb(B * T, Hkv * D, W, H * D),
      dvb(B * T, Hkv * D, W, (H + Hkv) * D);
  Wide outb(B * T, H * D, H * D + 3, 3);
  std::vector<float> lse2(lse.size());
  cpu.attention_forward(outb.band(qs), f32(lse2, {B, H, T}), qb.band(qs), kb.band(kvs),
                        vb.band(kvs), window, 0);
  require_close("out", outb.dense(), out, 1e-6);
  require_close("lse", lse2, lse, 1e-6);
  cpu.attention_backward(dqb.band(qs), dkb.band(kvs), dvb.band(kvs), f32(dout, qs), qb.band(qs),
                         kb.band(kvs), vb.band(kvs), outb.band(qs), f32(lse2, {B, H, T}), window);
  require_close("dq", dqb.dense(), dq, 1e-5);
  require_close("dk", dkb.dense(), dk, 1e-5);
  require_close("dv", dvb.dense(), dv, 1e-5);
  CHECK((outb.gaps_intact() && dqb.gaps_intact() && dkb.gaps_intact() && dvb.gaps_intact()));
}
