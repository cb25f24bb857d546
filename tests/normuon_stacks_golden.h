// The NorMuon stacks golden (tests/golden/normuon_stacks.*, from
// tests/reference/make_golden_normuon.py), as the CPU test (test_normuon_golden.cpp) and the GPU
// test (gpu/test_gpu_normuon.cpp) read it: three stacks of tall, wide and square matrices, their
// gradients for every step and, per variant, the parameters after each step and the final state.
#pragma once

#include <catch2/catch.hpp>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "backend/tensor_plan.h"
#include "io/safetensors.h"
#include "optim/normuon.h"
#include "test_support.h"

namespace normuon_golden {

using nlohmann::json;

inline json read_json(const std::string& relative) {
  std::ifstream in(lmtrain::test_support::source_path(relative));
  return json::parse(in);
}

struct Stacks {
  json meta = read_json("tests/golden/normuon_stacks.json");
  lmtrain::SafetensorsFile file = lmtrain::SafetensorsFile::open(
      lmtrain::test_support::source_path("tests/golden/normuon_stacks.safetensors"));
  std::vector<std::string> names = {"tall", "wide", "square"};

  int steps() const { return meta["schedule"]["num_iterations"]; }
  // The learning rate of 0-based step `step`: the golden's lr times the schedule's multiplier.
  double lr(int step) const {
    return meta["lr"].get<double>() * meta["schedule"]["lrm"][step].get<double>();
  }
  // Stack i's parameters after 1-based step `step` under `variant`.
  std::vector<float> params_after(const std::string& variant, size_t i, int step) const {
    return file.read_f32(fmt::format("{}.{}.param{}", variant, names[i], step));
  }
  // The golden value of the state tensor `name` ("<state>.<stack>.<k>", n elements): matrix k of
  // the stored whole stack. `state` gets the state's kind (momentum_buffer, second_moment).
  std::vector<float> state(const std::string& variant, const std::string& name, int64_t n,
                           std::string& state) const {
    const auto state_end = name.find('.');
    state = name.substr(0, state_end);
    const std::string matrix = name.substr(state_end + 1);
    const std::string stack = matrix.substr(0, matrix.find('.'));
    const int k = std::stoi(matrix.substr(matrix.find('.') + 1));
    const std::string key = fmt::format("{}.{}.{}", variant, stack, state);
    INFO(key);
    REQUIRE(file.contains(key));
    const std::vector<float> whole = file.read_f32(key);
    REQUIRE(int64_t(whole.size()) >= (k + 1) * n);
    return {whole.begin() + k * n, whole.begin() + (k + 1) * n};
  }
};

// One variant on a backend: the stacks' parameters (from param0) and gradients, and the optimizer.
struct Run {
  std::vector<lmtrain::Tensor> params = std::vector<lmtrain::Tensor>(3),
                               grads = std::vector<lmtrain::Tensor>(3);
  std::vector<std::vector<float>> initial;
  std::vector<lmtrain::MuonStackSpec> specs;
  lmtrain::Buffer memory;
  std::unique_ptr<lmtrain::NorMuon> muon;

  Run(const Stacks& golden, lmtrain::Backend& backend, const lmtrain::MuonConfig& config) {
    lmtrain::TensorPlan plan;
    for (size_t i = 0; i < 3; ++i) {
      const auto& dims = golden.meta["stacks"][golden.names[i]];
      const lmtrain::Shape shape{dims[0].get<int64_t>(), dims[1].get<int64_t>(),
                                 dims[2].get<int64_t>()};
      plan.add(params[i], shape, lmtrain::DType::f32);
      plan.add(grads[i], shape, lmtrain::DType::f32);
    }
    memory = plan.allocate(backend);
    for (size_t i = 0; i < 3; ++i) {
      initial.push_back(golden.file.read_f32(golden.names[i] + ".param0"));
      backend.upload(params[i], initial[i].data());
      specs.push_back(
          {params[i], grads[i],
           golden.meta["param_names"][golden.names[i]].get<std::vector<std::string>>()});
    }
    muon =
        std::make_unique<lmtrain::NorMuon>(backend, specs, config, golden.meta["depth"].get<int>());
  }

  // The gradients of 0-based step `step`, from the file.
  void upload_grads(const Stacks& golden, lmtrain::Backend& backend, int step) {
    for (size_t i = 0; i < 3; ++i) {
      backend.upload(
          grads[i],
          golden.file.read_f32(fmt::format("{}.grad{}", golden.names[i], step + 1)).data());
    }
  }
};

}  // namespace normuon_golden
