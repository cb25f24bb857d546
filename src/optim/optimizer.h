// Parameter groups and their update rules. Each group names its optimizer kind (AdamW, or
// NorMuon for the block matrices); the LR of a group is its base LR times the width and batch
// scaling rules, times the schedule's multiplier.
//
// With several ranks the gradients are reduced inside step(), ZeRO-style: each NorMuon stack is
// padded to a multiple of the world size and reduce-scattered so that every rank owns whole
// matrices; AdamW parameters of at least kShardMinElements are reduce-scattered by rows; smaller
// ones are all-reduced and updated on every rank. A rank keeps optimizer state only for what it
// owns, and the updated weights are all-gathered.
#pragma once

#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "config/config.h"
#include "dist/communicator.h"
#include "model/gpt.h"
#include "optim/normuon.h"
#include "optim/row_shard.h"
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
  static constexpr int64_t kShardMinElements = 1024;

  Optimizer(Gpt& model, const OptimConfig& optim, double batch_tokens, int num_iterations,
            dist::Communicator& comm);

  // Reduces the gradients across ranks, clips them to `grad_clip` (0: off) by the global norm,
  // and applies one update; `step` is 0-based, lr_mult from the schedule. Returns the step's
  // metrics (grad_norm, lr/<group>, muon/...). Throws naming the step when the norm is not finite.
  nlohmann::json step(int step, double lr_mult, double grad_clip = 0.0);

  Gpt& model() const { return model_; }
  const std::vector<GroupSettings>& groups() const { return groups_; }
  // This rank's state tensors, named per parameter; checkpoints save and restore exactly these.
  std::vector<StateTensor> state() const;
  // Number of updates taken, for AdamW bias correction; saved with the state.
  int updates() const { return updates_; }
  void set_updates(int n) { updates_ = n; }

 private:
  const GroupSettings& settings(ParamGroup group) const;
  // The part of a parameter this rank updates: the model's own views when unsharded,
  // chunk buffers otherwise.
  struct Part {
    RowShard shard;                  // rows x row_len, split over ranks when sharded
    bool sharded = false;            // reduce-scattered; else all-reduced and replicated
    Tensor model_param, model_grad;  // the model's views of the whole tensor
    Tensor param, grad;              // what this rank updates: the model's views or a chunk
  };
  Part make_part(Tensor model_param, Tensor model_grad, bool sharded) const;
  // Averages the gradient over ranks into part.grad and loads this rank's weights.
  void reduce(const Part& part);
  // Puts every rank's updated weights back into the model's tensor.
  void gather(const Part& part);

  Gpt& model_;
  dist::Communicator& comm_;
  std::vector<GroupSettings> groups_;
  int num_iterations_;
  std::unique_ptr<NorMuon> muon_;
  struct AdamWState {
    size_t spec;  // index into the parameter table
    Part part;
    Tensor m, v;
  };
  std::vector<AdamWState> adamw_;
  std::vector<Part> muon_parts_;  // one per stack, rows = matrices
  Buffer memory_, staging_memory_;
  Tensor staging_;  // flat f32 scratch for a padded whole tensor
  Tensor norm_;     // one f32: the squared gradient norm, summed over ranks
  int updates_ = 0;
};

}  // namespace lmtrain
