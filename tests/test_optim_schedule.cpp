// The step-dependent multipliers (src/optim/schedule.h) against values worked out by hand from
// their definitions, and gradient clipping by the global norm.
#include <catch2/catch.hpp>
#include <cmath>
#include <random>

#include "backend/cpu/cpu_backend.h"
#include "dist/communicator.h"
#include "model/gpt.h"
#include "optim/optimizer.h"
#include "optim/schedule.h"
#include "test_support.h"

using namespace lmtrain;

namespace {

std::vector<double> lr_table(int n, double warmup, double warmdown, double final_frac) {
  ScheduleConfig s;
  s.warmup_ratio = warmup;
  s.warmdown_ratio = warmdown;
  s.final_lr_frac = final_frac;
  std::vector<double> out;
  for (int step = 0; step < n; ++step) out.push_back(lr_multiplier(step, n, s));
  return out;
}

void check_table(const std::vector<double>& got, const std::vector<double>& want) {
  REQUIRE(got.size() == want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    INFO("step " << i);
    CHECK(got[i] == Approx(want[i]).epsilon(1e-12));
  }
}

}  // namespace

TEST_CASE("the LR multiplier warms up, holds, then warms down to final_lr_frac", "[optim]") {
  // 10 steps: warmup round(2.0) = 2 steps, warmdown round(3.0) = 3 steps.
  check_table(lr_table(10, 0.2, 0.3, 0.1),
              {0.5, 1, 1, 1, 1, 1, 1, 1, 2.0 / 3 + 0.1 / 3, 1.0 / 3 + 0.2 / 3});
  // Neither: flat.
  check_table(lr_table(4, 0, 0, 0.5), {1, 1, 1, 1});
  // Warmup and warmdown meet: the warmup wins while it lasts.
  check_table(lr_table(4, 0.5, 0.5, 0.0), {0.5, 1, 1, 0.5});
}

TEST_CASE("the LR schedule's step counts round half to even, as the reference's round()",
          "[optim]") {
  // 0.5 * 5 = 2.5 -> 2 warmup steps; 0.5 * 7 = 3.5 -> 4.
  check_table(lr_table(5, 0.5, 0, 0), {0.5, 1, 1, 1, 1});
  check_table(lr_table(7, 0.5, 0, 0), {0.25, 0.5, 0.75, 1, 1, 1, 1});
  // Warmdown 0.5 * 5 = 2.5 -> 2 steps: steps 0..3 full, step 4 at progress 1/2.
  check_table(lr_table(5, 0, 0.5, 0.2), {1, 1, 1, 1, 0.5 + 0.5 * 0.2});
}

TEST_CASE("Muon momentum warms up linearly and its weight decay scales with depth", "[optim]") {
  MuonConfig m;  // 0.85 -> 0.95 over 300 steps; weight decay 0.1 at depth 12, exponent 2
  CHECK(muon_momentum(0, m) == Approx(0.85));
  CHECK(muon_momentum(150, m) == Approx(0.90));
  CHECK(muon_momentum(300, m) == Approx(0.95));
  CHECK(muon_momentum(5000, m) == Approx(0.95));
  m.momentum_warmup_steps = 0;
  CHECK(muon_momentum(0, m) == Approx(0.95));

  CHECK(muon_weight_decay(0, 100, 12, m) == Approx(0.1));
  CHECK(muon_weight_decay(0, 100, 6, m) == Approx(0.4));     // 0.1 * (12 / 6)^2
  CHECK(muon_weight_decay(50, 100, 6, m) == Approx(0.2));    // halfway to 0
  CHECK(muon_weight_decay(0, 100, 24, m) == Approx(0.025));  // 0.1 * (12 / 24)^2
  CHECK(muon_weight_decay(100, 100, 12, m) == Approx(0.0).margin(1e-15));
  m.weight_decay_depth_exponent = 1;
  CHECK(muon_weight_decay(0, 100, 6, m) == Approx(0.2));
}

// Clipping scales every gradient by clip / norm before the update. Adam's and NorMuon's first
// updates do not depend on the gradients' scale, so the test reads the first moments
// (exp_avg = (1 - beta1) g after one step, NorMuon's momentum likewise linear in g): with
// clipping they are the unclipped run's times clip / norm, and equal to them when clip >= norm.
TEST_CASE("gradient clipping scales the step's gradients by clip / global norm", "[optim]") {
  CpuBackend backend;
  Config config = test_support::golden_config();
  const GptShape shape = GptShape::from(config.model, config.model.vocab_size);
  std::mt19937 rng(21);
  std::normal_distribution<float> dist(0.f, 1.f);

  // One optimizer step on fixed random gradients; returns the step's metrics and the state.
  std::vector<float> grads;
  double norm_sq = 0;
  auto run = [&](double clip, std::vector<std::vector<float>>& state) {
    Gpt model(backend, shape, config.batch.device_batch);
    model.init_weights(1);
    if (grads.empty()) {
      grads.resize(size_t(model.grads().numel()));  // the alignment gaps stay zero
      for (const ParamSpec& spec : model.table().specs) {
        for (int64_t i = 0; i < spec.shape.numel(); ++i) {
          float& g = grads[spec.offset + size_t(i)];
          g = dist(rng);
          norm_sq += double(g) * g;
        }
      }
    }
    backend.upload(model.grads(), grads.data());
    dist::LocalCommunicator comm(backend);
    Optimizer optimizer(model, config.optim, double(config.batch.total_batch_tokens),
                        config.schedule.num_iterations, comm);
    nlohmann::json metrics = optimizer.step(0, 1.0, clip);
    state.clear();
    for (const StateTensor& st : optimizer.state()) {
      if (st.name.rfind("exp_avg.", 0) == 0 || st.name.rfind("momentum_buffer.", 0) == 0)
        state.push_back(test_support::download(backend, st.tensor));
    }
    return metrics;
  };
  std::vector<std::vector<float>> plain, clipped, loose;
  run(0.0, plain);
  const double norm = std::sqrt(norm_sq);
  const nlohmann::json m = run(norm / 3, clipped);
  CHECK(m["grad_norm"].get<double>() == Approx(norm).epsilon(1e-5));  // before clipping
  run(norm * 1.5, loose);
  REQUIRE(!plain.empty());
  REQUIRE(clipped.size() == plain.size());
  REQUIRE(loose.size() == plain.size());
  for (size_t t = 0; t < plain.size(); ++t) {
    INFO("state tensor " << t);
    std::vector<float> want(plain[t].size());
    for (size_t i = 0; i < want.size(); ++i) want[i] = plain[t][i] / 3.f;
    CHECK(test_support::max_relative_error(clipped[t], want) < 1e-5);
    CHECK(loose[t] == plain[t]);
  }
}
