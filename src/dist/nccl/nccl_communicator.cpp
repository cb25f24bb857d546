#include "dist/nccl/nccl_communicator.h"

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <thread>

#include "core/error.h"

namespace lmtrain::dist {

namespace {

void nccl_check(ncclResult_t result, const char* op, int rank, int world) {
  if (result == ncclSuccess) return;
  fail("nccl {} (rank {} of {}): {} ({})", op, rank, world, ncclGetErrorString(result),
       ncclGetLastError(nullptr));
}

ncclDataType_t nccl_type(Tensor x) { return x.dtype == DType::i32 ? ncclInt32 : ncclFloat32; }

void cuda_check(cudaError_t err, const char* what, int rank, int world) {
  check(err == cudaSuccess, "nccl {} (rank {} of {}): {}", what, rank, world,
        cudaGetErrorString(err));
}

// The communicator's asynchronous error: a collective that failed (a peer gone, a network
// error) shows here, while its event may never complete.
ncclResult_t comm_async_error(ncclComm_t comm) {
  ncclResult_t async = ncclSuccess;
  if (ncclCommGetAsyncError(comm, &async) != ncclSuccess) return ncclInternalError;
  return async == ncclInProgress ? ncclSuccess : async;
}

// The event recorded after a collective, shared by its Pending and the watchdog: whichever
// lets go last destroys it.
class CollectiveEvent {
 public:
  enum State { starting, recorded, dropped };
  CollectiveEvent(int rank, int world) {
    cuda_check(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming), "event", rank, world);
  }
  ~CollectiveEvent() { cudaEventDestroy(event_); }
  CollectiveEvent(const CollectiveEvent&) = delete;
  CollectiveEvent& operator=(const CollectiveEvent&) = delete;
  cudaEvent_t event() const { return event_; }
  void set(State state) { state_ = state; }
  // A collective that failed to start (dropped) is done too: nothing of it runs.
  bool done() const {
    const State state = state_;
    return state == dropped || (state == recorded && cudaEventQuery(event_) != cudaErrorNotReady);
  }

 private:
  cudaEvent_t event_ = nullptr;
  std::atomic<State> state_ = starting;
};

// The backend's stream waits on the collective's event when the collective is waited for.
class EventPending final : public Pending {
 public:
  EventPending(cudaStream_t waiter, std::shared_ptr<std::atomic<bool>> aborted, int rank, int world)
      : waiter_(waiter),
        aborted_(std::move(aborted)),
        done_(std::make_shared<CollectiveEvent>(rank, world)) {}
  // Not waited for (an error unwinds the step): the collective may still be writing buffers
  // that are about to be freed, so wait for it on the host, unless the communicator was
  // aborted (the collective has been ended). One that NCCL reports failed, or that takes too
  // long, is aborted by the watchdog.
  ~EventPending() override {
    if (!waited_) {
      while (!*aborted_ && !done_->done())
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  EventPending(const EventPending&) = delete;
  EventPending& operator=(const EventPending&) = delete;
  const std::shared_ptr<CollectiveEvent>& done() const { return done_; }
  void wait() override {
    cudaError_t err = cudaStreamWaitEvent(waiter_, done_->event(), 0);
    check(err == cudaSuccess, "nccl wait: {}", cudaGetErrorString(err));
    waited_ = true;
  }

 private:
  cudaStream_t waiter_;
  std::shared_ptr<std::atomic<bool>> aborted_;
  std::shared_ptr<CollectiveEvent> done_;
  bool waited_ = false;
};

}  // namespace

NcclCommunicator::NcclCommunicator(std::shared_ptr<TcpStore> store, cudaStream_t stream)
    : store_(std::move(store)),
      stream_(stream),
      rank_(store_->info().rank),
      world_size_(store_->info().world_size) {
  ncclUniqueId id;
  const std::string key = "nccl/unique_id";
  if (rank_ == 0) {
    nccl_check(ncclGetUniqueId(&id), "get unique id", rank_, world_size_);
    store_->set(key, Bytes(id.internal, id.internal + sizeof id.internal));
  }
  Bytes published = store_->get(key);
  check(published.size() == sizeof id.internal,
        "rendezvous: key '{}' holds {} bytes, not an "
        "ncclUniqueId ({} bytes)",
        key, published.size(), sizeof id.internal);
  std::memcpy(id.internal, published.data(), sizeof id.internal);
  int device = 0;
  cuda_check(cudaGetDevice(&device), "device", rank_, world_size_);
  watchdog_.emplace(
      "nccl", rank_, world_size_, store_->timeout(),
      CollectiveWatchdog::Hooks{
          // Its queries of the events (and the abort's CUDA calls) would otherwise make a
          // context on GPU 0 for every rank.
          .on_thread_start = [device] { cudaSetDevice(device); },
          .engine_error =
              [this] {
                // Not waiting: the rank's thread may be stuck in an NCCL call holding the lock.
                const ncclResult_t error = async_error(/*wait=*/false);
                if (error == ncclSuccess) return std::string();
                return fmt::format("{} ({})", ncclGetErrorString(error), ncclGetLastError(nullptr));
              },
          .end =
              [this] {
                mark_aborted();
                // An init that never returned leaves nothing to abort and nothing that could
                // release the rank: it exits now (the reason is logged).
                if (!comm_ready_) std::_Exit(1);
                ncclCommAbort(comm_);
              },
          .exit = [] { std::_Exit(1); },
      });

  // The init meets every other rank over NCCL's own sockets: a machine that cannot reach rank
  // 0's address would wait in it for ever. It is watched like a collective.
  auto initialized = std::make_shared<std::atomic<bool>>(false);
  watchdog_->watch(
      "init", [initialized] { return initialized->load(); },
      "NCCL_SOCKET_IFNAME picks the network interface NCCL uses between machines");
  ncclComm_t comm = nullptr;
  const ncclResult_t init = ncclCommInitRank(&comm, world_size_, id, rank_);
  *initialized = true;
  nccl_check(init, "init", rank_, world_size_);
  {
    std::lock_guard lock(comm_mutex_);
    comm_ = comm;
    comm_ready_ = true;
  }
  cuda_check(cudaStreamCreateWithFlags(&comm_stream_, cudaStreamNonBlocking), "stream", rank_,
             world_size_);
  cuda_check(cudaEventCreateWithFlags(&inputs_ready_, cudaEventDisableTiming), "event", rank_,
             world_size_);
}

ncclResult_t NcclCommunicator::async_error(bool wait) {
  std::unique_lock lock(comm_mutex_, std::defer_lock);
  if (wait) {
    lock.lock();
  } else if (!lock.try_lock()) {
    return ncclSuccess;
  }
  return comm_ && !*aborted_ ? comm_async_error(comm_) : ncclSuccess;
}

NcclCommunicator::~NcclCommunicator() {
  // Going away on an error: collectives may wait for peers that will never join them. Aborting
  // ends them, so that freeing memory (which synchronizes the device) cannot hang. Otherwise
  // the started collectives finish first, which the watchdog bounds.
  const bool unwinding = std::uncaught_exceptions() > 0;
  if (!unwinding && !*aborted_) cudaStreamSynchronize(comm_stream_);
  if (unwinding || *aborted_ || async_error(/*wait=*/true) != ncclSuccess) abort();
  const bool aborted = *aborted_;
  watchdog_.reset();  // waits for an abort: a timeout at most, then the rank exits
  if (!aborted) ncclCommDestroy(comm_);
  cudaEventDestroy(inputs_ready_);
  cudaStreamDestroy(comm_stream_);
}

template <typename Enqueue>
PendingPtr NcclCommunicator::start(const char* op, Enqueue&& enqueue) {
  // The inputs are written by the backend's stream: start after what it has queued so far. One
  // event serves every start: a stream wait takes the event as it is when the wait is queued.
  // The Pending exists before the collective is queued, so none runs without one, and the
  // watchdog watches it from before the NCCL call, which may itself wait for peers (connecting).
  refuse_if_aborted(op);
  auto pending = std::make_unique<EventPending>(stream_, aborted_, rank_, world_size_);
  const std::shared_ptr<CollectiveEvent>& done = pending->done();
  watchdog_->watch(op, [done] { return done->done(); });
  try {
    cuda_check(cudaEventRecord(inputs_ready_, stream_), op, rank_, world_size_);
    cuda_check(cudaStreamWaitEvent(comm_stream_, inputs_ready_, 0), op, rank_, world_size_);
    {
      std::unique_lock lock(comm_mutex_);
      if (*aborted_) {  // since the check above; refused without the lock (it reads the watchdog)
        lock.unlock();
        refuse_if_aborted(op);
      }
      nccl_check(enqueue(), op, rank_, world_size_);
    }
    cuda_check(cudaEventRecord(done->event(), comm_stream_), op, rank_, world_size_);
  } catch (...) {
    done->set(CollectiveEvent::dropped);
    throw;
  }
  done->set(CollectiveEvent::recorded);
  return pending;
}

void NcclCommunicator::refuse_if_aborted(const char* op) const {
  if (!*aborted_) return;
  const std::string why = watchdog_ ? watchdog_->failure() : "";
  fail("nccl {} (rank {} of {}): the communicator was aborted {}", op, rank_, world_size_,
       why.empty() ? "after an error" : "because " + why);
}

PendingPtr NcclCommunicator::start_all_reduce_sum(Tensor x) {
  check_dtype("all_reduce_sum", x, true);
  return start("all_reduce_sum", [&] {
    return ncclAllReduce(x.data, x.data, size_t(x.numel()), nccl_type(x), ncclSum, comm_,
                         comm_stream_);
  });
}

PendingPtr NcclCommunicator::start_all_reduce_mean(Tensor x) {
  check_dtype("all_reduce_mean", x, false);
  return start("all_reduce_mean", [&] {
    return ncclAllReduce(x.data, x.data, size_t(x.numel()), ncclFloat32, ncclAvg, comm_,
                         comm_stream_);
  });
}

PendingPtr NcclCommunicator::start_reduce_scatter_mean(Tensor out, Tensor in) {
  check_dtype("reduce_scatter_mean", in, false);
  check_sharded("reduce_scatter_mean", in, out, world_size_);
  return start("reduce_scatter_mean", [&] {
    return ncclReduceScatter(in.data, out.data, size_t(out.numel()), ncclFloat32, ncclAvg, comm_,
                             comm_stream_);
  });
}

PendingPtr NcclCommunicator::start_all_gather(Tensor out, Tensor in) {
  check_dtype("all_gather", in, true);
  check_sharded("all_gather", out, in, world_size_);
  return start("all_gather", [&] {
    return ncclAllGather(in.data, out.data, size_t(in.numel()), nccl_type(in), comm_, comm_stream_);
  });
}

PendingPtr NcclCommunicator::start_broadcast(Tensor x, int root) {
  check_dtype("broadcast", x, true);
  check(root >= 0 && root < world_size_, "broadcast: root {} is not a rank of a world of {}", root,
        world_size_);
  return start("broadcast", [&] {
    return ncclBroadcast(x.data, x.data, size_t(x.numel()), nccl_type(x), root, comm_,
                         comm_stream_);
  });
}

void NcclCommunicator::barrier() {
  refuse_if_aborted("barrier");
  // Drain this rank's queued work, then meet the others through the store: NCCL has no barrier,
  // and a store barrier needs no device buffer. A collective that hangs the drain is aborted by
  // the watchdog, which ends the drain.
  cuda_check(cudaStreamSynchronize(stream_), "barrier", rank_, world_size_);
  cuda_check(cudaStreamSynchronize(comm_stream_), "barrier", rank_, world_size_);
  refuse_if_aborted("barrier");
  nccl_check(async_error(/*wait=*/true), "collective (reported at the barrier)", rank_,
             world_size_);
  store_->barrier("nccl");
}

void NcclCommunicator::mark_aborted() {
  std::lock_guard lock(comm_mutex_);  // no NCCL call is using comm_ once this is set
  *aborted_ = true;
}

void NcclCommunicator::abort() {
  mark_aborted();
  watchdog_->end();  // ncclCommAbort on the watchdog's thread, within its timeout
}

}  // namespace lmtrain::dist
