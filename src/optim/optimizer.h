// Parameter groups and their update rules. Each group names its optimizer kind (AdamW, or
// NorMuon for the block matrices); the LR of a group is its base LR times the width and batch
// scaling rules, times the schedule's multiplier.
//
// With several ranks the gradients are reduced by the optimizer, ZeRO-style, in buckets: AdamW
// parameters of at least kShardMinElements are reduce-scattered by rows, smaller ones are
// all-reduced and updated on every rank; each NorMuon stack is cut into buckets of world-size
// consecutive matrices (the last one padded), each reduce-scattered so that every rank owns one
// matrix of it: rank r owns the matrices k with k % world == r. A rank keeps optimizer state only
// for what it owns, and the updated weights are all-gathered.
//
// Communication overlaps computation: given as the last micro-step's backward hook,
// reduce_as_ready() starts each bucket's reduction as soon as its gradients are final, while
// the backward goes on through lower layers; step() starts each bucket's all-gather as soon as
// its update is computed, while the next one is.
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
  // Lets collectives still in flight (a step cut short by an error) finish before the buffers
  // they write go.
  ~Optimizer();
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  // The backward hook of the last micro-step (see above); step() starts what it has not.
  Gpt::GradsReady reduce_as_ready();
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
  // The rows of one parameter (an AdamW tensor, or a run of matrices of a NorMuon stack) that
  // travel in one collective, and this rank's chunk of them.
  struct Bucket {
    RowShard shard;                  // rows x row_len; chunk_rows per rank when sharded
    bool sharded = false;            // reduce-scattered; else all-reduced and replicated
    int ready_layer = -1;            // its gradients are final once backward reports this layer
    Tensor model_param, model_grad;  // the model's views of the rows
    Tensor param, grad;              // what this rank updates: the model's views or a chunk
    Tensor staging;                  // the padded rows when they run past the model's, else empty
    bool reducing = false;           // its reduction has started this step
    dist::PendingPtr pending;        // the collective in flight
  };
  Bucket make_bucket(Tensor model_param, Tensor model_grad, bool sharded, int ready_layer) const;
  // Starts the reduction of every bucket whose gradients are final after `layer`.
  void start_reductions(int layer);
  // Averages the gradient over ranks into bucket.grad and loads this rank's weights.
  void start_reduce(Bucket& bucket);
  // Puts every rank's updated weights back into the model's tensor; finish_gather() waits.
  void start_gather(Bucket& bucket);
  void finish_gather(Bucket& bucket);

  Gpt& model_;
  dist::Communicator& comm_;
  std::vector<GroupSettings> groups_;
  int num_iterations_;
  std::unique_ptr<NorMuon> muon_;
  struct AdamWState {
    size_t spec;    // index into the parameter table
    size_t bucket;  // index into buckets_
    Tensor m, v;
  };
  std::vector<AdamWState> adamw_;
  std::vector<Bucket> buckets_;  // empty with one rank: nothing to communicate
  // NorMuon stack s: this rank's matrices, (chunk rows, m, n), and its buckets
  // [stack_buckets_[s], stack_buckets_[s + 1]).
  struct StackChunk {
    Tensor param, grad;
  };
  std::vector<StackChunk> stack_chunks_;
  std::vector<size_t> stack_buckets_;
  Buffer memory_;
  Tensor sq_norms_;  // f32 per AdamW tensor and NorMuon stack: squared gradient norms
  int updates_ = 0;
};

}  // namespace lmtrain
