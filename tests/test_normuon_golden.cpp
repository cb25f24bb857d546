// NorMuon and its variants against the PyTorch reference (tests/reference/normuon_reference.py):
// stacks of tall, wide and square matrices under every variant, and the tiny GPT trained with
// each optimizer preset.
#include <catch2/catch.hpp>
#include <cmath>
#include <map>

#include "backend/cpu/cpu_backend.h"
#include "io/safetensors.h"
#include "model/gpt.h"
#include "normuon_stacks_golden.h"
#include "optim/normuon.h"
#include "optim/optimizer.h"
#include "optim/schedule.h"
#include "test_support.h"

using namespace lmtrain;
using nlohmann::json;

using normuon_golden::read_json;

TEST_CASE("every Muon variant matches the reference on stacks of matrices", "[golden][normuon]") {
  const normuon_golden::Stacks golden;
  const json& meta = golden.meta;
  CpuBackend backend;
  // The golden holds every switch in every value it can take (and an empty file fails here).
  REQUIRE(meta["variants"].size() == 20);
  const std::map<std::string, std::vector<json>> values = {
      {"momentum", {"lerp", "classic"}},
      {"nesterov", {true, false}},
      {"orthogonalizer", {"polar_express", "newton_schulz5", "none"}},
      {"ortho_steps", {3, 4, 5, 7}},
      {"lr_scale", {"rectangular", "moonshot", "sqrt_max", "none"}},
      {"second_moment", {true, false}},
      {"beta2", {0.95, 0.9}},
      {"weight_decay_mode", {"cautious", "decoupled", "none"}},
      {"weight_decay_reference_depth", {12, 6}}};
  for (const auto& [key, wanted] : values) {
    for (const json& value : wanted) {
      bool found = false;
      for (const auto& [variant, block] : meta["variants"].items()) found |= block[key] == value;
      INFO("optim.muon." << key << " = " << value.dump());
      CHECK(found);
    }
  }

  for (const auto& [variant, muon_block] : meta["variants"].items()) {
    DYNAMIC_SECTION("variant " << variant) {
      const Config config =
          parse_config({{"optim", {{"muon", muon_block}}}}, "normuon_stacks.json");
      normuon_golden::Run run(golden, backend, config.optim.muon);
      const int steps = golden.steps();
      for (int step = 0; step < steps; ++step) {
        run.upload_grads(golden, backend, step);
        json metrics;
        run.muon->step(step, steps, golden.lr(step), metrics);
        for (size_t i = 0; i < 3; ++i) {
          INFO(golden.names[i] << " after step " << step + 1);
          auto want = golden.params_after(variant, i, step + 1);
          CHECK(test_support::max_relative_error(test_support::download(backend, run.params[i]),
                                                 want) < 1e-5);
        }
      }
      for (const StateTensor& st : run.muon->state()) {
        std::string state;
        const auto want = golden.state(variant, st.name, st.tensor.numel(), state);
        INFO(st.name);
        CHECK(test_support::max_relative_error(test_support::download(backend, st.tensor), want) <
              1e-5);
      }
    }
  }
}

TEST_CASE("the tiny GPT trained with each optimizer preset matches the reference",
          "[golden][normuon]") {
  const json meta = read_json("tests/golden/normuon_gpt.json");
  auto file =
      SafetensorsFile::open(test_support::source_path("tests/golden/normuon_gpt.safetensors"));
  auto inputs =
      SafetensorsFile::open(test_support::source_path("tests/golden/gpt_tiny.safetensors"));
  std::vector<int32_t> tokens(32), targets(32);
  inputs.read("tokens", tokens.data(), tokens.size() * sizeof(int32_t));
  inputs.read("targets", targets.data(), targets.size() * sizeof(int32_t));

  for (const auto& [preset, spec] : meta["presets"].items()) {
    DYNAMIC_SECTION("preset " << preset) {
      const json document = {{"model", meta["model"]},
                             {"batch", meta["batch"]},
                             {"schedule", meta["schedule"]},
                             {"optim", spec["optim"]}};
      const Config c = parse_config(document, test_support::source_path("configs/golden.json"));
      CpuBackend backend;
      const GptShape shape = GptShape::from(c.model, c.model.vocab_size);
      Gpt model(backend, shape, c.batch.device_batch);
      for (const auto& p : model.table().specs) {
        backend.upload(model.param(p), inputs.read_f32("param." + p.name).data());
      }
      model.refresh_weights();
      const int steps = c.schedule.num_iterations;
      dist::LocalCommunicator comm(backend);
      Optimizer optimizer(model, c.optim, double(c.batch.total_batch_tokens), steps, comm);
      // Elements whose cautious-decay mask sits within rounding of zero in the reference may
      // legitimately flip (how they round depends on the compiler's contractions into FMAs); the
      // generator lists them with the jump a flip makes (lr_eff * wd * |p|). A flip's knock-on
      // through later gradients has no bound, so with cautious decay every step starts from the
      // reference's params of the step before (the golden holds them), and a flip can move only
      // its own element at its own step. The optimizer's state (momentum, second moment) does
      // not depend on the decisions.
      const json at_risk = spec.value("cautious_at_risk", json::array());
      const bool restart_each_step = spec.contains("cautious_at_risk");
      auto check_params = [&](int step) {
        std::map<std::string, std::map<int64_t, double>> slack;
        for (const auto& r : at_risk)  // the decisions of this step (0-based in the list)
          if (r["step"].get<int>() == step - 1)
            slack[r["param"].get<std::string>()][r["index"].get<int64_t>()] +=
                r["jump"].get<double>();
        for (const auto& p : model.table().specs) {
          INFO(preset << " step " << step << " " << p.name);
          const auto got = test_support::download(backend, model.param(p));
          const auto want = file.read_f32(fmt::format("{}.step{}.{}", preset, step, p.name));
          REQUIRE(got.size() == want.size());
          double scale = 0, worst = 0;
          for (float w : want) scale = std::max(scale, std::abs(double(w)));
          for (size_t i = 0; i < got.size(); ++i) {
            const auto it = slack[p.name].find(int64_t(i));
            const double allowed = it == slack[p.name].end() ? 0.0 : it->second;
            worst = std::max(worst, std::abs(double(got[i]) - want[i]) - allowed);
          }
          CHECK(worst < 2e-5 * scale);
          if (restart_each_step) backend.upload(model.param(p), want.data());
        }
        if (restart_each_step) model.refresh_weights();
      };
      for (int step = 0; step < steps; ++step) {
        model.zero_grads();
        Gpt::Loss loss = model.forward(tokens, targets, true);
        const double want = file.read_f32(fmt::format("{}.step{}.loss", preset, step + 1))[0];
        INFO("step " << step + 1 << ": loss " << loss.sum / loss.count << ", reference " << want);
        CHECK(std::abs(loss.sum / loss.count - want) < 1e-5 * want);
        model.backward();
        optimizer.step(step, lr_multiplier(step, steps, c.schedule));
        if (restart_each_step || step + 1 == steps) check_params(step + 1);
      }
    }
  }
}
