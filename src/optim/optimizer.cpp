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

Optimizer::Part Optimizer::make_part(Tensor model_param, Tensor model_grad, bool sharded) const {
  Part p;
  const int64_t rows = model_param.dim(0), row_len = model_param.numel() / rows;
  p.sharded = sharded;
  p.shard = sharded ? RowShard(rows, row_len, comm_.rank(), comm_.world_size())
                    : RowShard(rows, row_len, 0, 1);
  p.model_param = p.param = model_param;
  p.model_grad = p.grad = model_grad;
  return p;
}

Optimizer::Optimizer(Gpt& model, const OptimConfig& optim, double batch_tokens, int num_iterations,
                     dist::Communicator& comm)
    : model_(model),
      comm_(comm),
      groups_(make_groups(optim, model.shape().width, batch_tokens)),
      num_iterations_(num_iterations) {
  const int world = comm.world_size();
  const auto& specs = model.table().specs;
  TensorPlan plan;
  // Chunk buffers of sharded parts; the plan fills in their pointers when it allocates.
  auto chunk = [&](Part& p, Shape shape) {
    plan.add(p.param, shape, DType::f32);
    plan.add(p.grad, shape, DType::f32);
  };

  adamw_.reserve(specs.size());  // the plan holds pointers into adamw_ and muon_parts_
  for (size_t i = 0; i < specs.size(); ++i) {
    if (settings(specs[i].group).kind != "adamw") continue;
    const bool sharded = world > 1 && specs[i].shape.numel() >= kShardMinElements;
    AdamWState& s = adamw_.emplace_back(
        AdamWState{i, make_part(model.param(specs[i]), model.grad(specs[i]), sharded), {}, {}});
    const Shape local =
        sharded ? Shape{s.part.shard.chunk_rows, s.part.shard.row_len} : specs[i].shape;
    if (sharded) chunk(s.part, local);
    plan.add(s.m, local, DType::f32);
    plan.add(s.v, local, DType::f32);
  }
  std::vector<MuonStackSpec> stacks;
  if (optim.matrix_optimizer == "normuon") {
    stacks = model_stacks(model);
    muon_parts_.reserve(stacks.size());
    for (const MuonStackSpec& s : stacks) {
      Part& p = muon_parts_.emplace_back(make_part(s.params, s.grads, world > 1));
      if (p.sharded) chunk(p, {p.shard.chunk_rows, s.params.dim(1), s.params.dim(2)});
    }
  }
  plan.add(norm_, {1}, DType::f32);
  memory_ = plan.allocate(model.backend());

  if (!stacks.empty()) {
    // Each rank runs NorMuon on the matrices it owns; padding matrices have no name.
    std::vector<MuonStackSpec> owned;
    for (size_t i = 0; i < stacks.size(); ++i) {
      const Part& p = muon_parts_[i];
      MuonStackSpec spec{p.param, p.grad, {}};
      for (int64_t k = 0; k < p.shard.chunk_rows; ++k) {
        const int64_t row = p.shard.rank * p.shard.chunk_rows + k;
        spec.names.push_back(row < p.shard.rows ? stacks[i].names[row] : "");
      }
      owned.push_back(std::move(spec));
    }
    muon_ = std::make_unique<NorMuon>(model.backend(), std::move(owned), optim.muon,
                                      model.shape().depth);
  }
  int64_t staging = 1;
  for (const auto& s : adamw_)
    if (s.part.sharded)
      staging = std::max(staging, s.part.shard.padded_rows() * s.part.shard.row_len);
  for (const auto& p : muon_parts_)
    if (p.sharded) staging = std::max(staging, p.shard.padded_rows() * p.shard.row_len);
  TensorPlan staging_plan;
  staging_plan.add(staging_, {staging}, DType::f32);
  staging_memory_ = staging_plan.allocate(model.backend());
  for (auto& s : adamw_) {
    model.backend().fill(s.m, 0.f);
    model.backend().fill(s.v, 0.f);
  }
}

const GroupSettings& Optimizer::settings(ParamGroup group) const {
  for (const auto& g : groups_)
    if (g.group == group) return g;
  fail("optimizer: no settings for group {}", group_name(group));
}

void Optimizer::reduce(const Part& part) {
  if (!part.sharded) {
    comm_.all_reduce_mean(part.grad);
    return;
  }
  Backend& b = model_.backend();
  const RowShard& s = part.shard;
  const int64_t n = s.rows * s.row_len, padded = s.padded_rows() * s.row_len;
  b.copy(staging_.slice(0, n), part.model_grad.view({n}));
  if (padded > n) b.fill(staging_.slice(n, padded - n), 0.f);
  comm_.reduce_scatter_mean(part.grad.view({s.chunk_rows, s.row_len}),
                            staging_.slice(0, padded).view({s.padded_rows(), s.row_len}));
  // This rank's rows of the weights, zero where the chunk runs past the real rows.
  const int64_t owned = s.owned() * s.row_len, chunk = s.chunk_rows * s.row_len;
  const Tensor local = part.param.view({chunk});
  if (owned > 0)
    b.copy(local.slice(0, owned), part.model_param.view({n}).slice(s.begin() * s.row_len, owned));
  if (chunk > owned) b.fill(local.slice(owned, chunk - owned), 0.f);
}

void Optimizer::gather(const Part& part) {
  if (!part.sharded) return;
  const RowShard& s = part.shard;
  const int64_t n = s.rows * s.row_len, padded = s.padded_rows() * s.row_len;
  comm_.all_gather(staging_.slice(0, padded).view({s.padded_rows(), s.row_len}),
                   part.param.view({s.chunk_rows, s.row_len}));
  model_.backend().copy(part.model_param.view({n}), staging_.slice(0, n));
}

nlohmann::json Optimizer::step(int step, double lr_mult, double grad_clip) {
  Backend& b = model_.backend();
  for (const auto& s : adamw_) reduce(s.part);
  for (const auto& p : muon_parts_) reduce(p);

  // Global gradient norm: sharded chunks are disjoint across ranks; replicated gradients are
  // equal on every rank and counted by rank 0 alone.
  double local = 0;
  const bool counts_replicated = comm_.rank() == 0;
  for (const auto& s : adamw_)
    if (s.part.sharded || counts_replicated) local += b.sum_squares(s.part.grad);
  for (const auto& p : muon_parts_)
    if (p.sharded || counts_replicated) local += b.sum_squares(p.grad);
  double total = local;
  if (comm_.world_size() > 1) {
    const float value = float(local);
    b.upload(norm_, &value);
    comm_.all_reduce_sum(norm_);
    float summed = 0;
    b.download(&summed, norm_);
    total = summed;
  }
  const double grad_norm = std::sqrt(total);
  if (!std::isfinite(grad_norm)) {
    std::string first = "(none on this rank)";
    for (const auto& spec : model_.table().specs) {
      if (!std::isfinite(b.sum_squares(model_.grad(spec)))) {
        first = spec.name;
        break;
      }
    }
    fail("step {}: gradient norm is not finite (first non-finite gradient: {}); stopping", step + 1,
         first);
  }
  if (grad_clip > 0 && grad_norm > grad_clip) {
    const float factor = float(grad_clip / grad_norm);
    for (const auto& s : adamw_) b.scale(s.part.grad, factor);
    for (const auto& p : muon_parts_) b.scale(p.grad, factor);
  }

  ++updates_;
  nlohmann::json metrics = {{"grad_norm", grad_norm}};
  for (const auto& g : groups_) metrics[std::string("lr/") + group_name(g.group)] = g.lr * lr_mult;
  for (const auto& s : adamw_) {
    const GroupSettings& g = settings(model_.table().specs[s.spec].group);
    AdamWHyper h{float(g.lr * lr_mult), float(g.beta1),        float(g.beta2),
                 float(g.eps),          float(g.weight_decay), updates_};
    b.adamw_update(s.part.param, s.part.grad, s.m, s.v, h);
  }
  if (muon_) muon_->step(step, num_iterations_, settings(ParamGroup::matrix).lr * lr_mult, metrics);
  for (const auto& s : adamw_) gather(s.part);
  for (const auto& p : muon_parts_) gather(p);
  model_.refresh_weights();
  return metrics;
}

std::vector<StateTensor> Optimizer::state() const {
  std::vector<StateTensor> out;
  const bool replicated = comm_.world_size() > 1;
  for (const auto& s : adamw_) {
    const ParamSpec& spec = model_.table().specs[s.spec];
    for (const auto& [kind, tensor] : {std::pair{"exp_avg.", s.m}, {"exp_avg_sq.", s.v}}) {
      StateTensor st{kind + spec.name, tensor.view(s.part.param.shape)};
      if (s.part.sharded) {
        // Only the real rows: padding never reaches a checkpoint.
        const RowShard& r = s.part.shard;
        st.tensor = tensor.view({r.chunk_rows * r.row_len})
                        .slice(0, r.owned() * r.row_len)
                        .view({r.owned(), r.row_len});
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
