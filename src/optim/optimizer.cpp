#include "optim/optimizer.h"

#include <cmath>

#include "backend/tensor_plan.h"

namespace lmtrain {

std::vector<GroupSettings> make_groups(const OptimConfig& o, int width, double batch_tokens) {
  const double width_scale = std::pow(width / o.lr_reference_width, -0.5);
  const double batch_scale = std::sqrt(batch_tokens / o.lr_reference_batch);
  const double b1 = o.adam_beta1, b2 = o.adam_beta2, eps = o.adam_eps;
  const auto& wd = o.weight_decay;
  std::vector<GroupSettings> groups = {
      {ParamGroup::embedding, "adamw", o.embedding_lr * width_scale, b1, b2, eps, wd.embedding},
      {ParamGroup::value_embeds, "adamw", o.embedding_lr * width_scale, b1, b2, eps,
       wd.value_embeds},
      {ParamGroup::unembedding, "adamw", o.unembedding_lr * width_scale, b1, b2, eps,
       wd.unembedding},
      {ParamGroup::resid, "adamw", o.scalar_lr * 0.01, b1, b2, eps, wd.resid},
      {ParamGroup::x0, "adamw", o.scalar_lr, 0.96, b2, eps, wd.x0},
      {ParamGroup::matrix, o.matrix_optimizer, o.matrix_lr, b1, b2, eps, wd.matrix},
  };
  for (auto& g : groups) g.lr *= batch_scale;
  return groups;
}

Optimizer::Bucket Optimizer::make_bucket(Tensor model_param, Tensor model_grad, bool sharded,
                                         int ready) const {
  Bucket bucket;
  const int64_t rows = model_param.dim(0), row_len = model_param.numel() / rows;
  bucket.sharded = sharded;
  bucket.shard = sharded ? RowShard(rows, row_len, comm_.rank(), comm_.world_size())
                         : RowShard(rows, row_len, 0, 1);
  bucket.ready_layer = ready;
  bucket.model_param = bucket.param = model_param.view({rows, row_len});
  bucket.model_grad = bucket.grad = model_grad.view({rows, row_len});
  return bucket;
}

Optimizer::Optimizer(Gpt& model, const OptimConfig& optim, double batch_tokens, int num_iterations,
                     dist::Communicator& comm)
    : model_(model),
      comm_(comm),
      groups_(make_groups(optim, model.shape().width, batch_tokens)),
      num_iterations_(num_iterations) {
  const int world = comm.world_size(), rank = comm.rank(), depth = model.shape().depth;
  const auto& specs = model.table().specs;
  TensorPlan plan;
  // The buffers of sharded buckets; the plan fills in their pointers when it allocates, so
  // buckets_ and stack_chunks_ are sized before any is planned.
  auto plan_chunk = [&](Bucket& b) {
    if (!b.sharded) return;
    const RowShard& s = b.shard;
    plan.add(b.param, {s.chunk_rows, s.row_len}, DType::f32);
    plan.add(b.grad, {s.chunk_rows, s.row_len}, DType::f32);
    if (s.padded_rows() > s.rows) plan.add(b.staging, {s.padded_rows(), s.row_len}, DType::f32);
  };

  std::vector<MuonStackSpec> stacks;
  if (optim.matrix_optimizer == "normuon") {
    stacks = model_stacks(model);
    check_param_overrides(stacks, optim.muon);
  }
  size_t num_buckets = 0;
  for (const auto& spec : specs) num_buckets += settings(spec.group).kind == "adamw";
  for (const auto& s : stacks)
    if (world > 1) num_buckets += size_t(dist::padded_rows(s.params.dim(0), world) / world);
  buckets_.reserve(num_buckets);
  adamw_.reserve(specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {
    if (settings(specs[i].group).kind != "adamw") continue;
    const bool sharded = world > 1 && specs[i].shape.numel() >= kShardMinElements;
    Bucket& b = buckets_.emplace_back(make_bucket(model.param(specs[i]), model.grad(specs[i]),
                                                  sharded, model.grads_final_after(specs[i])));
    plan_chunk(b);
    AdamWState& s = adamw_.emplace_back(AdamWState{i, buckets_.size() - 1, {}, {}});
    const Shape local = sharded ? Shape{b.shard.chunk_rows, b.shard.row_len} : b.param.shape;
    plan.add(s.m, local, DType::f32);
    plan.add(s.v, local, DType::f32);
  }
  // NorMuon: with W ranks, bucket j of a stack is its matrices [jW, jW + W), rank r owning
  // matrix jW + r as row j of its chunk. A bucket is ready with the lowest layer among them.
  stack_chunks_.resize(stacks.size());
  for (size_t si = 0; si < stacks.size(); ++si) {
    const MuonStackSpec& s = stacks[si];
    StackChunk& chunk = stack_chunks_[si];
    stack_buckets_.push_back(buckets_.size());
    const int64_t K = s.params.dim(0), m = s.params.dim(1), n = s.params.dim(2);
    if (world == 1) {
      chunk = {s.params, s.grads};
      continue;
    }
    const int64_t local = dist::padded_rows(K, world) / world;
    plan.add(chunk.param, {local, m, n}, DType::f32);
    plan.add(chunk.grad, {local, m, n}, DType::f32);
    for (int64_t j = 0; j < local; ++j) {
      const int64_t first = j * world, count = std::min<int64_t>(world, K - first);
      int ready = depth;
      for (int64_t k = first; k < first + count; ++k) {
        const ParamSpec& spec = model.table().find(s.names[k]);
        ready = std::min(ready, model.grads_final_after(spec));
      }
      auto matrices = [&](Tensor t) {
        return t.slice(first * m * n, count * m * n).view({count, m * n});
      };
      Bucket& b =
          buckets_.emplace_back(make_bucket(matrices(s.params), matrices(s.grads), true, ready));
      if (b.shard.padded_rows() > b.shard.rows) {
        plan.add(b.staging, {b.shard.padded_rows(), b.shard.row_len}, DType::f32);
      }
    }
  }
  stack_buckets_.push_back(buckets_.size());
  plan.add(sq_norms_, {int64_t(adamw_.size() + stack_chunks_.size())}, DType::f32);
  memory_ = plan.allocate(model.backend());

  if (!stacks.empty()) {
    // Each rank runs NorMuon on the matrices it owns; padding matrices have no name.
    std::vector<MuonStackSpec> owned;
    for (size_t si = 0; si < stacks.size(); ++si) {
      const StackChunk& chunk = stack_chunks_[si];
      MuonStackSpec spec{chunk.param, chunk.grad, {}};
      for (int64_t j = 0; j < chunk.param.dim(0); ++j) {
        const int64_t k = j * world + rank;
        spec.names.push_back(k < stacks[si].params.dim(0) ? stacks[si].names[k] : "");
        if (world == 1) continue;
        Bucket& b = buckets_[stack_buckets_[si] + j];
        const Shape row = {1, b.shard.row_len};
        b.param = chunk.param[j].view(row);
        b.grad = chunk.grad[j].view(row);
      }
      owned.push_back(std::move(spec));
    }
    muon_ = std::make_unique<NorMuon>(model.backend(), std::move(owned), optim.muon, depth, &comm);
  }
  for (auto& s : adamw_) {
    model.backend().fill(s.m, 0.f);
    model.backend().fill(s.v, 0.f);
  }
}

Optimizer::~Optimizer() {
  for (Bucket& b : buckets_) b.pending.reset();
}

const GroupSettings& Optimizer::settings(ParamGroup group) const {
  for (const auto& g : groups_)
    if (g.group == group) return g;
  fail("optimizer: no settings for group {}", group_name(group));
}

Gpt::GradsReady Optimizer::reduce_as_ready() {
  return [this](int layer) { start_reductions(layer); };
}

void Optimizer::start_reductions(int layer) {
  if (comm_.world_size() == 1) return;
  for (Bucket& b : buckets_) {
    if (!b.reducing && b.ready_layer >= layer) start_reduce(b);
  }
}

void Optimizer::start_reduce(Bucket& bucket) {
  bucket.reducing = true;
  if (!bucket.sharded) {
    bucket.pending = comm_.start_all_reduce_mean(bucket.grad);
    return;
  }
  Backend& b = model_.backend();
  const RowShard& s = bucket.shard;
  Tensor whole = bucket.model_grad;
  if (bucket.staging.data) {
    const int64_t n = s.rows * s.row_len;
    whole = bucket.staging;
    b.copy(whole.view({whole.numel()}).slice(0, n), bucket.model_grad.view({n}));
    b.fill(whole.view({whole.numel()}).slice(n, whole.numel() - n), 0.f);
  }
  bucket.pending = comm_.start_reduce_scatter_mean(bucket.grad, whole);
  // This rank's rows of the weights, zero where the chunk runs past the real rows.
  const int64_t owned = s.owned() * s.row_len, chunk = s.chunk_rows * s.row_len;
  const Tensor local = bucket.param.view({chunk});
  if (owned > 0) {
    b.copy(local.slice(0, owned),
           bucket.model_param.view({s.rows * s.row_len}).slice(s.begin() * s.row_len, owned));
  }
  if (chunk > owned) b.fill(local.slice(owned, chunk - owned), 0.f);
}

void Optimizer::start_gather(Bucket& bucket) {
  if (!bucket.sharded) return;
  const Tensor whole = bucket.staging.data ? bucket.staging : bucket.model_param;
  bucket.pending = comm_.start_all_gather(whole, bucket.param);
}

void Optimizer::finish_gather(Bucket& bucket) {
  if (!bucket.sharded) return;
  bucket.pending->wait();
  bucket.pending.reset();
  if (bucket.staging.data) {
    const int64_t n = bucket.shard.rows * bucket.shard.row_len;
    model_.backend().copy(bucket.model_param.view({n}),
                          bucket.staging.view({bucket.staging.numel()}).slice(0, n));
  }
}

nlohmann::json Optimizer::step(int step, double lr_mult, double grad_clip) {
  Backend& b = model_.backend();
  start_reductions(-1);
  for (Bucket& bucket : buckets_) {
    if (bucket.pending) bucket.pending->wait();
    bucket.pending.reset();
    bucket.reducing = false;
  }

  // Global gradient norm: one squared norm per AdamW tensor and NorMuon stack (a stack's
  // buckets are rows of its chunk, summed whole), summed over ranks as a vector and read back
  // once. Sharded chunks are disjoint across ranks; replicated gradients are equal on every rank
  // and counted by rank 0 alone.
  const bool counts_replicated = comm_.rank() == 0;
  b.fill(sq_norms_, 0.f);
  int64_t slot = 0;
  for (const AdamWState& s : adamw_) {
    const Bucket& bucket = buckets_[s.bucket];
    if (bucket.sharded || counts_replicated) b.sum_squares(sq_norms_.slice(slot, 1), bucket.grad);
    ++slot;
  }
  for (const StackChunk& chunk : stack_chunks_)
    b.sum_squares(sq_norms_.slice(slot++, 1), chunk.grad);
  if (comm_.world_size() > 1) comm_.all_reduce_sum(sq_norms_);
  std::vector<float> sq_norms(size_t(sq_norms_.numel()));
  b.download(sq_norms.data(), sq_norms_);
  double total = 0;
  for (float s : sq_norms) total += s;
  const double grad_norm = std::sqrt(total);
  if (!std::isfinite(grad_norm)) {
    std::string first = "(none on this rank)";
    for (const auto& spec : model_.table().specs) {
      float sq = 0;
      b.sum_squares(sq_norms_.slice(0, 1), model_.grad(spec));
      b.download(&sq, sq_norms_.slice(0, 1));
      if (!std::isfinite(sq)) {
        first = spec.name;
        break;
      }
    }
    fail("step {}: gradient norm is not finite (first non-finite gradient: {}); stopping", step + 1,
         first);
  }
  if (grad_clip > 0 && grad_norm > grad_clip) {
    const float factor = float(grad_clip / grad_norm);
    for (const AdamWState& s : adamw_) b.scale(buckets_[s.bucket].grad, factor);
    for (const StackChunk& chunk : stack_chunks_) b.scale(chunk.grad, factor);
  }

  ++updates_;
  nlohmann::json metrics = {{"grad_norm", grad_norm}};
  for (const auto& g : groups_) metrics[std::string("lr/") + group_name(g.group)] = g.lr * lr_mult;
  for (auto& s : adamw_) {
    const GroupSettings& g = settings(model_.table().specs[s.spec].group);
    AdamWHyper h{float(g.lr * lr_mult), float(g.beta1),        float(g.beta2),
                 float(g.eps),          float(g.weight_decay), updates_};
    Bucket& bucket = buckets_[s.bucket];
    b.adamw_update(bucket.param, bucket.grad, s.m, s.v, h);
    start_gather(bucket);
  }
  if (muon_) {
    muon_->step(step, num_iterations_, settings(ParamGroup::matrix).lr * lr_mult, metrics,
                [this](size_t stack) {
                  for (size_t i = stack_buckets_[stack]; i < stack_buckets_[stack + 1]; ++i)
                    start_gather(buckets_[i]);
                });
  }
  for (Bucket& bucket : buckets_) finish_gather(bucket);
  model_.refresh_weights();
  return metrics;
}

std::vector<StateTensor> Optimizer::state() const {
  std::vector<StateTensor> out;
  const bool replicated = comm_.world_size() > 1;
  for (const auto& s : adamw_) {
    const ParamSpec& spec = model_.table().specs[s.spec];
    const Bucket& bucket = buckets_[s.bucket];
    for (const auto& [kind, tensor] : {std::pair{"exp_avg.", s.m}, {"exp_avg_sq.", s.v}}) {
      StateTensor st{kind + spec.name, tensor};
      if (bucket.sharded) {
        // Only the real rows: padding never reaches a checkpoint. They keep the parameter's
        // shape past the first dimension, so that any world size saves and expects one layout.
        const RowShard& r = bucket.shard;
        Shape owned = spec.shape;
        owned.dims[0] = r.owned();
        st.tensor =
            tensor.view({r.chunk_rows * r.row_len}).slice(0, r.owned() * r.row_len).view(owned);
        st.row_begin = r.begin();
        st.rows_total = r.rows;
      } else {
        st.tensor = tensor.view(spec.shape);
        st.replicated = replicated;
      }
      out.push_back(st);
    }
  }
  if (muon_) {
    auto muon_state = muon_->state();
    out.insert(out.end(), muon_state.begin(), muon_state.end());
  }
  return out;
}

}  // namespace lmtrain
