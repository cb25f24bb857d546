// Collectives on CUDA tensors through NCCL. Compiled only in CUDA builds (CMake adds
// src/dist/nccl/ to lmtrain_cuda). Rank 0 creates the ncclUniqueId and publishes it in the
// rendezvous store; every rank reads it and joins the communicator on its LOCAL_RANK's device.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <memory>

#include "dist/communicator.h"
#include "dist/tcp_store.h"

namespace lmtrain::dist {

class NcclCommunicator final : public Communicator {
 public:
  // `stream` is the CUDA backend's stream: collectives are enqueued on it, so they order with
  // the backend's ops without host synchronization. The current device must already be the
  // rank's device (the backend is created on it).
  NcclCommunicator(std::shared_ptr<TcpStore> store, cudaStream_t stream);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  std::string name() const override { return "nccl"; }
  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  void all_reduce_sum(Tensor x) override;
  void all_reduce_mean(Tensor x) override;
  void reduce_scatter_mean(Tensor out, Tensor in) override;
  void all_gather(Tensor out, Tensor in) override;
  void broadcast(Tensor x, int root) override;
  void barrier() override;

 private:
  std::shared_ptr<TcpStore> store_;
  cudaStream_t stream_;
  int rank_ = 0, world_size_ = 1;
  ncclComm_t comm_ = nullptr;
};

}  // namespace lmtrain::dist
