// How a config turns into batches and steps: gradient accumulation and the horizon.
#pragma once

#include <string>

#include "config/config.h"
#include "model/gpt_shape.h"

namespace lmtrain {

struct TrainingPlan {
  int64_t tokens_per_micro_step = 0;  // device_batch * T * ranks
  int64_t batch_tokens = 0;           // tokens per optimizer step
  int grad_accum = 1;
  int num_iterations = 0;
  double flops_per_token = 0;
  size_t scaling_params = 0;
  double total_tokens() const { return double(batch_tokens) * num_iterations; }
  double total_flops() const { return flops_per_token * total_tokens(); }
  double tokens_per_param() const { return total_tokens() / double(scaling_params); }
  // Multi-line human summary for the start of a run and `lmtrain info`.
  std::string describe() const;
};

// `require_horizon` false allows configs without a horizon (info on a model alone). `source`
// names the config, or the --set that wrote a key, in errors.
TrainingPlan make_plan(const Config& config, const GptShape& shape, int world,
                       const config::Source& source, bool require_horizon = true);

}  // namespace lmtrain
