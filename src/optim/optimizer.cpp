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

Optimizer::Optimizer(Gpt& model, const OptimConfig& optim, double batch_tokens)
    : model_(model), groups_(make_groups(optim, model.shape().width, batch_tokens)) {
  TensorPlan plan;
  const Shape flat{int64_t(model.table().total)};
  plan.add(adam_m_, flat, DType::f32);
  plan.add(adam_v_, flat, DType::f32);
  memory_ = plan.allocate(model.backend());
  model.backend().fill(adam_m_, 0.f);
  model.backend().fill(adam_v_, 0.f);
}

const GroupSettings& Optimizer::settings(ParamGroup group) const {
  for (const auto& g : groups_)
    if (g.group == group) return g;
  fail("optimizer: no settings for group {}", group_name(group));
}

double Optimizer::group_lr(ParamGroup group, double lr_mult) const {
  return settings(group).lr * lr_mult;
}

void Optimizer::step(int /*step*/, double lr_mult) {
  ++updates_;
  Backend& b = model_.backend();
  for (const auto& spec : model_.table().specs) {
    const GroupSettings& g = settings(spec.group);
    const int64_t n = spec.shape.numel();
    AdamWHyper h{float(g.lr * lr_mult), float(g.beta1), float(g.beta2), float(g.eps),
                 float(g.weight_decay), updates_};
    b.adamw_update(model_.param(spec), model_.grad(spec), adam_m_.slice(spec.offset, n).view(spec.shape),
                   adam_v_.slice(spec.offset, n).view(spec.shape), h);
  }
}

std::vector<StateTensor> Optimizer::state() const {
  return {{"adamw.exp_avg", adam_m_}, {"adamw.exp_avg_sq", adam_v_}};
}

}  // namespace lmtrain
