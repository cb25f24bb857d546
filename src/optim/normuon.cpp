#include "optim/normuon.h"

#include <fnmatch.h>

#include <algorithm>
#include <array>
#include <cmath>

#include "backend/tensor_plan.h"
#include "optim/schedule.h"

namespace lmtrain {

namespace {

// Polar Express coefficients (a, b, c) per iteration; later iterations reuse the last.
constexpr std::array<std::array<float, 3>, 5> kPolarExpress = {{
    {8.156554524902461f, -22.48329292557795f, 15.878769915207462f},
    {4.042929935166739f, -2.808917465908714f, 0.5000178451051316f},
    {3.8916678022926607f, -2.772484153217685f, 0.5060648178503393f},
    {3.285753657755655f, -2.3681294933425376f, 0.46449024233003106f},
    {2.3465413258596377f, -1.7097828382687081f, 0.42323551169305323f},
}};
constexpr std::array<float, 3> kNewtonSchulz5 = {3.4445f, -4.7750f, 2.0315f};

Tensor stack_view(Tensor flat, const MatrixStack& s) {
  return flat.slice(s.offset, s.count() * s.rows * s.cols).view({s.count(), s.rows, s.cols});
}

}  // namespace

std::vector<MuonStackSpec> model_stacks(const Gpt& model) {
  std::vector<MuonStackSpec> out;
  for (const MatrixStack& s : model.table().stacks) {
    MuonStackSpec& spec = out.emplace_back();
    spec.params = stack_view(model.params(), s);
    spec.grads = stack_view(model.grads(), s);
    for (size_t member : s.members) spec.names.push_back(model.table().specs[member].name);
  }
  return out;
}

double NorMuon::lr_scale(const std::string& rule, int64_t rows, int64_t cols) {
  if (rule == "rectangular") return std::sqrt(std::max(1.0, double(rows) / double(cols)));
  if (rule == "moonshot") return 0.2 * std::sqrt(double(std::max(rows, cols)));
  if (rule == "sqrt_max") return std::sqrt(double(std::max(rows, cols)));
  if (rule == "none") return 1.0;
  fail("optim.muon.lr_scale: unknown rule \"{}\"", rule);
}

void check_param_overrides(const std::vector<MuonStackSpec>& stacks, const MuonConfig& config) {
  for (size_t i = 0; i < config.param_overrides.size(); ++i) {
    const std::string& pattern = config.param_overrides[i].pattern;
    bool matched = false;
    for (const MuonStackSpec& s : stacks)
      for (const std::string& name : s.names)
        matched = matched || fnmatch(pattern.c_str(), name.c_str(), 0) == 0;
    check(matched || stacks.empty(),
          "optim.muon.param_overrides[{}].pattern \"{}\" matches none of the NorMuon matrices "
          "(a glob over whole names such as {})",
          i, pattern, stacks.empty() ? "" : stacks.front().names.front());
  }
}

NorMuon::NorMuon(Backend& backend, std::vector<MuonStackSpec> stacks, const MuonConfig& config,
                 int depth, dist::Communicator* comm)
    : backend_(backend), config_(config), depth_(depth), comm_(comm) {
  TensorPlan state_plan;
  int64_t largest = 0, largest_square = 0;
  stacks_.resize(stacks.size());  // the plan holds pointers into stacks_: sized once
  for (size_t i = 0; i < stacks.size(); ++i) {
    Stack& st = stacks_[i];
    st.spec = std::move(stacks[i]);
    const Tensor p = st.spec.params;
    check(p.shape.rank == 3 && p.dtype == DType::f32 && st.spec.grads.shape == p.shape &&
              int64_t(st.spec.names.size()) == p.dim(0),
          "NorMuon: stack {} needs f32 (K, m, n) params and grads and K names", p.shape.str());
    st.count = p.dim(0), st.rows = p.dim(1), st.cols = p.dim(2);
    st.named = std::count_if(st.spec.names.begin(), st.spec.names.end(),
                             [](const std::string& name) { return !name.empty(); });
    state_plan.add(st.momentum, p.shape, DType::f32);
    if (config.second_moment) {
      state_plan.add(st.second, {st.count, st.rows >= st.cols ? st.rows : st.cols}, DType::f32);
    }
    for (const std::string& name : st.spec.names) {
      double lr_mul = 1.0, wd_mul = 1.0;
      for (const auto& o : config.param_overrides) {
        if (fnmatch(o.pattern.c_str(), name.c_str(), 0) == 0) {
          lr_mul = o.lr_mul;
          wd_mul = o.wd_mul;
        }
      }
      st.lr_mul.push_back(lr_mul);
      st.wd_mul.push_back(wd_mul);
    }
    const int64_t small = std::min(st.rows, st.cols);
    largest = std::max(largest, p.numel());
    largest_square = std::max(largest_square, st.count * small * small);
  }
  state_memory_ = state_plan.allocate(backend);
  for (auto& st : stacks_) {
    backend.fill(st.momentum, 0.f);
    if (config.second_moment) backend.fill(st.second, 0.f);
  }
  TensorPlan scratch;
  const DType work = backend.activation_dtype();
  scratch.add(scratch_u_, {largest}, DType::f32);
  scratch.add(work_x_, {largest}, work);
  scratch.add(work_y_, {largest}, work);
  scratch.add(work_gram_, {largest_square}, work);
  scratch.add(work_poly_, {largest_square}, work);
  scratch.add(update_sq_, {2 * int64_t(stacks_.size())}, DType::f32);
  scratch_memory_ = scratch.allocate(backend);
}

void NorMuon::orthogonalize(Tensor u) {
  Backend& b = backend_;
  const std::string& kind = config_.orthogonalizer;
  if (kind == "none") return;
  const int64_t K = u.dim(0), rows = u.dim(1), cols = u.dim(2);
  // Iterate on the wide orientation (r <= c) so that X X^T is the smaller Gram matrix.
  const bool tall = rows > cols;
  const int64_t r = tall ? cols : rows, c = tall ? rows : cols;
  Tensor x = work_x_.slice(0, K * r * c).view({K, r, c});
  Tensor y = work_y_.slice(0, K * r * c).view({K, r, c});
  Tensor gram = work_gram_.slice(0, K * r * r).view({K, r, r});
  Tensor poly = work_poly_.slice(0, K * r * r).view({K, r, r});
  // Normalise from the fp32 update straight into the work dtype (bf16 on the GPU, where the
  // matmuls dominate), transposing tall matrices in the same pass.
  const bool polar = kind == "polar_express";
  b.normalize_matrices(x, u, polar ? 1.02f : 1.0f, polar ? 1e-6f : 1e-7f, tall);
  for (int i = 0; i < config_.ortho_steps; ++i) {
    const auto& [ca, cb, cc] =
        polar ? kPolarExpress[std::min<size_t>(i, kPolarExpress.size() - 1)] : kNewtonSchulz5;
    b.matmul(gram, x, x, false, true, false);                    // A = X X^T
    b.matmul_add(poly, gram, gram, false, false, gram, cc, cb);  // B = c A A + b A
    b.matmul_add(y, poly, x, false, false, x, 1.f, ca);          // Y = B X + a X
    std::swap(x, y);
  }
  // Back into the fp32 update, converting (and transposing tall matrices) in one pass.
  if (tall) {
    b.transpose_matrices(u, x);
  } else {
    b.copy(u, x);
  }
}

void NorMuon::step(int step, int num_iterations, double lr, nlohmann::json& metrics,
                   const std::function<void(size_t stack)>& updated) {
  Backend& b = backend_;
  const double mu = muon_momentum(step, config_);
  const double wd = muon_weight_decay(step, num_iterations, depth_, config_);
  const bool lerp = config_.momentum == "lerp";
  const std::string& mode = config_.weight_decay_mode;
  metrics["muon/momentum"] = mu;
  metrics["muon/weight_decay"] = mode == "none" ? 0.0 : wd;
  for (size_t si = 0; si < stacks_.size(); ++si) {
    Stack& st = stacks_[si];
    Tensor u = scratch_u_.slice(0, st.spec.params.numel()).view(st.spec.params.shape);
    b.muon_momentum(u, st.momentum, st.spec.grads, float(mu), lerp, config_.nesterov);
    orthogonalize(u);
    if (config_.second_moment) b.normuon_second_moment(u, st.second, float(config_.beta2));
    b.sum_squares(update_sq_.slice(int64_t(si), 1), u);
    const double scale = lr_scale(config_.lr_scale, st.rows, st.cols);
    // One update per run of matrices with the same multipliers (usually the whole stack).
    for (int64_t k = 0, end = 0; k < st.count; k = end) {
      end = k + 1;
      while (end < st.count && st.lr_mul[end] == st.lr_mul[k] && st.wd_mul[end] == st.wd_mul[k])
        ++end;
      const double lr_eff = lr * scale * st.lr_mul[k];
      const double w = wd * st.wd_mul[k];
      const int64_t size = st.rows * st.cols;
      const Tensor p = st.spec.params.slice(k * size, (end - k) * size);
      const Tensor x = u.slice(k * size, (end - k) * size);
      if (mode == "cautious") {
        b.muon_apply(p, x, float(lr_eff), float(lr_eff * w), true);
      } else {
        b.muon_apply(p, x, float(lr_eff), mode == "decoupled" ? float(lr * w) : 0.f, false);
      }
    }
    if (updated) updated(si);
  }
  // The update RMS of every stack over its named matrices (padding updates are zero), summed
  // over ranks, read back at once.
  const int64_t num_stacks = int64_t(stacks_.size());
  for (int64_t si = 0; si < num_stacks; ++si)
    b.fill(update_sq_.slice(num_stacks + si, 1), float(stacks_[size_t(si)].named));
  if (comm_ && comm_->world_size() > 1) comm_->all_reduce_sum(update_sq_);
  std::vector<float> sums(size_t(2 * num_stacks));
  b.download(sums.data(), update_sq_);
  for (int64_t si = 0; si < num_stacks; ++si) {
    const Stack& st = stacks_[size_t(si)];
    const std::string label = std::to_string(st.rows) + "x" + std::to_string(st.cols);
    const double elements = double(sums[size_t(num_stacks + si)]) * double(st.rows * st.cols);
    metrics["muon/update_rms/" + label] =
        lr * lr_scale(config_.lr_scale, st.rows, st.cols) *
        std::sqrt(elements > 0 ? sums[size_t(si)] / elements : 0.0);
  }
}

std::vector<StateTensor> NorMuon::state() const {
  std::vector<StateTensor> out;
  for (const auto& st : stacks_) {
    for (int64_t k = 0; k < st.count; ++k) {
      const std::string& name = st.spec.names[k];
      if (name.empty()) continue;  // padding of a sharded stack
      out.push_back({"momentum_buffer." + name, st.momentum[k]});
      if (config_.second_moment) {
        const Shape shape = st.rows >= st.cols ? Shape{st.rows, 1} : Shape{1, st.cols};
        out.push_back({"second_moment." + name, st.second[k].view(shape)});
      }
    }
  }
  return out;
}

}  // namespace lmtrain
