// NorMuon and the Muon variants it generalises, over stacks of same-shape block matrices:
// momentum, orthogonalisation (Polar Express / Newton-Schulz), NorMuon's per-neuron second
// moment, shape-based LR scaling and cautious or decoupled weight decay. docs/OPTIMIZERS.md
// gives the math of every switch.
#pragma once

#include <functional>
#include <nlohmann/json.hpp>
#include <vector>

#include "config/config.h"
#include "dist/communicator.h"
#include "model/gpt.h"
#include "optim/state_tensor.h"

namespace lmtrain {

// One stack of same-shape matrices to optimize: views of (K, m, n) parameters and gradients.
struct MuonStackSpec {
  Tensor params, grads;
  // Per matrix, for param_overrides and checkpoint state; "" for the zero matrices that pad a
  // stack sharded over ranks.
  std::vector<std::string> names;
};

// The block matrices of a model, stack by stack.
std::vector<MuonStackSpec> model_stacks(const Gpt& model);

// Refuses a param_overrides pattern that matches none of the stacks' matrices: a typo would
// otherwise leave every LR and decay as they were without a word.
void check_param_overrides(const std::vector<MuonStackSpec>& stacks, const MuonConfig& config);

class NorMuon {
 public:
  // `depth` scales the weight decay from its reference depth. With a communicator, each rank
  // holds its share of every stack and the logged update RMS covers all ranks' matrices.
  NorMuon(Backend& backend, std::vector<MuonStackSpec> stacks, const MuonConfig& config, int depth,
          dist::Communicator* comm = nullptr);

  // One update of every stack. lr is the matrix group's LR after the schedule multiplier.
  // `updated`, when given, is called with each stack's index as soon as its parameters are
  // updated (the optimizer starts their all-gather while the next stack is computed).
  void step(int step, int num_iterations, double lr, nlohmann::json& metrics,
            const std::function<void(size_t stack)>& updated = {});
  // Momentum buffers and second moments, named per parameter.
  std::vector<StateTensor> state() const;

  // The LR multiplier of a (rows x cols) matrix under the configured rule.
  static double lr_scale(const std::string& rule, int64_t rows, int64_t cols);

 private:
  struct Stack {
    MuonStackSpec spec;
    int64_t count, rows, cols;
    int64_t named;                       // matrices that are not padding
    Tensor momentum, second;             // state: (K, m, n) and (K, m) or (K, n)
    std::vector<double> lr_mul, wd_mul;  // per matrix, from param_overrides
  };
  // Orthogonalises u (K, m, n) in place per the config; work buffers are the shared scratch.
  void orthogonalize(Tensor u);

  Backend& backend_;
  MuonConfig config_;
  int depth_;
  dist::Communicator* comm_;
  std::vector<Stack> stacks_;
  Buffer state_memory_, scratch_memory_;
  // Flat scratch sized for the largest stack: the f32 update and the orthogonalizer's work
  // tensors in the backend's activation dtype.
  Tensor scratch_u_, work_x_, work_y_, work_gram_, work_poly_;
  // f32: per stack the squared norm of its last update, then per stack its named matrices (the
  // metrics' sums over ranks)
  Tensor update_sq_;
};

}  // namespace lmtrain
