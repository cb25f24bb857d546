// The op profile of `run.profile_steps`: what TimedBackend measured, per step, as
// <run dir>/op_profile.json and as a table for the log.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "backend/timed_backend.h"

namespace lmtrain {

// The configured window, for the report: steps [start, start + steps), 1-based.
struct ProfileWindow {
  int start = 0, steps = 0;
};

// Every label with calls, ms, share of the op time and TFLOP/s or GB/s per profiled step,
// sorted by time; per-phase totals; each step's wall time against its summed op time.
// `complete` says whether every step of the window ran.
nlohmann::json op_profile_report(const OpProfile& profile, const ProfileWindow& window,
                                 const std::string& backend);

// A readable summary of a report: totals, the phases and the `top` labels by time.
std::string format_op_profile(const nlohmann::json& report, size_t top = 25);

}  // namespace lmtrain
