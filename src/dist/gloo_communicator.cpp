#include "dist/gloo_communicator.h"

#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/barrier.h>
#include <gloo/broadcast.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>
#include <signal.h>

#include <cstring>

#include "core/error.h"
#include "dist/socket.h"

namespace lmtrain::dist {

namespace {

// Gloo's bootstrap reads and writes rank addresses through this interface; the keys live
// under "gloo/" in the shared store.
class GlooStore final : public gloo::rendezvous::Store {
 public:
  explicit GlooStore(TcpStore& store) : store_(store) {}
  void set(const std::string& key, const std::vector<char>& data) override {
    store_.set(prefix + key, data);
  }
  std::vector<char> get(const std::string& key) override { return store_.get(prefix + key); }
  void wait(const std::vector<std::string>& keys) override { wait(keys, store_.timeout()); }
  void wait(const std::vector<std::string>& keys,
            const std::chrono::milliseconds& timeout) override {
    std::vector<std::string> full;
    for (const auto& k : keys) full.push_back(prefix + k);
    store_.wait(full, timeout);
  }

 private:
  static constexpr const char* prefix = "gloo/";
  TcpStore& store_;
};

// Gloo reports failures (a peer gone, a timeout) as gloo::Exception, and a broken invariant of
// its own (GLOO_ENFORCE) as gloo::EnforceNotMet, which is not one; say which collective.
template <typename F>
void gloo_call(const char* op, int rank, int world, F&& call) {
  try {
    call();
  } catch (const gloo::Exception& e) {
    fail("gloo {} (rank {} of {}): {}", op, rank, world, e.what());
  } catch (const gloo::EnforceNotMet& e) {
    fail("gloo {} (rank {} of {}): {}", op, rank, world, e.what());
  }
}

// Gloo's TCP transport writes to its sockets without MSG_NOSIGNAL, so a write that races a
// peer's exit raises SIGPIPE, whose default action ends the process without a word. Ignored,
// the write fails with EPIPE and Gloo reports the peer gone, which gloo_call names. A handler
// someone installed is left alone.
void ignore_default_sigpipe() {
  struct sigaction current {};
  sigaction(SIGPIPE, nullptr, &current);
  if (current.sa_handler == SIG_DFL) ::signal(SIGPIPE, SIG_IGN);
}

using ReduceFn = void (*)(void*, const void*, const void*, size_t);

void divide(Tensor x, int world) {
  float* p = x.f32();
  for (int64_t i = 0; i < x.numel(); ++i) p[i] /= float(world);
}

}  // namespace

GlooCommunicator::GlooCommunicator(std::shared_ptr<TcpStore> store)
    : store_(std::move(store)), rank_(store_->info().rank), world_size_(store_->info().world_size) {
  ignore_default_sigpipe();
  gloo::transport::tcp::attr attr;
  if (auto iface = process_env("GLOO_SOCKET_IFNAME")) {
    attr.iface = *iface;
  } else {
    attr.hostname = local_address_towards(store_->info().master_addr);
  }
  auto context = std::make_shared<gloo::rendezvous::Context>(rank_, world_size_);
  context->setTimeout(store_->timeout());
  gloo_call("connect", rank_, world_size_, [&] {
    std::shared_ptr<gloo::transport::Device> device = gloo::transport::tcp::CreateDevice(attr);
    GlooStore adapter(*store_);
    context->connectFullMesh(adapter, device);
  });
  context_ = std::move(context);
}

GlooCommunicator::~GlooCommunicator() = default;

PendingPtr GlooCommunicator::start(const char* op, std::function<void()> job) {
  struct Queued final : Pending {
    std::future<void> done;
    ~Queued() override {
      if (done.valid()) done.wait();
    }
    void wait() override { done.get(); }
  };
  auto pending = std::make_unique<Queued>();
  pending->done =
      worker_.submit([this, op, job = std::move(job)] { gloo_call(op, rank_, world_size_, job); });
  return pending;
}

void GlooCommunicator::all_reduce(void* in, void* out, Tensor x) {
  if (x.numel() == 0) return;
  gloo::AllreduceOptions opts(context_);
  if (x.dtype == DType::i32) {
    opts.setInput(static_cast<int32_t*>(in), size_t(x.numel()));
    opts.setOutput(static_cast<int32_t*>(out), size_t(x.numel()));
    opts.setReduceFunction(static_cast<ReduceFn>(&gloo::sum<int32_t>));
  } else {
    opts.setInput(static_cast<float*>(in), size_t(x.numel()));
    opts.setOutput(static_cast<float*>(out), size_t(x.numel()));
    opts.setReduceFunction(static_cast<ReduceFn>(&gloo::sum<float>));
  }
  gloo::allreduce(opts);
}

PendingPtr GlooCommunicator::start_all_reduce_sum(Tensor x) {
  check_dtype("all_reduce_sum", x, true);
  return start("all_reduce_sum", [this, x] { all_reduce(x.data, x.data, x); });
}

PendingPtr GlooCommunicator::start_all_reduce_mean(Tensor x) {
  check_dtype("all_reduce_mean", x, false);
  return start("all_reduce_mean", [this, x] {
    all_reduce(x.data, x.data, x);
    divide(x, world_size_);
  });
}

PendingPtr GlooCommunicator::start_reduce_scatter_mean(Tensor out, Tensor in) {
  check_dtype("reduce_scatter_mean", in, false);
  check_sharded("reduce_scatter_mean", in, out, world_size_);
  return start("reduce_scatter_mean", [this, out, in] {
    scratch_.resize(size_t(in.numel()));
    all_reduce(in.data, scratch_.data(), in);
    std::memcpy(out.data, scratch_.data() + rank_ * out.numel(), out.bytes());
    divide(out, world_size_);
  });
}

PendingPtr GlooCommunicator::start_all_gather(Tensor out, Tensor in) {
  check_dtype("all_gather", in, true);
  check_sharded("all_gather", out, in, world_size_);
  return start("all_gather", [this, out, in] {
    if (in.numel() == 0) return;
    gloo::AllgatherOptions opts(context_);
    // Element type only sets the element size; f32 and i32 are both 4 bytes.
    opts.setInput(static_cast<float*>(in.data), size_t(in.numel()));
    opts.setOutput(static_cast<float*>(out.data), size_t(out.numel()));
    gloo::allgather(opts);
  });
}

PendingPtr GlooCommunicator::start_broadcast(Tensor x, int root) {
  check_dtype("broadcast", x, true);
  check(root >= 0 && root < world_size_, "broadcast: root {} is not a rank of a world of {}", root,
        world_size_);
  return start("broadcast", [this, x, root] {
    if (x.numel() == 0) return;
    gloo::BroadcastOptions opts(context_);
    opts.setOutput(static_cast<float*>(x.data), size_t(x.numel()));
    opts.setRoot(root);
    gloo::broadcast(opts);
  });
}

void GlooCommunicator::barrier() {
  start("barrier", [this] {
    gloo::BarrierOptions opts(context_);
    gloo::barrier(opts);
  })->wait();
}

}  // namespace lmtrain::dist
