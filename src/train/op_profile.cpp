#include "train/op_profile.h"

#include <algorithm>

namespace lmtrain {

using nlohmann::json;

namespace {

// null where there is no time to divide by.
json rate(double amount, double ms, double unit) {
  return ms > 0 ? json(amount / (ms * 1e-3) / unit) : json(nullptr);
}

}  // namespace

json op_profile_report(const OpProfile& profile, const ProfileWindow& window,
                       const std::string& backend) {
  const size_t n = profile.steps.size();
  const double per_step = n > 0 ? 1.0 / double(n) : 0.0;
  double wall_ms = 0, op_ms = 0;
  json steps = json::array();
  for (const auto& s : profile.steps) {
    wall_ms += s.wall_ms;
    op_ms += s.op_ms;
    steps.push_back({{"step", s.step}, {"wall_ms", s.wall_ms}, {"op_ms", s.op_ms}});
  }
  auto percent = [&](double ms) { return op_ms > 0 ? 100 * ms / op_ms : 0.0; };

  std::vector<const OpStats*> sorted;
  for (const auto& op : profile.ops) sorted.push_back(&op);
  std::stable_sort(sorted.begin(), sorted.end(),
                   [](const OpStats* a, const OpStats* b) { return a->ms > b->ms; });
  json ops = json::array();
  for (const OpStats* op : sorted) {
    ops.push_back({{"phase", op->phase},
                   {"op", op->op},
                   {"key", op->key},
                   {"calls_per_step", double(op->calls) * per_step},
                   {"ms_per_step", op->ms * per_step},
                   {"percent", percent(op->ms)},
                   {"flops_per_step", op->flops * per_step},
                   {"tflop_per_s", op->flops > 0 ? rate(op->flops, op->ms, 1e12) : json(nullptr)},
                   {"bytes_per_step", op->bytes * per_step},
                   {"gb_per_s", op->bytes > 0 ? rate(op->bytes, op->ms, 1e9) : json(nullptr)}});
  }

  // Phases in the order they first ran.
  std::vector<std::string> order;
  std::vector<OpStats> totals;
  for (const auto& op : profile.ops) {
    auto it = std::find(order.begin(), order.end(), op.phase);
    if (it == order.end()) {
      order.push_back(op.phase);
      totals.push_back({op.phase, "", ""});
      it = order.end() - 1;
    }
    OpStats& t = totals[size_t(it - order.begin())];
    t.calls += op.calls;
    t.ms += op.ms;
  }
  json phases = json::array();
  for (const auto& t : totals) {
    phases.push_back({{"phase", t.phase},
                      {"calls_per_step", double(t.calls) * per_step},
                      {"ms_per_step", t.ms * per_step},
                      {"percent", percent(t.ms)}});
  }

  return {{"backend", backend},
          {"window", {{"start", window.start}, {"steps", window.steps}}},
          {"profiled_steps", n},
          {"complete", int(n) >= window.steps},
          {"step_wall_ms", wall_ms * per_step},
          {"op_ms", op_ms * per_step},
          {"outside_ops_ms", (wall_ms - op_ms) * per_step},
          {"steps", steps},
          {"phases", phases},
          {"ops", ops}};
}

std::string format_op_profile(const json& report, size_t top) {
  const auto& steps = report["steps"];
  if (steps.empty()) return "op profile: no step was profiled";
  const double wall = report["step_wall_ms"], op = report["op_ms"];
  std::string out = fmt::format(
      "op profile of steps {}-{} on {} ({} steps{}): per step {:.2f} ms of op time in {:.2f} ms "
      "wall, {:.2f} ms ({:.1f}%) outside the ops (host work, transfers, waiting)\n",
      steps.front()["step"].get<int>(), steps.back()["step"].get<int>(),
      report["backend"].get<std::string>(), steps.size(),
      report["complete"].get<bool>() ? ""
                                     : fmt::format(" of the {} asked for: the run ended first",
                                                   report["window"]["steps"].get<int>()),
      op, wall, wall - op, wall > 0 ? 100 * (wall - op) / wall : 0.0);
  out +=
      fmt::format("  {:<12} {:>10} {:>9} {:>11}\n", "phase", "ms/step", "% of ops", "calls/step");
  for (const auto& p : report["phases"]) {
    out += fmt::format("  {:<12} {:>10.3f} {:>8.1f}% {:>11.1f}\n", p["phase"].get<std::string>(),
                       p["ms_per_step"].get<double>(), p["percent"].get<double>(),
                       p["calls_per_step"].get<double>());
  }
  const auto& ops = report["ops"];
  out += fmt::format("  the {} labels with the most time (of {}):\n", std::min(top, ops.size()),
                     ops.size());
  out += fmt::format("  {:<10} {:<22} {:>10} {:>10} {:>9} {:>15}  {}\n", "phase", "op",
                     "calls/step", "ms/step", "% of ops", "rate", "key");
  for (size_t i = 0; i < std::min(top, ops.size()); ++i) {
    const json& o = ops[i];
    std::string speed = "";
    if (!o["tflop_per_s"].is_null()) {
      speed = fmt::format("{:.2f} TFLOP/s", o["tflop_per_s"].get<double>());
    } else if (!o["gb_per_s"].is_null()) {
      speed = fmt::format("{:.1f} GB/s", o["gb_per_s"].get<double>());
    }
    std::string line =
        fmt::format("  {:<10} {:<22} {:>10.1f} {:>10.3f} {:>8.1f}% {:>15}  {}",
                    o["phase"].get<std::string>(), o["op"].get<std::string>(),
                    o["calls_per_step"].get<double>(), o["ms_per_step"].get<double>(),
                    o["percent"].get<double>(), speed, o["key"].get<std::string>());
    line.erase(line.find_last_not_of(' ') + 1);
    out += line + "\n";
  }
  out.pop_back();  // spdlog ends the line
  return out;
}

}  // namespace lmtrain
