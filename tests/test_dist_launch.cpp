// `lmtrain launch`: rank environment, output prefixes, failure propagation, signal forwarding.
#include <sched.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <chrono>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "core/error.h"
#include "dist_support.h"
#include "test_support.h"

using Catch::Matchers::Contains;
using Clock = std::chrono::steady_clock;

namespace {

// A running `lmtrain launch` whose stdout and stderr go to one pipe.
class Launcher {
 public:
  // `ignore_hangup`: start the launcher with SIGHUP ignored, as nohup does.
  explicit Launcher(std::vector<std::string> args, bool ignore_hangup = false) {
    args.insert(args.begin(), {LMTRAIN_BINARY, "launch"});
    int fds[2];
    REQUIRE(pipe(fds) == 0);
    pid_ = fork();
    REQUIRE(pid_ >= 0);
    if (pid_ == 0) {
      if (ignore_hangup) signal(SIGHUP, SIG_IGN);
      dup2(fds[1], 1);
      dup2(fds[1], 2);
      close(fds[0]);
      close(fds[1]);
      std::vector<char*> argv;
      for (auto& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    close(fds[1]);
    fd_ = fds[0];
  }
  ~Launcher() {
    if (fd_ >= 0) close(fd_);
    if (pid_ > 0) waitpid(pid_, nullptr, 0);
  }

  // Reads output until `text` appears (or the launcher ends).
  void read_until(const std::string& text) {
    while (output.find(text) == std::string::npos && read_some()) {
    }
  }
  // Reads output until each of `ranks` ranks has printed its "ready" line.
  void read_until_ready(int ranks) {
    for (int rank = 0; rank < ranks; ++rank) read_until(fmt::format("[rank {}] ready", rank));
  }
  // Reads to the end and reaps the launcher; returns its exit code.
  int finish() {
    while (read_some()) {
    }
    int status = 0;
    waitpid(pid_, &status, 0);
    pid_ = -1;
    seconds = std::chrono::duration<double>(Clock::now() - start_).count();
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  pid_t pid() const { return pid_; }

  std::string output;
  double seconds = 0;

 private:
  bool read_some() {
    char buf[4096];
    ssize_t n = read(fd_, buf, sizeof buf);
    if (n <= 0) return false;
    output.append(buf, size_t(n));
    return true;
  }

  pid_t pid_ = -1;
  int fd_ = -1;
  Clock::time_point start_ = Clock::now();
};

}  // namespace

TEST_CASE("launch: ranks get torchrun's environment and prefixed output", "[dist]") {
  Launcher launch({"--nproc-per-node", "2", "--", "sh", "-c",
                   "echo \"env $RANK $LOCAL_RANK $WORLD_SIZE $LOCAL_WORLD_SIZE $MASTER_ADDR\"; "
                   "echo \"port $MASTER_PORT\"; printf 'to stderr\\nno newline' >&2"});
  REQUIRE(launch.finish() == 0);
  const std::string& out = launch.output;
  CHECK_THAT(out, Contains("[rank 0] env 0 0 2 2 127.0.0.1\n"));
  CHECK_THAT(out, Contains("[rank 1] env 1 1 2 2 127.0.0.1\n"));
  CHECK_THAT(out, Contains("[rank 1] to stderr\n"));
  CHECK_THAT(out, Contains("[rank 0] no newline\n"));
  CHECK_THAT(out, !Contains("port 0\n"));
  // Both ranks see the same rendezvous port.
  auto port_line = [&](int rank) {
    auto at = out.find(fmt::format("[rank {}] port ", rank));
    return at == std::string::npos ? std::string()
                                   : out.substr(at + 9, out.find('\n', at) - at - 9);
  };
  CHECK(port_line(0) == port_line(1));
}

// When rank 0 runs lmtrain, the launcher binds its store socket before any rank starts (rank 0
// inherits it; the e2e runs of tests/test_e2e_ddp.cpp fail if it does not take it), so a port in
// use fails there. Another program gets the port alone and no descriptor, as from torchrun.
TEST_CASE("launch: the store socket is bound for lmtrain only", "[dist]") {
  lmtrain::test_support::StoreSocket taken;
  const std::string port = std::to_string(taken.port);
  Launcher busy({"--nproc-per-node", "2", "--master-port", port, "--", "lmtrain", "--help"});
  CHECK(busy.finish() != 0);
  CHECK_THAT(busy.output, Contains("launch: cannot listen on 127.0.0.1:" + port) &&
                              Contains("--master-port picks another"));
  CHECK_THAT(busy.output, !Contains("[rank 0]"));

  Launcher other({"--nproc-per-node", "2", "--master-port", port, "--", "sh", "-c",
                  "echo \"fd $LMTRAIN_STORE_FD port $MASTER_PORT\""});
  REQUIRE(other.finish() == 0);
  CHECK_THAT(other.output, Contains("[rank 0] fd -1 port " + port + "\n") &&
                               Contains("[rank 1] fd -1 port " + port + "\n"));
}

// Several ranks each running OpenMP threads on every core would oversubscribe the node, so each
// gets its share of the cores in OMP_NUM_THREADS, unless the user set it; one rank keeps them all.
TEST_CASE("launch: each rank gets its share of the cores unless OMP_NUM_THREADS is set", "[dist]") {
  cpu_set_t allowed;
  REQUIRE(sched_getaffinity(0, sizeof allowed, &allowed) == 0);
  const std::string share = std::to_string(std::max(1, CPU_COUNT(&allowed) / 2));
  const std::string script = "echo \"threads [$OMP_NUM_THREADS]\"";
  {
    const lmtrain::test_support::ScopedEnv unset("OMP_NUM_THREADS", nullptr);
    Launcher two({"--nproc-per-node", "2", "--", "sh", "-c", script});
    REQUIRE(two.finish() == 0);
    CHECK_THAT(two.output, Contains("[rank 0] threads [" + share + "]\n") &&
                               Contains("[rank 1] threads [" + share + "]\n"));
    Launcher one({"--nproc-per-node", "1", "--", "sh", "-c", script});
    REQUIRE(one.finish() == 0);
    CHECK_THAT(one.output, Contains("[rank 0] threads []\n"));
  }
  const lmtrain::test_support::ScopedEnv chosen("OMP_NUM_THREADS", "7");
  Launcher two({"--nproc-per-node", "2", "--", "sh", "-c", script});
  REQUIRE(two.finish() == 0);
  CHECK_THAT(two.output, Contains("[rank 0] threads [7]\n") && Contains("[rank 1] threads [7]\n"));
}

TEST_CASE("launch: 'lmtrain' as the command runs this executable", "[dist]") {
  Launcher launch({"--nproc-per-node", "1", "--", "lmtrain", "--help"});
  CHECK(launch.finish() == 0);
  CHECK_THAT(launch.output, Contains("[rank 0] lmtrain: train"));
}

TEST_CASE("launch: a failing rank stops the others and is named", "[dist]") {
  Launcher launch({"--nproc-per-node", "3", "--", "sh", "-c",
                   "if [ \"$RANK\" = 1 ]; then sleep 0.3; echo failing; exit 3; fi; sleep 60"});
  CHECK(launch.finish() != 0);
  CHECK(launch.seconds < 5.0);
  CHECK_THAT(launch.output, Contains("[rank 1] failing"));
  CHECK_THAT(launch.output, Contains("launch: rank 1 exited with code 3; stopped the other ranks"));
}

TEST_CASE("launch: a rank killed by a signal is reported", "[dist]") {
  Launcher launch({"--nproc-per-node", "2", "--", "sh", "-c",
                   "if [ \"$RANK\" = 0 ]; then kill -9 $$; fi; sleep 60"});
  CHECK(launch.finish() != 0);
  CHECK(launch.seconds < 5.0);
  CHECK_THAT(launch.output, Contains("launch: rank 0 was killed by signal 9 (KILL)"));
}

TEST_CASE("launch: ranks that ignore SIGTERM are killed after the grace period", "[dist]") {
  Launcher launch({"--nproc-per-node", "2", "--grace", "0.5", "--", "sh", "-c",
                   "if [ \"$RANK\" = 1 ]; then exit 5; fi; trap '' TERM; sleep 60"});
  CHECK(launch.finish() != 0);
  CHECK(launch.seconds < 5.0);
  CHECK_THAT(launch.output, Contains("launch: rank 1 exited with code 5"));
}

TEST_CASE("launch: SIGTERM to the launcher reaches every rank", "[dist]") {
  Launcher launch({"--nproc-per-node", "2", "--", "sh", "-c",
                   "trap 'echo got TERM; exit 0' TERM; echo ready; sleep 60 & wait"});
  launch.read_until_ready(2);
  REQUIRE(kill(launch.pid(), SIGTERM) == 0);
  CHECK(launch.finish() == 0);
  CHECK(launch.seconds < 5.0);
  CHECK_THAT(launch.output, Contains("[rank 0] got TERM") && Contains("[rank 1] got TERM"));
}

// A launcher killed outright forwards nothing; its ranks get SIGTERM from the kernel instead
// (a training saves and stops on it) rather than running on without it.
TEST_CASE("launch: ranks of a launcher killed by SIGKILL get SIGTERM", "[dist]") {
  const lmtrain::test_support::TempDir tmp;
  const std::string marks = tmp / "term";
  Launcher launch({"--nproc-per-node", "2", "--", "sh", "-c",
                   "trap 'touch " + marks + ".$RANK; exit 0' TERM; echo ready; sleep 60 & wait"});
  launch.read_until_ready(2);
  REQUIRE(kill(launch.pid(), SIGKILL) == 0);
  CHECK(launch.finish() == 128 + SIGKILL);
  const auto deadline = Clock::now() + std::chrono::seconds(20);
  auto marked = [&] {
    return std::filesystem::exists(marks + ".0") && std::filesystem::exists(marks + ".1");
  };
  while (!marked() && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  CHECK(marked());
}

// SIGHUP is forwarded like SIGTERM; under nohup it stays ignored by the launcher and its ranks.
TEST_CASE("launch: SIGHUP reaches every rank unless it is ignored", "[dist]") {
  const std::string rank_script =
      "trap 'echo got HUP; exit 0' HUP; trap 'echo got TERM; exit 0' TERM; echo ready; "
      "sleep 60 & wait";
  Launcher forwarded({"--nproc-per-node", "2", "--", "sh", "-c", rank_script});
  forwarded.read_until_ready(2);
  REQUIRE(kill(forwarded.pid(), SIGHUP) == 0);
  CHECK(forwarded.finish() == 0);
  CHECK_THAT(forwarded.output, Contains("[rank 0] got HUP") && Contains("[rank 1] got HUP"));

  // Started with SIGHUP ignored: the launcher stays, and so does a rank that hangs itself up.
  Launcher ignored({"--nproc-per-node", "2", "--", "sh", "-c",
                    "echo ready; sleep 0.3; kill -HUP $$; echo survived"},
                   true);
  ignored.read_until_ready(2);
  REQUIRE(kill(ignored.pid(), SIGHUP) == 0);
  CHECK(ignored.finish() == 0);
  CHECK_THAT(ignored.output, Contains("[rank 0] survived") && Contains("[rank 1] survived"));
}

// Ranks that stop as asked (a training saves and exits with 128 + signal): the launcher exits
// the same way, as one rank would.
TEST_CASE("launch: ranks stopped by a forwarded signal give its exit code", "[dist]") {
  Launcher launch({"--nproc-per-node", "2", "--", "sh", "-c",
                   "trap 'exit 130' INT; echo ready; sleep 60 & wait"});
  launch.read_until_ready(2);
  REQUIRE(kill(launch.pid(), SIGINT) == 0);
  CHECK(launch.finish() == 130);
  CHECK_THAT(launch.output,
             Contains("launch: stopped by signal 2; the ranks saved and exited with code 130"));
}

TEST_CASE("launch: bad arguments are one-line errors", "[dist]") {
  Launcher launch({"--nproc-per-node", "2", "--nnodes", "2", "--", "true"});
  CHECK(launch.finish() != 0);
  CHECK_THAT(launch.output, Contains("--master-addr is required with --nnodes 2"));
}
