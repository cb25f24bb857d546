// Decisions every rank must take together. A rank that stopped on its own would leave the
// others waiting in their next collective until the rendezvous timeout (Gloo's own, NCCL's
// watchdog) fails them.
#pragma once

#include <vector>

#include "backend/backend.h"
#include "dist/communicator.h"

namespace lmtrain {

// Sums `values` over ranks through `scratch`, a device tensor of at least values.size() f32
// (a no-op for one rank). Throws when the sum was cut short (an aborted communicator).
void all_reduce_sum(dist::Communicator& comm, Backend& backend, Tensor scratch,
                    std::vector<float>& values);

// Throws on every rank when any rank's loss of micro-step `micro` of step `step` (1-based) is
// not finite, naming those ranks. `scratch` holds at least world_size f32.
void stop_on_nonfinite_loss(dist::Communicator& comm, Backend& backend, Tensor scratch, double loss,
                            int step, int micro);

}  // namespace lmtrain
