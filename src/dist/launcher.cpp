#include "dist/launcher.h"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstring>
#include <filesystem>
#include <optional>
#include <thread>

#include "core/error.h"
#include "dist/socket.h"

extern char** environ;

namespace lmtrain::dist {

namespace {

constexpr int kMaxRanksPerNode = 1024;
constexpr int kMaxNodes = 65536;  // with 1024 ranks each, the world size still fits an int

// ---- launcher signals: written to a self-pipe by the handler, read in the poll loop ----
std::atomic<int> g_signal_pipe{-1};  // lock-free, so safe to read in a handler

void on_signal(int sig) {
  unsigned char byte = static_cast<unsigned char>(sig);
  (void)!::write(g_signal_pipe.load(), &byte, 1);
}

// Installs the forwarding handlers for its lifetime; SIGPIPE is ignored so that a closed
// terminal or pager does not kill the launcher while ranks still run.
class SignalCatcher {
 public:
  static constexpr int kForwarded[] = {SIGINT, SIGTERM, SIGHUP};

  SignalCatcher() {
    int fds[2];
    // The call comes first: an argument of check() may be evaluated before another one, so
    // errno must not be read in the same call that sets it.
    const bool piped = ::pipe2(fds, O_CLOEXEC | O_NONBLOCK) == 0;
    check(piped, "launch: pipe: {}", std::strerror(errno));
    read_.reset(fds[0]);
    write_.reset(fds[1]);
    g_signal_pipe = write_.get();
    struct sigaction action {};
    action.sa_handler = on_signal;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;
    for (size_t i = 0; i < std::size(kForwarded); ++i) {
      sigaction(kForwarded[i], nullptr, &previous_[i]);
      // nohup: a hangup stays ignored, by the launcher and (inherited) by its ranks.
      if (kForwarded[i] == SIGHUP && previous_[i].sa_handler == SIG_IGN) continue;
      sigaction(kForwarded[i], &action, nullptr);
    }
    struct sigaction ignore {};
    ignore.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &ignore, &previous_pipe_);
  }
  ~SignalCatcher() {
    for (size_t i = 0; i < std::size(kForwarded); ++i)
      sigaction(kForwarded[i], &previous_[i], nullptr);
    sigaction(SIGPIPE, &previous_pipe_, nullptr);
    g_signal_pipe = -1;
  }
  SignalCatcher(const SignalCatcher&) = delete;
  SignalCatcher& operator=(const SignalCatcher&) = delete;

  int fd() const { return read_.get(); }
  // The signals received since the last call.
  std::vector<int> take() {
    std::vector<int> out;
    unsigned char byte;
    while (::read(read_.get(), &byte, 1) == 1) out.push_back(byte);
    return out;
  }

 private:
  Fd read_, write_;
  struct sigaction previous_[std::size(kForwarded)]{};
  struct sigaction previous_pipe_ {};
};

// One output stream of one rank: bytes in, whole prefixed lines out.
struct PrefixedStream {
  Fd fd;
  int target = 1;  // the launcher's stdout or stderr
  std::string partial;

  void emit(const std::string& prefix, const char* data, size_t n) {
    partial.append(data, n);
    std::string out;
    size_t start = 0;
    for (size_t nl; (nl = partial.find('\n', start)) != std::string::npos; start = nl + 1)
      out += prefix + partial.substr(start, nl + 1 - start);
    partial.erase(0, start);
    // A rank printing one endless line (a progress bar without newlines) is still shown.
    if (partial.size() > 65536) out += prefix + std::exchange(partial, {}) + "\n";
    write_out(out);
  }
  void finish(const std::string& prefix) {
    if (!partial.empty()) write_out(prefix + std::exchange(partial, {}) + "\n");
    fd.reset();
  }
  void write_out(const std::string& text) const {
    // Whole lines in one write keep ranks' lines from interleaving mid-line. Errors (a closed
    // terminal) are ignored: the ranks' outcome matters more than their output.
    for (size_t done = 0; done < text.size();) {
      ssize_t n = ::write(target, text.data() + done, text.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return;
      done += size_t(n);
    }
  }
};

struct Rank {
  int rank = 0;
  pid_t pid = -1;  // also its process group: signals reach the rank's own children too
  bool running = false;
  int status = 0;
  PrefixedStream out, err;
  std::string prefix;
};

std::string describe_status(int status) {
  if (WIFSIGNALED(status)) {
    int sig = WTERMSIG(status);
    return fmt::format("was killed by signal {} ({})", sig,
                       sigabbrev_np(sig) ? sigabbrev_np(sig) : "?");
  }
  return fmt::format("exited with code {}", WEXITSTATUS(status));
}

bool failed(int status) { return !WIFEXITED(status) || WEXITSTATUS(status) != 0; }

std::string self_executable() {
  char path[PATH_MAX];
  ssize_t n = ::readlink("/proc/self/exe", path, sizeof path - 1);
  check(n > 0, "launch: cannot find this executable: {}", std::strerror(errno));
  return std::string(path, size_t(n));
}

// The launcher's environment with the rank's variables replacing any inherited ones.
std::vector<std::string> rank_environment(
    const std::vector<std::pair<std::string, std::string>>& vars) {
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) {
    std::string entry = *e;
    bool replaced = false;
    for (const auto& [name, value] : vars) replaced |= entry.rfind(name + "=", 0) == 0;
    if (!replaced) env.push_back(entry);
  }
  for (const auto& [name, value] : vars) env.push_back(name + "=" + value);
  return env;
}

// Each rank's share of the cores this launcher may run on, for its OpenMP (and OpenBLAS) threads,
// unless OMP_NUM_THREADS is set (and not empty): several ranks each running threads on every core
// would oversubscribe them (2 CPU ranks on 2 cores trained 1.6x slower so). torchrun sets 1.
std::vector<std::pair<std::string, std::string>> thread_share(int ranks_per_node) {
  const char* chosen = std::getenv("OMP_NUM_THREADS");
  if (ranks_per_node == 1 || (chosen && *chosen)) return {};
  cpu_set_t allowed;
  const int cores = ::sched_getaffinity(0, sizeof allowed, &allowed) == 0
                        ? CPU_COUNT(&allowed)
                        : int(std::thread::hardware_concurrency());
  return {{"OMP_NUM_THREADS", std::to_string(std::max(1, cores / ranks_per_node))}};
}

std::vector<char*> pointers(std::vector<std::string>& strings) {
  std::vector<char*> out;
  for (auto& s : strings) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

// The ranks of this node. On destruction, whatever still runs is killed and reaped, so an
// exception in the launcher leaves no orphans.
class RankGroup {
 public:
  ~RankGroup() {
    // All are killed before any is waited for: ranks die in parallel, not one after another.
    for (Rank& r : ranks_)
      if (r.running) ::kill(-r.pid, SIGKILL);
    for (Rank& r : ranks_)
      if (r.running) ::waitpid(r.pid, nullptr, 0);
  }

  std::vector<Rank>& ranks() { return ranks_; }

  // `inherited`: a descriptor the rank keeps open across exec (-1: none).
  void spawn(int rank, std::vector<std::string> argv, std::vector<std::string> env, int inherited) {
    int out[2], err[2];
    if (::pipe2(out, O_CLOEXEC) != 0) fail_to_start(rank, "pipe for its output");
    Fd out_read(out[0]), out_write(out[1]);
    if (::pipe2(err, O_CLOEXEC) != 0) fail_to_start(rank, "pipe for its errors");
    Fd err_read(err[0]), err_write(err[1]);
    Rank& r = ranks_.emplace_back();
    r.rank = rank;
    r.prefix = fmt::format("[rank {}] ", rank);
    r.out.fd = std::move(out_read);
    r.out.target = STDOUT_FILENO;
    r.err.fd = std::move(err_read);
    r.err.target = STDERR_FILENO;
    // Everything the child needs is prepared before fork: only async-signal-safe calls after.
    std::vector<char*> argv_ptrs = pointers(argv), env_ptrs = pointers(env);
    std::string exec_error = fmt::format("launch: rank {} cannot run '{}': ", rank, argv[0]);
    const pid_t launcher = ::getpid();

    pid_t pid = ::fork();
    if (pid < 0) fail_to_start(rank, "fork");
    if (pid == 0) {
      ::setpgid(0, 0);
      // A launcher killed outright (SIGKILL, the OOM killer) forwards nothing: the kernel then
      // sends each rank SIGTERM, on which a training saves and stops, instead of leaving it to
      // train on unwatched. Kept across exec; the launcher forks from its main thread only.
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (::getppid() != launcher) ::_exit(1);  // it died before the call
      ::signal(SIGPIPE, SIG_DFL);               // ignored dispositions would survive exec
      ::dup2(out_write.get(), STDOUT_FILENO);
      ::dup2(err_write.get(), STDERR_FILENO);
      if (inherited >= 0) ::fcntl(inherited, F_SETFD, 0);
      ::execvpe(argv_ptrs[0], argv_ptrs.data(), env_ptrs.data());
      const char* reason = std::strerror(errno);
      (void)!::write(STDERR_FILENO, exec_error.data(), exec_error.size());
      (void)!::write(STDERR_FILENO, reason, std::strlen(reason));
      (void)!::write(STDERR_FILENO, "\n", 1);
      ::_exit(127);
    }
    ::setpgid(pid, pid);  // also here, so that no signal can reach the child before its own call
    r.pid = pid;
    r.running = true;
  }

  void signal_all(int sig) {
    // Exited ranks are signalled too: they may have left children behind in their group.
    for (Rank& r : ranks_)
      if (r.pid > 0) ::kill(-r.pid, sig);
  }

 private:
  // The ranks started so far are stopped by the destructor as the error unwinds.
  [[noreturn]] void fail_to_start(int rank, const char* what) {
    const int error = errno;
    fail("launch: rank {}: {}: {}; stopped the ranks already started; {}", rank, what,
         std::strerror(error),
         error == EMFILE || error == ENFILE
             ? "each rank holds 2 open files in the launcher: raise ulimit -n or lower "
               "--nproc-per-node"
             : "lower --nproc-per-node");
  }

  std::vector<Rank> ranks_;
};

// Whether `program` (a command's argv[0]) is the executable at `self`.
bool same_program(const std::string& program, const std::string& self) {
  std::error_code error;  // a name looked up in PATH, or a missing file: not this one
  return program == self || (program.find('/') != std::string::npos &&
                             std::filesystem::equivalent(program, self, error));
}

// The rendezvous port, and with `bind` the store's socket already listening on it, for rank 0 to
// inherit (LMTRAIN_STORE_FD). Bound here, before any rank starts: a port only picked here and
// bound by rank 0 later could be taken in between, e.g. as the local port of another program's
// connection, and a port in use fails here. Without `bind` (another program than lmtrain, a
// PyTorch script, binds the port itself, as under torchrun; or a job with no store) a free port
// is picked and released.
struct RendezvousPort {
  Fd listener;
  int port;
};
RendezvousPort rendezvous_port(const LaunchOptions& o, const std::string& addr, bool bind) {
  const int port = o.master_port ? o.master_port : o.nnodes == 1 ? 0 : 29500;  // 0: a free one
  if (!bind) return {Fd(), port ? port : bound_port(listen_tcp(addr, 0).get())};
  try {
    Fd listener = listen_tcp(addr, port);
    const int bound = bound_port(listener.get());
    return {std::move(listener), bound};
  } catch (const Error& e) {
    fail("launch: {}; does another job use that port? --master-port picks another", e.what());
  }
}

}  // namespace

int launch(const LaunchOptions& o) {
  // Beyond these no machine or job is sane: a million ranks forked for minutes before the
  // launcher ran out of files.
  check(o.nproc_per_node >= 1 && o.nproc_per_node <= kMaxRanksPerNode,
        "launch: --nproc-per-node: expected 1 to {} ranks, got {}", kMaxRanksPerNode,
        o.nproc_per_node);
  check(o.nnodes >= 1 && o.nnodes <= kMaxNodes, "launch: --nnodes: expected 1 to {}, got {}",
        kMaxNodes, o.nnodes);
  check(o.node_rank >= 0 && o.node_rank < o.nnodes, "launch: --node-rank {} is not in [0, {})",
        o.node_rank, o.nnodes);
  check(!o.command.empty(), "launch: no command to run (lmtrain launch ... -- lmtrain train ...)");
  check(o.nnodes == 1 || !o.master_addr.empty(),
        "launch: --master-addr is required with --nnodes {} (the host of node rank 0)", o.nnodes);
  check(o.master_port >= 0 && o.master_port <= 65535, "launch: --master-port {} is not a TCP port",
        o.master_port);
  const std::string addr = o.master_addr.empty() ? "127.0.0.1" : o.master_addr;
  const int world = o.nnodes * o.nproc_per_node;
  std::vector<std::string> argv = o.command;
  const std::string self = self_executable();
  if (argv[0] == "lmtrain") argv[0] = self;

  // Only rank 0 running this lmtrain takes the store's socket, and only a job of ranks has one.
  auto [store_listener, port] =
      rendezvous_port(o, addr, o.node_rank == 0 && world > 1 && same_program(argv[0], self));

  const auto threads = thread_share(o.nproc_per_node);
  SignalCatcher signals;
  RankGroup group;
  for (int local = 0; local < o.nproc_per_node; ++local) {
    int rank = o.node_rank * o.nproc_per_node + local;
    const int inherited = rank == 0 ? store_listener.get() : -1;
    std::vector<std::pair<std::string, std::string>> vars = {
        {"RANK", std::to_string(rank)},
        {"LOCAL_RANK", std::to_string(local)},
        {"WORLD_SIZE", std::to_string(world)},
        {"LOCAL_WORLD_SIZE", std::to_string(o.nproc_per_node)},
        {"GROUP_RANK", std::to_string(o.node_rank)},
        {"MASTER_ADDR", addr},
        {"MASTER_PORT", std::to_string(port)},
        {"LMTRAIN_STORE_FD", std::to_string(inherited)}};
    vars.insert(vars.end(), threads.begin(), threads.end());
    group.spawn(rank, argv, rank_environment(vars), inherited);
    if (rank == 0) store_listener.reset();  // rank 0 holds it now
  }

  std::optional<std::pair<int, int>> first_failure;  // rank, wait status
  // Time points that have not been set yet are never reached.
  constexpr Clock::time_point never = Clock::time_point::max();
  Clock::time_point kill_at = never, drain_until = never;
  int forwarded = 0;  // the last signal passed on to the ranks
  std::vector<Rank>& ranks = group.ranks();
  while (true) {
    // Wait for output, a launcher signal, or 50 ms (exits are polled with waitpid below).
    std::vector<pollfd> fds{{signals.fd(), POLLIN, 0}};
    std::vector<std::pair<Rank*, PrefixedStream*>> streams;
    for (Rank& r : ranks)
      for (PrefixedStream* s : {&r.out, &r.err})
        if (s->fd) {
          fds.push_back({s->fd.get(), POLLIN, 0});
          streams.emplace_back(&r, s);
        }
    if (::poll(fds.data(), fds.size(), 50) < 0 && errno != EINTR)
      fail("launch: poll: {}", std::strerror(errno));
    for (size_t i = 1; i < fds.size(); ++i) {
      if (!fds[i].revents) continue;
      auto [r, s] = streams[i - 1];
      char chunk[65536];
      ssize_t n = ::read(s->fd.get(), chunk, sizeof chunk);
      if (n > 0)
        s->emit(r->prefix, chunk, size_t(n));
      else if (n == 0 || errno != EINTR)
        s->finish(r->prefix);
    }
    for (int sig : signals.take()) {
      group.signal_all(sig);
      forwarded = sig;
    }

    bool any_running = false;
    for (Rank& r : ranks) {
      if (r.running && ::waitpid(r.pid, &r.status, WNOHANG) == r.pid) {
        r.running = false;
        // A rank that stopped as a forwarded signal asked has not failed: the others were
        // asked too, and finish their save.
        const bool as_asked =
            forwarded && WIFEXITED(r.status) && WEXITSTATUS(r.status) == 128 + forwarded;
        if (failed(r.status) && !as_asked && !first_failure) {
          first_failure = {r.rank, r.status};
          group.signal_all(SIGTERM);
          kill_at = Clock::now() + o.grace;
        }
      }
      any_running |= r.running;
    }
    if (any_running && Clock::now() >= kill_at) {
      group.signal_all(SIGKILL);
      kill_at = never;
    }
    if (any_running) continue;
    // All ranks are gone; their output may still sit in the pipes, or the pipes may be held open
    // by children that escaped the process groups: drain for a moment, then stop.
    if (drain_until == never) drain_until = Clock::now() + std::chrono::milliseconds(500);
    if (streams.empty() || Clock::now() >= drain_until) break;
  }
  for (Rank& r : ranks) {
    r.out.finish(r.prefix);
    r.err.finish(r.prefix);
  }
  // Asked to stop, the ranks did as asked (saved and exited with 128 + signal, or finished):
  // so does the launcher, like a single rank.
  const bool stopped = std::any_of(ranks.begin(), ranks.end(), [&](const Rank& r) {
    return forwarded && WIFEXITED(r.status) && WEXITSTATUS(r.status) == 128 + forwarded;
  });
  if (stopped && !first_failure) {
    fmt::print(stderr, "launch: stopped by signal {}; the ranks saved and exited with code {}\n",
               forwarded, 128 + forwarded);
    return 128 + forwarded;
  }
  if (first_failure)
    fail("launch: rank {} {}; stopped the other ranks", first_failure->first,
         describe_status(first_failure->second));
  return 0;
}

}  // namespace lmtrain::dist
