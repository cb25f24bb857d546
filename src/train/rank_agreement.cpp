#include "train/rank_agreement.h"

#include <fmt/ranges.h>

#include <cmath>

#include "core/error.h"

namespace lmtrain {

void all_reduce_sum(dist::Communicator& comm, Backend& backend, Tensor scratch,
                    std::vector<float>& values) {
  if (comm.world_size() == 1) return;
  check(scratch.numel() >= int64_t(values.size()),
        "all_reduce_sum: {} values do not fit a scratch of {}", values.size(), scratch.numel());
  Tensor t = scratch.slice(0, int64_t(values.size()));
  backend.upload(t, values.data());
  comm.all_reduce_sum(t);
  backend.download(values.data(), t);
  comm.check_results("all_reduce_sum");  // not decisions taken on what an abort left
}

void stop_on_nonfinite_loss(dist::Communicator& comm, Backend& backend, Tensor scratch, double loss,
                            int step, int micro) {
  const int world = comm.world_size(), rank = comm.rank();
  const bool finite = std::isfinite(loss);
  if (world == 1) {
    check(finite, "step {}: loss is {} (micro-step {}); stopping", step, loss, micro);
    return;
  }
  // One flag per rank, so that every rank can name the ones that failed.
  std::vector<float> failed(size_t(world), 0.f);
  failed[size_t(rank)] = finite ? 0.f : 1.f;
  all_reduce_sum(comm, backend, scratch, failed);
  std::vector<int> ranks;
  for (int r = 0; r < world; ++r)
    if (failed[size_t(r)] > 0) ranks.push_back(r);
  if (ranks.empty()) return;
  check(finite, "step {}: loss is {} (micro-step {}, rank {}); stopping", step, loss, micro, rank);
  fail("step {}: loss is not finite on rank{} {} (micro-step {}); stopping", step,
       ranks.size() > 1 ? "s" : "", fmt::join(ranks, ", "), micro);
}

}  // namespace lmtrain
