// Every op of the CUDA backend against the CPU reference on fresh random inputs, in fp32 mode
// (tight tolerances) and bf16 mode (bf16 rounding of activation outputs), and run twice to check
// that the GPU results are bit-identical. Tolerances are max|err| / max|ref| per tensor:
//   kExact       results that involve no arithmetic, or the same additions in the same order
//   kElementwise one or two roundings per element (fp32)
//   kReduction   sums whose order differs from the CPU's (fp32), and f32 results in bf16 mode
//                computed from the same bf16 inputs
//   kBf16        activation outputs stored in bf16 (2^-8 relative rounding, plus what it feeds)
//   kTf32        f32 matmuls in bf16 mode, which run on TF32 tensor cores (10-bit mantissa)
#include <algorithm>
#include <array>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstring>
#ifdef LMTRAIN_HAVE_CUDNN
#include <dlfcn.h>
#endif
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "backend/matmul_table.h"
#include "op_case.h"
#include "test_support.h"

using namespace gpu_test;
using lmtrain::AdamWHyper;
using lmtrain::test_support::ScopedEnv;

namespace {

constexpr double kExact = 0, kElementwise = 1e-5, kReduction = 1e-4, kBf16 = 1e-2, kTf32 = 1e-2;
// Losses from bf16 logits: the kernel takes the hardware tanh (relative error below 2^-10), so a
// capped logit may be off by softcap * 2^-10 and a loss (log-sum-exp minus the target's logit)
// by twice that, 0.03 at softcap 15, on the largest of losses of about 20 to 35 here.
constexpr double kFastTanhLoss = 2e-3;
constexpr DType kModes[] = {DType::f32, DType::bf16};

std::vector<int32_t> random_ids(size_t n, int lo, int hi) {
  std::uniform_int_distribution<int> dist(lo, hi);
  std::vector<int32_t> ids(n);
  for (auto& id : ids) id = dist(rng());
  return ids;
}

}  // namespace

TEST_CASE("gpu fill, copy, add and scale match the CPU", "[gpu][ops]") {
  for (DType act : kModes) {
    const int64_t n = 100003;
    OpCase c(act);
    c.add("a", {n}, Kind::act, poison(n))
        .add("f", {n}, Kind::f32, poison(n))
        .add("x", {n}, Kind::act, randn(n))
        .add("y", {n}, Kind::act, randn(n))
        .add("src", {n}, Kind::f32, randn(n, 3.f))
        .add("conv", {n}, Kind::act, poison(n))
        .add("back", {n}, Kind::f32, poison(n))
        .add("fx", {n}, Kind::f32, randn(n))
        .add("fy", {n}, Kind::f32, randn(n))
        .add("s_fill", {n}, Kind::act, randn(n))
        .add("s_conv", {n}, Kind::act, randn(n))
        .add("s_y", {n}, Kind::act, randn(n))
        .add("s_x", {n}, Kind::f32, randn(n))
        .add("c_src", {n}, Kind::act, randn(n))
        .add("c_dst", {n}, Kind::act, poison(n))
        .add("c_shifted", {n}, Kind::act, randn(n));
    // The s_ arrays are written through views that start one element in: no 16-byte packs.
    c.check("fill/copy/add/scale",
            [](Backend& b, const Args& t) {
              b.fill(t["a"], 0.37f);
              b.fill(t["f"], -2.5f);
              b.copy(t["conv"], t["src"]);   // f32 -> activation dtype
              b.copy(t["back"], t["conv"]);  // and back
              b.add(t["y"], t["x"], -0.75f);
              b.scale(t["x"], 1.5f);
              b.add(t["fy"], t["fx"], 0.25f);
              b.scale(t["fx"], -3.f);
              b.fill(t["s_fill"].slice(1, n - 1), 0.37f);
              b.copy(t["s_conv"].slice(1, n - 1), t["src"].slice(0, n - 1));
              b.add(t["s_y"].slice(1, n - 1), t["y"].slice(0, n - 1), -0.75f);
              b.scale(t["s_x"].slice(1, n - 1), 1.5f);
              // Activation dtype to itself (bf16 -> bf16 in bf16 mode), as the generator copies
              // keys and values into its cache: whole, and into a view one element in.
              b.copy(t["c_dst"], t["c_src"]);
              b.copy(t["c_shifted"].slice(1, n - 1), t["c_src"].slice(0, n - 1));
            },
            {{"a", kExact, kBf16},
             {"f", kExact, kExact},
             {"conv", kExact, kBf16},
             {"back", kExact, kBf16},
             {"y", kElementwise, kBf16},
             {"x", kElementwise, kBf16},
             {"fy", kElementwise, kElementwise},
             {"fx", kElementwise, kElementwise},
             {"s_fill", kExact, kBf16},
             {"s_conv", kExact, kBf16},
             {"s_y", kElementwise, kBf16},
             {"s_x", kElementwise, kElementwise},
             {"c_dst", kExact, kExact},
             {"c_shifted", kExact, kExact}});
    // The GPU's f32 -> bf16 conversion must round to nearest even, exactly as the host does.
    if (act == DType::bf16) {
      OpCase src(act);
      std::vector<float> values = randn(n, 3.f);
      std::vector<float> rounded(values.size());
      for (size_t i = 0; i < values.size(); ++i) rounded[i] = round_bf16(values[i]);
      src.add("src", {n}, Kind::f32, values).add("conv", {n}, Kind::act, poison(n));
      const Results r =
          src.run(backend(act), [](Backend& b, const Args& t) { b.copy(t["conv"], t["src"]); });
      compare("[bf16] copy f32 -> bf16 rounds to nearest even", r.at("conv"), rounded, kExact);
    }
  }
  // A converting copy between overlapping bytes would race between packs: refused.
  Backend& b = backend(DType::bf16);
  lmtrain::Buffer memory = b.allocate(64 * sizeof(float));
  const lmtrain::Tensor f32s = memory.tensor({32}, DType::f32);
  CHECK_THROWS_WITH(b.copy(memory.tensor({32}, DType::bf16), f32s), Catch::Contains("overlap"));
  CHECK_THROWS_WITH(b.copy(memory.tensor({32}, DType::bf16, 100), f32s),
                    Catch::Contains("overlap"));
  CHECK_NOTHROW(b.copy(memory.tensor({32}, DType::bf16, 128), f32s));
}

TEST_CASE("gpu sum_squares matches the CPU and is deterministic", "[gpu][ops]") {
  for (DType act : kModes) {
    for (int64_t n : {int64_t(1), int64_t(1000), int64_t(8192), int64_t((1 << 20) + 123)}) {
      std::vector<float> values = randn(size_t(n));
      for (Kind kind : {Kind::f32, Kind::act}) {
        OpCase c(act);
        c.add("x", {n}, kind, values);
        c.add("out", {2}, Kind::f32, {-1.f, -1.f});
        // Two sums queued into one vector before anything is read back, as the optimizer does.
        auto op = [](Backend& b, const Args& t) {
          b.sum_squares(t["out"].slice(0, 1), t["x"]);
          b.sum_squares(t["out"].slice(1, 1), t["x"].slice(0, t["x"].numel() / 2));
        };
        lmtrain::CpuBackend cpu;
        const Results want = c.run(cpu, op), got = c.run(backend(act), op);
        const Results again = c.run(backend(act), op);
        const std::string what = std::string("[") + mode_name(act) +
                                 "] sum_squares n=" + std::to_string(n) +
                                 (kind == Kind::f32 ? " f32" : " act");
        const double gpu_sum = got.at("out")[0], gpu_again = again.at("out")[0];
        compare_scalar(what, gpu_sum, want.at("out")[0], kReduction);
        compare_scalar(what + ", first half", got.at("out")[1], want.at("out")[1], kReduction);
        INFO(what << ": two runs gave " << gpu_sum << " and " << gpu_again);
        CHECK(gpu_sum == gpu_again);
      }
    }
  }
}

// Lengths around the 8192-element chunks (2^20 + 1: a last chunk of one element; 16385: two
// full chunks and one element; 7: less than a chunk; 0: no chunk at all, the sum is exactly 0),
// with the last element 100 times the others: the element alone in the last chunk must be
// counted once, and it dominates the sum (10^4 against n/3). The GPU squares in fp32 (one
// rounding, 6e-8), adds 8192-element chunks in fp32 in a fixed tree (a few roundings deep: about
// 1e-7 relative) and the chunk sums in double; the CPU adds in double: 1e-6 relative for f32
// input leaves a margin of about 10.
TEST_CASE("gpu sum_squares with a dominant last element and chunk-edge lengths", "[gpu][ops]") {
  for (DType act : kModes) {
    for (int64_t n : {int64_t((1 << 20) + 1), int64_t(16385), int64_t(7), int64_t(0)}) {
      std::vector<float> values = uniform(size_t(n) + 1, -1.f, 1.f);
      if (n > 0) values[size_t(n - 1)] = 100.f;
      for (Kind kind : {Kind::f32, Kind::act}) {
        OpCase c(act);
        // One element more than summed, so that even n = 0 sums a view into real memory.
        c.add("x", {n + 1}, kind, values);
        c.add("out", {2}, Kind::f32, {-1.f, -1.f});
        const auto op = [n](Backend& b, const Args& t) {
          b.sum_squares(t["out"].slice(0, 1), t["x"].slice(0, n));
          // The same elements but the first, from a view one element in (no aligned packs).
          b.sum_squares(t["out"].slice(1, 1),
                        t["x"].slice(std::min<int64_t>(n, 1), std::max<int64_t>(n - 1, 0)));
        };
        lmtrain::CpuBackend cpu;
        const Results want = c.run(cpu, op), got = c.run(backend(act), op);
        const Results again = c.run(backend(act), op);
        const std::string what = std::string("[") + mode_name(act) +
                                 "] sum_squares, last element 100x, n=" + std::to_string(n) +
                                 (kind == Kind::f32 ? " f32" : " act");
        const double tol = kind == Kind::f32 ? 1e-6 : kReduction;
        if (n == 0) {
          CHECK(want.at("out")[0] == 0.f);
          CHECK(got.at("out")[0] == 0.f);
          CHECK(got.at("out")[1] == 0.f);
        }
        compare_scalar(what, got.at("out")[0], want.at("out")[0], tol);
        compare_scalar(what + ", from one element in", got.at("out")[1], want.at("out")[1], tol);
        INFO(what << ": two runs gave " << got.at("out")[0] << " and " << again.at("out")[0]);
        CHECK(std::memcmp(got.at("out").data(), again.at("out").data(), 2 * sizeof(float)) == 0);
      }
    }
  }
}

TEST_CASE("gpu matmul matches the CPU", "[gpu][ops][matmul]") {
  struct Case {
    int64_t batch, M, K, N;
  };
  for (DType act : kModes) {
    for (Case s : {Case{0, 37, 53, 29}, Case{0, 128, 256, 64}, Case{3, 19, 40, 33}}) {
      for (bool ta : {false, true}) {
        for (bool tb : {false, true}) {
          auto shape = [&](int64_t r, int64_t c) {
            return s.batch ? Shape{s.batch, r, c} : Shape{r, c};
          };
          const Shape sa = ta ? shape(s.K, s.M) : shape(s.M, s.K);
          const Shape sb = tb ? shape(s.N, s.K) : shape(s.K, s.N);
          const Shape so = shape(s.M, s.N);
          OpCase c(act);
          c.add("a", sa, Kind::act, randn(size_t(sa.numel())))
              .add("b", sb, Kind::act, randn(size_t(sb.numel())))
              .add("out", so, Kind::act, poison(size_t(so.numel())))
              .add("acc", so, Kind::act, randn(size_t(so.numel())))
              .add("addend", so, Kind::act, randn(size_t(so.numel())))
              .add("addend_off", {so.numel() + 1}, Kind::act, randn(size_t(so.numel() + 1)))
              .add("sum_off", so, Kind::act, poison(size_t(so.numel())))
              .add("sum", so, Kind::act, poison(size_t(so.numel())))
              .add("scaled", so, Kind::act, poison(size_t(so.numel())))
              .add("fscaled", so, Kind::f32, poison(size_t(so.numel())))
              .add("grad", so, Kind::f32, randn(size_t(so.numel())))
              .add("fa", sa, Kind::f32, randn(size_t(sa.numel())))
              .add("fb", sb, Kind::f32, randn(size_t(sb.numel())))
              .add("fout", so, Kind::f32, randn(size_t(so.numel())));
          const std::string label = "matmul b" + std::to_string(s.batch) + " " +
                                    std::to_string(s.M) + "x" + std::to_string(s.K) + "x" +
                                    std::to_string(s.N) + (ta ? " a^T" : "") + (tb ? " b^T" : "");
          c.check(label,
                  [&](Backend& b, const Args& t) {
                    b.matmul(t["out"], t["a"], t["b"], ta, tb, false);
                    b.matmul(t["acc"], t["a"], t["b"], ta, tb, true, 0.5f);
                    b.matmul_add(t["sum"], t["a"], t["b"], ta, tb, t["addend"]);
                    b.matmul_add(t["scaled"], t["a"], t["b"], ta, tb, t["addend"], -0.75f, 2.5f);
                    // An addend one element into its buffer: less aligned than out.
                    b.matmul_add(t["sum_off"], t["a"], t["b"], ta, tb,
                                 t["addend_off"].slice(1, so.numel()).view(so));
                    // Polar Express's form: f32 matrices, f32 addend.
                    b.matmul_add(t["fscaled"], t["fa"], t["fb"], ta, tb, t["fout"], 1.25f, -0.5f);
                    b.matmul(t["grad"], t["a"], t["b"], ta, tb,
                             true);  // act inputs, f32 accumulator
                    b.matmul(t["fout"], t["fa"], t["fb"], ta, tb, true, -1.5f);  // optimizer matmul
                  },
                  {{"out", kReduction, kBf16},
                   {"acc", kReduction, kBf16},
                   {"sum", kReduction, kBf16},
                   {"scaled", kReduction, kBf16},
                   {"sum_off", kReduction, kBf16},
                   {"fscaled", kReduction, kTf32},
                   {"grad", kReduction, kReduction},
                   {"fout", kReduction, kTf32}});
        }
      }
    }
  }
}

// Operands and outputs less aligned than cuBLASLt's 16-byte default: views one element into
// their buffers (2-byte aligned in bf16, 4-byte in f32), which the plan cache keys on and passes
// to cuBLASLt; alpha != 1 without accumulation; matmul_add writing over its own addend; and the
// two rank-3 forms Polar Express runs (src/optim/normuon.cpp, orthogonalize), whose addend is one
// of the operands: B = c·A·A + b·A (addend == a == b) and Y = B·X + a·X (addend == b), in the
// work dtype (the activation dtype) and in f32.
TEST_CASE("gpu matmul on misaligned views and aliased addends matches the CPU",
          "[gpu][ops][matmul]") {
  const int64_t M = 37, K = 53, N = 29;
  for (DType act : kModes) {
    for (bool ta : {false, true}) {
      for (bool tb : {false, true}) {
        const Shape sa = ta ? Shape{K, M} : Shape{M, K}, sb = tb ? Shape{N, K} : Shape{K, N};
        const Shape so{M, N};
        const int64_t na = sa.numel(), nb = sb.numel(), no = so.numel();
        OpCase c(act);
        // The shifted outputs start random rather than NaN: their first element is not written
        // and must come back as it was on both backends.
        c.add("a_off", {na + 1}, Kind::act, randn(size_t(na + 1)))
            .add("b_off", {nb + 1}, Kind::act, randn(size_t(nb + 1)))
            .add("out_off", {no + 1}, Kind::act, randn(size_t(no + 1)))
            .add("acc_off", {no + 1}, Kind::act, randn(size_t(no + 1)))
            .add("fa_off", {na + 1}, Kind::f32, randn(size_t(na + 1)))
            .add("fb_off", {nb + 1}, Kind::f32, randn(size_t(nb + 1)))
            .add("fout_off", {no + 1}, Kind::f32, randn(size_t(no + 1)))
            .add("grad_off", {no + 1}, Kind::f32, randn(size_t(no + 1)))
            .add("a", sa, Kind::act, randn(size_t(na)))
            .add("b", sb, Kind::act, randn(size_t(nb)))
            .add("scaled", so, Kind::act, poison(size_t(no)))
            .add("fscaled", so, Kind::f32, poison(size_t(no)))
            .add("inplace", so, Kind::act, randn(size_t(no)))
            .add("finplace", so, Kind::f32, randn(size_t(no)));
        const std::string label = std::string("matmul views one element in, aliased addends") +
                                  (ta ? " a^T" : "") + (tb ? " b^T" : "");
        c.check(label,
                [&](Backend& b, const Args& t) {
                  const auto in = [&](const char* name, Shape shape) {
                    return t[name].slice(1, shape.numel()).view(shape);
                  };
                  b.matmul(in("out_off", so), in("a_off", sa), in("b_off", sb), ta, tb, false);
                  b.matmul(in("acc_off", so), in("a_off", sa), in("b_off", sb), ta, tb, true,
                           -0.5f);
                  b.matmul(in("fout_off", so), in("fa_off", sa), in("fb_off", sb), ta, tb, false,
                           1.75f);
                  b.matmul(in("grad_off", so), in("a_off", sa), in("b_off", sb), ta, tb, true);
                  // alpha != 1 without accumulating: the output's old contents play no part.
                  b.matmul(t["scaled"], t["a"], t["b"], ta, tb, false, -0.75f);
                  b.matmul(t["fscaled"], in("fa_off", sa), t["fa_off"].slice(0, nb).view(sb), ta,
                           tb, false, 3.f);
                  // out == addend: cuBLASLt's C and D the same memory.
                  b.matmul_add(t["inplace"], t["a"], t["b"], ta, tb, t["inplace"], 1.5f, -0.5f);
                  b.matmul_add(t["finplace"], in("fa_off", sa), in("fb_off", sb), ta, tb,
                               t["finplace"], -1.f, 2.f);
                },
                {{"out_off", kReduction, kBf16},
                 {"acc_off", kReduction, kBf16},
                 {"fout_off", kReduction, kTf32},
                 {"grad_off", kReduction, kReduction},
                 {"scaled", kReduction, kBf16},
                 {"fscaled", kReduction, kTf32},
                 {"inplace", kReduction, kBf16},
                 {"finplace", kReduction, kTf32}});
      }
    }
    // Polar Express's two polynomial steps on a stack of 3 wide matrices (r <= c), as
    // normuon.cpp runs them: poly = c gram gram + b gram; y = poly X + a X (Newton-Schulz's
    // coefficients, which keep the terms of similar size).
    const int64_t S = 3, r = 19, cols = 40;
    const float pa = 3.4445f, pb = -4.7750f, pc = 2.0315f;
    OpCase c(act);
    for (Kind kind : {Kind::act, Kind::f32}) {
      const std::string p = kind == Kind::act ? "w_" : "f_";
      c.add(p + "x", {S, r, cols}, kind, randn(size_t(S * r * cols), 1.f / std::sqrt(float(cols))))
          .add(p + "gram", {S, r, r}, kind, randn(size_t(S * r * r), 0.3f))
          .add(p + "poly", {S, r, r}, kind, poison(size_t(S * r * r)))
          .add(p + "poly_in", {S, r, r}, kind, randn(size_t(S * r * r), 0.5f))
          .add(p + "y", {S, r, cols}, kind, poison(size_t(S * r * cols)));
    }
    c.check("rank-3 matmul_add with the addend an operand (Polar Express)",
            [&](Backend& b, const Args& t) {
              for (const char* p : {"w_", "f_"}) {
                const auto at = [&](const char* name) { return t[std::string(p) + name]; };
                b.matmul_add(at("poly"), at("gram"), at("gram"), false, false, at("gram"), pc, pb);
                // From an input of its own rather than poly: no bf16 rounding carried over.
                b.matmul_add(at("y"), at("poly_in"), at("x"), false, false, at("x"), 1.f, pa);
              }
            },
            {{"w_poly", kReduction, kBf16},
             {"w_y", kReduction, kBf16},
             {"f_poly", kReduction, kTf32},
             {"f_y", kReduction, kTf32},
             {"w_gram", kExact, kExact},
             {"w_x", kExact, kExact},
             {"f_gram", kExact, kExact},
             {"f_x", kExact, kExact}});
  }
}

namespace {

// Matmuls of every form the model and optimizer use, for the algorithm-choice tests below.
OpCase matmul_forms_case(DType act) {
  const int64_t M = 256, K = 384, N = 320;
  OpCase c(act);
  c.add("a", {M, K}, Kind::act, randn(size_t(M * K)))
      .add("b", {N, K}, Kind::act, randn(size_t(N * K)))
      .add("out", {M, N}, Kind::act, poison(size_t(M * N)))
      .add("acc", {M, N}, Kind::act, randn(size_t(M * N)))
      .add("addend", {M, N}, Kind::act, randn(size_t(M * N)))
      .add("sum", {M, N}, Kind::act, poison(size_t(M * N)))
      .add("grad", {N, K}, Kind::f32, randn(size_t(N * K)))
      .add("dout", {M, N}, Kind::act, randn(size_t(M * N)));
  // Polar Express's rank-3 forms on a stack of 4 wide matrices, the addend an operand.
  const int64_t S = 4, r = 64, cols = 192;
  c.add("x", {S, r, cols}, Kind::act, randn(size_t(S * r * cols), 1.f / std::sqrt(float(cols))))
      .add("gram", {S, r, r}, Kind::act, randn(size_t(S * r * r), 0.3f))
      .add("poly", {S, r, r}, Kind::act, poison(size_t(S * r * r)))
      .add("poly_in", {S, r, r}, Kind::act, randn(size_t(S * r * r), 0.5f))
      .add("y", {S, r, cols}, Kind::act, poison(size_t(S * r * cols)));
  return c;
}

void matmul_forms(Backend& b, const Args& t) {
  b.matmul(t["out"], t["a"], t["b"], false, true, false);
  b.matmul(t["acc"], t["a"], t["b"], false, true, true, 0.5f);  // in place
  b.matmul_add(t["sum"], t["a"], t["b"], false, true, t["addend"], 1.f, -2.f);
  b.matmul(t["grad"], t["dout"], t["a"], true, false, true);  // a weight gradient
  b.matmul_add(t["poly"], t["gram"], t["gram"], false, false, t["gram"], 2.0315f, -4.7750f);
  b.matmul_add(t["y"], t["poly_in"], t["x"], false, false, t["x"], 1.f, 3.4445f);
}

const std::vector<Expect> kMatmulFormsExpect = {
    {"out", kReduction, kBf16}, {"acc", kReduction, kBf16},       {"sum", kReduction, kBf16},
    {"addend", kExact, kExact}, {"grad", kReduction, kReduction}, {"poly", kReduction, kBf16},
    {"y", kReduction, kBf16},   {"gram", kExact, kExact}};

// A real cuBLASLt descriptor made for other data types than any matmul of `act` mode uses:
// cublasLtMatmulAlgoCheck refuses a descriptor that does not match the layouts.
std::array<uint64_t, 8> mismatched_algo(DType act) {
  cublasLtHandle_t lt = nullptr;
  REQUIRE(cublasLtCreate(&lt) == CUBLAS_STATUS_SUCCESS);
  const cudaDataType_t t = act == DType::bf16 ? CUDA_R_32F : CUDA_R_16BF;
  int id = 0, count = 0;
  cublasLtMatmulAlgo_t algo{};
  const bool made = cublasLtMatmulAlgoGetIds(lt, CUBLAS_COMPUTE_32F, CUDA_R_32F, t, t, t, t, 1, &id,
                                             &count) == CUBLAS_STATUS_SUCCESS &&
                    count == 1 &&
                    cublasLtMatmulAlgoInit(lt, CUBLAS_COMPUTE_32F, CUDA_R_32F, t, t, t, t, id,
                                           &algo) == CUBLAS_STATUS_SUCCESS;
  cublasLtDestroy(lt);
  REQUIRE(made);
  std::array<uint64_t, 8> words{};
  std::memcpy(words.data(), algo.data, sizeof(algo.data));
  return words;
}

}  // namespace

// LMTRAIN_MATMUL_TUNING=measure times cuBLASLt's suggestions on each shape's first call: the
// timing runs must leave what the real call reads untouched (an accumulation in place is timed
// on scratch) and the chosen algorithm must give the CPU's result.
TEST_CASE("gpu matmul with measured algorithms matches the CPU", "[gpu][ops][matmul]") {
  require_gpu();
  const ScopedEnv tuning("LMTRAIN_MATMUL_TUNING", "measure");
  const ScopedEnv no_table("LMTRAIN_MATMUL_TABLE", nullptr);
  for (DType act : kModes) {
    lmtrain::CudaBackend tuned(act);
    lmtrain::CpuBackend cpu;
    OpCase c = matmul_forms_case(act);
    const Results want = c.run(cpu, matmul_forms), got = c.run(tuned, matmul_forms),
                  again = c.run(tuned, matmul_forms);
    for (const Expect& e : kMatmulFormsExpect) {
      const std::string& name = e.name;
      const std::string what = std::string("[") + mode_name(act) + "] tuned matmul " + name;
      compare(what, got.at(name), want.at(name), act == DType::bf16 ? e.bf16_tol : e.fp32_tol);
      require_identical(what + " again", got.at(name), again.at(name));
    }
  }
}

// measure mode with LMTRAIN_MATMUL_TABLE writes its choices; table mode reads them back and runs
// the same algorithms, so its results are bit-identical to the measuring backend's. A table
// entry cuBLASLt refuses falls back to the first suggestion, bit for bit what heuristic mode
// gives; a table made for another GPU, or a table named in heuristic mode, is an error.
TEST_CASE("gpu matmul tables give the measured algorithms back", "[gpu][ops][matmul]") {
  require_gpu();
  const ScopedEnv no_table("LMTRAIN_MATMUL_TABLE", nullptr);
  const lmtrain::test_support::TempDir tmp;
  const std::string path = tmp / "table.json";
  for (DType act : kModes) {
    const std::string mode = std::string("[") + mode_name(act) + "] ";
    OpCase c = matmul_forms_case(act);
    std::filesystem::remove(path);
    Results measured, heuristic;
    {
      const ScopedEnv tuning("LMTRAIN_MATMUL_TUNING", "measure");
      const ScopedEnv table("LMTRAIN_MATMUL_TABLE", path.c_str());
      lmtrain::CudaBackend gpu(act);
      measured = c.run(gpu, matmul_forms);
    }
    {
      const ScopedEnv tuning("LMTRAIN_MATMUL_TUNING", "heuristic");
      lmtrain::CudaBackend gpu(act);
      heuristic = c.run(gpu, matmul_forms);
    }
    REQUIRE(std::filesystem::exists(path));
    lmtrain::MatmulTable written = lmtrain::MatmulTable::load(path);
    INFO(mode << written.size() << " shapes measured");
    CHECK(written.size() > 0);
    {
      const ScopedEnv tuning("LMTRAIN_MATMUL_TUNING", "table");
      const ScopedEnv table("LMTRAIN_MATMUL_TABLE", path.c_str());
      lmtrain::CudaBackend gpu(act);
      const Results replayed = c.run(gpu, matmul_forms);
      for (const Expect& e : kMatmulFormsExpect)
        require_identical(mode + "table replay " + e.name, replayed.at(e.name),
                          measured.at(e.name));
    }
    // Every shape given a descriptor for other data types: each takes the first suggestion.
    lmtrain::MatmulTable refused(written.device());
    for (const auto& [shape, choice] : written.rows())
      refused.put(shape, {mismatched_algo(act), choice.ms, choice.heuristic_ms});
    refused.save(tmp / "refused.json");
    {
      const ScopedEnv tuning("LMTRAIN_MATMUL_TUNING", "table");
      const ScopedEnv table("LMTRAIN_MATMUL_TABLE", (tmp / "refused.json").c_str());
      lmtrain::CudaBackend gpu(act);
      const Results fallback = c.run(gpu, matmul_forms);
      for (const Expect& e : kMatmulFormsExpect)
        require_identical(mode + "refused table entries " + e.name, fallback.at(e.name),
                          heuristic.at(e.name));
    }
  }
  lmtrain::MatmulTable other(lmtrain::MatmulDevice{"another GPU", 1, 1});
  other.save(tmp / "other.json");
  for (const char* tuning : {"table", "measure"}) {
    const ScopedEnv mode("LMTRAIN_MATMUL_TUNING", tuning);
    const ScopedEnv table("LMTRAIN_MATMUL_TABLE", (tmp / "other.json").c_str());
    CHECK_THROWS_WITH(
        lmtrain::CudaBackend(DType::bf16),
        Catch::Matchers::StartsWith(tmp / "other.json" + ": a table for another GPU (1 SMs) with "
                                                         "cuBLASLt 1, but this is "));
  }
  {
    const ScopedEnv tuning("LMTRAIN_MATMUL_TUNING", "heuristic");
    const ScopedEnv table("LMTRAIN_MATMUL_TABLE", path.c_str());
    CHECK_THROWS_WITH(lmtrain::CudaBackend(DType::bf16),
                      "LMTRAIN_MATMUL_TABLE=" + path +
                          " is set, but LMTRAIN_MATMUL_TUNING=heuristic reads no table");
  }
  {
    const ScopedEnv tuning("LMTRAIN_MATMUL_TUNING", "fastest");
    CHECK_THROWS_WITH(lmtrain::CudaBackend(DType::bf16),
                      "LMTRAIN_MATMUL_TUNING=fastest is not one of table (the default), "
                      "heuristic, measure");
  }
}

// A misspelt cuDNN switch is an error, as LMTRAIN_MATMUL_TUNING's is, not the default with a
// warning. They are read in bf16 only (the fp32 mode uses neither graph).
TEST_CASE("gpu backend refuses unknown values of the cuDNN switches", "[gpu][ops][cudnn]") {
  require_gpu();
#ifdef LMTRAIN_HAVE_CUDNN
  {
    const ScopedEnv attention("LMTRAIN_CUDNN_ATTENTION", "determinstic");
    CHECK_THROWS_WITH(lmtrain::CudaBackend(DType::bf16),
                      "LMTRAIN_CUDNN_ATTENTION=determinstic is not one of 1, deterministic, "
                      "nondeterministic, 0, off");
  }
  {
    const ScopedEnv mlp("LMTRAIN_CUDNN_MLP", "yes");
    CHECK_THROWS_WITH(lmtrain::CudaBackend(DType::bf16),
                      "LMTRAIN_CUDNN_MLP=yes is not one of 0, off, 1, on, auto");
  }
#else
  WARN("this build has no cuDNN (LMTRAIN_HAVE_CUDNN undefined): the switches are not read");
#endif
}

// Weight gradients sum over every token of a batch: K in the tens of thousands, where cuBLASLt
// may split K and use its workspace, accumulated in place (C == D) into an f32 gradient and an
// activation-dtype output; with cuBLASLt's first suggestion and with measured algorithms.
TEST_CASE("gpu matmul accumulating over many rows matches the CPU", "[gpu][ops][matmul]") {
  require_gpu();
  const int64_t M = 256, K = 65536, N = 192;
  for (DType act : kModes) {
    lmtrain::CpuBackend cpu;
    OpCase c(act);
    c.add("dout", {K, M}, Kind::act, randn(size_t(K * M)))
        .add("x", {K, N}, Kind::act, randn(size_t(K * N)))
        .add("grad", {M, N}, Kind::f32, randn(size_t(M * N)))
        .add("acc", {M, N}, Kind::act, randn(size_t(M * N)));
    const Op op = [](Backend& b, const Args& t) {
      b.matmul(t["grad"], t["dout"], t["x"], true, false, true);
      b.matmul(t["acc"], t["dout"], t["x"], true, false, true, 0.5f);
    };
    const Results want = c.run(cpu, op);
    for (const char* tuning : {"heuristic", "measure"}) {
      const ScopedEnv env("LMTRAIN_MATMUL_TUNING", tuning);
      lmtrain::CudaBackend gpu(act);
      const Results got = c.run(gpu, op);
      const std::string what = std::string("[") + mode_name(act) + "] matmul K=65536 in place" +
                               (std::string(tuning) == "measure" ? ", measured " : " ");
      compare(what + "grad", got.at("grad"), want.at("grad"), kReduction);
      compare(what + "acc", got.at("acc"), want.at("acc"), act == DType::bf16 ? kBf16 : kReduction);
    }
  }
}

TEST_CASE("gpu embedding matches the CPU", "[gpu][ops]") {
  struct Case {
    int64_t N, C;
    const char* ids;
    int64_t V = 50;
  };
  // The backward adds sorted rows in chunks of 64: runs of one id inside a chunk, across a few
  // chunks, across most of them, filling chunks exactly, and (runs of 96) a run that starts on a
  // chunk's first entry and continues, one that starts inside a chunk and continues, one that
  // ends on a boundary; fewer rows than a chunk. C = 64 and 2056 move in packs in both dtypes,
  // 300 only in f32 (packs of 4, not 8), 70 and 302 in neither; 300 in bf16, 302 and 2056 need
  // more than one channel tile (256 threads) per chunk. The model's vocabulary (50304: ids of
  // 16 bits, two passes of the radix sort, and the last id) with one id at 30%; one id in 45%
  // of 40000 rows (a run over 280 chunks, as the most frequent token of a d12 batch).
  for (DType act : kModes) {
    for (Case s :
         {Case{300, 70, "every third"}, Case{300, 64, "every third"}, Case{5000, 64, "70%"},
          Case{5000, 70, "70%"}, Case{640, 64, "blocks of 64"}, Case{640, 64, "blocks of 96"},
          Case{640, 300, "blocks of 96"}, Case{640, 302, "blocks of 96"},
          Case{300, 2056, "every third"}, Case{37, 64, "every third"}, Case{1, 64, "one row"},
          Case{4096, 64, "30% and the last id", 50304}, Case{40000, 64, "45%"}}) {
      const int64_t V = s.V, N = s.N, C = s.C;
      const std::string pattern = s.ids;
      std::vector<int32_t> ids = random_ids(size_t(N), 0, int(V) - 1);
      for (size_t i = 0; i < ids.size(); ++i) {
        if (pattern == "every third" && i % 3 == 0) ids[i] = 7;
        if (pattern == "70%" && i % 10 < 7) ids[i] = 3;
        if (pattern == "blocks of 64") ids[i] = int32_t(i / 64) * 3;  // sorted runs of 64
        if (pattern == "blocks of 96") ids[i] = int32_t(i / 96) * 3;
        if (pattern == "45%" && i % 20 < 9) ids[i] = 11;
        if (pattern == "30% and the last id" && i % 10 < 3) ids[i] = 40000;
      }
      if (pattern == "30% and the last id") ids[5] = ids[N - 1] = int32_t(V - 1);
      OpCase c(act);
      c.add_ids("tokens", {N}, ids)
          .add("table", {V, C}, Kind::act, randn(size_t(V * C)))
          .add("out", {N, C}, Kind::act, poison(size_t(N * C)))
          .add("dtable", {V, C}, Kind::f32, randn(size_t(V * C)))
          .add("dout", {N, C}, Kind::act, randn(size_t(N * C)));
      c.check("embedding N=" + std::to_string(N) + " C=" + std::to_string(C) + " " + pattern,
              [](Backend& b, const Args& t) {
                b.embedding_forward(t["out"], t["table"], t["tokens"]);
                b.embedding_backward(t["dtable"], t["dout"], t["tokens"]);
              },
              // The forward copies; the backward adds in chunk order, not the CPU's row order.
              {{"out", kExact, kExact}, {"dtable", kReduction, kReduction}});
    }
  }
}

// The outputs of the normalisation tests: forward, forward in place, backward, backward in place.
const std::vector<Expect> kNormOutputs = {
    {"out", kReduction, kBf16}, {"rstd", kReduction, kReduction},
    {"xi", kReduction, kBf16},  {"rstd_i", kReduction, kReduction},
    {"dx", kReduction, kBf16},  {"g_in_place", kReduction, kBf16}};

// C = 16, 96, 448, 704, 1536 and 2000 take the packed kernels, 333 (not a multiple of the pack)
// the element ones; the rmsnorm case also runs a view that starts one element in (element
// kernels). Packed rows up to some packs per lane are kept in registers (common.cuh, RowPacks;
// 256 elements a round in bf16, 128 in fp32): in bf16, 448 keeps 2 packs a lane, 704 3, 1536 6
// (forward) and 2000 8 (forward), the last round partial but for 1536; in fp32, 448 keeps 4 and
// 704 6 (forward). The rest read the row twice, with a partial last round at 704 and 2000. And
// the widths of d12 (768), d20 (1280) and 1024 (4 packs a lane in bf16), whatever path they take.

TEST_CASE("gpu rmsnorm matches the CPU", "[gpu][ops]") {
  for (DType act : kModes) {
    for (int64_t C : {16, 96, 333, 448, 704, 768, 1024, 1280, 1536, 2000}) {
      const int64_t N = 67;
      OpCase c(act);
      c.add("x", {N, C}, Kind::act, randn(size_t(N * C), 2.f))
          .add("out", {N, C}, Kind::act, poison(size_t(N * C)))
          .add("rstd", {N}, Kind::f32, poison(size_t(N)))
          .add("xi", {N, C}, Kind::act, randn(size_t(N * C)))
          .add("rstd_i", {N}, Kind::f32, poison(size_t(N)))
          .add("dout", {N, C}, Kind::act, randn(size_t(N * C)))
          .add("dx", {N, C}, Kind::act, poison(size_t(N * C)))
          .add("g_in_place", {N, C}, Kind::act, randn(size_t(N * C)))
          .add("r", {N}, Kind::f32, uniform(size_t(N), 0.5f, 1.5f))
          .add("res", {N, C}, Kind::act, randn(size_t(N * C)))
          .add("dx_res", {N, C}, Kind::act, poison(size_t(N * C)))
          .add("res_in_place", {N, C}, Kind::act, randn(size_t(N * C)))
          .add("shifted", {N, C}, Kind::act, randn(size_t(N * C)))
          .add("rstd_s", {N}, Kind::f32, randn(size_t(N)));
      std::vector<Expect> outputs = kNormOutputs;
      outputs.push_back({"dx_res", kReduction, kBf16});
      outputs.push_back({"res_in_place", kReduction, kBf16});
      outputs.push_back({"shifted", kReduction, kBf16});
      outputs.push_back({"rstd_s", kReduction, kReduction});
      c.check(
          "rmsnorm C=" + std::to_string(C),
          [](Backend& b, const Args& t) {
            b.rmsnorm_forward(t["out"], t["rstd"], t["x"]);
            b.rmsnorm_forward(t["xi"], t["rstd_i"], t["xi"]);  // in place
            b.rmsnorm_backward(t["dx"], t["dout"], t["x"], t["r"], {});
            b.rmsnorm_backward(t["g_in_place"], t["g_in_place"], t["x"], t["r"], {});  // in place
            // With a skip connection's gradient, also accumulated into it in place.
            b.rmsnorm_backward(t["dx_res"], t["dout"], t["x"], t["r"], t["res"]);
            b.rmsnorm_backward(t["res_in_place"], t["dout"], t["x"], t["r"], t["res_in_place"]);
            // N - 1 rows from one element in: misaligned rows.
            const int64_t rows = t["x"].dim(0) - 1, cols = t["x"].dim(1);
            b.rmsnorm_forward(t["shifted"].slice(1, rows * cols).view({rows, cols}),
                              t["rstd_s"].slice(0, rows),
                              t["x"].slice(0, rows * cols).view({rows, cols}));
          },
          outputs);
    }
  }
}

TEST_CASE("gpu norm_rope matches the CPU", "[gpu][ops]") {
  for (DType act : kModes) {
    // 18: an odd number of pairs, no packs; 130: the same, with more pairs than lanes in a warp,
    // so each lane loops; 528: packs, with more packs than lanes (two rounds in bf16, three in
    // fp32, read twice); 16, 64, 128, 192: one pack of each half a lane, kept in registers
    // (RowPacks).
    for (int64_t D : {16, 18, 64, 128, 130, 192, 528}) {
      const int64_t B = 2, T = 7, H = 3, Tmax = 12, n = B * T * H * D;
      std::vector<float> angle = uniform(size_t(Tmax * D / 2), -3.f, 3.f), cos(angle), sin(angle);
      for (size_t i = 0; i < angle.size(); ++i) {
        cos[i] = std::cos(angle[i]);
        sin[i] = std::sin(angle[i]);
      }
      OpCase c(act);
      c.add("x", {B, T, H, D}, Kind::act, randn(size_t(n)))
          .add("out", {B, T, H, D}, Kind::act, poison(size_t(n)))
          .add("rstd", {B * T * H}, Kind::f32, poison(size_t(B * T * H)))
          .add("xi", {B, T, H, D}, Kind::act, randn(size_t(n)))
          .add("rstd_i", {B * T * H}, Kind::f32, poison(size_t(B * T * H)))
          .add("dout", {B, T, H, D}, Kind::act, randn(size_t(n)))
          .add("r", {B * T * H}, Kind::f32, uniform(size_t(B * T * H), 0.5f, 2.f))
          .add("dx", {B, T, H, D}, Kind::act, poison(size_t(n)))
          .add("g_in_place", {B, T, H, D}, Kind::act, randn(size_t(n)))
          .add("cos", {Tmax, D / 2}, Kind::f32, cos)
          .add("sin", {Tmax, D / 2}, Kind::f32, sin);
      c.check(
          "norm_rope D=" + std::to_string(D),
          [](Backend& b, const Args& t) {
            b.norm_rope_forward(t["out"], t["rstd"], t["x"], t["cos"], t["sin"], 3);
            b.norm_rope_forward(t["xi"], t["rstd_i"], t["xi"], t["cos"], t["sin"], 5);
            b.norm_rope_backward(t["dx"], t["dout"], t["x"], t["r"], t["cos"], t["sin"], 4);
            b.norm_rope_backward(t["g_in_place"], t["g_in_place"], t["x"], t["r"], t["cos"],
                                 t["sin"], 5);
          },
          kNormOutputs);
    }
  }
}

TEST_CASE("gpu attention through the backend matches the CPU", "[gpu][ops][attention]") {
  for (DType act : kModes) {
    for (int64_t D : {16, 32, 64, 128}) {
      for (int window : {5, 1000}) {
        const int64_t B = 2, T = 33, H = 4, Hkv = 2;
        OpCase c(act);
        c.add("q", {B, T, H, D}, Kind::act, randn(size_t(B * T * H * D)))
            .add("k", {B, T, Hkv, D}, Kind::act, randn(size_t(B * T * Hkv * D)))
            .add("v", {B, T, Hkv, D}, Kind::act, randn(size_t(B * T * Hkv * D)))
            .add("out", {B, T, H, D}, Kind::act, poison(size_t(B * T * H * D)))
            .add("lse", {B, H, T}, Kind::f32, poison(size_t(B * H * T)))
            .add("dout", {B, T, H, D}, Kind::act, randn(size_t(B * T * H * D)))
            .add("dq", {B, T, H, D}, Kind::act, poison(size_t(B * T * H * D)))
            .add("dk", {B, T, Hkv, D}, Kind::act, poison(size_t(B * T * Hkv * D)))
            .add("dv", {B, T, Hkv, D}, Kind::act, poison(size_t(B * T * Hkv * D)))
            // Decoding: 9 queries at positions 24..32 over all 33 keys.
            .add("q9", {B, 9, H, D}, Kind::act, randn(size_t(B * 9 * H * D)))
            .add("out9", {B, 9, H, D}, Kind::act, poison(size_t(B * 9 * H * D)))
            .add("lse9", {B, H, 9}, Kind::f32, poison(size_t(B * H * 9)));
        c.check("attention D=" + std::to_string(D) + " window=" + std::to_string(window),
                [&](Backend& b, const Args& t) {
                  b.attention_forward(t["out"], t["lse"], t["q"], t["k"], t["v"], window, 0);
                  b.attention_backward(t["dq"], t["dk"], t["dv"], t["dout"], t["q"], t["k"], t["v"],
                                       t["out"], t["lse"], window);
                  b.attention_forward(t["out9"], t["lse9"], t["q9"], t["k"], t["v"], window, 24);
                },
                {{"out", kReduction, kBf16},
                 {"lse", kReduction, kReduction},
                 {"dq", kReduction, kBf16},
                 {"dk", kReduction, kBf16},
                 {"dv", kReduction, kBf16},
                 {"out9", kReduction, kBf16},
                 {"lse9", kReduction, kReduction}});
      }
    }
  }
}

TEST_CASE("gpu relu2 matches the CPU", "[gpu][ops]") {
  for (DType act : kModes) {
    const int64_t n = 50021;
    // The backward reads the forward's output: squares of random values, some zero.
    std::vector<float> y = randn(size_t(n));
    for (float& v : y) v = v > 0.f ? v * v : 0.f;
    OpCase c(act);
    c.add("x", {n}, Kind::act, randn(size_t(n)))
        .add("out", {n}, Kind::act, poison(size_t(n)))
        .add("y", {n}, Kind::act, y)
        .add("dout", {n}, Kind::act, randn(size_t(n)))
        .add("dx", {n}, Kind::act, poison(size_t(n)))
        .add("g_in_place", {n}, Kind::act, randn(size_t(n)))
        .add("h_in_place", {n}, Kind::act, randn(size_t(n)))
        .add("shifted", {n}, Kind::act, randn(size_t(n)))
        .add("dx_shifted", {n}, Kind::act, randn(size_t(n)));
    // n is not a multiple of the pack (a partial last pack); the shifted views start one
    // element into their arrays, which rules packs out.
    c.check("relu2",
            [n](Backend& b, const Args& t) {
              b.relu2_forward(t["out"], t["x"]);
              b.relu2_forward(t["h_in_place"], t["h_in_place"]);  // as the model runs it
              b.relu2_backward(t["dx"], t["dout"], t["y"]);
              b.relu2_backward(t["g_in_place"], t["g_in_place"], t["y"]);
              b.relu2_forward(t["shifted"].slice(1, n - 1), t["x"].slice(0, n - 1));
              b.relu2_backward(t["dx_shifted"].slice(1, n - 1), t["dout"].slice(0, n - 1),
                               t["y"].slice(0, n - 1));
            },
            {{"out", kElementwise, kBf16},
             {"h_in_place", kElementwise, kBf16},
             {"dx", kElementwise, kBf16},
             {"g_in_place", kElementwise, kBf16},
             {"shifted", kElementwise, kBf16},
             {"dx_shifted", kElementwise, kBf16}});
  }
}

// The MLP's matmul with its relu2, in bf16 through each path LMTRAIN_CUDNN_MLP can pick: the
// cuDNN graph ("1"), whichever was faster ("auto"), and cuBLASLt with the relu2 kernel ("0", and
// unset). Each must give the CPU's result and repeat bit for bit; where the backend loaded cuDNN,
// "auto" must have chosen, and "1" not taking the graph (no engine for the shape: the log says
// why) is reported. M is not a multiple of any tile; then d12's MLP for one sequence and for
// four, and d20's for one.
TEST_CASE("gpu matmul + relu2 matches the CPU on every path", "[gpu][ops][matmul][cudnn]") {
  require_gpu();
  for (const auto [M, K, N] : {std::array<int64_t, 3>{300, 64, 256},
                               {2048, 768, 3072},
                               {8192, 768, 3072},
                               {2048, 1280, 5120}}) {
    OpCase c(DType::bf16);
    // The backward reads the forward's output: squares of random values, some zero.
    std::vector<float> hidden = randn(size_t(M * N));
    for (float& v : hidden) v = v > 0.f ? v * v : 0.f;
    c.add("x", {M, K}, Kind::act, randn(size_t(M * K)))
        .add("w_fc", {N, K}, Kind::act, randn(size_t(N * K), 0.05f))
        .add("out", {M, N}, Kind::act, poison(size_t(M * N)))
        .add("dout", {M, K}, Kind::act, randn(size_t(M * K)))
        .add("w_proj", {K, N}, Kind::act, randn(size_t(K * N), 0.05f))
        .add("hidden", {M, N}, Kind::act, hidden)
        .add("dx", {M, N}, Kind::act, poison(size_t(M * N)));
    const Op op = [](Backend& b, const Args& t) {
      b.matmul_relu2_forward(t["out"], t["x"], t["w_fc"]);
      b.matmul_relu2_backward(t["dx"], t["dout"], t["w_proj"], t["hidden"]);
    };
    lmtrain::CpuBackend cpu;
    const Results want = c.run(cpu, op);
    for (const char* mode : {"1", "auto", "0", static_cast<const char*>(nullptr)}) {
      const ScopedEnv env("LMTRAIN_CUDNN_MLP", mode);
      lmtrain::CudaBackend gpu(DType::bf16);
      const Results got = c.run(gpu, op), again = c.run(gpu, op);
      const std::string path =
          fmt::format("LMTRAIN_CUDNN_MLP={} {}x{}x{}", mode ? mode : "(unset)", M, N, K);
      for (const char* name : {"out", "dx"}) {
        compare("[bf16] matmul + relu2 " + path + " " + name, got.at(name), want.at(name), kBf16);
        require_identical(path + " " + name, got.at(name), again.at(name));
      }
      for (const bool backward : {false, true}) {
        const std::optional<bool> fused = gpu.matmul_relu2_fused({M, K, N, backward});
        INFO(path << (backward ? " backward" : " forward") << " ran "
                  << (!fused   ? "no choice"
                      : *fused ? "the cuDNN graph"
                               : "cuBLASLt + relu2"));
        if (!mode || !std::strcmp(mode, "0")) CHECK(!fused);
#ifdef LMTRAIN_HAVE_CUDNN
        if (mode && !std::strcmp(mode, "1") && fused != true)
          WARN(path << (backward ? " backward" : " forward") << " did not take the cuDNN graph");
        void* cudnn = dlopen("libcudnn.so.9", RTLD_NOW | RTLD_NOLOAD);  // loaded by the backend?
        const bool cudnn_loaded = cudnn != nullptr;
        if (cudnn) dlclose(cudnn);
        if (mode && !std::strcmp(mode, "auto") && cudnn_loaded) CHECK(fused.has_value());
#endif
      }
    }
  }
}

TEST_CASE("gpu residual_mix_norm matches the CPU", "[gpu][ops]") {
  for (DType act : kModes) {
    // C = 96, 448, 704 and 2000 take the packed kernels, 73 the element ones; N = 2000 gives
    // many row blocks. Rows kept in registers (RowPacks): 96 in both dtypes and directions; 448
    // in bf16 (2 packs a lane, partial) and in the fp32 forward (4); 704 in the bf16 forward (3).
    // The rest read their rows twice, 704 and 2000 with a partial last round. And the widths of
    // d12 (768), d20 (1280) and 1024, whatever path they take.
    for (auto [N, C] : {std::pair<int64_t, int64_t>{41, 73},
                        {2000, 73},
                        {41, 96},
                        {2000, 96},
                        {41, 448},
                        {41, 704},
                        {41, 768},
                        {41, 1024},
                        {41, 1280},
                        {41, 2000}}) {
      const int64_t n = N * C, L = 3;
      OpCase c(act);
      c.add("x", {N, C}, Kind::act, randn(size_t(n)))
          .add("x0", {N, C}, Kind::act, randn(size_t(n)))
          .add("mixed", {N, C}, Kind::act, poison(size_t(n)))
          .add("normed", {N, C}, Kind::act, poison(size_t(n)))
          .add("rstd", {N}, Kind::f32, poison(size_t(N)))
          .add("resid", {L}, Kind::f32, uniform(size_t(L), 0.5f, 1.5f))
          .add("x0l", {L}, Kind::f32, uniform(size_t(L), -0.5f, 0.5f))
          .add("r", {N}, Kind::f32, uniform(size_t(N), 0.5f, 1.5f))
          .add("dnormed", {N, C}, Kind::act, randn(size_t(n)))
          .add("dmixed", {N, C}, Kind::act, randn(size_t(n)))
          .add("dx", {N, C}, Kind::act, poison(size_t(n)))
          .add("dx0", {N, C}, Kind::act, randn(size_t(n)))
          .add("dresid", {L}, Kind::f32, randn(size_t(L)))
          .add("dx0l", {L}, Kind::f32, randn(size_t(L)))
          .add("g_in_place", {N, C}, Kind::act, randn(size_t(n)))
          .add("g_dnormed", {N, C}, Kind::act, randn(size_t(n)))
          .add("mixed_s", {N, C}, Kind::act, randn(size_t(n)))
          .add("normed_s", {N, C}, Kind::act, randn(size_t(n)))
          .add("rstd_s", {N}, Kind::f32, randn(size_t(N)));
      c.check("residual_mix_norm N=" + std::to_string(N) + " C=" + std::to_string(C),
              [](Backend& b, const Args& t) {
                b.residual_mix_norm_forward(t["mixed"], t["normed"], t["rstd"], t["x"], t["x0"],
                                            t["resid"], t["x0l"], 1);
                b.residual_mix_norm_backward(t["dx"], t["dx0"], t["dresid"], t["dx0l"],
                                             t["dnormed"], t["dmixed"], t["x"], t["x0"], t["r"],
                                             t["resid"], t["x0l"], 1);
                // dx aliasing dmixed, for another layer.
                b.residual_mix_norm_backward(t["g_in_place"], t["dx0"], t["dresid"], t["dx0l"],
                                             t["dnormed"], t["g_in_place"], t["x"], t["x0"], t["r"],
                                             t["resid"], t["x0l"], 2);
                // dx aliasing dnormed.
                b.residual_mix_norm_backward(t["g_dnormed"], t["dx0"], t["dresid"], t["dx0l"],
                                             t["g_dnormed"], t["dmixed"], t["x"], t["x0"], t["r"],
                                             t["resid"], t["x0l"], 0);
                // N - 1 rows from one element in: misaligned rows even where C packs.
                const int64_t rows = t["x"].dim(0) - 1, cols = t["x"].dim(1);
                const auto shifted = [&](const char* name) {
                  return t[name].slice(1, rows * cols).view({rows, cols});
                };
                b.residual_mix_norm_forward(shifted("mixed_s"), shifted("normed_s"),
                                            t["rstd_s"].slice(0, rows), shifted("x"), shifted("x0"),
                                            t["resid"], t["x0l"], 2);
              },
              {{"mixed", kElementwise, kBf16},
               {"normed", kReduction, kBf16},
               {"rstd", kReduction, kReduction},
               {"dx", kReduction, kBf16},
               {"dx0", kReduction, kBf16},
               {"dresid", kReduction, kReduction},
               {"dx0l", kReduction, kReduction},
               {"g_in_place", kReduction, kBf16},
               {"g_dnormed", kReduction, kBf16},
               {"mixed_s", kElementwise, kBf16},
               {"normed_s", kReduction, kBf16},
               {"rstd_s", kReduction, kReduction}});
    }
  }
}

TEST_CASE("gpu value_gate matches the CPU", "[gpu][ops]") {
  for (DType act : kModes) {
    // D = 16, 128 and 264 move in packs (264: more packs than lanes), D = 18 does not. dgate_w
    // sums chunks of 64 rows (N = 300 and 3000: several, the last partial; 20000: more chunks
    // than the second pass has threads); 9 heads x 32 gate channels are more weights than a
    // block has threads.
    struct Case {
      int64_t N, D, Hkv, G;
    };
    for (Case s :
         {Case{37, 16, 3, 12}, Case{3000, 16, 3, 12}, Case{37, 18, 3, 12}, Case{300, 128, 3, 12},
          Case{37, 264, 3, 12}, Case{600, 16, 9, 32}, Case{20000, 16, 3, 12}}) {
      const int64_t N = s.N, D = s.D, Hkv = s.Hkv, G = s.G, C = 40, V = 50;
      OpCase c(act);
      c.add("xn", {N, C}, Kind::act, randn(size_t(N * C)))
          .add("gate_w", {Hkv, G}, Kind::act, randn(size_t(Hkv * G), 0.3f))
          .add("table", {V, Hkv * D}, Kind::act, randn(size_t(V * Hkv * D)))
          .add_ids("tokens", {N}, random_ids(size_t(N), 0, int(V) - 1))
          .add("v", {N, Hkv * D}, Kind::act, randn(size_t(N * Hkv * D)))
          .add("gate", {N, Hkv}, Kind::f32, poison(size_t(N * Hkv)))
          .add("dv", {N, Hkv * D}, Kind::act, randn(size_t(N * Hkv * D)))
          .add("gate_in", {N, Hkv}, Kind::f32, uniform(size_t(N * Hkv), 0.1f, 1.9f))
          .add("dxn", {N, C}, Kind::act, randn(size_t(N * C)))
          .add("dgate_w", {Hkv, G}, Kind::f32, randn(size_t(Hkv * G)))
          .add("dve", {N, Hkv * D}, Kind::act, poison(size_t(N * Hkv * D)));
      c.check("value_gate N=" + std::to_string(N) + " D=" + std::to_string(D),
              [](Backend& b, const Args& t) {
                b.value_gate_forward(t["v"], t["gate"], t["xn"], t["gate_w"], t["table"],
                                     t["tokens"]);
                b.value_gate_backward(t["dxn"], t["dgate_w"], t["dve"], t["dv"], t["xn"],
                                      t["gate_w"], t["table"], t["tokens"], t["gate_in"]);
              },
              {{"v", kElementwise, kBf16},
               {"gate", kReduction, kReduction},
               {"dxn", kReduction, kBf16},
               {"dgate_w", kReduction, kReduction},
               {"dve", kElementwise, kBf16}});
    }
  }
}

TEST_CASE("gpu softcap_cross_entropy matches the CPU", "[gpu][ops]") {
  for (DType act : kModes) {
    // Padded rows take packs (a vocabulary not a multiple of the pack, 4 floats or 8 bf16, ends
    // inside one); a row of 77 does not.
    for (auto [vocab, Vp] :
         {std::pair<int, int64_t>{100, 128}, {101, 128}, {5000, 5120}, {77, 77}}) {
      const int64_t N = 19;
      std::vector<int32_t> targets = random_ids(size_t(N), 0, vocab - 1);
      targets[3] = -1;
      targets[11] = -1;
      targets[0] = vocab - 1;  // the last real column: inside the last, partial pack
      OpCase c(act);
      c.add_ids("targets", {N}, targets)
          .add("logits", {N, Vp}, Kind::act, randn(size_t(N * Vp), 10.f))
          .add("losses", {N}, Kind::f32, poison(size_t(N)))
          .add("eval_logits", {N, Vp}, Kind::act, randn(size_t(N * Vp), 10.f))
          .add("eval_losses", {N}, Kind::f32, poison(size_t(N)));
      c.check("softcap_cross_entropy vocab=" + std::to_string(vocab),
              [vocab](Backend& b, const Args& t) {
                b.softcap_cross_entropy(t["logits"], t["losses"], t["targets"], vocab, 15.f,
                                        1.f / 17);
                b.softcap_cross_entropy(t["eval_logits"], t["eval_losses"], t["targets"], vocab,
                                        15.f, 0.f);
              },
              {{"losses", kReduction, kFastTanhLoss},
               {"logits", kReduction, kBf16},
               {"eval_losses", kReduction, kFastTanhLoss},
               {"eval_logits", kExact, kExact}});
    }
  }
}

// A NaN logit makes its row's loss NaN (the run then stops naming the step), also when one
// thread's share of the row is nothing but NaNs: columns 8..15 are a whole share of one thread
// in each layout (4 or 8 columns per packed thread, 1 unpacked), the target's share is finite.
TEST_CASE("gpu softcap_cross_entropy keeps a NaN logit's NaN", "[gpu][ops]") {
  for (DType act : kModes) {
    lmtrain::CudaBackend& b = backend(act);
    for (int64_t Vp : {128, 77}) {
      const int vocab = 77, N = 2;
      std::vector<float> logits = randn(size_t(N * Vp), 10.f);
      for (int64_t j = 8; j < 16; ++j) logits[size_t(j)] = NAN;  // row 0 only
      std::vector<uint16_t> bits(logits.size());
      for (size_t i = 0; i < bits.size(); ++i) bits[i] = bf16_bits(logits[i]);
      const std::vector<int32_t> targets = {0, 5};
      lmtrain::Buffer memory = b.allocate(size_t(N * Vp) * 4 + 64 * 4);
      const lmtrain::Tensor z = memory.tensor({N, Vp}, act);
      const lmtrain::Tensor losses = memory.tensor({N}, DType::f32, size_t(N * Vp) * 4);
      const lmtrain::Tensor ids = memory.tensor({N}, DType::i32, size_t(N * Vp) * 4 + 32 * 4);
      b.upload(ids, targets.data());
      for (float grad_scale : {0.f, 1.f}) {
        if (act == DType::bf16)
          b.upload(z, bits.data());
        else
          b.upload(z, logits.data());
        b.softcap_cross_entropy(z, losses, ids, vocab, 15.f, grad_scale);
        const std::vector<float> got = fetch(b, losses);
        INFO(mode_name(act) << " Vp " << Vp << " grad_scale " << grad_scale);
        CHECK(std::isnan(got[0]));
        CHECK(std::isfinite(got[1]));
      }
    }
  }
}

TEST_CASE("gpu optimizer ops match the CPU", "[gpu][ops][optim]") {
  for (DType act : kModes) {
    const int64_t n = 20011;
    OpCase c(act);
    c.add("p", {n}, Kind::f32, randn(size_t(n)))
        .add("g", {n}, Kind::f32, randn(size_t(n), 0.01f))
        .add("m", {n}, Kind::f32, randn(size_t(n), 0.01f))
        .add("v", {n}, Kind::f32, uniform(size_t(n), 0.f, 1e-4f));
    for (const char* buf : {"buf0", "buf1", "buf2", "buf3"})
      c.add(buf, {n}, Kind::f32, randn(size_t(n)));
    c.add("u", {n}, Kind::f32, poison(size_t(n)))
        .add("u1", {n}, Kind::f32, poison(size_t(n)))
        .add("u2", {n}, Kind::f32, poison(size_t(n)))
        .add("u3", {n}, Kind::f32, poison(size_t(n)))
        .add("pc", {n}, Kind::f32, randn(size_t(n)))
        .add("pd", {n}, Kind::f32, randn(size_t(n)))
        .add("x", {n}, Kind::f32, randn(size_t(n)))
        // AdamW's first step, from the zero state the optimizer starts with (bias corrections
        // 1 - beta^1).
        .add("p1", {n}, Kind::f32, randn(size_t(n)))
        .add("m1", {n}, Kind::f32, std::vector<float>(size_t(n), 0.f))
        .add("v1", {n}, Kind::f32, std::vector<float>(size_t(n), 0.f));
    // Stacks of 3 matrices of 37 x 53 (1961 elements: odd, so matrix 1 starts 4-byte aligned
    // only), updated from matrix 1 on as NorMuon::step does for a run of matrices that shares
    // multipliers, and matrix 0 with other ones.
    const int64_t size = 37 * 53, stack = 3 * size;
    c.add("sp", {stack}, Kind::f32, randn(size_t(stack)))
        .add("sq", {stack}, Kind::f32, randn(size_t(stack)))
        .add("sx", {stack}, Kind::f32, randn(size_t(stack)))
        .add("sg", {stack}, Kind::f32, randn(size_t(stack), 0.01f))
        .add("su", {stack}, Kind::f32, randn(size_t(stack)))
        .add("sbuf", {stack}, Kind::f32, randn(size_t(stack)))
        .add("su_l", {stack}, Kind::f32, randn(size_t(stack)))
        .add("sbuf_l", {stack}, Kind::f32, randn(size_t(stack)));
    c.check("adamw/muon_momentum/muon_apply",
            [size](Backend& b, const Args& t) {
              b.adamw_update(t["p"], t["g"], t["m"], t["v"],
                             AdamWHyper{0.01f, 0.8f, 0.95f, 1e-10f, 0.1f, 3});
              b.adamw_update(t["p1"], t["g"], t["m1"], t["v1"],
                             AdamWHyper{0.01f, 0.8f, 0.95f, 1e-10f, 0.1f, 1});
              const auto from1 = [&](const char* name) { return t[name].slice(size, 2 * size); };
              const auto first = [&](const char* name) { return t[name].slice(0, size); };
              b.muon_apply(from1("sp"), from1("sx"), 0.02f, 0.003f, true);
              b.muon_apply(first("sp"), first("sx"), 0.01f, 0.006f, true);
              b.muon_apply(from1("sq"), from1("sx"), 0.02f, 0.003f, false);
              b.muon_momentum(from1("su"), from1("sbuf"), from1("sg"), 0.9f, false, true);
              b.muon_momentum(from1("su_l"), from1("sbuf_l"), from1("sg"), 0.85f, true, true);
              b.muon_momentum(t["u"], t["buf0"], t["g"], 0.9f, false, false);
              b.muon_momentum(t["u1"], t["buf1"], t["g"], 0.9f, false, true);
              b.muon_momentum(t["u2"], t["buf2"], t["g"], 0.9f, true, false);
              b.muon_momentum(t["u3"], t["buf3"], t["g"], 0.9f, true, true);
              b.muon_apply(t["pc"], t["x"], 0.02f, 0.003f, true);
              b.muon_apply(t["pd"], t["x"], 0.02f, 0.003f, false);
            },
            {{"p", kElementwise, kElementwise},    {"m", kElementwise, kElementwise},
             {"v", kElementwise, kElementwise},    {"u", kElementwise, kElementwise},
             {"buf0", kElementwise, kElementwise}, {"u1", kElementwise, kElementwise},
             {"buf1", kElementwise, kElementwise}, {"u2", kElementwise, kElementwise},
             {"buf2", kElementwise, kElementwise}, {"u3", kElementwise, kElementwise},
             {"buf3", kElementwise, kElementwise}, {"pc", kElementwise, kElementwise},
             {"pd", kElementwise, kElementwise},   {"p1", kElementwise, kElementwise},
             {"m1", kElementwise, kElementwise},   {"v1", kElementwise, kElementwise},
             {"sp", kElementwise, kElementwise},   {"sq", kElementwise, kElementwise},
             {"su", kElementwise, kElementwise},   {"sbuf", kElementwise, kElementwise},
             {"su_l", kElementwise, kElementwise}, {"sbuf_l", kElementwise, kElementwise}});
  }
}

TEST_CASE("gpu Muon matrix ops match the CPU", "[gpu][ops][optim]") {
  struct Stack {
    int64_t K, rows, cols;
    int64_t zero = -1;  // a matrix of zeros, as the padding of a stack split over ranks
  };
  // Matrices of 19200 elements take several chunks of the per-matrix norms, in every matrix of
  // the stack; a zero matrix must come out as zeros (not NaN) and its state decays.
  for (DType act : kModes) {
    for (Stack s : {Stack{3, 37, 53}, Stack{2, 70, 30}, Stack{2, 30, 70}, Stack{1, 300, 300},
                    Stack{3, 96, 200}, Stack{3, 200, 96, 1}}) {
      const int64_t size = s.K * s.rows * s.cols, slots = std::max(s.rows, s.cols);
      const int64_t matrix = s.rows * s.cols;
      std::vector<float> x = randn(size_t(size), 3.f), y = randn(size_t(size));
      if (s.zero >= 0) {
        std::fill_n(x.begin() + s.zero * matrix, matrix, 0.f);
        std::fill_n(y.begin() + s.zero * matrix, matrix, 0.f);
      }
      OpCase c(act);
      const Shape shape{s.K, s.rows, s.cols}, transposed{s.K, s.cols, s.rows};
      c.add("x", shape, Kind::f32, x)
          .add("xt", transposed, Kind::f32, poison(size_t(size)))
          .add("work", shape, Kind::act, poison(size_t(size)))
          .add("work_t", transposed, Kind::act, poison(size_t(size)))
          .add("act", shape, Kind::act, randn(size_t(size)))
          .add("act_t", transposed, Kind::f32, poison(size_t(size)))
          .add("y", shape, Kind::f32, y)
          .add("state", {s.K, slots}, Kind::f32, uniform(size_t(s.K * slots), 0.f, 2.f));
      c.check("muon matrices " + std::to_string(s.K) + "x" + std::to_string(s.rows) + "x" +
                  std::to_string(s.cols) + (s.zero >= 0 ? " one zero" : ""),
              [](Backend& b, const Args& t) {
                b.transpose_matrices(t["xt"], t["x"]);
                b.transpose_matrices(t["act_t"], t["act"]);  // from the work dtype to f32
                // Into the work dtype, straight and transposed, then in place in f32.
                b.normalize_matrices(t["work"], t["x"], 1.02f, 1e-6f, false);
                b.normalize_matrices(t["work_t"], t["x"], 1.0f, 1e-7f, true);
                b.normalize_matrices(t["x"], t["x"], 1.02f, 1e-6f, false);
                b.normuon_second_moment(t["y"], t["state"], 0.95f);
              },
              {{"xt", kExact, kExact},
               {"act_t", kExact, kExact},
               {"work", kReduction, kBf16},
               {"work_t", kReduction, kBf16},
               {"x", kReduction, kReduction},
               {"y", kReduction, kReduction},
               {"state", kReduction, kReduction}});
    }
  }
}
