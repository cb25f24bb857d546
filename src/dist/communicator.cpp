#include "dist/communicator.h"

#ifdef LMTRAIN_HAVE_NCCL
#include "backend/cuda/cuda_backend.h"
#include "dist/nccl/nccl_communicator.h"
#endif

#include "core/error.h"
#include "dist/gloo_communicator.h"
#include "dist/tcp_store.h"

namespace lmtrain::dist {

void check_dtype(const char* op, Tensor x, bool allow_i32) {
  check(x.dtype == DType::f32 || (allow_i32 && x.dtype == DType::i32),
        "{}: {} tensors are not supported (f32{})", op, dtype_name(x.dtype),
        allow_i32 ? " or i32" : "");
}

void check_sharded(const char* op, Tensor whole, Tensor chunk, int world_size) {
  check(whole.dtype == chunk.dtype, "{}: dtypes differ ({} whole, {} chunk)", op,
        dtype_name(whole.dtype), dtype_name(chunk.dtype));
  check(whole.shape.rank >= 1 && whole.dim(0) % world_size == 0 &&
            whole.numel() == chunk.numel() * world_size,
        "{}: {} is not {} chunks of {} along dim 0 (pad dim 0 to a multiple of the world size)", op,
        whole.shape.str(), world_size, chunk.shape.str());
}

namespace {

struct Done final : Pending {
  void wait() override {}
};

PendingPtr done() { return std::make_unique<Done>(); }

}  // namespace

PendingPtr LocalCommunicator::start_all_reduce_sum(Tensor x) {
  check_dtype("all_reduce_sum", x, true);
  return done();
}

PendingPtr LocalCommunicator::start_all_reduce_mean(Tensor x) {
  check_dtype("all_reduce_mean", x, false);
  return done();
}

PendingPtr LocalCommunicator::start_reduce_scatter_mean(Tensor out, Tensor in) {
  check_dtype("reduce_scatter_mean", in, false);
  check_sharded("reduce_scatter_mean", in, out, 1);
  if (out.data != in.data) backend_.copy(out, in);
  return done();
}

PendingPtr LocalCommunicator::start_all_gather(Tensor out, Tensor in) {
  check_dtype("all_gather", in, true);
  check_sharded("all_gather", out, in, 1);
  if (out.data != in.data) backend_.copy(out, in);
  return done();
}

PendingPtr LocalCommunicator::start_broadcast(Tensor x, int root) {
  check_dtype("broadcast", x, true);
  check(root == 0, "broadcast: root {} is not a rank of a world of 1", root);
  return done();
}

std::unique_ptr<Communicator> make_communicator(const RankInfo& info, Backend& backend,
                                                std::chrono::milliseconds timeout) {
  if (info.world_size == 1) return std::make_unique<LocalCommunicator>(backend);
#ifndef LMTRAIN_HAVE_NCCL
  check(backend.name() != "cuda",
        "distributed training: {} ranks on GPUs need NCCL, and this lmtrain was built without it "
        "(install libnccl-dev and rebuild; one GPU trains without it)",
        info.world_size);
#endif
  auto store = std::make_shared<TcpStore>(info, timeout, inherited_store_listener(info));
  if (backend.name() == "cpu") return std::make_unique<GlooCommunicator>(std::move(store));
#ifdef LMTRAIN_HAVE_NCCL
  if (backend.name() == "cuda") {
    return std::make_unique<NcclCommunicator>(std::move(store),
                                              static_cast<CudaBackend&>(backend).stream());
  }
#endif
  fail("distributed training: no communicator for the {} backend", backend.name());
}

}  // namespace lmtrain::dist
