#include "train/plan.h"

#include <cmath>
#include <limits>
#include <string_view>
#include <vector>

namespace lmtrain {

TrainingPlan make_plan(const Config& c, const GptShape& shape, int world,
                       const config::Source& source, bool require_horizon) {
  TrainingPlan p;
  p.tokens_per_micro_step = int64_t(c.batch.device_batch) * shape.seq_len * world;
  p.batch_tokens =
      c.batch.total_batch_tokens == -1 ? p.tokens_per_micro_step : c.batch.total_batch_tokens;
  check(p.batch_tokens % p.tokens_per_micro_step == 0,
        "{}: batch.total_batch_tokens: {} is not a multiple of device_batch {} x sequence_len {} x "
        "ranks {} = {}",
        source.at({"batch.total_batch_tokens", "batch.device_batch", "model.sequence_len"}),
        p.batch_tokens, c.batch.device_batch, shape.seq_len, world, p.tokens_per_micro_step);
  p.grad_accum = int(p.batch_tokens / p.tokens_per_micro_step);
  p.flops_per_token = shape.flops_per_token();
  p.scaling_params = count_params(ParamTable(shape)).scaling();

  const auto& s = c.schedule;
  // The keys the horizon comes from: an error about it names the --set of any of them. The
  // batch's tokens come from the device batch only when total_batch_tokens is -1; the budgets
  // divide by the model's FLOPs or parameters.
  std::vector<std::string_view> horizon_keys = {"schedule.num_iterations", "schedule.target_flops",
                                                "schedule.target_param_data_ratio",
                                                "batch.total_batch_tokens"};
  if (c.batch.total_batch_tokens == -1)
    horizon_keys.insert(horizon_keys.end(), {"batch.device_batch", "model.sequence_len"});
  if (s.num_iterations <= 0) horizon_keys.push_back("model");
  const std::string horizon_source = source.at(horizon_keys);
  // A horizon from a budget, rounded to whole steps; one past int's range is refused, not wrapped.
  auto steps = [&](double exact, const char* key) {
    const double rounded = std::nearbyint(exact);
    check(rounded <= double(std::numeric_limits<int>::max()),
          "{}: schedule.{}: the horizon comes to {:.3g} steps, more than a run can count; lower "
          "the budget",
          horizon_source, key, rounded);
    return int(rounded);
  };
  if (s.num_iterations > 0) {
    p.num_iterations = s.num_iterations;
  } else if (s.target_flops > 0) {
    p.num_iterations = steps(s.target_flops / (p.flops_per_token * p.batch_tokens), "target_flops");
  } else if (s.target_param_data_ratio > 0) {
    p.num_iterations = steps(s.target_param_data_ratio * double(p.scaling_params) / p.batch_tokens,
                             "target_param_data_ratio");
  } else if (require_horizon) {
    fail("{}: schedule: set one of num_iterations, target_flops or target_param_data_ratio",
         source.at({"schedule.num_iterations", "schedule.target_flops",
                    "schedule.target_param_data_ratio"}));
  }
  if (require_horizon) {
    check(p.num_iterations >= 1, "{}: schedule: the horizon comes to {} steps; raise the budget",
          horizon_source, p.num_iterations);
  }
  return p;
}

std::string TrainingPlan::describe() const {
  std::string s = fmt::format(
      "batch: {} tokens per step = {} per micro-step x {} accumulation steps\n"
      "flops per token: {:.4e}\n",
      batch_tokens, tokens_per_micro_step, grad_accum, flops_per_token);
  if (num_iterations > 0) {
    s += fmt::format(
        "horizon: {} steps, {:.4e} tokens, {:.4e} FLOPs, {:.2f} tokens per scaling parameter "
        "({})\n",
        num_iterations, total_tokens(), total_flops(), tokens_per_param(), scaling_params);
  }
  return s;
}

}  // namespace lmtrain
