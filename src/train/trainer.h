// `lmtrain train`: the training loop with evaluation, sampling, checkpoints and metrics.
#pragma once

#include <string>
#include <vector>

namespace lmtrain {

struct TrainOptions {
  std::string config_path;
  std::vector<std::string> overrides;
  bool resume = false;
  std::string init_from;   // checkpoint whose weights start a new run
  bool overwrite = false;  // a new run may replace an earlier one in its directory
};

// Returns the process exit code (0, or 128 + signal when stopped by SIGINT/SIGTERM).
int train(const TrainOptions& options);

}  // namespace lmtrain
