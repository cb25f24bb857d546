// The ops that take row bands (core/tensor.h) against the CPU on bands of packed q|k|v rows, as
// the model calls them: every wide array is compared whole, so a write into the columns between
// a band's rows (which hold random values on both backends) shows as a mismatch. Tolerances as
// in test_gpu_ops.cpp.
#include <catch2/catch.hpp>
#include <cmath>
#include <string>

#include "op_case.h"

using namespace gpu_test;

namespace {

constexpr double kElementwise = 1e-5, kReduction = 1e-4, kBf16 = 1e-2;
constexpr DType kModes[] = {DType::f32, DType::bf16};

// Heads [first, first + n) of a packed (B*T, heads * D) array, as a (B, T, n, D) band.
Tensor heads(Tensor packed, int64_t B, int64_t T, int64_t first, int64_t n, int64_t D) {
  return packed.columns(first * D, n * D).view({B, T, n, D});
}

}  // namespace

TEST_CASE("gpu matmul and copy on bands match the CPU", "[gpu][ops][bands]") {
  for (DType act : kModes) {
    const int64_t N = 96, C = 64, Q = 64, W = 3 * Q;  // a packed (N, q | k | v) projection
    OpCase c(act);
    c.add("x", {N, C}, Kind::act, randn(size_t(N * C)))
        .add("w", {W, C}, Kind::act, randn(size_t(W * C), 0.1f))
        .add("packed", {N, W}, Kind::act, randn(size_t(N * W)))
        .add("dpacked", {N, W}, Kind::act, randn(size_t(N * W)))
        .add("dx", {N, C}, Kind::act, randn(size_t(N * C)))
        .add("dw", {Q, C}, Kind::f32, randn(size_t(Q * C)))
        .add("copied", {N, W}, Kind::act, randn(size_t(N * W)));
    c.check("bands",
            [&](Backend& b, const Args& t) {
              // The middle third as its own matmul (the GQA path), its gradients from the band.
              const Tensor w_k = t["w"].view({3, Q, C})[1];
              b.matmul(t["packed"].columns(Q, Q), t["x"], w_k, false, true, false);
              b.matmul(t["dw"], t["dpacked"].columns(Q, Q), t["x"], true, false, true);
              b.matmul(t["dx"], t["dpacked"].columns(2 * Q, Q), w_k, false, false, true);
              b.copy(t["copied"].columns(0, Q), t["packed"].columns(Q, Q));
            },
            {{"packed", kReduction, kBf16},
             {"dw", kReduction, kBf16},
             {"dx", kReduction, kBf16},
             {"copied", kReduction, kBf16}});
  }
}

TEST_CASE("gpu norm_rope and value_gate on bands match the CPU", "[gpu][ops][bands]") {
  for (DType act : kModes) {
    // D = 128 moves in packs, D = 18 in single pairs.
    for (int64_t D : {18, 128}) {
      const int64_t B = 2, T = 9, H = 3, Hkv = 3, Htot = H + 2 * Hkv, N = B * T, Tmax = 12;
      const int64_t C = 40, G = 12, V = 20;
      std::vector<float> angle = uniform(size_t(Tmax * D / 2), -3.f, 3.f), cos(angle), sin(angle);
      for (size_t i = 0; i < angle.size(); ++i)
        cos[i] = std::cos(angle[i]), sin[i] = std::sin(angle[i]);
      std::vector<int32_t> tokens(static_cast<size_t>(N));
      for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = int32_t(i * 7 % V);
      OpCase c(act);
      c.add("qkv", {N, Htot * D}, Kind::act, randn(size_t(N * Htot * D)))
          .add("dqkv", {N, Htot * D}, Kind::act, randn(size_t(N * Htot * D)))
          .add("k", {B, T, Hkv, D}, Kind::act, randn(size_t(N * Hkv * D)))
          .add("rstd", {N * Hkv}, Kind::f32, randn(size_t(N * Hkv)))
          .add("r", {N * Hkv}, Kind::f32, uniform(size_t(N * Hkv), 0.5f, 2.f))
          .add("cos", {Tmax, D / 2}, Kind::f32, cos)
          .add("sin", {Tmax, D / 2}, Kind::f32, sin)
          .add("xn", {N, C}, Kind::act, randn(size_t(N * C)))
          .add("gate_w", {Hkv, G}, Kind::act, randn(size_t(Hkv * G), 0.3f))
          .add("table", {V, Hkv * D}, Kind::act, randn(size_t(V * Hkv * D)))
          .add_ids("tokens", {N}, tokens)
          .add("gate", {N, Hkv}, Kind::f32, randn(size_t(N * Hkv)))
          .add("dxn", {N, C}, Kind::act, randn(size_t(N * C)))
          .add("dgate_w", {Hkv, G}, Kind::f32, randn(size_t(Hkv * G)))
          .add("dve", {N, Hkv * D}, Kind::act, randn(size_t(N * Hkv * D)));
      c.check("norm_rope and value_gate D=" + std::to_string(D),
              [&](Backend& b, const Args& t) {
                const Tensor k_raw = heads(t["qkv"], B, T, H, Hkv, D);
                const Tensor dk = heads(t["dqkv"], B, T, H, Hkv, D);
                const Tensor v = t["qkv"].columns((H + Hkv) * D, Hkv * D);
                const Tensor dv = t["dqkv"].columns((H + Hkv) * D, Hkv * D);
                b.norm_rope_forward(t["k"], t["rstd"], k_raw, t["cos"], t["sin"], 2);
                b.norm_rope_backward(dk, dk, k_raw, t["r"], t["cos"], t["sin"], 2);
                b.value_gate_forward(v, t["gate"], t["xn"], t["gate_w"], t["table"], t["tokens"]);
                b.value_gate_backward(t["dxn"], t["dgate_w"], t["dve"], dv, t["xn"], t["gate_w"],
                                      t["table"], t["tokens"], t["gate"]);
              },
              {{"k", kReduction, kBf16},
               {"rstd", kReduction, kReduction},
               {"dqkv", kReduction, kBf16},
               {"qkv", kElementwise, kBf16},
               {"gate", kReduction, kReduction},
               {"dxn", kReduction, kBf16},
               {"dgate_w", kReduction, kReduction},
               {"dve", kElementwise, kBf16}});
    }
  }
}

namespace {

// Attention forward and backward with q, k and v read from bands of a packed (B*T, q|k|v) array
// and the gradients written into bands of its gradient, against the CPU. `model_mix`: q and k
// dense (the normalised copies), as the model has them.
void check_attention_on_bands(DType act, int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t D,
                              int window, bool model_mix) {
  const int64_t Htot = H + 2 * Hkv, N = B * T;
  OpCase c(act);
  c.add("qkv", {N, Htot * D}, Kind::act, randn(size_t(N * Htot * D)))
      .add("dqkv", {N, Htot * D}, Kind::act, randn(size_t(N * Htot * D)))
      .add("q", {B, T, H, D}, Kind::act, randn(size_t(N * H * D)))
      .add("k", {B, T, Hkv, D}, Kind::act, randn(size_t(N * Hkv * D)))
      .add("out", {B, T, H, D}, Kind::act, poison(size_t(N * H * D)))
      .add("lse", {B, H, T}, Kind::f32, poison(size_t(B * H * T)))
      .add("dout", {B, T, H, D}, Kind::act, randn(size_t(N * H * D)));
  c.check(fmt::format("attention B={} T={} H={} Hkv={} D={} window={} ({})", B, T, H, Hkv, D,
                      window, model_mix ? "the model's layout" : "all bands"),
          [&](Backend& b, const Args& t) {
            const Tensor q = model_mix ? t["q"] : heads(t["qkv"], B, T, 0, H, D);
            const Tensor k = model_mix ? t["k"] : heads(t["qkv"], B, T, H, Hkv, D);
            const Tensor v = heads(t["qkv"], B, T, H + Hkv, Hkv, D);
            b.attention_forward(t["out"], t["lse"], q, k, v, window, 0);
            b.attention_backward(heads(t["dqkv"], B, T, 0, H, D), heads(t["dqkv"], B, T, H, Hkv, D),
                                 heads(t["dqkv"], B, T, H + Hkv, Hkv, D), t["dout"], q, k, v,
                                 t["out"], t["lse"], window);
          },
          {{"out", kReduction, kBf16},
           {"lse", kReduction, kReduction},
           {"dqkv", kReduction, kBf16},
           {"qkv", 0, 0}});
}

}  // namespace

// In bf16 at D = 64 and 128 cuDNN reads and writes the bands through its strides; elsewhere (fp32,
// D = 32) our kernel runs on dense copies of them. Two layouts: every tensor a band, and the
// model's mix (q and k dense, normalised copies; v and every gradient bands), where a gradient's
// strides differ from its tensor's.
TEST_CASE("gpu attention on bands of packed q/k/v matches the CPU", "[gpu][ops][bands]") {
  for (DType act : kModes)
    for (int64_t D : {32, 64, 128})
      for (int window : {16, 1000})
        for (bool model_mix : {false, true})
          check_attention_on_bands(act, 2, 64, 4, 2, D, window, model_mix);
}

// d12's attention as it trains (one sequence of it): T 2048, 6 heads of 128 with as many kv heads,
// so that q, k and v are bands of one q|k|v product; the sliding window (1024) and the full one.
// bf16, the path cuDNN takes (test_gpu_attention.cpp checks that it builds these graphs).
TEST_CASE("gpu attention at d12's shape on the model's bands matches the CPU",
          "[gpu][ops][bands]") {
  for (int window : {1024, 2048})
    check_attention_on_bands(DType::bf16, 1, 2048, 6, 6, 128, window, true);
}
