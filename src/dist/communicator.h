// Collectives across the ranks of a job, on tensors of the rank's backend: Gloo over TCP for CPU
// tensors, NCCL for CUDA tensors, and a local stand-in for a single process.
//
// Layout contract of the sharded collectives, which the optimizer is built on: a "whole" tensor
// holds world_size equal chunks along dim 0 and chunk r belongs to rank r. reduce_scatter_mean
// leaves rank r the mean over ranks of chunk r; all_gather is its inverse and puts every rank's
// chunk into place. Callers pad dim 0 to a multiple of world_size (padded_rows) so that chunks
// are whole rows: whole matrices of a NorMuon stack (K, m, n), whole rows of an AdamW parameter.
//
// Every call is collective: all ranks make the same calls in the same order with the same shapes.
// Results are bit-identical on all ranks.
//
// Each collective has an asynchronous form that returns a Pending, so that communication can run
// while the backend computes (gradients of late layers travel while early layers run their
// backward; updated weights travel while the next stack's update is computed). A started
// collective reads its input and writes its output until wait(): neither may be touched before.
// NCCL runs collectives on a communication stream of its own, and wait() makes the backend's
// stream wait for it without blocking the host; Gloo runs them in order on a communication
// thread, and wait() blocks until done and rethrows its error. The blocking forms are start +
// wait, so the two mix freely and keep one order.
#pragma once

#include <chrono>
#include <exception>
#include <memory>
#include <string>

#include "backend/backend.h"
#include "dist/env.h"

namespace lmtrain::dist {

class TcpStore;

// A started collective. Destroying one that was not waited for waits, dropping its error.
class Pending {
 public:
  virtual ~Pending() = default;
  virtual void wait() = 0;
};
using PendingPtr = std::unique_ptr<Pending>;

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual std::string name() const = 0;  // "local", "gloo" or "nccl"
  virtual int rank() const = 0;
  virtual int world_size() const = 0;

  // In place on every rank: x = sum (or mean) of x over ranks. Sum: f32 or i32; mean: f32.
  virtual PendingPtr start_all_reduce_sum(Tensor x) = 0;
  virtual PendingPtr start_all_reduce_mean(Tensor x) = 0;
  // out (chunk) = mean over ranks of this rank's chunk of `in` (whole); f32.
  virtual PendingPtr start_reduce_scatter_mean(Tensor out, Tensor in) = 0;
  // out (whole) = every rank's `in` (chunk) in rank order; f32 or i32.
  virtual PendingPtr start_all_gather(Tensor out, Tensor in) = 0;
  // In place: x = root's x; f32 or i32.
  virtual PendingPtr start_broadcast(Tensor x, int root) = 0;
  // Returns once every rank has called it (after this rank's started collectives complete).
  virtual void barrier() = 0;
  // Ends this rank's collectives in flight without waiting for the other ranks, where the engine
  // needs it (NCCL: a collective whose peer has failed never completes, and freeing memory
  // synchronizes the device; the abort runs on the watchdog's thread, which exits a rank it
  // leaves stuck). The communicator takes no collective afterwards.
  virtual void abort() {}
  // Throws, naming the reason, when the communicator was aborted since `op` was started: its
  // results on the host may be partial (NCCL; the other engines fail the collective itself).
  virtual void check_results(const char* /*op*/) {}

  void all_reduce_sum(Tensor x) { start_all_reduce_sum(x)->wait(); }
  void all_reduce_mean(Tensor x) { start_all_reduce_mean(x)->wait(); }
  void reduce_scatter_mean(Tensor out, Tensor in) { start_reduce_scatter_mean(out, in)->wait(); }
  void all_gather(Tensor out, Tensor in) { start_all_gather(out, in)->wait(); }
  void broadcast(Tensor x, int root) { start_broadcast(x, root)->wait(); }
};

// Aborts the communicator when an exception that started after its construction destroys it.
// Declared after the buffers that collectives use, it goes before them as an error unwinds.
class AbortOnError {
 public:
  explicit AbortOnError(Communicator& comm) : comm_(comm) {}
  ~AbortOnError() {
    if (std::uncaught_exceptions() > exceptions_) comm_.abort();
  }
  AbortOnError(const AbortOnError&) = delete;
  AbortOnError& operator=(const AbortOnError&) = delete;

 private:
  Communicator& comm_;
  const int exceptions_ = std::uncaught_exceptions();
};

// Rows of dim 0 rounded up to a multiple of world_size, so chunks hold whole rows.
inline int64_t padded_rows(int64_t rows, int world_size) {
  return (rows + world_size - 1) / world_size * world_size;
}

// Checks the shapes of a sharded collective (`whole` = world_size chunks of `chunk` along dim 0)
// and throws naming the op when they do not fit.
void check_sharded(const char* op, Tensor whole, Tensor chunk, int world_size);
// Checks that a tensor has one of the dtypes an op supports.
void check_dtype(const char* op, Tensor x, bool allow_i32);

// World size 1: every collective is the identity (copies where out and in differ), done at once.
class LocalCommunicator final : public Communicator {
 public:
  explicit LocalCommunicator(Backend& backend) : backend_(backend) {}
  std::string name() const override { return "local"; }
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  PendingPtr start_all_reduce_sum(Tensor x) override;
  PendingPtr start_all_reduce_mean(Tensor x) override;
  PendingPtr start_reduce_scatter_mean(Tensor out, Tensor in) override;
  PendingPtr start_all_gather(Tensor out, Tensor in) override;
  PendingPtr start_broadcast(Tensor x, int root) override;
  void barrier() override {}

 private:
  Backend& backend_;
};

// Connects this rank to the others. A world of 1 gets a LocalCommunicator and opens no socket.
// Otherwise rank 0 starts the rendezvous store on MASTER_ADDR:MASTER_PORT, every rank joins
// it, and the backend picks the engine: Gloo for "cpu", NCCL for "cuda". `timeout` bounds the
// rendezvous and every later collective (rendezvous_timeout() reads it from the environment):
// Gloo's own timeout, NCCL's watchdog (dist/collective_watchdog.h).
std::unique_ptr<Communicator> make_communicator(const RankInfo& info, Backend& backend,
                                                std::chrono::milliseconds timeout);

}  // namespace lmtrain::dist
