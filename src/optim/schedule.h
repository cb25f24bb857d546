// Step-dependent multipliers shared by all optimizer groups.
#pragma once

#include <cmath>

#include "config/config.h"

namespace lmtrain {

// Linear warmup, constant, then linear warmdown to final_lr_frac over the last steps. Step
// counts round half to even (nearbyint), as Python's round() does in the reference.
inline double lr_multiplier(int step, int num_iterations, const ScheduleConfig& s) {
  const int warmup = int(std::nearbyint(s.warmup_ratio * num_iterations));
  const int warmdown = int(std::nearbyint(s.warmdown_ratio * num_iterations));
  if (step < warmup) return double(step + 1) / warmup;
  if (step <= num_iterations - warmdown) return 1.0;
  const double progress = double(num_iterations - step) / warmdown;
  return progress + (1.0 - progress) * s.final_lr_frac;
}

}  // namespace lmtrain
