// Step-dependent multipliers shared by all optimizer groups.
#pragma once

#include <algorithm>
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

// Muon momentum: linear from momentum_start to momentum_end over the warmup steps.
inline double muon_momentum(int step, const MuonConfig& m) {
  const double frac =
      m.momentum_warmup_steps > 0 ? std::min(double(step) / m.momentum_warmup_steps, 1.0) : 1.0;
  return (1.0 - frac) * m.momentum_start + frac * m.momentum_end;
}

// Muon weight decay: scaled from the reference depth, decaying linearly to 0 over the run.
inline double muon_weight_decay(int step, int num_iterations, int depth, const MuonConfig& m) {
  const double scaled = m.weight_decay * std::pow(m.weight_decay_reference_depth / depth,
                                                  m.weight_decay_depth_exponent);
  return scaled * (1.0 - double(step) / num_iterations);
}

}  // namespace lmtrain
