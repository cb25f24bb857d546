// GlooCommunicator with 2 and 4 ranks as threads on 127.0.0.1, against the serial computation.
#include <signal.h>

#include <catch2/catch.hpp>
#include <future>
#include <mutex>
#include <thread>

#include "backend/cpu/cpu_backend.h"
#include "core/error.h"
#include "dist/communicator.h"
#include "dist/gloo_communicator.h"
#include "dist/socket.h"
#include "dist/tcp_store.h"
#include "dist_support.h"
#include "train/rank_agreement.h"

using namespace lmtrain;
using namespace lmtrain::dist;
using lmtrain::test_support::normal_data;
using lmtrain::test_support::rank_info;
using lmtrain::test_support::StoreSocket;
using namespace std::chrono_literals;

namespace {

Tensor tensor(std::vector<float>& v, Shape shape) { return Tensor{v.data(), shape, DType::f32}; }

bool near(const std::vector<float>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (std::abs(a[i] - b[i]) > 1e-5 * (1 + std::abs(b[i]))) return false;
  return true;
}

// What every rank computed, collected for comparison after the threads join.
struct Results {
  std::mutex mutex;
  std::vector<std::string> errors;
  std::vector<std::vector<float>> sum, mean, scattered, gathered, broadcast;
  std::vector<std::vector<int32_t>> sum_i32;
};

void run_rank(int rank, int world, StoreSocket& socket, Results& out) {
  const int64_t rows = 6 * world, cols = 5;  // dim 0 splits into world chunks of 6 rows
  try {
    GlooCommunicator comm(std::make_shared<TcpStore>(rank_info(rank, world, socket.port), 20s,
                                                     socket.listener_for(rank)));
    check(comm.rank() == rank && comm.world_size() == world, "wrong rank or world");

    std::vector<float> sum = normal_data(100 + rank, rows * cols);
    comm.all_reduce_sum(tensor(sum, {rows, cols}));
    std::vector<float> mean = normal_data(100 + rank, rows * cols);
    comm.all_reduce_mean(tensor(mean, {rows, cols}));

    std::vector<float> in = normal_data(200 + rank, rows * cols), scattered(6 * cols);
    comm.reduce_scatter_mean(tensor(scattered, {6, cols}), tensor(in, {rows, cols}));

    std::vector<float> chunk = normal_data(300 + rank, 6 * cols), gathered(rows * cols);
    comm.all_gather(tensor(gathered, {rows, cols}), tensor(chunk, {6, cols}));

    std::vector<float> bcast = normal_data(400 + rank, 17);
    comm.broadcast(tensor(bcast, {17}), world - 1);

    std::vector<int32_t> ints{rank, 10 * rank, -rank};
    comm.all_reduce_sum(Tensor{ints.data(), Shape{3}, DType::i32});
    comm.barrier();

    std::lock_guard lock(out.mutex);
    out.sum[rank] = sum;
    out.mean[rank] = mean;
    out.scattered[rank] = scattered;
    out.gathered[rank] = gathered;
    out.broadcast[rank] = bcast;
    out.sum_i32[rank] = ints;
  } catch (const std::exception& e) {
    std::lock_guard lock(out.mutex);
    out.errors.push_back(fmt::format("rank {}: {}", rank, e.what()));
  }
}

}  // namespace

TEST_CASE("gloo communicator matches the serial computation", "[dist]") {
  const int world = GENERATE(2, 4);
  const int64_t rows = 6 * world, cols = 5, n = rows * cols;
  Results results;
  for (auto* v :
       {&results.sum, &results.mean, &results.scattered, &results.gathered, &results.broadcast})
    v->resize(world);
  results.sum_i32.resize(world);

  StoreSocket socket;
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r)
    threads.emplace_back(run_rank, r, world, std::ref(socket), std::ref(results));
  for (auto& t : threads) t.join();
  INFO((results.errors.empty() ? "" : results.errors[0]));
  REQUIRE(results.errors.empty());

  std::vector<double> sum(n, 0.0), scatter_sum(n, 0.0);
  std::vector<float> gathered;
  for (int r = 0; r < world; ++r) {
    auto a = normal_data(100 + r, n), b = normal_data(200 + r, n),
         c = normal_data(300 + r, n / world);
    for (int64_t i = 0; i < n; ++i) sum[i] += a[i], scatter_sum[i] += b[i];
    gathered.insert(gathered.end(), c.begin(), c.end());
  }
  std::vector<double> mean(n);
  for (int64_t i = 0; i < n; ++i) mean[i] = sum[i] / world;
  const std::vector<float> root_data = normal_data(400 + world - 1, 17);

  for (int r = 0; r < world; ++r) {
    INFO("rank " << r << " of " << world);
    CHECK(near(results.sum[r], sum));
    CHECK(near(results.mean[r], mean));
    // Every rank holds bit-identical reductions.
    CHECK(results.sum[r] == results.sum[0]);
    CHECK(results.mean[r] == results.mean[0]);
    std::vector<double> my_chunk(scatter_sum.begin() + r * n / world,
                                 scatter_sum.begin() + (r + 1) * n / world);
    for (double& x : my_chunk) x /= world;
    CHECK(near(results.scattered[r], my_chunk));
    CHECK(results.gathered[r] == gathered);
    CHECK(results.broadcast[r] == root_data);
    int32_t ranks_sum = world * (world - 1) / 2;
    CHECK(results.sum_i32[r] == std::vector<int32_t>{ranks_sum, 10 * ranks_sum, -ranks_sum});
  }
}

TEST_CASE("communicator: shapes that do not split into chunks are rejected", "[dist]") {
  CpuBackend backend;
  LocalCommunicator local(backend);
  std::vector<float> a(6), b(6);
  local.reduce_scatter_mean(tensor(b, {2, 3}), tensor(a, {2, 3}));
  CHECK_THROWS_WITH(check_sharded("reduce_scatter_mean", tensor(a, {3, 2}), tensor(b, {1, 2}), 2),
                    Catch::Matchers::Contains("(3, 2) is not 2 chunks of (1, 2) along dim 0"));
  CHECK(padded_rows(5, 4) == 8);
  CHECK(padded_rows(8, 4) == 8);
}

TEST_CASE("rendezvous with a missing rank times out with a clear error", "[dist]") {
  // WORLD_SIZE=2 but only rank 0 runs; the timeout comes from the environment as in a real job.
  auto env = [](const std::string& name) -> std::optional<std::string> {
    if (name == "LMTRAIN_RENDEZVOUS_TIMEOUT") return "1";
    return std::nullopt;
  };
  // Rank 0's store socket is handed over as `lmtrain launch` hands it (RankInfo::store_fd).
  auto rank0 = [](StoreSocket& socket) {
    RankInfo info = rank_info(0, 2, socket.port);
    info.store_fd = socket.listener.release();
    return info;
  };
  CpuBackend backend;
  auto start = Clock::now();
  StoreSocket socket, slurm_socket;
  CHECK_THROWS_WITH(make_communicator(rank0(socket), backend, rendezvous_timeout(env)),
                    Catch::Matchers::Contains("rendezvous: rank 0 waited 1 s for key") &&
                        Catch::Matchers::Contains("are all WORLD_SIZE=2 ranks started"));
  CHECK(std::chrono::duration<double>(Clock::now() - start).count() < 5.0);
  // Under srun the world size came from SLURM_NTASKS, which the hint names instead.
  RankInfo slurm = rank0(slurm_socket);
  slurm.source = "slurm";
  CHECK_THROWS_WITH(make_communicator(slurm, backend, rendezvous_timeout(env)),
                    Catch::Matchers::Contains("are all SLURM_NTASKS=2 ranks started"));
}

TEST_CASE("started collectives do not block the caller, run in order, and report errors at wait",
          "[dist]") {
  StoreSocket socket;
  // Rank 1 joins only after rank 0 has started all three collectives and computed something:
  // if starting blocked, rank 0 would never get there (a bounded wait turns that into a failure).
  std::promise<void> rank0_started;
  std::vector<std::string> errors;
  std::mutex mutex;
  std::vector<float> reduced[2], scattered[2], gathered[2];
  auto rank_main = [&](int rank) {
    try {
      GlooCommunicator comm(std::make_shared<TcpStore>(rank_info(rank, 2, socket.port), 20s,
                                                       socket.listener_for(rank)));
      std::vector<float> a = normal_data(10 + rank, 8), b = normal_data(20 + rank, 8);
      std::vector<float> chunk(4), c = normal_data(30 + rank, 4), whole(8);
      if (rank == 1) rank0_started.get_future().wait();
      PendingPtr sum = comm.start_all_reduce_sum(tensor(a, {8}));
      PendingPtr scatter = comm.start_reduce_scatter_mean(tensor(chunk, {4}), tensor(b, {8}));
      PendingPtr gather = comm.start_all_gather(tensor(whole, {8}), tensor(c, {4}));
      if (rank == 0) rank0_started.set_value();
      gather->wait();  // waiting on the last waits for the earlier ones too
      scatter->wait();
      sum->wait();
      std::lock_guard lock(mutex);
      reduced[rank] = a, scattered[rank] = chunk, gathered[rank] = whole;
    } catch (const std::exception& e) {
      std::lock_guard lock(mutex);
      errors.push_back(e.what());
    }
  };
  std::thread r0(rank_main, 0), r1(rank_main, 1);
  r0.join();
  r1.join();
  INFO((errors.empty() ? "" : errors[0]));
  REQUIRE(errors.empty());
  std::vector<double> sum(8), mean(8);
  std::vector<float> gathered_expected;
  for (int r = 0; r < 2; ++r) {
    auto a = normal_data(10 + r, 8), b = normal_data(20 + r, 8), c = normal_data(30 + r, 4);
    for (int i = 0; i < 8; ++i) sum[i] += a[i], mean[i] += b[i] / 2.0;
    gathered_expected.insert(gathered_expected.end(), c.begin(), c.end());
  }
  for (int r = 0; r < 2; ++r) {
    CHECK(near(reduced[r], sum));
    CHECK(near(scattered[r], std::vector<double>(mean.begin() + 4 * r, mean.begin() + 4 * r + 4)));
    CHECK(gathered[r] == gathered_expected);
  }
}

// A rank process starts with SIGPIPE's default action (the launcher restores it); a write that
// races the peer's exit would end the process silently unless the communicator ignores it.
TEST_CASE("a collective whose peer is gone fails at wait, naming the collective", "[dist]") {
  ::signal(SIGPIPE, SIG_DFL);
  StoreSocket socket;
  std::string error;
  std::promise<void> rank0_joined;
  std::thread peer([&, joined = rank0_joined.get_future()] {
    // Joins the job, then leaves without taking part in the collective; not before rank 0 has
    // joined too (a loaded machine could let it leave while rank 0 still connects, which fails
    // rank 0's set-up instead of its collective).
    GlooCommunicator comm(std::make_shared<TcpStore>(rank_info(1, 2, socket.port), 20s));
    joined.wait_for(20s);
  });
  try {
    // The timeout bounds the set-up on a loaded machine; the collective fails as soon as the
    // peer's connections close.
    GlooCommunicator comm(
        std::make_shared<TcpStore>(rank_info(0, 2, socket.port), 20s, std::move(socket.listener)));
    rank0_joined.set_value();
    std::vector<float> a(1 << 16, 1.f);
    PendingPtr pending = comm.start_all_reduce_sum(tensor(a, {int64_t(a.size())}));
    pending->wait();
  } catch (const Error& e) {
    error = e.what();
  }
  peer.join();
  CHECK_THAT(error, Catch::Matchers::Contains("gloo all_reduce_sum (rank 0 of 2)"));
  struct sigaction after {};
  sigaction(SIGPIPE, nullptr, &after);
  CHECK(after.sa_handler == SIG_IGN);
}

// Every rank stops at the same micro-step, naming the ranks whose loss was not finite; with every
// loss finite, nobody stops.
TEST_CASE("a non-finite loss on one rank stops every rank and names it", "[dist]") {
  constexpr int world = 3;
  StoreSocket socket;
  // Per call, each rank's loss and then its error ("" when it did not stop).
  const std::vector<std::vector<double>> losses = {
      {2.5, 2.5, 2.5}, {2.5, NAN, 2.5}, {INFINITY, 2.5, -INFINITY}};
  std::vector<std::vector<std::string>> errors(losses.size(), std::vector<std::string>(world));
  auto rank_main = [&](int rank) {
    CpuBackend backend;
    GlooCommunicator comm(std::make_shared<TcpStore>(rank_info(rank, world, socket.port), 20s,
                                                     socket.listener_for(rank)));
    Buffer memory = backend.allocate(world * sizeof(float));
    const Tensor scratch = memory.tensor({world}, DType::f32);
    for (size_t call = 0; call < losses.size(); ++call) {
      try {
        stop_on_nonfinite_loss(comm, backend, scratch, losses[call][size_t(rank)], 7, int(call));
      } catch (const std::exception& e) {
        errors[call][size_t(rank)] = e.what();
      }
    }
  };
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) threads.emplace_back(rank_main, r);
  for (auto& t : threads) t.join();
  CHECK(errors[0] == std::vector<std::string>(world));
  CHECK(errors[1][1] == "step 7: loss is nan (micro-step 1, rank 1); stopping");
  CHECK(errors[1][0] == "step 7: loss is not finite on rank 1 (micro-step 1); stopping");
  CHECK(errors[1][2] == errors[1][0]);
  CHECK(errors[2][0] == "step 7: loss is inf (micro-step 2, rank 0); stopping");
  CHECK(errors[2][1] == "step 7: loss is not finite on ranks 0, 2 (micro-step 2); stopping");
  CHECK(errors[2][2] == "step 7: loss is -inf (micro-step 2, rank 2); stopping");
}

TEST_CASE("AbortOnError aborts the communicator only when an error unwinds past it", "[dist]") {
  struct CountingCommunicator : Communicator {
    int aborts = 0;
    std::string name() const override { return "counting"; }
    int rank() const override { return 0; }
    int world_size() const override { return 2; }
    PendingPtr start_all_reduce_sum(Tensor) override { return nullptr; }
    PendingPtr start_all_reduce_mean(Tensor) override { return nullptr; }
    PendingPtr start_reduce_scatter_mean(Tensor, Tensor) override { return nullptr; }
    PendingPtr start_all_gather(Tensor, Tensor) override { return nullptr; }
    PendingPtr start_broadcast(Tensor, int) override { return nullptr; }
    void barrier() override {}
    void abort() override { ++aborts; }
  } comm;
  { const AbortOnError guard(comm); }
  CHECK(comm.aborts == 0);
  CHECK_THROWS_WITH(
      [&] {
        const AbortOnError guard(comm);
        fail("step 3: lost a peer");
      }(),
      "step 3: lost a peer");
  CHECK(comm.aborts == 1);
  // Created while another exception unwinds (a destructor's cleanup), it aborts only for a new one.
  try {
    struct Cleanup {
      Communicator& comm;
      ~Cleanup() { const AbortOnError guard(comm); }
    } cleanup{comm};
    fail("unwinding");
  } catch (const std::exception&) {
  }
  CHECK(comm.aborts == 1);
}
