// Collectives on CPU tensors through Gloo's TCP transport. Ranks bootstrap through the
// rendezvous store (a gloo::rendezvous::Store adapter over TcpStore) and then talk directly:
// each rank listens on the local address that routes to MASTER_ADDR (127.0.0.1 for a
// single-machine job), or on the interface named by GLOO_SOCKET_IFNAME. Collectives run on a
// communication thread, in the order they were started. Constructing one makes the process
// ignore SIGPIPE (unless it has a handler for it): a peer that leaves is then an error naming
// the collective, not a silent death.
#pragma once

#include <memory>
#include <vector>

#include "dist/communicator.h"
#include "dist/serial_worker.h"
#include "dist/tcp_store.h"

namespace gloo {
class Context;
}

namespace lmtrain::dist {

class GlooCommunicator final : public Communicator {
 public:
  // Connects to all other ranks (a full mesh); every rank constructs one at the same point.
  // The store's timeout also bounds each collective.
  explicit GlooCommunicator(std::shared_ptr<TcpStore> store);
  ~GlooCommunicator() override;

  std::string name() const override { return "gloo"; }
  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  PendingPtr start_all_reduce_sum(Tensor x) override;
  PendingPtr start_all_reduce_mean(Tensor x) override;
  // Gloo 2022's only reduce-scatter is the pair-based ReduceScatterHalvingDoubling, which
  // registers fresh buffers on every call; this reduces the whole tensor with the ring
  // all-reduce and keeps this rank's chunk. Twice the traffic of a true reduce-scatter, which
  // the CPU path (tests, small runs) can afford, and bit-identical on every rank.
  PendingPtr start_reduce_scatter_mean(Tensor out, Tensor in) override;
  PendingPtr start_all_gather(Tensor out, Tensor in) override;
  PendingPtr start_broadcast(Tensor x, int root) override;
  void barrier() override;

 private:
  // Queues `job` on the communication thread; its gloo::Exception is reported naming `op`.
  PendingPtr start(const char* op, std::function<void()> job);
  void all_reduce(void* in, void* out, Tensor x);

  std::shared_ptr<TcpStore> store_;
  int rank_ = 0, world_size_ = 1;
  std::shared_ptr<gloo::Context> context_;
  std::vector<float> scratch_;  // the whole reduced tensor of reduce_scatter_mean
  // Declared last: destroyed first, so queued collectives finish while the context exists.
  SerialWorker worker_;
};

}  // namespace lmtrain::dist
