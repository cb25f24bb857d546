// The CUDA backend's timing points (src/backend/cuda/timing.cpp) and the op profile's
// TimedBackend over it: misuse is rejected, two events around real work measure a positive time,
// the event pool creates no events once it holds enough, and timing the ops changes no bit of
// their results. The CPU backend's timing points are tested in tests/test_op_profile.cpp.
#include <catch2/catch.hpp>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "backend/timed_backend.h"
#include "op_case.h"

using namespace gpu_test;
using lmtrain::Buffer;
using lmtrain::CudaBackend;

namespace {

constexpr DType kModes[] = {DType::f32, DType::bf16};

}  // namespace

TEST_CASE("gpu timing events reject misuse", "[gpu][profile]") {
  require_gpu();
  CudaBackend b(DType::f32);
  Backend::TimingEvent start = b.make_timing_event(), end = b.make_timing_event();
  CHECK_THROWS_WITH(b.elapsed_ms(start, end), Catch::Contains("never recorded"));
  b.record_timing_event(start);
  CHECK_THROWS_WITH(b.elapsed_ms(start, end), Catch::Contains("never recorded"));
  CHECK_THROWS_WITH(b.elapsed_ms(end, start), Catch::Contains("never recorded"));
  b.record_timing_event(end);
  b.synchronize();
  CHECK(b.elapsed_ms(start, end) >= 0.0);

  // An empty event, one of another CUDA backend and one of the CPU backend are not this
  // backend's.
  Backend::TimingEvent none;
  CHECK_THROWS_WITH(b.record_timing_event(none), Catch::Contains("not a timing event"));
  CudaBackend other(DType::f32);
  Backend::TimingEvent foreign = other.make_timing_event();
  CHECK_THROWS_WITH(b.record_timing_event(foreign), Catch::Contains("not a timing event"));
  lmtrain::CpuBackend cpu;
  Backend::TimingEvent host = cpu.make_timing_event();
  CHECK_THROWS_WITH(b.record_timing_event(host), Catch::Contains("not a timing event"));
  CHECK_THROWS_WITH(b.elapsed_ms(start, host), Catch::Contains("not a timing event"));
}

TEST_CASE("gpu timing events measure the device time of a large matmul", "[gpu][profile]") {
  CudaBackend& b = backend(DType::f32);
  // 2 * 4096^3 = 1.4e11 FLOPs in fp32 (no TF32 in fp32 mode): milliseconds on any GPU.
  const int64_t n = 4096;
  const Buffer memory = b.allocate(size_t(3 * n * n) * sizeof(float));
  const Tensor x = memory.tensor({n, n}, DType::f32);
  const Tensor y = memory.tensor({n, n}, DType::f32, size_t(n * n) * sizeof(float));
  const Tensor out = memory.tensor({n, n}, DType::f32, size_t(2 * n * n) * sizeof(float));
  b.fill(x, 1.f / 64);
  b.fill(y, 1.f / 64);
  b.matmul(out, x, y, false, false, false);  // warm-up: builds the cuBLASLt plan
  b.synchronize();
  Backend::TimingEvent start = b.make_timing_event(), end = b.make_timing_event();
  b.record_timing_event(start);
  b.matmul(out, x, y, false, false, false);
  b.record_timing_event(end);
  b.synchronize();
  const double ms = b.elapsed_ms(start, end);
  std::printf("timing events: %lldx%lldx%lld fp32 matmul took %.3f ms (%.1f TFLOP/s)\n",
              (long long)n, (long long)n, (long long)n, ms,
              ms > 0 ? 2.0 * double(n) * double(n) * double(n) / ms * 1e-9 : 0.0);
  CHECK(ms > 0.0);
  // Every element is 4096 products of 2^-6 * 2^-6: exactly 1, whatever the summation order.
  std::vector<float> corner(4);
  b.download(corner.data(), out.slice(0, 4));
  CHECK(corner == std::vector<float>(4, 1.f));
}

TEST_CASE("gpu timing events come from a pool", "[gpu][profile]") {
  require_gpu();
  CudaBackend b(DType::f32);
  CHECK(b.timing_events_created() == 0);
  constexpr size_t kEvents = 16;
  // Twice N events, each set destroyed before the next is made: the second set reuses the
  // first's events.
  for (int round = 1; round <= 2; ++round) {
    std::vector<Backend::TimingEvent> events;
    for (size_t i = 0; i < kEvents; ++i) {
      events.push_back(b.make_timing_event());
      b.record_timing_event(events.back());
    }
    b.synchronize();
    CHECK(b.elapsed_ms(events.front(), events.back()) >= 0.0);
    INFO("round " << round << ": " << b.timing_events_created() << " events created");
    CHECK(b.timing_events_created() == kEvents);
  }
  CHECK(b.timing_events_created() == kEvents);

  // An event may outlive its backend: the pool is shared with the events.
  Backend::TimingEvent survivor;
  {
    CudaBackend short_lived(DType::f32);
    survivor = short_lived.make_timing_event();
    short_lived.record_timing_event(survivor);
    short_lived.synchronize();
  }
  survivor = Backend::TimingEvent();  // returns the event to the orphaned pool, which frees it
  SUCCEED();
}

// TimedBackend brackets every op with two timing points and forwards it unchanged: the results
// must be the plain backend's bit for bit (the backend is deterministic), and every op filed.
TEST_CASE("gpu ops timed by TimedBackend give the plain backend's bits", "[gpu][profile]") {
  for (DType act : kModes) {
    const int64_t M = 67, K = 96, N = 80, Vp = 128, B = 2, T = 33, H = 4, Hkv = 2, D = 64;
    const int64_t nq = B * T * H * D, nkv = B * T * Hkv * D;
    OpCase c(act);
    c.add("a", {M, K}, Kind::act, randn(size_t(M * K)))
        .add("w", {N, K}, Kind::act, randn(size_t(N * K)))
        .add("y", {M, N}, Kind::act, poison(size_t(M * N)))
        .add("addend", {M, N}, Kind::act, randn(size_t(M * N)))
        .add("sum", {M, N}, Kind::act, poison(size_t(M * N)))
        .add("normed", {M, K}, Kind::act, poison(size_t(M * K)))
        .add("rstd", {M}, Kind::f32, poison(size_t(M)))
        .add("logits", {M, Vp}, Kind::act, randn(size_t(M * Vp), 5.f))
        .add("losses", {M}, Kind::f32, poison(size_t(M)))
        .add_ids("targets", {M}, std::vector<int32_t>(size_t(M), 7))
        .add("p", {N, K}, Kind::f32, randn(size_t(N * K)))
        .add("g", {N, K}, Kind::f32, randn(size_t(N * K), 0.01f))
        .add("m", {N, K}, Kind::f32, randn(size_t(N * K), 0.01f))
        .add("v", {N, K}, Kind::f32, uniform(size_t(N * K), 0.f, 1e-4f))
        .add("norms", {2}, Kind::f32, poison(2))
        .add("q", {B, T, H, D}, Kind::act, randn(size_t(nq)))
        .add("k", {B, T, Hkv, D}, Kind::act, randn(size_t(nkv)))
        .add("vv", {B, T, Hkv, D}, Kind::act, randn(size_t(nkv)))
        .add("attn", {B, T, H, D}, Kind::act, poison(size_t(nq)))
        .add("lse", {B, H, T}, Kind::f32, poison(size_t(B * H * T)))
        .add("dattn", {B, T, H, D}, Kind::act, randn(size_t(nq)))
        .add("dq", {B, T, H, D}, Kind::act, poison(size_t(nq)))
        .add("dk", {B, T, Hkv, D}, Kind::act, poison(size_t(nkv)))
        .add("dv", {B, T, Hkv, D}, Kind::act, poison(size_t(nkv)));
    const Op op = [](Backend& b, const Args& t) {
      b.matmul(t["y"], t["a"], t["w"], false, true, false);
      b.matmul_add(t["sum"], t["a"], t["w"], false, true, t["addend"], 0.5f, -1.f);
      b.rmsnorm_forward(t["normed"], t["rstd"], t["a"]);
      b.softcap_cross_entropy(t["logits"], t["losses"], t["targets"], 100, 15.f, 0.25f);
      b.adamw_update(t["p"], t["g"], t["m"], t["v"],
                     lmtrain::AdamWHyper{0.01f, 0.8f, 0.95f, 1e-10f, 0.1f, 2});
      b.sum_squares(t["norms"].slice(0, 1), t["g"]);
      b.sum_squares(t["norms"].slice(1, 1), t["y"]);
      b.attention_forward(t["attn"], t["lse"], t["q"], t["k"], t["vv"], 9, 0);
      b.attention_backward(t["dq"], t["dk"], t["dv"], t["dattn"], t["q"], t["k"], t["vv"],
                           t["attn"], t["lse"], 9);
    };
    CudaBackend& gpu = backend(act);
    const Results plain = c.run(gpu, op);
    lmtrain::TimedBackend timed(gpu);
    timed.begin_step(1);
    timed.set_phase("test");
    const Results got = c.run(timed, op);
    timed.end_step(1.0);
    // cuDNN's nondeterministic backward (bf16 only) may differ run to run in dq, dk and dv.
    const char* env = std::getenv("LMTRAIN_CUDNN_ATTENTION");
    const bool repeatable =
        act == DType::f32 || env == nullptr || std::string(env) != "nondeterministic";
    for (const char* name : {"y", "sum", "normed", "rstd", "logits", "losses", "p", "m", "v",
                             "norms", "attn", "lse", "dq", "dk", "dv"}) {
      if (!repeatable && name[0] == 'd') continue;
      require_identical(std::string("[") + mode_name(act) + "] timed " + name, got.at(name),
                        plain.at(name));
    }
    const lmtrain::OpProfile& profile = timed.profile();
    REQUIRE(profile.steps.size() == 1);
    int64_t calls = 0;
    for (const lmtrain::OpStats& s : profile.ops) {
      std::printf("[%s] timed %-10s %-28s %-36s calls %lld  %.4f ms\n", mode_name(act),
                  s.phase.c_str(), s.op.c_str(), s.key.c_str(), (long long)s.calls, s.ms);
      CHECK(s.phase == "test");
      CHECK(s.ms >= 0.0);
      calls += s.calls;
    }
    CHECK(calls == 9);  // the ops of `op`, each once (uploads and downloads are not timed)
    CHECK(profile.steps[0].op_ms > 0.0);
  }
}
