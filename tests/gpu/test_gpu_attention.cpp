// The fused CUDA attention kernels (kernels/attention.cu) against the CPU reference op, in float
// and bf16, over head dims, windows, GQA ratios, lengths that are not multiples of the tiles and
// query offsets; plus a check that the backward is bit-for-bit deterministic.
#include <cuda_runtime.h>
#ifdef LMTRAIN_HAVE_CUDNN
#include <dlfcn.h>
#endif

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "attention.cuh"
#include "backend/cpu/cpu_backend.h"
#include "backend/cuda/attention_cudnn.h"
#include "gpu_support.h"

using namespace lmtrain;

namespace {

#define ATTN_CUDA(call)                                 \
  do {                                                  \
    cudaError_t status_ = (call);                       \
    INFO(#call << ": " << cudaGetErrorString(status_)); \
    REQUIRE(status_ == cudaSuccess);                    \
  } while (0)

// Round-to-nearest-even f32 -> bf16 bits, and back (host side, no cuda_bf16 intrinsics).
uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
float bf16_value(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
std::vector<float> round_bf16(const std::vector<float>& x) {
  std::vector<float> r(x.size());
  for (size_t i = 0; i < x.size(); ++i) r[i] = bf16_value(bf16_bits(x[i]));
  return r;
}

std::vector<float> randn(size_t n, float scale, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<float> x(n);
  for (float& e : x) e = dist(rng);
  return x;
}

// Device buffer holding a host f32 vector as float or bf16.
struct DevArray {
  void* ptr = nullptr;
  size_t n = 0;
  bool bf16 = false;

  DevArray(size_t count, bool is_bf16) : n(count), bf16(is_bf16) {
    ATTN_CUDA(cudaMalloc(&ptr, std::max<size_t>(bytes(), 1)));
    ATTN_CUDA(
        cudaMemset(ptr, 0xff, std::max<size_t>(bytes(), 1)));  // NaN garbage: must be overwritten
  }
  DevArray(const std::vector<float>& host, bool is_bf16) : DevArray(host.size(), is_bf16) {
    upload(host);
  }
  ~DevArray() { cudaFree(ptr); }
  DevArray(const DevArray&) = delete;
  DevArray& operator=(const DevArray&) = delete;

  size_t bytes() const { return n * (bf16 ? 2 : 4); }
  void upload(const std::vector<float>& host) {
    REQUIRE(host.size() == n);
    if (bf16) {
      std::vector<uint16_t> b(n);
      for (size_t i = 0; i < n; ++i) b[i] = bf16_bits(host[i]);
      ATTN_CUDA(cudaMemcpy(ptr, b.data(), bytes(), cudaMemcpyHostToDevice));
    } else {
      ATTN_CUDA(cudaMemcpy(ptr, host.data(), bytes(), cudaMemcpyHostToDevice));
    }
  }
  std::vector<float> download() const {
    std::vector<float> host(n);
    if (bf16) {
      std::vector<uint16_t> b(n);
      ATTN_CUDA(cudaMemcpy(b.data(), ptr, bytes(), cudaMemcpyDeviceToHost));
      for (size_t i = 0; i < n; ++i) host[i] = bf16_value(b[i]);
    } else {
      ATTN_CUDA(cudaMemcpy(host.data(), ptr, bytes(), cudaMemcpyDeviceToHost));
    }
    return host;
  }
  std::vector<uint8_t> raw() const {
    std::vector<uint8_t> r(bytes());
    ATTN_CUDA(cudaMemcpy(r.data(), ptr, bytes(), cudaMemcpyDeviceToHost));
    return r;
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr);
  }
};

struct Case {
  int B, Tq, Tk, H, Hkv, D, window, q_offset;
  bool bf16;
  std::string str() const {
    std::ostringstream s;
    s << (bf16 ? "bf16" : "f32") << " B=" << B << " Tq=" << Tq << " Tk=" << Tk << " H=" << H
      << " Hkv=" << Hkv << " D=" << D << " window=" << window << " q_offset=" << q_offset;
    return s.str();
  }
};

// The largest relative error seen per (dtype, tensor) in a test case, printed at its end so that
// the margin to the tolerance is visible on passing runs too.
struct Worst {
  std::vector<std::pair<std::string, double>> seen;
  void note(const std::string& key, double rel) {
    for (auto& [k, r] : seen)
      if (k == key) return void(r = std::max(r, rel));
    seen.push_back({key, rel});
  }
  void print(const char* test) {
    std::printf("%s: worst relative error", test);
    for (auto& [k, r] : seen) std::printf("  %s %.2e", k.c_str(), r);
    std::printf("\n");
    seen.clear();
  }
} worst_seen;

// max |gpu - ref| / max |ref| over a tensor of shape dims (row-major); on failure the message
// names the worst element by its index in each dimension.
void expect_close(const char* name, const std::vector<float>& gpu, const std::vector<float>& ref,
                  std::vector<int64_t> dims, double tol, const Case& c) {
  REQUIRE(gpu.size() == ref.size());
  double scale = 0, worst = -1;
  size_t at = 0;
  bool finite = true;
  for (size_t i = 0; i < ref.size(); ++i) {
    scale = std::max(scale, std::abs(double(ref[i])));
    double e = std::abs(double(gpu[i]) - double(ref[i]));
    if (!std::isfinite(gpu[i])) {
      finite = false;
      e = INFINITY;
    }
    if (e > worst) worst = e, at = i;
  }
  const double rel = scale > 0 ? worst / scale : worst;
  worst_seen.note(std::string(c.bf16 ? "bf16 " : "f32 ") + name, rel);
  if (finite && rel <= tol) {
    SUCCEED();
    return;
  }
  std::ostringstream idx;
  size_t rem = at;
  std::vector<int64_t> pos(dims.size());
  for (size_t d = dims.size(); d-- > 0;) pos[d] = int64_t(rem % dims[d]), rem /= dims[d];
  for (size_t d = 0; d < pos.size(); ++d) idx << (d ? "," : "") << pos[d];
  FAIL_CHECK(c.str() << ": " << name << " worst element [" << idx.str() << "] gpu=" << gpu[at]
                     << " ref=" << ref[at] << " |err|=" << worst << " max|ref|=" << scale
                     << " relative error " << rel << " > tolerance " << tol);
}

Tensor host_tensor(std::vector<float>& x, Shape shape) {
  return Tensor{x.data(), shape, DType::f32};
}

struct Inputs {
  std::vector<float> q, k, v;
};

// Random q, k, v (rounded to bf16 when the case is bf16, so the CPU sees what the GPU sees).
// q is scaled up so that some softmax rows are peaked and others flat.
Inputs make_inputs(const Case& c, uint32_t seed) {
  Inputs in{randn(size_t(c.B) * c.Tq * c.H * c.D, 1.6f, seed),
            randn(size_t(c.B) * c.Tk * c.Hkv * c.D, 1.f, seed + 1),
            randn(size_t(c.B) * c.Tk * c.Hkv * c.D, 1.f, seed + 2)};
  if (c.bf16) in.q = round_bf16(in.q), in.k = round_bf16(in.k), in.v = round_bf16(in.v);
  return in;
}

void gpu_forward(const Case& c, DevArray& out, DevArray& lse, const DevArray& q, const DevArray& k,
                 const DevArray& v) {
  if (c.bf16)
    cuda::attention_forward<__nv_bfloat16>(
        out.as<__nv_bfloat16>(), lse.as<float>(), q.as<__nv_bfloat16>(), k.as<__nv_bfloat16>(),
        v.as<__nv_bfloat16>(), c.B, c.Tq, c.Tk, c.H, c.Hkv, c.D, c.window, c.q_offset, nullptr);
  else
    cuda::attention_forward<float>(out.as<float>(), lse.as<float>(), q.as<float>(), k.as<float>(),
                                   v.as<float>(), c.B, c.Tq, c.Tk, c.H, c.Hkv, c.D, c.window,
                                   c.q_offset, nullptr);
  ATTN_CUDA(cudaDeviceSynchronize());
}

void check_forward(const Case& c, uint32_t seed) {
  INFO(c.str());
  Inputs in = make_inputs(c, seed);
  std::vector<float> out(size_t(c.B) * c.Tq * c.H * c.D), lse(size_t(c.B) * c.H * c.Tq);
  CpuBackend cpu;
  cpu.attention_forward(host_tensor(out, {c.B, c.Tq, c.H, c.D}), host_tensor(lse, {c.B, c.H, c.Tq}),
                        host_tensor(in.q, {c.B, c.Tq, c.H, c.D}),
                        host_tensor(in.k, {c.B, c.Tk, c.Hkv, c.D}),
                        host_tensor(in.v, {c.B, c.Tk, c.Hkv, c.D}), c.window, c.q_offset);

  DevArray gq(in.q, c.bf16), gk(in.k, c.bf16), gv(in.v, c.bf16);
  DevArray gout(out.size(), c.bf16), glse(lse.size(), false);
  gpu_forward(c, gout, glse, gq, gk, gv);
  const double tol = c.bf16 ? 2e-2 : 1e-5;
  expect_close("out", gout.download(), out, {c.B, c.Tq, c.H, c.D}, tol, c);
  // lse is f32 in both dtypes and computed from the same (rounded) inputs.
  expect_close("lse", glse.download(), lse, {c.B, c.H, c.Tq}, 1e-5, c);
}

struct Grads {
  std::vector<float> dq, dk, dv;
};

// Runs the CPU forward for out and lse, then the backward on CPU and GPU from the same out
// (rounded to bf16 in the bf16 case, as the GPU forward would hand it over), lse and dout.
void check_backward(const Case& c, uint32_t seed) {
  INFO(c.str());
  REQUIRE(c.Tq == c.Tk);
  REQUIRE(c.q_offset == 0);
  Inputs in = make_inputs(c, seed);
  const int64_t B = c.B, T = c.Tq, H = c.H, Hkv = c.Hkv, D = c.D;
  std::vector<float> out(size_t(B * T * H * D)), lse(size_t(B * H * T));
  std::vector<float> gout = randn(out.size(), 1.f, seed + 3);
  CpuBackend cpu;
  cpu.attention_forward(host_tensor(out, {B, T, H, D}), host_tensor(lse, {B, H, T}),
                        host_tensor(in.q, {B, T, H, D}), host_tensor(in.k, {B, T, Hkv, D}),
                        host_tensor(in.v, {B, T, Hkv, D}), c.window, 0);
  if (c.bf16) out = round_bf16(out), gout = round_bf16(gout);

  Grads ref{std::vector<float>(in.q.size()), std::vector<float>(in.k.size()),
            std::vector<float>(in.v.size())};
  cpu.attention_backward(host_tensor(ref.dq, {B, T, H, D}), host_tensor(ref.dk, {B, T, Hkv, D}),
                         host_tensor(ref.dv, {B, T, Hkv, D}), host_tensor(gout, {B, T, H, D}),
                         host_tensor(in.q, {B, T, H, D}), host_tensor(in.k, {B, T, Hkv, D}),
                         host_tensor(in.v, {B, T, Hkv, D}), host_tensor(out, {B, T, H, D}),
                         host_tensor(lse, {B, H, T}), c.window);

  DevArray q(in.q, c.bf16), k(in.k, c.bf16), v(in.v, c.bf16), o(out, c.bf16), g(gout, c.bf16);
  DevArray l(lse, false);
  DevArray dq(in.q.size(), c.bf16), dk(in.k.size(), c.bf16), dv(in.v.size(), c.bf16);
  DevArray ws(cuda::attention_backward_workspace_bytes(c.B, c.Tq, c.H, c.Hkv, c.D) / 4 + 1, false);

  auto run = [&] {
    if (c.bf16)
      cuda::attention_backward<__nv_bfloat16>(
          dq.as<__nv_bfloat16>(), dk.as<__nv_bfloat16>(), dv.as<__nv_bfloat16>(),
          g.as<__nv_bfloat16>(), q.as<__nv_bfloat16>(), k.as<__nv_bfloat16>(),
          v.as<__nv_bfloat16>(), o.as<__nv_bfloat16>(), l.as<float>(), c.B, c.Tq, c.H, c.Hkv, c.D,
          c.window, ws.ptr, nullptr);
    else
      cuda::attention_backward<float>(dq.as<float>(), dk.as<float>(), dv.as<float>(), g.as<float>(),
                                      q.as<float>(), k.as<float>(), v.as<float>(), o.as<float>(),
                                      l.as<float>(), c.B, c.Tq, c.H, c.Hkv, c.D, c.window, ws.ptr,
                                      nullptr);
    ATTN_CUDA(cudaDeviceSynchronize());
  };
  run();
  // f32: dk sums over up to group * T rows in fp32 on both, in different orders; the worst seen
  // on an H100 (against a CPU that summed in double) is about 7e-6, so 2e-5 leaves a margin. At
  // window 0 the CPU's dq and dk are exact zeros, so the GPU's are compared with 2e-5 absolute.
  const double tol = c.bf16 ? 2e-2 : 2e-5;
  expect_close("dq", dq.download(), ref.dq, {B, T, H, D}, tol, c);
  expect_close("dk", dk.download(), ref.dk, {B, T, Hkv, D}, tol, c);
  expect_close("dv", dv.download(), ref.dv, {B, T, Hkv, D}, tol, c);
}

}  // namespace

TEST_CASE("gpu attention forward matches the CPU reference", "[gpu][attention]") {
  gpu_test::require_gpu();
  uint32_t seed = 1000;
  for (bool bf16 : {false, true})
    for (int D : {16, 32, 64, 128})
      for (auto [H, Hkv] : {std::pair<int, int>{2, 2}, {6, 2}})
        for (int T : {37, 130})
          for (int window : {0, 1, 7, T / 2, T})
            check_forward({2, T, T, H, Hkv, D, window, 0, bf16}, seed++);
  worst_seen.print("attention forward");
}

TEST_CASE("gpu attention forward with queries at an offset (Tq < Tk)", "[gpu][attention]") {
  gpu_test::require_gpu();
  uint32_t seed = 2000;
  for (bool bf16 : {false, true})
    for (int D : {16, 64, 128})
      for (int window : {0, 5, 70, 1000}) {
        check_forward({2, 37, 130, 6, 2, D, window, 93, bf16}, seed++);  // the last 37 positions
        check_forward({1, 37, 130, 3, 3, D, window, 50, bf16}, seed++);  // a middle stretch
        check_forward({2, 1, 130, 3, 1, D, window, 129, bf16}, seed++);  // one decode step
        check_forward({1, 70, 200, 2, 1, D, window, 0, bf16}, seed++);   // keys past the queries
      }
  worst_seen.print("attention forward, q_offset");
}

TEST_CASE("gpu attention backward matches the CPU reference", "[gpu][attention]") {
  gpu_test::require_gpu();
  uint32_t seed = 3000;
  for (bool bf16 : {false, true})
    for (int D : {16, 32, 64, 128})
      for (auto [H, Hkv] : {std::pair<int, int>{2, 2}, {6, 2}})
        for (int T : {37, 130})
          for (int window : {0, 1, 7, T / 2, T})
            check_backward({2, T, T, H, Hkv, D, window, 0, bf16}, seed++);
  // A longer sequence with a window spanning several tiles on both sides, and a single position.
  for (bool bf16 : {false, true}) {
    check_backward({1, 300, 300, 3, 1, 64, 70, 0, bf16}, seed++);
    check_forward({1, 300, 300, 3, 1, 64, 70, 0, bf16}, seed++);
    check_backward({3, 1, 1, 2, 1, 32, 0, 0, bf16}, seed++);
  }
  worst_seen.print("attention backward");
}

TEST_CASE("gpu attention backward is deterministic", "[gpu][attention]") {
  gpu_test::require_gpu();
  for (bool bf16 : {false, true})
    for (int window : {7, 130}) {
      const Case c{2, 130, 130, 6, 2, 64, window, 0, bf16};
      INFO(c.str());
      Inputs in = make_inputs(c, 77);
      std::vector<float> gout = randn(in.q.size(), 1.f, 78);
      DevArray q(in.q, bf16), k(in.k, bf16), v(in.v, bf16), g(gout, bf16);
      DevArray o(in.q.size(), bf16), l(size_t(c.B) * c.H * c.Tq, false);
      gpu_forward(c, o, l, q, k, v);
      DevArray ws(cuda::attention_backward_workspace_bytes(c.B, c.Tq, c.H, c.Hkv, c.D) / 4 + 1,
                  false);
      std::vector<std::vector<uint8_t>> runs[2];
      for (auto& r : runs) {
        DevArray dq(in.q.size(), bf16), dk(in.k.size(), bf16), dv(in.v.size(), bf16);
        if (bf16)
          cuda::attention_backward<__nv_bfloat16>(
              dq.as<__nv_bfloat16>(), dk.as<__nv_bfloat16>(), dv.as<__nv_bfloat16>(),
              g.as<__nv_bfloat16>(), q.as<__nv_bfloat16>(), k.as<__nv_bfloat16>(),
              v.as<__nv_bfloat16>(), o.as<__nv_bfloat16>(), l.as<float>(), c.B, c.Tq, c.H, c.Hkv,
              c.D, c.window, ws.ptr, nullptr);
        else
          cuda::attention_backward<float>(dq.as<float>(), dk.as<float>(), dv.as<float>(),
                                          g.as<float>(), q.as<float>(), k.as<float>(),
                                          v.as<float>(), o.as<float>(), l.as<float>(), c.B, c.Tq,
                                          c.H, c.Hkv, c.D, c.window, ws.ptr, nullptr);
        ATTN_CUDA(cudaDeviceSynchronize());
        r = {dq.raw(), dk.raw(), dv.raw()};
      }
      CHECK(runs[0][0] == runs[1][0]);
      CHECK(runs[0][1] == runs[1][1]);
      CHECK(runs[0][2] == runs[1][2]);
    }
}

TEST_CASE("gpu attention rejects unsupported head dims", "[gpu][attention]") {
  gpu_test::require_gpu();
  CHECK_THROWS(cuda::attention_forward<float>(nullptr, nullptr, nullptr, nullptr, nullptr, 1, 4, 4,
                                              2, 2, 48, 4, 0, nullptr));
  CHECK_THROWS(cuda::attention_forward<float>(nullptr, nullptr, nullptr, nullptr, nullptr, 1, 4, 3,
                                              2, 2, 64, 4, 0, nullptr));  // Tq > Tk
}

// ---- cuDNN's fused SDPA (src/backend/cuda/attention_cudnn.cpp), the bf16 training path ----

namespace {

// Grow-only device workspace, like the backend's scratch.
struct GrowBuffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  ~GrowBuffer() { cudaFree(ptr); }
  void* get(size_t n) {
    if (n > bytes) {
      ATTN_CUDA(cudaDeviceSynchronize());
      cudaFree(ptr);
      ptr = nullptr;
      ATTN_CUDA(cudaMalloc(&ptr, n));
      bytes = n;
    }
    return ptr;
  }
};

// One CudnnAttention for the binary (its graphs are cached per shape), on the legacy stream.
cuda::CudnnAttention* cudnn_attention() {
  static std::unique_ptr<cuda::CudnnAttention> a = cuda::CudnnAttention::create(nullptr);
  return a.get();
}
GrowBuffer& cudnn_workspace() {
  static GrowBuffer w;
  return w;
}
cuda::CudnnAttention::Workspace workspace_fn() {
  return [](size_t n) { return cudnn_workspace().get(n); };
}

// Whether the cuDNN cases run: fails the test when no GPU is visible, and when the build has
// cuDNN attention (LMTRAIN_HAVE_CUDNN) but it cannot be used at run time (no libcudnn.so.9, no
// handle), unless LMTRAIN_CUDNN_ATTENTION=0/off turned it off on purpose. A build without cuDNN
// (no cudnn.h or frontend headers at configure time) skips them with a warning: there is no
// cuDNN path to test, and the backend runs our own kernel everywhere.
bool cudnn_expected() {
  gpu_test::require_gpu();
#ifdef LMTRAIN_HAVE_CUDNN
  const char* env = std::getenv("LMTRAIN_CUDNN_ATTENTION");
  if (env && (std::strcmp(env, "0") == 0 || std::strcmp(env, "off") == 0)) {
    WARN("LMTRAIN_CUDNN_ATTENTION=" << env << " turns cuDNN attention off: cuDNN cases skipped");
    return false;
  }
  INFO(
      "this build has cuDNN attention (LMTRAIN_HAVE_CUDNN) but CudnnAttention::create() "
      "returned null: is libcudnn.so.9 installed and loadable? (see the warning logged above; "
      "LMTRAIN_CUDNN_ATTENTION=0 runs the tests without cuDNN)");
  REQUIRE(cudnn_attention() != nullptr);
  return true;
#else
  WARN("this build has no cuDNN attention (LMTRAIN_HAVE_CUDNN undefined): cuDNN cases skipped");
  return false;
#endif
}

// Shapes cuDNN accepted and rejected so far (rejections are legal: the backend then falls back).
int cudnn_accepted = 0, cudnn_rejected = 0;

// cuDNN forward (bf16, q_offset 0) against the CPU on the bf16-rounded inputs. Returns false when
// cuDNN rejected the shape.
bool check_cudnn_forward(const Case& c, uint32_t seed) {
  INFO("cudnn " << c.str());
  REQUIRE(c.bf16);
  REQUIRE(c.Tq == c.Tk);
  Inputs in = make_inputs(c, seed);
  std::vector<float> out(size_t(c.B) * c.Tq * c.H * c.D), lse(size_t(c.B) * c.H * c.Tq);
  CpuBackend cpu;
  cpu.attention_forward(host_tensor(out, {c.B, c.Tq, c.H, c.D}), host_tensor(lse, {c.B, c.H, c.Tq}),
                        host_tensor(in.q, {c.B, c.Tq, c.H, c.D}),
                        host_tensor(in.k, {c.B, c.Tk, c.Hkv, c.D}),
                        host_tensor(in.v, {c.B, c.Tk, c.Hkv, c.D}), c.window, 0);
  DevArray gq(in.q, true), gk(in.k, true), gv(in.v, true);
  DevArray gout(out.size(), true), glse(lse.size(), false);
  if (!cudnn_attention()->forward(gout.ptr, glse.as<float>(), gq.ptr, gk.ptr, gv.ptr,
                                  {c.B, c.Tq, c.H, c.Hkv, c.D, c.window}, workspace_fn())) {
    ++cudnn_rejected;
    std::printf("cuDNN rejected forward %s\n", c.str().c_str());
    return false;
  }
  ++cudnn_accepted;
  ATTN_CUDA(cudaDeviceSynchronize());
  expect_close("cudnn out", gout.download(), out, {c.B, c.Tq, c.H, c.D}, 2e-2, c);
  expect_close("cudnn lse", glse.download(), lse, {c.B, c.H, c.Tq}, 1e-4, c);
  return true;
}

// cuDNN backward from the CPU's out (rounded to bf16) and lse, against the CPU backward.
bool check_cudnn_backward(const Case& c, uint32_t seed) {
  INFO("cudnn " << c.str());
  REQUIRE(c.bf16);
  REQUIRE(c.Tq == c.Tk);
  Inputs in = make_inputs(c, seed);
  const int64_t B = c.B, T = c.Tq, H = c.H, Hkv = c.Hkv, D = c.D;
  std::vector<float> out(size_t(B * T * H * D)), lse(size_t(B * H * T));
  std::vector<float> gout = round_bf16(randn(out.size(), 1.f, seed + 3));
  CpuBackend cpu;
  cpu.attention_forward(host_tensor(out, {B, T, H, D}), host_tensor(lse, {B, H, T}),
                        host_tensor(in.q, {B, T, H, D}), host_tensor(in.k, {B, T, Hkv, D}),
                        host_tensor(in.v, {B, T, Hkv, D}), c.window, 0);
  out = round_bf16(out);
  Grads ref{std::vector<float>(in.q.size()), std::vector<float>(in.k.size()),
            std::vector<float>(in.v.size())};
  cpu.attention_backward(host_tensor(ref.dq, {B, T, H, D}), host_tensor(ref.dk, {B, T, Hkv, D}),
                         host_tensor(ref.dv, {B, T, Hkv, D}), host_tensor(gout, {B, T, H, D}),
                         host_tensor(in.q, {B, T, H, D}), host_tensor(in.k, {B, T, Hkv, D}),
                         host_tensor(in.v, {B, T, Hkv, D}), host_tensor(out, {B, T, H, D}),
                         host_tensor(lse, {B, H, T}), c.window);
  DevArray q(in.q, true), k(in.k, true), v(in.v, true), o(out, true), g(gout, true);
  DevArray l(lse, false);
  DevArray dq(in.q.size(), true), dk(in.k.size(), true), dv(in.v.size(), true);
  if (!cudnn_attention()->backward(dq.ptr, dk.ptr, dv.ptr, g.ptr, q.ptr, k.ptr, v.ptr, o.ptr,
                                   l.as<float>(), {c.B, c.Tq, c.H, c.Hkv, c.D, c.window},
                                   workspace_fn())) {
    ++cudnn_rejected;
    std::printf("cuDNN rejected backward %s\n", c.str().c_str());
    return false;
  }
  ++cudnn_accepted;
  ATTN_CUDA(cudaDeviceSynchronize());
  expect_close("cudnn dq", dq.download(), ref.dq, {B, T, H, D}, 2e-2, c);
  expect_close("cudnn dk", dk.download(), ref.dk, {B, T, Hkv, D}, 2e-2, c);
  expect_close("cudnn dv", dv.download(), ref.dv, {B, T, Hkv, D}, 2e-2, c);
  return true;
}

}  // namespace

TEST_CASE("cudnn attention (bf16) matches the CPU reference", "[gpu][attention][cudnn]") {
  if (!cudnn_expected()) return;
  std::printf("cuDNN attention: %s backward\n",
              cudnn_attention()->deterministic() ? "deterministic" : "nondeterministic");
  uint32_t seed = 5000;
  // Every window < T - 1 is its own graph (a build costs up to a second), so the grid is smaller
  // than the own kernel's; windows T - 1 and beyond share the causal graph.
  for (int D : {64, 128})
    for (auto [H, Hkv] : {std::pair<int, int>{2, 2}, {6, 2}})
      for (int T : {37, 130})
        for (int window : {0, 7, T / 2, T - 2, T, 4 * T}) {
          const Case c{2, T, T, H, Hkv, D, window, 0, true};
          check_cudnn_forward(c, seed++);
          check_cudnn_backward(c, seed++);
        }
  for (int window : {1, 70, 300}) {  // GQA 4:1, a window spanning several tiles
    const Case c{1, 300, 300, 4, 1, 64, window, 0, true};
    check_cudnn_forward(c, seed++);
    check_cudnn_backward(c, seed++);
  }
  // Other head dims: cuDNN may or may not take them (the backend falls back).
  for (int D : {16, 32})
    for (int window : {5, 130}) {
      const Case c{2, 130, 130, 6, 2, D, window, 0, true};
      check_cudnn_forward(c, seed++);
      check_cudnn_backward(c, seed++);
    }
  // The training shape, scaled down in B and T: must be taken.
  for (int window : {64, 255, 256}) {
    const Case c{2, 256, 256, 6, 6, 128, window, 0, true};
    CHECK(check_cudnn_forward(c, seed++));
    CHECK(check_cudnn_backward(c, seed++));
  }
  // d12's and d20's shapes as the model trains them (B 64 and 16 at T 2048, as many kv heads as
  // query heads): v and the gradients are bands of the q|k|v projection and its gradient, q, k,
  // out and dout dense. cuDNN must build their graphs, or training falls back to our kernel on
  // dense copies (test_gpu_bands.cpp checks the values at one sequence of d12).
  for (const auto [B, H] : {std::pair{64, 6}, {16, 10}})
    for (int window : {1024, 2048}) {
      const int64_t band = 3 * int64_t(H) * 128;
      const cuda::AttentionPitches pitch{.v = band, .dq = band, .dk = band, .dv = band};
      const cuda::AttentionShape s{B, 2048, H, H, 128, window, pitch};
      INFO("B " << B << " H " << H << " window " << window);
      CHECK(cudnn_attention()->workspace_bytes(s, false) >= 0);
      CHECK(cudnn_attention()->workspace_bytes(s, true) >= 0);
    }
  std::printf("cuDNN attention: %d graphs accepted, %d rejected\n", cudnn_accepted, cudnn_rejected);
  worst_seen.print("cudnn attention");
}

TEST_CASE("cudnn attention backward determinism", "[gpu][attention][cudnn]") {
  if (!cudnn_expected()) return;
  const Case c{4, 512, 512, 6, 2, 128, 100, 0, true};
  Inputs in = make_inputs(c, 91);
  std::vector<float> gout = randn(in.q.size(), 1.f, 92);
  DevArray q(in.q, true), k(in.k, true), v(in.v, true), g(gout, true);
  DevArray o(in.q.size(), true), l(size_t(c.B) * c.H * c.Tq, false);
  const cuda::AttentionShape s{c.B, c.Tq, c.H, c.Hkv, c.D, c.window};
  REQUIRE(cudnn_attention()->forward(o.ptr, l.as<float>(), q.ptr, k.ptr, v.ptr, s, workspace_fn()));
  std::vector<std::vector<uint8_t>> runs[2];
  for (auto& r : runs) {
    DevArray dq(in.q.size(), true), dk(in.k.size(), true), dv(in.v.size(), true);
    REQUIRE(cudnn_attention()->backward(dq.ptr, dk.ptr, dv.ptr, g.ptr, q.ptr, k.ptr, v.ptr, o.ptr,
                                        l.as<float>(), s, workspace_fn()));
    ATTN_CUDA(cudaDeviceSynchronize());
    r = {dq.raw(), dk.raw(), dv.raw()};
  }
  const bool same = runs[0] == runs[1];
  std::printf("cuDNN attention backward (%s mode): two runs %s\n",
              cudnn_attention()->deterministic() ? "deterministic" : "nondeterministic",
              same ? "bit-identical" : "DIFFER");
  if (cudnn_attention()->deterministic()) CHECK(same);
}

// ---- the backend's attention scratch (CudaBackend::attention_scratch_bytes) ----

namespace {

// cuDNN's version at run time (9.19.0 reads 91900) from the library the backend loaded, or 0
// when it cannot be read.
size_t cudnn_runtime_version() {
#ifdef LMTRAIN_HAVE_CUDNN
  for (const char* lib : {"libcudnn.so.9", "libcudnn.so"}) {
    void* handle = dlopen(lib, RTLD_NOW | RTLD_NOLOAD);  // only if already loaded
    if (!handle) continue;
    size_t (*get_version)() = nullptr;
    void* symbol = dlsym(handle, "cudnnGetVersion");
    static_assert(sizeof(symbol) == sizeof(get_version));
    std::memcpy(&get_version, &symbol, sizeof(symbol));
    const size_t version = get_version ? get_version() : 0;
    dlclose(handle);
    return version;
  }
#endif
  return 0;
}

// A fresh device buffer of n elements of `dtype` holding `host` (bf16 rounded), or poison.
Tensor backend_array(Backend& b, std::vector<Buffer>& keep, Shape shape, DType dtype,
                     const std::vector<float>& host) {
  keep.push_back(b.allocate(size_t(shape.numel()) * dtype_size(dtype)));
  const Tensor t = keep.back().tensor(shape, dtype);
  std::vector<float> values = host.empty() ? std::vector<float>(size_t(shape.numel()), NAN) : host;
  if (dtype == DType::bf16) {
    std::vector<uint16_t> bits(values.size());
    for (size_t i = 0; i < bits.size(); ++i) bits[i] = bf16_bits(values[i]);
    b.upload(t, bits.data());
  } else {
    b.upload(t, values.data());
  }
  return t;
}

}  // namespace

// Gpt counts attention_scratch_bytes() before a batch runs (docs/CUDA.md, "Activation memory"):
// the ops must then take no more than that, and in bf16 on Hopper with cuDNN's deterministic
// backward the figure must include the materialised dP (B·H·T²·2 bytes, cuDNN < 9.25; the
// frontend pads T to 64, which T = 256 already is). A fresh backend starts with no scratch, and
// its scratch only grows (the old one freed before the new one is allocated), so the bytes in use
// after the ops, less those before, are the scratch they took, and the peak during them is at
// most the bytes before plus the largest scratch asked for.
TEST_CASE("gpu attention takes no more scratch than attention_scratch_bytes reports",
          "[gpu][attention][memory]") {
  gpu_test::require_gpu();
  const int B = 2, T = 256, H = 6, Hkv = 2, D = 128, window = 64;
  int device = 0;
  ATTN_CUDA(cudaGetDevice(&device));
  cudaDeviceProp prop{};
  ATTN_CUDA(cudaGetDeviceProperties(&prop, device));
  const size_t dp_bytes = size_t(B) * H * T * T * 2;
  for (DType act : {DType::f32, DType::bf16}) {
    const bool bf16 = act == DType::bf16;
    const Case c{B, T, T, H, Hkv, D, window, 0, bf16};
    INFO(c.str());
    CudaBackend b(act);
    const size_t reported = b.attention_scratch_bytes(B, T, H, Hkv, D, window);
    std::vector<Buffer> keep;
    const Shape qs{B, T, H, D}, kvs{B, T, Hkv, D};
    const Tensor q = backend_array(b, keep, qs, act, randn(size_t(qs.numel()), 1.6f, 11));
    const Tensor k = backend_array(b, keep, kvs, act, randn(size_t(kvs.numel()), 1.f, 12));
    const Tensor v = backend_array(b, keep, kvs, act, randn(size_t(kvs.numel()), 1.f, 13));
    const Tensor dout = backend_array(b, keep, qs, act, randn(size_t(qs.numel()), 1.f, 14));
    const Tensor out = backend_array(b, keep, qs, act, {});
    const Tensor dq = backend_array(b, keep, qs, act, {});
    const Tensor dk = backend_array(b, keep, kvs, act, {});
    const Tensor dv = backend_array(b, keep, kvs, act, {});
    const Tensor lse = backend_array(b, keep, {B, H, T}, DType::f32, {});
    b.synchronize();
    const size_t in_use_before = b.bytes_in_use(), peak_before = b.peak_bytes();
    b.attention_forward(out, lse, q, k, v, window, 0);
    b.attention_backward(dq, dk, dv, dout, q, k, v, out, lse, window);
    b.synchronize();
    const size_t taken = b.bytes_in_use() - in_use_before, peak = b.peak_bytes();
    std::printf(
        "[%s] attention scratch B=%d T=%d H=%d Hkv=%d D=%d window=%d: reported %zu bytes, taken "
        "%zu, peak %zu above the bytes before (%zu), B*H*T*T*2 = %zu\n",
        bf16 ? "bf16" : "fp32", B, T, H, Hkv, D, window, reported, taken,
        peak > in_use_before ? peak - in_use_before : 0, in_use_before, dp_bytes);
    CHECK(taken <= reported);
    CHECK(peak <= std::max(peak_before, in_use_before + reported));
    // The ops ran: no poison left in the outputs.
    for (const Tensor& t : {out, dq, dk, dv}) {
      const std::vector<float> host = gpu_test::fetch(b, t);
      CHECK(std::all_of(host.begin(), host.end(), [](float x) { return std::isfinite(x); }));
    }
    if (!bf16) continue;
    const size_t version = cudnn_runtime_version();
    // The bound holds where cuDNN ran this shape (it may turn a graph down, and the backend then
    // runs its own kernel, legally), deterministically, on Hopper, with cuDNN < 9.25, and with
    // the frontend's dP-workspace limit left at its default.
    const cuda::AttentionShape shape{B, T, H, Hkv, D, window};
    const bool cudnn = cudnn_attention() != nullptr && cudnn_attention()->deterministic() &&
                       cudnn_attention()->workspace_bytes(shape, false) >= 0 &&
                       cudnn_attention()->workspace_bytes(shape, true) >= 0 &&
                       std::getenv("CUDNN_FRONTEND_ATTN_DP_WORKSPACE_LIMIT") == nullptr;
    if (cudnn && prop.major == 9 && version > 0 && version < 92500) {
      INFO("compute capability " << prop.major << "." << prop.minor << ", cuDNN " << version
                                 << ", deterministic backward: dP is materialised");
      CHECK(reported >= dp_bytes);
      CHECK(taken >= dp_bytes);
    } else {
      std::printf(
          "attention scratch: no lower bound checked (cuDNN attention %s, compute capability "
          "%d.%d, cuDNN version %zu; the bound holds for deterministic cuDNN < 9.25 on 9.x)\n",
          cudnn_attention() == nullptr ? "off"
          : cudnn                      ? "deterministic"
                                       : "nondeterministic",
          prop.major, prop.minor, version);
    }
  }
}

// Not a check: times forward + backward of the d12 benchmark's attention (B 64, T 2048, 6 heads
// of 128, windows 1024 and 2048) on cuDNN and on our own kernel. Hidden: run with "[timing]".
TEST_CASE("attention timing at the d12 shape", "[.][timing]") {
  gpu_test::require_gpu();
  const int B = 64, T = 2048, H = 6, Hkv = 6, D = 128;
  const size_t nq = size_t(B) * T * H * D;
  std::vector<float> host = randn(nq, 1.f, 7);
  DevArray q(host, true), k(host, true), v(host, true), g(host, true), o(nq, true);
  DevArray dq(nq, true), dk(nq, true), dv(nq, true), l(size_t(B) * H * T, false);
  DevArray ws(cuda::attention_backward_workspace_bytes(B, T, H, Hkv, D) / 4 + 1, false);
  cudaEvent_t e0, e1, e2;
  ATTN_CUDA(cudaEventCreate(&e0));
  ATTN_CUDA(cudaEventCreate(&e1));
  ATTN_CUDA(cudaEventCreate(&e2));
  for (int window : {1024, 2048})
    for (int impl = 0; impl < 2; ++impl) {
      if (impl == 1 && !cudnn_attention()) continue;
      const cuda::AttentionShape s{B, T, H, Hkv, D, window};
      auto fwd = [&] {
        if (impl == 0)
          cuda::attention_forward<__nv_bfloat16>(
              o.as<__nv_bfloat16>(), l.as<float>(), q.as<__nv_bfloat16>(), k.as<__nv_bfloat16>(),
              v.as<__nv_bfloat16>(), B, T, T, H, Hkv, D, window, 0, nullptr);
        else
          REQUIRE(cudnn_attention()->forward(o.ptr, l.as<float>(), q.ptr, k.ptr, v.ptr, s,
                                             workspace_fn()));
      };
      auto bwd = [&] {
        if (impl == 0)
          cuda::attention_backward<__nv_bfloat16>(
              dq.as<__nv_bfloat16>(), dk.as<__nv_bfloat16>(), dv.as<__nv_bfloat16>(),
              g.as<__nv_bfloat16>(), q.as<__nv_bfloat16>(), k.as<__nv_bfloat16>(),
              v.as<__nv_bfloat16>(), o.as<__nv_bfloat16>(), l.as<float>(), B, T, H, Hkv, D, window,
              ws.ptr, nullptr);
        else
          REQUIRE(cudnn_attention()->backward(dq.ptr, dk.ptr, dv.ptr, g.ptr, q.ptr, k.ptr, v.ptr,
                                              o.ptr, l.as<float>(), s, workspace_fn()));
      };
      fwd(), bwd();  // warm-up (graph build)
      ATTN_CUDA(cudaDeviceSynchronize());
      const int reps = impl == 0 ? 2 : 10;
      float f_ms = 0, b_ms = 0;
      for (int r = 0; r < reps; ++r) {
        ATTN_CUDA(cudaEventRecord(e0));
        fwd();
        ATTN_CUDA(cudaEventRecord(e1));
        bwd();
        ATTN_CUDA(cudaEventRecord(e2));
        ATTN_CUDA(cudaEventSynchronize(e2));
        float a = 0, b = 0;
        ATTN_CUDA(cudaEventElapsedTime(&a, e0, e1));
        ATTN_CUDA(cudaEventElapsedTime(&b, e1, e2));
        f_ms += a / reps, b_ms += b / reps;
      }
      // Causal band FLOPs: 4 B H D per visible (query, key) pair forward, 2.5x that backward.
      double pairs = 0;
      for (int i = 0; i < T; ++i) pairs += std::min(i, window) + 1;
      const double fflop = 4.0 * B * H * D * pairs;
      std::printf(
          "timing %-6s window %4d: forward %7.2f ms (%5.0f TFLOP/s), backward %7.2f ms "
          "(%5.0f TFLOP/s)\n",
          impl ? "cudnn" : "own", window, f_ms, fflop / f_ms * 1e-9, b_ms,
          2.5 * fflop / b_ms * 1e-9);
    }
  cudaEventDestroy(e0), cudaEventDestroy(e1), cudaEventDestroy(e2);
}
