// Parameter groups and their update rules. Each group names its optimizer kind; the LR of a
// group is its base LR times the width and batch scaling rules, times the schedule's multiplier.
#pragma once

#include <string>
#include <vector>

#include "config/config.h"
#include "model/gpt.h"

namespace lmtrain {

struct GroupSettings {
  ParamGroup group;
  std::string kind;  // "adamw"
  double lr;         // scaled base LR, before the schedule multiplier
  double beta1, beta2, eps, weight_decay;
};

// Base LRs with nanochat's scaling: AdamW LRs of embeddings and head by (C/ref_width)^-0.5,
// every group by sqrt(batch_tokens / ref_batch).
std::vector<GroupSettings> make_groups(const OptimConfig& optim, int width, double batch_tokens);

// A named optimizer-state tensor, for checkpoints.
struct StateTensor {
  std::string name;
  Tensor tensor;
};

class Optimizer {
 public:
  Optimizer(Gpt& model, const OptimConfig& optim, double batch_tokens);

  // Applies one update from model.grads(); `step` is 0-based, lr_mult from the schedule.
  void step(int step, double lr_mult);

  Gpt& model() const { return model_; }
  const std::vector<GroupSettings>& groups() const { return groups_; }
  double group_lr(ParamGroup group, double lr_mult) const;
  std::vector<StateTensor> state() const;
  // Number of updates taken, for AdamW bias correction; saved with the state.
  int updates() const { return updates_; }
  void set_updates(int n) { updates_ = n; }

 private:
  const GroupSettings& settings(ParamGroup group) const;

  Gpt& model_;
  std::vector<GroupSettings> groups_;
  Buffer memory_;
  Tensor adam_m_, adam_v_;  // flat, the parameters' layout
  int updates_ = 0;
};

}  // namespace lmtrain
