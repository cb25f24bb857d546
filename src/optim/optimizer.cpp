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
      {ParamGroup::value_embeds, "adamw", o.embedding_lr * width_scale, b1, b2, eps, wd.value_embeds},
      {ParamGroup::unembedding, "adamw", o.unembedding_lr * width_scale, b1, b2, eps, wd.unembedding},
      {ParamGroup::resid, "adamw", o.scalar_lr * 0.01, b1, b2, eps, wd.resid},
      {ParamGroup::x0, "adamw", o.scalar_lr, 0.96, b2, eps, wd.x0},
      {ParamGroup::matrix, o.matrix_optimizer, o.matrix_lr, b1, b2, eps, wd.matrix},
  };
  for (auto& g : groups) g.lr *= batch_scale;
  return groups;
}

Optimizer::Optimizer(Gpt& model, const OptimConfig& optim, double batch_tokens, int num_iterations)
    : model_(model),
      groups_(make_groups(optim, model.shape().width, batch_tokens)),
      num_iterations_(num_iterations) {
  if (optim.matrix_optimizer == "normuon") {
    muon_ = std::make_unique<NorMuon>(model.backend(), model_stacks(model), optim.muon,
                                      model.shape().depth);
  }
  TensorPlan plan;
  const auto& specs = model.table().specs;
  adamw_.reserve(specs.size());  // the plan holds pointers into adamw_: no reallocation
  for (size_t i = 0; i < specs.size(); ++i) {
    if (settings(specs[i].group).kind != "adamw") continue;
    AdamWState& s = adamw_.emplace_back(AdamWState{i, {}, {}});
    plan.add(s.m, specs[i].shape, DType::f32);
    plan.add(s.v, specs[i].shape, DType::f32);
  }
  memory_ = plan.allocate(model.backend());
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

nlohmann::json Optimizer::step(int step, double lr_mult) {
  ++updates_;
  nlohmann::json metrics;
  for (const auto& g : groups_) metrics[std::string("lr/") + group_name(g.group)] = g.lr * lr_mult;
  Backend& b = model_.backend();
  for (const auto& s : adamw_) {
    const ParamSpec& spec = model_.table().specs[s.spec];
    const GroupSettings& g = settings(spec.group);
    AdamWHyper h{float(g.lr * lr_mult), float(g.beta1), float(g.beta2), float(g.eps),
                 float(g.weight_decay), updates_};
    b.adamw_update(model_.param(spec), model_.grad(spec), s.m, s.v, h);
  }
  if (muon_) muon_->step(step, num_iterations_, settings(ParamGroup::matrix).lr * lr_mult, metrics);
  model_.refresh_weights();
  return metrics;
}

std::vector<StateTensor> Optimizer::state() const {
  std::vector<StateTensor> out;
  for (const auto& s : adamw_) {
    const std::string& name = model_.table().specs[s.spec].name;
    out.push_back({"exp_avg." + name, s.m});
    out.push_back({"exp_avg_sq." + name, s.v});
  }
  if (muon_) {
    auto muon_state = muon_->state();
    out.insert(out.end(), muon_state.begin(), muon_state.end());
  }
  return out;
}

}  // namespace lmtrain
