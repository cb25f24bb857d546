// When the optimizer talks to the other ranks: with the backward hook, each bucket's reduction
// starts as soon as its gradients are final (during the backward, while lower blocks still run)
// and is waited for only in the step; each all-gather starts right after its update and is
// waited for at the end. A recording communicator stands in for a world of 2 and logs the order.
#include <fmt/format.h>

#include <algorithm>
#include <catch2/catch.hpp>

#include "backend/cpu/cpu_backend.h"
#include "optim/optimizer.h"
#include "test_support.h"

using namespace lmtrain;

namespace {

// Rank 0 of 2 whose collectives only log themselves: the order of starts and waits, against the
// backward's progress, which the test logs too. Reduce-scatter keeps this rank's chunk and
// all-gather copies it everywhere, so the step computes on well-formed numbers.
class RecordingCommunicator final : public dist::Communicator {
 public:
  explicit RecordingCommunicator(Backend& backend) : backend_(backend) {}
  std::vector<std::string> log;

  std::string name() const override { return "recording"; }
  int rank() const override { return 0; }
  int world_size() const override { return 2; }
  dist::PendingPtr start_all_reduce_sum(Tensor) override { return record("all_reduce"); }
  dist::PendingPtr start_all_reduce_mean(Tensor) override { return record("all_reduce"); }
  dist::PendingPtr start_reduce_scatter_mean(Tensor out, Tensor in) override {
    backend_.copy(out, in.slice(0, out.numel()).view(out.shape));
    return record("reduce_scatter");
  }
  dist::PendingPtr start_all_gather(Tensor out, Tensor in) override {
    for (int64_t r = 0; r < 2; ++r)
      backend_.copy(out.slice(r * in.numel(), in.numel()).view(in.shape), in);
    return record("all_gather");
  }
  dist::PendingPtr start_broadcast(Tensor, int) override { return record("broadcast"); }
  void barrier() override {}

 private:
  struct Logged final : dist::Pending {
    std::vector<std::string>& log;
    std::string what;
    Logged(std::vector<std::string>& l, std::string w) : log(l), what(std::move(w)) {}
    void wait() override { log.push_back("wait " + what); }
  };
  dist::PendingPtr record(const std::string& op) {
    const std::string what = op + " #" + std::to_string(count_++);
    log.push_back("start " + what);
    return std::make_unique<Logged>(log, what);
  }
  Backend& backend_;
  int count_ = 0;
};

// Index of the first log line starting with `prefix`, or the log's size.
size_t first(const std::vector<std::string>& log, const std::string& prefix) {
  for (size_t i = 0; i < log.size(); ++i)
    if (log[i].starts_with(prefix)) return i;
  return log.size();
}

size_t count(const std::vector<std::string>& log, const std::string& prefix) {
  return size_t(std::count_if(log.begin(), log.end(),
                              [&](const std::string& l) { return l.starts_with(prefix); }));
}

}  // namespace

TEST_CASE("reductions start during the backward and all-gathers right after their updates",
          "[optim][dist]") {
  for (const char* preset : {"normuon", "adamw"}) {
    INFO(preset);
    const Config config = load_config(test_support::source_path("tests/golden/gpt_tiny.json"),
                                      {"model.depth=4", std::string("optim.preset=") + preset});
    const GptShape shape = GptShape::from(config.model, config.model.vocab_size);
    CpuBackend backend;
    Gpt model(backend, shape, 1);
    model.init_weights(7);
    RecordingCommunicator comm(backend);
    Optimizer optimizer(model, config.optim, double(shape.seq_len), 10, comm);

    std::vector<int32_t> tokens(size_t(shape.seq_len), 3), targets(size_t(shape.seq_len), 5);
    model.zero_grads();
    model.forward(tokens, targets, true);
    const Gpt::GradsReady reduce = optimizer.reduce_as_ready();
    model.backward([&](int layer) {
      comm.log.push_back("ready " + std::to_string(layer));
      reduce(layer);
    });
    comm.log.push_back("step");
    optimizer.step(0, 1.0);
    const auto& log = comm.log;
    INFO(fmt::format("{}", fmt::join(log, "\n")));

    // lm_head and the top block's buckets start before the lower blocks run their backward.
    CHECK(first(log, "start reduce_scatter") < first(log, "ready 2"));
    // Every reduction has started by the end of the backward (wte's and the scalars' at its very
    // end), and none is waited for before the step: the backward never blocks on communication.
    CHECK(count(log, "start reduce_scatter") > 2);
    for (size_t i = first(log, "step"); i < log.size(); ++i)
      CHECK_FALSE(log[i].starts_with("start reduce_scatter"));
    CHECK(first(log, "wait") > first(log, "step"));
    // Several all-gathers are in flight at once: the first is waited for only after the last
    // has started.
    const size_t gathers = count(log, "start all_gather");
    CHECK(gathers > 2);
    size_t last_gather_start = 0;
    for (size_t i = 0; i < log.size(); ++i)
      if (log[i].starts_with("start all_gather")) last_gather_start = i;
    CHECK(first(log, "wait all_gather") > last_gather_start);
    CHECK(count(log, "wait all_gather") == gathers);
  }
}
