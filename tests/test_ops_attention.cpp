// Causal sliding-window GQA attention against an explicit masked softmax.
#include <omp.h>

#include <cstring>

#include "op_check.h"

using namespace lmtrain;
using namespace op_check;

namespace {

struct Dims {
  int64_t B, Tq, Tk, H, Hkv, D;
};

struct Attn {
  std::vector<double> out, lse;
};

// Scores over all Tk keys, -inf outside pos - window <= j <= pos, softmax, weighted values.
Attn naive_attention(const std::vector<float>& q, const std::vector<float>& k,
                     const std::vector<float>& v, Dims s, int window, int q_offset) {
  Attn r{std::vector<double>(s.B * s.Tq * s.H * s.D), std::vector<double>(s.B * s.H * s.Tq)};
  std::vector<double> p(s.Tk);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.H; ++h)
      for (int64_t t = 0; t < s.Tq; ++t) {
        int64_t pos = q_offset + t, g = h / (s.H / s.Hkv);
        double mx = -INFINITY;
        for (int64_t j = 0; j < s.Tk; ++j) {
          double dot = 0.0;
          for (int64_t d = 0; d < s.D; ++d)
            dot += double(q[((b * s.Tq + t) * s.H + h) * s.D + d]) *
                   k[((b * s.Tk + j) * s.Hkv + g) * s.D + d];
          bool visible = j <= pos && j >= pos - window;
          p[j] = visible ? dot / std::sqrt(double(s.D)) : -INFINITY;
          mx = std::max(mx, p[j]);
        }
        double sum = 0.0;
        for (int64_t j = 0; j < s.Tk; ++j) sum += std::exp(p[j] - mx);
        r.lse[(b * s.H + h) * s.Tq + t] = mx + std::log(sum);
        for (int64_t d = 0; d < s.D; ++d) {
          double o = 0.0;
          for (int64_t j = 0; j < s.Tk; ++j)
            o += std::exp(p[j] - mx) / sum * v[((b * s.Tk + j) * s.Hkv + g) * s.D + d];
          r.out[((b * s.Tq + t) * s.H + h) * s.D + d] = o;
        }
      }
  return r;
}

}  // namespace

TEST_CASE("attention forward matches an explicit masked softmax", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(11);
  for (auto [H, Hkv] : {std::pair<int64_t, int64_t>{6, 2}, {2, 2}})
    for (int window : {0, 1, 3, 9, 100}) {
      Dims s{2, 9, 9, H, Hkv, 8};
      std::vector<float> q = randn(s.B * s.Tq * s.H * s.D, rng),
                         k = randn(s.B * s.Tk * s.Hkv * s.D, rng),
                         v = randn(s.B * s.Tk * s.Hkv * s.D, rng);
      std::vector<float> out(q.size()), lse(s.B * s.H * s.Tq);
      cpu.attention_forward(f32(out, {s.B, s.Tq, s.H, s.D}), f32(lse, {s.B, s.H, s.Tq}),
                            f32(q, {s.B, s.Tq, s.H, s.D}), f32(k, {s.B, s.Tk, s.Hkv, s.D}),
                            f32(v, {s.B, s.Tk, s.Hkv, s.D}), window, 0);
      Attn want = naive_attention(q, k, v, s, window, 0);
      std::string what = fmt::format("H {} Hkv {} window {}", H, Hkv, window);
      require_close(what + " out", out, want.out, 1e-5);
      require_close(what + " lse", lse, want.lse, 1e-5);
    }
}

TEST_CASE("attention on the last queries with q_offset equals the full forward's rows", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(12);
  const int64_t B = 2, T = 10, Tq = 3, H = 6, Hkv = 2, D = 8;
  const int window = 4, q_offset = int(T - Tq);
  std::vector<float> q = randn(B * T * H * D, rng), k = randn(B * T * Hkv * D, rng),
                     v = randn(B * T * Hkv * D, rng);
  std::vector<float> out(q.size()), lse(B * H * T);
  Tensor kt = f32(k, {B, T, Hkv, D}), vt = f32(v, {B, T, Hkv, D});
  cpu.attention_forward(f32(out, {B, T, H, D}), f32(lse, {B, H, T}), f32(q, {B, T, H, D}), kt, vt,
                        window, 0);

  std::vector<float> q_tail, out_tail(B * Tq * H * D), lse_tail(B * H * Tq), want_out, want_lse;
  for (int64_t b = 0; b < B; ++b) {
    auto rows = [&](const std::vector<float>& x, int64_t t0, int64_t t1) {
      return std::vector<float>(x.begin() + (b * T + t0) * H * D, x.begin() + (b * T + t1) * H * D);
    };
    auto q_rows = rows(q, q_offset, T), out_rows = rows(out, q_offset, T);
    q_tail.insert(q_tail.end(), q_rows.begin(), q_rows.end());
    want_out.insert(want_out.end(), out_rows.begin(), out_rows.end());
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = q_offset; t < T; ++t) want_lse.push_back(lse[(b * H + h) * T + t]);
  }
  cpu.attention_forward(f32(out_tail, {B, Tq, H, D}), f32(lse_tail, {B, H, Tq}),
                        f32(q_tail, {B, Tq, H, D}), kt, vt, window, q_offset);
  require_close("out tail", out_tail, want_out, 1e-6);
  require_close("lse tail", lse_tail, want_lse, 1e-6);
}

TEST_CASE("attention backward matches finite differences", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(13);
  const int64_t B = 2, T = 6, H = 6, D = 4;
  // Grouped (3 query heads per kv head) and plain heads; windows from the token alone (0) to
  // more than the sequence.
  for (auto [Hkv, window] : {std::pair<int64_t, int>{2, 0}, {2, 2}, {2, 8}, {6, 3}}) {
    std::vector<float> q = randn(B * T * H * D, rng), k = randn(B * T * Hkv * D, rng),
                       v = randn(B * T * Hkv * D, rng), w = randn(q.size(), rng);
    std::vector<float> out(q.size()), lse(B * H * T);
    auto forward = [&] {
      cpu.attention_forward(f32(out, {B, T, H, D}), f32(lse, {B, H, T}), f32(q, {B, T, H, D}),
                            f32(k, {B, T, Hkv, D}), f32(v, {B, T, Hkv, D}), window, 0);
      return weighted_sum(w, out);
    };
    forward();
    // Gradients are overwritten: start them from garbage.
    std::vector<float> dq = randn(q.size(), rng), dk = randn(k.size(), rng),
                       dv = randn(v.size(), rng);
    cpu.attention_backward(f32(dq, {B, T, H, D}), f32(dk, {B, T, Hkv, D}), f32(dv, {B, T, Hkv, D}),
                           f32(w, {B, T, H, D}), f32(q, {B, T, H, D}), f32(k, {B, T, Hkv, D}),
                           f32(v, {B, T, Hkv, D}), f32(out, {B, T, H, D}), f32(lse, {B, H, T}),
                           window);
    INFO("Hkv " << Hkv << " window " << window);
    check_gradient("q", q, dq, forward);
    check_gradient("k", k, dk, forward);
    check_gradient("v", v, dv, forward);
  }
}

// A row that sees one key has a softmax of exactly 1 whatever its score: dq and dk are exactly
// zero (the GPU tests compare against them with an absolute tolerance), and dv sums dout over the
// query heads of its kv head.
TEST_CASE("attention backward at window 0 gives exact zeros for dq and dk", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(15);
  const int64_t B = 2, T = 70, H = 6, Hkv = 2, D = 16;  // T spans two query blocks
  std::vector<float> q = randn(B * T * H * D, rng), k = randn(B * T * Hkv * D, rng),
                     v = randn(B * T * Hkv * D, rng), dout = randn(q.size(), rng);
  std::vector<float> out(q.size()), lse(B * H * T);
  cpu.attention_forward(f32(out, {B, T, H, D}), f32(lse, {B, H, T}), f32(q, {B, T, H, D}),
                        f32(k, {B, T, Hkv, D}), f32(v, {B, T, Hkv, D}), 0, 0);
  std::vector<float> dq = randn(q.size(), rng), dk = randn(k.size(), rng), dv(v.size());
  cpu.attention_backward(f32(dq, {B, T, H, D}), f32(dk, {B, T, Hkv, D}), f32(dv, {B, T, Hkv, D}),
                         f32(dout, {B, T, H, D}), f32(q, {B, T, H, D}), f32(k, {B, T, Hkv, D}),
                         f32(v, {B, T, Hkv, D}), f32(out, {B, T, H, D}), f32(lse, {B, H, T}), 0);
  CHECK(std::all_of(dq.begin(), dq.end(), [](float x) { return x == 0.f; }));
  CHECK(std::all_of(dk.begin(), dk.end(), [](float x) { return x == 0.f; }));
  const int64_t group = H / Hkv;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t g = 0; g < Hkv; ++g)
        for (int64_t d = 0; d < D; ++d) {
          double want = 0.0;
          for (int64_t h = g * group; h < (g + 1) * group; ++h)
            want += dout[((b * T + t) * H + h) * D + d];
          REQUIRE(dv[((b * T + t) * Hkv + g) * D + d] == Approx(want).margin(1e-6));
        }
}

TEST_CASE("attention backward is identical for any thread count", "[ops]") {
  CpuBackend cpu;
  std::mt19937 rng(14);
  const int64_t B = 2, T = 20, H = 6, Hkv = 2, D = 16;
  const int window = 7;
  std::vector<float> q = randn(B * T * H * D, rng), k = randn(B * T * Hkv * D, rng),
                     v = randn(B * T * Hkv * D, rng), dout = randn(q.size(), rng);
  std::vector<float> out(q.size()), lse(B * H * T);
  cpu.attention_forward(f32(out, {B, T, H, D}), f32(lse, {B, H, T}), f32(q, {B, T, H, D}),
                        f32(k, {B, T, Hkv, D}), f32(v, {B, T, Hkv, D}), window, 0);
  auto backward = [&](int threads) {
    int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    std::vector<float> dq(q.size()), dk(k.size()), dv(v.size());
    cpu.attention_backward(f32(dq, {B, T, H, D}), f32(dk, {B, T, Hkv, D}), f32(dv, {B, T, Hkv, D}),
                           f32(dout, {B, T, H, D}), f32(q, {B, T, H, D}), f32(k, {B, T, Hkv, D}),
                           f32(v, {B, T, Hkv, D}), f32(out, {B, T, H, D}), f32(lse, {B, H, T}),
                           window);
    omp_set_num_threads(saved);
    dq.insert(dq.end(), dk.begin(), dk.end());
    dq.insert(dq.end(), dv.begin(), dv.end());
    return dq;
  };
  std::vector<float> one = backward(1);
  for (int threads : {2, 3}) {
    std::vector<float> many = backward(threads);
    INFO(threads << " threads");
    CHECK(std::memcmp(one.data(), many.data(), one.size() * sizeof(float)) == 0);
  }
}

TEST_CASE("attention rejects inconsistent shapes", "[ops]") {
  CpuBackend cpu;
  const int64_t B = 1, T = 4, D = 4;
  std::vector<float> q(B * T * 3 * D), k(B * T * 2 * D), v(k.size()), out(q.size()), lse(B * 3 * T),
      q2(B * T * 2 * D), out2(q2.size()), lse2(B * 2 * T), lse_bad(B * 2 * 3);
  // 3 query heads do not share 2 kv heads evenly.
  CHECK_THROWS_AS(
      cpu.attention_forward(f32(out, {B, T, 3, D}), f32(lse, {B, 3, T}), f32(q, {B, T, 3, D}),
                            f32(k, {B, T, 2, D}), f32(v, {B, T, 2, D}), 2, 0),
      Error);
  CHECK_THROWS_AS(
      cpu.attention_forward(f32(out2, {B, T, 2, D}), f32(lse_bad, {B, 2, 3}), f32(q2, {B, T, 2, D}),
                            f32(k, {B, T, 2, D}), f32(v, {B, T, 2, D}), 2, 0),
      Error);
  CHECK_THROWS_AS(
      cpu.attention_forward(f32(out2, {B, T, 2, D}), f32(lse2, {B, 2, T}), f32(q2, {B, T, 2, D}),
                            f32(k, {B, T, 2, D}), f32(v, {B, T, 2, D}), 2, 1),
      Error);  // queries would sit past the last key
}
