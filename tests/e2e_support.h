// Helpers for the end-to-end tests: they run the real lmtrain binary in a fresh temporary
// directory, with tiny models, and look at its exit code, output and files.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "test_support.h"

namespace lmtrain::e2e {

namespace fs = std::filesystem;
using nlohmann::json;

// The default corpus every e2e test trains on; missing data is a failure, not a skip.
inline std::string data_dir() {
  const std::string dir = test_support::source_path("data/tiny");
  for (const char* file : {"tokenizer.json", "train_000000.bin", "val_000000.bin"}) {
    if (!fs::exists(fs::path(dir) / file)) {
      FAIL(dir << "/" << file
               << " is missing: run `python3 scripts/prepare_data.py` (or `make test`) first");
    }
  }
  return dir;
}

inline std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

inline void write_text(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
}

inline std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

using test_support::TempDir;

struct Result {
  int code = -1;  // exit status, or 128 + signal when the process was killed by a signal
  std::string out, err;
  // Everything the process printed, for failure messages.
  std::string all() const {
    return "exit " + std::to_string(code) + "\n--- stdout\n" + out + "--- stderr\n" + err;
  }
};

inline std::string shell_quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

inline int decode_status(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

// Runs `lmtrain args...` in the repository root (as ctest does) and waits; stdout and stderr
// are captured separately into files under `tmp`. `shell_setup` runs first in the same shell
// ("ulimit -n 64;"). With `close_stdout` lmtrain starts with its stdout closed (`>&-`).
inline Result run_lmtrain(const std::vector<std::string>& args, const TempDir& tmp,
                          const std::string& shell_setup = "", bool close_stdout = false) {
  static int counter = 0;
  const std::string tag = std::to_string(++counter);
  const fs::path out = tmp.path() / (".stdout" + tag), err = tmp.path() / (".stderr" + tag);
  std::string command = "cd " + shell_quote(LMTRAIN_SOURCE_DIR) + " && " + shell_setup + " " +
                        shell_quote(LMTRAIN_BINARY);
  for (const auto& a : args) command += " " + shell_quote(a);
  command += (close_stdout ? " >&-" : " >" + shell_quote(out.string())) + " 2>" +
             shell_quote(err.string()) + " </dev/null";
  Result r;
  r.code = decode_status(std::system(command.c_str()));
  r.out = read_text(out);
  r.err = read_text(err);
  fs::remove(out);
  fs::remove(err);
  return r;
}

// A process started in the background with its output in files (or its stdout in a pipe); see
// run_lmtrain_background. The destructor kills it if a failed check left it running.
struct Background {
  pid_t pid = -1;
  fs::path out, err;
  int stdout_reader = -1;  // the pipe's read end, with BackgroundOptions::stdout_to_pipe
  // Closes the read end of the stdout pipe, as a pager that quits does.
  void close_stdout_reader() {
    if (stdout_reader >= 0) ::close(stdout_reader);
    stdout_reader = -1;
  }
  // Waits for the process to end and collects its output.
  Result wait() {
    int status = 0;
    ::waitpid(pid, &status, 0);
    pid = -1;
    return Result{decode_status(status), read_text(out), read_text(err)};
  }
  ~Background() {
    if (pid > 0) {  // a failed test left it running: stop it so the suite does not hang
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
    close_stdout_reader();
  }
};

struct BackgroundOptions {
  bool ignore_hangup = false;   // start with SIGHUP ignored, as nohup does
  bool stdout_to_pipe = false;  // stdout into a pipe whose read end is Background::stdout_reader
};

// Starts `lmtrain args...` in the repository root without waiting.
inline void run_lmtrain_background(const std::vector<std::string>& args, const TempDir& tmp,
                                   Background& bg, BackgroundOptions options = {}) {
  bg.out = tmp.path() / ".bg_stdout";
  bg.err = tmp.path() / ".bg_stderr";
  std::vector<std::string> argv_storage = {LMTRAIN_BINARY};
  argv_storage.insert(argv_storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_storage) argv.push_back(a.data());
  argv.push_back(nullptr);
  int pipe_fds[2] = {-1, -1};
  if (options.stdout_to_pipe) REQUIRE(::pipe2(pipe_fds, O_CLOEXEC) == 0);
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    int in = ::open("/dev/null", O_RDONLY);
    int o = options.stdout_to_pipe ? pipe_fds[1]
                                   : ::open(bg.out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int e = ::open(bg.err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (in < 0 || o < 0 || e < 0 || ::chdir(LMTRAIN_SOURCE_DIR) != 0) ::_exit(126);
    if (options.ignore_hangup) ::signal(SIGHUP, SIG_IGN);
    ::dup2(in, 0);
    ::dup2(o, 1);
    ::dup2(e, 2);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  bg.pid = pid;
  if (options.stdout_to_pipe) {
    ::close(pipe_fds[1]);
    bg.stdout_reader = pipe_fds[0];
  }
}

// Polls `done` every 5 ms for up to 60 s; returns whether it came true.
template <typename F>
bool wait_until(F&& done) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return false;
}

// Waits up to a minute for a metrics file to hold the record of step `step` (or a later one).
inline bool wait_for_step(const fs::path& metrics, int step) {
  return wait_until([&] {
    for (const auto& line : lines_of(read_text(metrics))) {
      const json record = json::parse(line, nullptr, false);  // a line being written: not yet
      if (record.is_discarded() || !record.contains("train_loss")) continue;
      if (record["step"].get<int>() >= step) return true;
    }
    return false;
  });
}

// The records of a run's metrics.jsonl, in order.
inline std::vector<json> read_metrics(const fs::path& path) {
  std::vector<json> records;
  for (const auto& line : lines_of(read_text(path))) {
    if (!line.empty()) records.push_back(json::parse(line));
  }
  return records;
}

// The run directory, metrics file and checkpoint folder of a run named `name` under `out_dir`.
struct RunPaths {
  fs::path run, metrics, ckpt;
  RunPaths(const fs::path& out_dir, const std::string& name)
      : run(out_dir / name),
        metrics(out_dir / name / "metrics.jsonl"),
        ckpt(out_dir / name / "ckpt") {}
};

// A tiny, fast training config (2 layers, width 64, T=32) on the default corpus with absolute
// paths, writing its run under `out_dir`. `patch` is deep-merged over it.
inline json tiny_config(const std::string& out_dir, const json& patch = json::object()) {
  const std::string data = data_dir();
  json c = {
      {"run",
       {{"name", "e2e"}, {"out_dir", out_dir}, {"seed", 1337}, {"backend", "cpu"}, {"threads", 1}}},
      {"model", {{"depth", 2}, {"aspect_ratio", 32}, {"head_dim", 32}, {"sequence_len", 32}}},
      {"data", {{"train", data}, {"val", data}, {"tokenizer", data + "/tokenizer.json"}}},
      {"batch", {{"device_batch", 4}, {"total_batch_tokens", 128}}},
      {"schedule", {{"num_iterations", 6}}},
      {"eval", {{"every", 0}, {"tokens", 1024}, {"sample_tokens", 4}}},
      {"checkpoint", {{"every", 0}}},
      {"log", {{"every", 1}}},
  };
  // A patch written {} arrives as null, which merge_patch would put in place of the config.
  if (!patch.is_null()) c.merge_patch(patch);
  return c;
}

// Writes `config` to <tmp>/<file> and returns the path.
inline std::string write_config(const TempDir& tmp, const json& config,
                                const std::string& file = "config.json") {
  const std::string path = tmp / file;
  write_text(path, config.dump(2));
  return path;
}

// Every file under `dir` with its bytes, to show that a failed command changed nothing.
inline std::vector<std::pair<std::string, std::string>> snapshot(const fs::path& dir) {
  std::vector<std::pair<std::string, std::string>> files;
  for (const auto& entry : fs::recursive_directory_iterator(dir)) {
    if (entry.is_regular_file()) files.emplace_back(entry.path().string(), read_text(entry.path()));
  }
  std::sort(files.begin(), files.end());
  return files;
}

// The process failed with exactly one line on stderr, "error: ...", containing each of `parts`.
inline void require_one_error_line(const Result& r, const std::vector<std::string>& parts) {
  INFO(r.all());
  CHECK(r.code != 0);
  REQUIRE(r.err.rfind("error: ", 0) == 0);
  REQUIRE(r.err.back() == '\n');
  CHECK(r.err.find('\n') == r.err.size() - 1);
  for (const auto& p : parts) CHECK(r.err.find(p) != std::string::npos);
}

}  // namespace lmtrain::e2e
