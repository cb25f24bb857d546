// A harness for op-level GPU tests: named host arrays are uploaded to a backend, the op runs on
// them, and every array is downloaded again, so in-place and accumulating outputs compare the
// same way as overwritten ones. The CPU backend (fp32) gives the reference; the GPU runs twice
// to check determinism.
#pragma once

#include <cstdlib>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "backend/cpu/cpu_backend.h"
#include "gpu_support.h"

namespace gpu_test {

using lmtrain::Backend;
using lmtrain::Shape;
using lmtrain::Tensor;

// act: the backend's activation dtype; f32: always f32 (statistics, parameters, their
// gradients, optimizer state); i32: token ids and targets.
enum class Kind { act, f32, i32 };

// Fresh random inputs on every run; LMTRAIN_GPU_TEST_SEED reproduces a run (the seed is printed).
inline std::mt19937& rng() {
  static std::mt19937 gen = [] {
    const char* env = std::getenv("LMTRAIN_GPU_TEST_SEED");
    const unsigned seed = env ? unsigned(std::strtoul(env, nullptr, 10)) : std::random_device{}();
    std::printf("gpu tests: random seed %u (set LMTRAIN_GPU_TEST_SEED=%u to repeat)\n", seed, seed);
    return std::mt19937(seed);
  }();
  return gen;
}

inline std::vector<float> randn(size_t n, float scale = 1.f) {
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng());
  return v;
}

inline std::vector<float> uniform(size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng());
  return v;
}

// Outputs that the op overwrites start as NaN on both backends: an element the GPU fails to
// write then shows up as a NaN mismatch.
inline std::vector<float> poison(size_t n) { return std::vector<float>(n, NAN); }

struct Args {
  std::map<std::string, Tensor> tensors;
  Tensor operator[](const std::string& name) const { return tensors.at(name); }
};
using Op = std::function<void(Backend&, const Args&)>;
using Results = std::map<std::string, std::vector<float>>;

// An output to compare, with its tolerance in each mode (see docs/CUDA.md for the reasoning).
struct Expect {
  std::string name;
  double fp32_tol, bf16_tol;
};

class OpCase {
 public:
  explicit OpCase(DType act) : act_(act) {}

  // Activation-dtype arrays are rounded to bf16 in bf16 mode, so the CPU reference computes on
  // exactly the values the GPU sees.
  OpCase& add(const std::string& name, Shape shape, Kind kind, std::vector<float> values) {
    REQUIRE(size_t(shape.numel()) == values.size());
    if (kind == Kind::act && act_ == DType::bf16)
      for (float& x : values) x = round_bf16(x);
    args_.push_back({name, shape, kind, std::move(values), {}});
    return *this;
  }
  OpCase& add_ids(const std::string& name, Shape shape, std::vector<int32_t> ids) {
    REQUIRE(size_t(shape.numel()) == ids.size());
    args_.push_back({name, shape, Kind::i32, {}, std::move(ids)});
    return *this;
  }

  // Uploads every array to `b`, runs the op, downloads every array as floats.
  Results run(Backend& b, const Op& op) const {
    std::vector<lmtrain::Buffer> memory;
    Args args;
    for (const Arg& a : args_) {
      const DType dtype = a.kind == Kind::i32   ? DType::i32
                          : a.kind == Kind::f32 ? DType::f32
                                                : b.activation_dtype();
      memory.push_back(b.allocate(size_t(a.shape.numel()) * lmtrain::dtype_size(dtype)));
      const Tensor t = memory.back().tensor(a.shape, dtype);
      args.tensors[a.name] = t;
      if (dtype == DType::i32) {
        b.upload(t, a.ids.data());
      } else if (dtype == DType::bf16) {
        std::vector<uint16_t> bits(a.values.size());
        for (size_t i = 0; i < bits.size(); ++i) bits[i] = bf16_bits(a.values[i]);
        b.upload(t, bits.data());
      } else {
        b.upload(t, a.values.data());
      }
    }
    op(b, args);
    Results out;
    for (const Arg& a : args_) {
      const Tensor t = args[a.name];
      // Token ids are inputs only: their slot stays zeros.
      out[a.name] = t.dtype == DType::i32 ? std::vector<float>(size_t(t.numel())) : fetch(b, t);
    }
    return out;
  }

  // The CPU reference against the GPU in this case's mode, plus a second GPU run that must be
  // bit-identical to the first.
  Results check(const std::string& label, const Op& op, const std::vector<Expect>& outputs) const {
    lmtrain::CpuBackend cpu;
    const Results want = run(cpu, op);
    Backend& gpu = backend(act_);
    const Results got = run(gpu, op);
    const Results again = run(gpu, op);
    for (const Expect& e : outputs) {
      const std::string what = std::string("[") + mode_name(act_) + "] " + label + " " + e.name;
      compare(what, got.at(e.name), want.at(e.name), act_ == DType::bf16 ? e.bf16_tol : e.fp32_tol);
      require_identical(what, got.at(e.name), again.at(e.name));
    }
    return got;
  }

 private:
  struct Arg {
    std::string name;
    Shape shape;
    Kind kind;
    std::vector<float> values;
    std::vector<int32_t> ids;
  };
  DType act_;
  std::vector<Arg> args_;
};

}  // namespace gpu_test
