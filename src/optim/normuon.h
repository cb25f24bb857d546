// NorMuon and the Muon variants it generalises, over stacks of same-shape block matrices:
// momentum, orthogonalisation (Polar Express / Newton-Schulz), NorMuon's per-neuron second
// moment, shape-based LR scaling and cautious or decoupled weight decay. docs/OPTIMIZERS.md
// gives the math of every switch.
#pragma once

#include <nlohmann/json.hpp>

#include <vector>

#include "config/config.h"
#include "model/gpt.h"
#include "optim/state_tensor.h"

namespace lmtrain {

class NorMuon {
 public:
  NorMuon(Gpt& model, const MuonConfig& config);

  // One update of every stack. lr is the matrix group's LR after the schedule multiplier.
  void step(int step, int num_iterations, double lr, nlohmann::json& metrics);
  // Momentum buffers and second moments, named per parameter.
  std::vector<StateTensor> state() const;

  // The LR multiplier of a (rows x cols) matrix under the configured rule.
  static double lr_scale(const std::string& rule, int64_t rows, int64_t cols);

 private:
  struct Stack {
    const MatrixStack* layout;
    Tensor params, grads;          // (K, m, n) views of the model's flat arrays
    Tensor momentum, second;       // state: (K, m, n) and (K, m) or (K, n)
    std::vector<double> lr_mul, wd_mul;  // per member, from param_overrides
  };
  // Orthogonalises u (K, m, n) in place per the config; work buffers are the shared scratch.
  void orthogonalize(Tensor u);

  Gpt& model_;
  MuonConfig config_;
  std::vector<Stack> stacks_;
  Buffer state_memory_, scratch_memory_;
  Tensor scratch_u_, scratch_x_, scratch_y_, scratch_a_, scratch_b_;  // flat, largest stack
};

}  // namespace lmtrain
