// Parameter groups and their update rules. Each group names its optimizer kind (AdamW, or
// NorMuon for the block matrices); the LR of a group is its base LR times the width and batch
// scaling rules, times the schedule's multiplier.
#pragma once

#include <nlohmann/json.hpp>

#include <memory>
#include <string>
#include <vector>

#include "config/config.h"
#include "model/gpt.h"
#include "optim/normuon.h"
#include "optim/state_tensor.h"

namespace lmtrain {

struct GroupSettings {
  ParamGroup group;
  std::string kind;  // "adamw" | "normuon"
  double lr;         // scaled base LR, before the schedule multiplier
  double beta1, beta2, eps, weight_decay;
};

// Base LRs with nanochat's scaling: AdamW LRs of embeddings and head by (C/ref_width)^-0.5,
// every group by sqrt(batch_tokens / ref_batch).
std::vector<GroupSettings> make_groups(const OptimConfig& optim, int width, double batch_tokens);

class Optimizer {
 public:
  Optimizer(Gpt& model, const OptimConfig& optim, double batch_tokens, int num_iterations);

  // Applies one update from model.grads(); `step` is 0-based, lr_mult from the schedule.
  // Returns the step's optimizer metrics (lr/<group>, muon/...).
  nlohmann::json step(int step, double lr_mult);

  Gpt& model() const { return model_; }
  const std::vector<GroupSettings>& groups() const { return groups_; }
  // Every state tensor, named per parameter; checkpoints save and restore exactly these.
  std::vector<StateTensor> state() const;
  // Number of updates taken, for AdamW bias correction; saved with the state.
  int updates() const { return updates_; }
  void set_updates(int n) { updates_ = n; }

 private:
  const GroupSettings& settings(ParamGroup group) const;

  Gpt& model_;
  std::vector<GroupSettings> groups_;
  int num_iterations_;
  std::unique_ptr<NorMuon> muon_;
  struct AdamWState {
    size_t spec;  // index into the parameter table
    Tensor m, v;
  };
  std::vector<AdamWState> adamw_;
  Buffer memory_;
  int updates_ = 0;
};

}  // namespace lmtrain
