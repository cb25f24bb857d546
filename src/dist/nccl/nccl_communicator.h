// Collectives on CUDA tensors through NCCL. Compiled only in CUDA builds (CMake adds
// src/dist/nccl/ to lmtrain_cuda). Rank 0 creates the ncclUniqueId and publishes it in the
// rendezvous store; every rank reads it and joins the communicator on its backend's device.
// Collectives run on a communication stream of their own, ordered after the backend's stream
// at the point they were started, and wait() orders the backend's stream after them: the two
// streams overlap in between, and the host never blocks. NCCL's collectives have no timeout: a
// watchdog aborts the communicator when one takes longer than the store's timeout or NCCL
// reports an error, so that a peer that is gone fails this rank instead of hanging it.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <optional>

#include "dist/collective_watchdog.h"
#include "dist/communicator.h"
#include "dist/tcp_store.h"

namespace lmtrain::dist {

class NcclCommunicator final : public Communicator {
 public:
  // `stream` is the CUDA backend's stream. The current device must already be the rank's
  // device (the backend is created on it).
  NcclCommunicator(std::shared_ptr<TcpStore> store, cudaStream_t stream);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  std::string name() const override { return "nccl"; }
  int rank() const override { return rank_; }
  int world_size() const override { return world_size_; }
  PendingPtr start_all_reduce_sum(Tensor x) override;
  PendingPtr start_all_reduce_mean(Tensor x) override;
  PendingPtr start_reduce_scatter_mean(Tensor out, Tensor in) override;
  PendingPtr start_all_gather(Tensor out, Tensor in) override;
  PendingPtr start_broadcast(Tensor x, int root) override;
  void barrier() override;
  void abort() override;
  void check_results(const char* op) override { refuse_if_aborted(op); }

 private:
  // Orders the communication stream after the backend's stream, runs `enqueue` (one NCCL
  // call on comm_stream_) and returns the Pending that orders the backend's stream after it.
  template <typename Enqueue>
  PendingPtr start(const char* op, Enqueue&& enqueue);
  // Throws, naming `op` and why, once the communicator has been aborted.
  void refuse_if_aborted(const char* op) const;

  std::shared_ptr<TcpStore> store_;
  cudaStream_t stream_;  // the backend's
  cudaStream_t comm_stream_ = nullptr;
  cudaEvent_t inputs_ready_ = nullptr;  // recorded on stream_ at each start
  int rank_ = 0, world_size_ = 1;
  ncclComm_t comm_ = nullptr;
  std::atomic<bool> comm_ready_ = false;  // comm_ is set (its init returned)
  // Set by abort(); shared with the Pendings, which then stop waiting for their collectives.
  std::shared_ptr<std::atomic<bool>> aborted_ = std::make_shared<std::atomic<bool>>(false);
  // Guards comm_ against its abort: held by the NCCL calls that queue a collective or read its
  // error, and while the communicator is marked aborted (not while it aborts, which may take
  // long). Once aborted_ is set, nothing touches comm_ but ncclCommAbort, which only the
  // watchdog's end calls (once).
  std::mutex comm_mutex_;
  // The communicator's asynchronous error; success before its init returned, once it is
  // aborted, and (without `wait`) while another thread holds comm_mutex_.
  ncclResult_t async_error(bool wait);
  // From now on the communicator refuses collectives and nothing touches comm_ but its abort.
  void mark_aborted();
  // Started once comm_ exists; stopped first when the communicator goes, as it reads comm_.
  std::optional<CollectiveWatchdog> watchdog_;
};

}  // namespace lmtrain::dist
