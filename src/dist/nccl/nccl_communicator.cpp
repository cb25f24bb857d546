#include "dist/nccl/nccl_communicator.h"

#include <cstring>

#include "core/error.h"

namespace lmtrain::dist {

namespace {

void nccl_check(ncclResult_t result, const char* op, int rank, int world) {
  if (result == ncclSuccess) return;
  fail("nccl {} (rank {} of {}): {} ({})", op, rank, world, ncclGetErrorString(result),
       ncclGetLastError(nullptr));
}

ncclDataType_t nccl_type(Tensor x) { return x.dtype == DType::i32 ? ncclInt32 : ncclFloat32; }

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
  nccl_check(ncclCommInitRank(&comm_, world_size_, id, rank_), "init", rank_, world_size_);
}

NcclCommunicator::~NcclCommunicator() {
  // Pending collectives on the stream must finish before the communicator goes.
  cudaStreamSynchronize(stream_);
  ncclCommDestroy(comm_);
}

void NcclCommunicator::all_reduce_sum(Tensor x) {
  check_dtype("all_reduce_sum", x, true);
  nccl_check(
      ncclAllReduce(x.data, x.data, size_t(x.numel()), nccl_type(x), ncclSum, comm_, stream_),
      "all_reduce_sum", rank_, world_size_);
}

void NcclCommunicator::all_reduce_mean(Tensor x) {
  check_dtype("all_reduce_mean", x, false);
  nccl_check(ncclAllReduce(x.data, x.data, size_t(x.numel()), ncclFloat32, ncclAvg, comm_, stream_),
             "all_reduce_mean", rank_, world_size_);
}

void NcclCommunicator::reduce_scatter_mean(Tensor out, Tensor in) {
  check_dtype("reduce_scatter_mean", in, false);
  check_sharded("reduce_scatter_mean", in, out, world_size_);
  nccl_check(ncclReduceScatter(in.data, out.data, size_t(out.numel()), ncclFloat32, ncclAvg, comm_,
                               stream_),
             "reduce_scatter_mean", rank_, world_size_);
}

void NcclCommunicator::all_gather(Tensor out, Tensor in) {
  check_dtype("all_gather", in, true);
  check_sharded("all_gather", out, in, world_size_);
  nccl_check(ncclAllGather(in.data, out.data, size_t(in.numel()), nccl_type(in), comm_, stream_),
             "all_gather", rank_, world_size_);
}

void NcclCommunicator::broadcast(Tensor x, int root) {
  check_dtype("broadcast", x, true);
  check(root >= 0 && root < world_size_, "broadcast: root {} is not a rank of a world of {}", root,
        world_size_);
  nccl_check(ncclBroadcast(x.data, x.data, size_t(x.numel()), nccl_type(x), root, comm_, stream_),
             "broadcast", rank_, world_size_);
}

void NcclCommunicator::barrier() {
  // Drain this rank's queued work, then meet the others through the store: NCCL has no barrier,
  // and a store barrier needs no device buffer.
  cudaError_t err = cudaStreamSynchronize(stream_);
  check(err == cudaSuccess, "nccl barrier (rank {} of {}): {}", rank_, world_size_,
        cudaGetErrorString(err));
  store_->barrier("nccl");
}

}  // namespace lmtrain::dist
