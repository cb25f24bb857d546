#include "dist/env.h"

#include <charconv>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "core/error.h"

namespace lmtrain::dist {

std::optional<std::string> process_env(const std::string& name) {
  const char* value = std::getenv(name.c_str());
  if (!value) return std::nullopt;
  return std::string(value);
}

namespace {

int parse_int(const std::string& name, const std::string& text, int min_value) {
  int value = 0;
  auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  check(ec == std::errc() && end == text.data() + text.size() && !text.empty(),
        "{}='{}' is not an integer", name, text);
  check(value >= min_value, "{}={} must be at least {}", name, value, min_value);
  return value;
}

std::optional<int> read_int(const EnvLookup& env, const std::string& name, int min_value) {
  auto text = env(name);
  if (!text) return std::nullopt;
  return parse_int(name, *text, min_value);
}

int require_int(const EnvLookup& env, const std::string& name, int min_value,
                const std::string& because) {
  auto value = read_int(env, name, min_value);
  check(value.has_value(), "{} is not set ({})", name, because);
  return *value;
}

// Slurm's task counts per node, e.g. "2(x3),1" for 2, 2, 2, 1: the count on node `node`.
int slurm_tasks_on_node(const std::string& spec, int node) {
  const std::string name = "SLURM_TASKS_PER_NODE";
  std::vector<int> counts;
  size_t pos = 0;
  while (pos <= spec.size()) {
    size_t comma = spec.find(',', pos);
    std::string item =
        spec.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    size_t paren = item.find("(x");
    int count = parse_int(name, item.substr(0, paren), 1);
    int repeat = 1;
    if (paren != std::string::npos) {
      check(item.back() == ')', "{}='{}' is malformed", name, spec);
      repeat = parse_int(name, item.substr(paren + 2, item.size() - paren - 3), 1);
    }
    counts.insert(counts.end(), repeat, count);
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  check(node < int(counts.size()), "SLURM_NODEID={} is beyond {}='{}'", node, name, spec);
  return counts[node];
}

void read_torchrun(const EnvLookup& env, RankInfo& info) {
  const std::string why = "torchrun's convention needs RANK and WORLD_SIZE together";
  info.source = "torchrun";
  info.rank = require_int(env, "RANK", 0, why);
  info.world_size = require_int(env, "WORLD_SIZE", 1, why);
  // Bare RANK/WORLD_SIZE (PyTorch's env:// contract) means every rank runs on this machine.
  info.local_rank = read_int(env, "LOCAL_RANK", 0).value_or(info.rank);
  info.local_world_size = read_int(env, "LOCAL_WORLD_SIZE", 1).value_or(info.world_size);
}

void read_openmpi(const EnvLookup& env, RankInfo& info) {
  const std::string why = "set by mpirun next to OMPI_COMM_WORLD_RANK";
  info.source = "openmpi";
  info.rank = require_int(env, "OMPI_COMM_WORLD_RANK", 0, why);
  info.world_size = require_int(env, "OMPI_COMM_WORLD_SIZE", 1, why);
  info.local_rank = require_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", 0, why);
  info.local_world_size = require_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1, why);
}

void read_slurm(const EnvLookup& env, RankInfo& info) {
  const std::string why = "set by srun next to SLURM_PROCID";
  info.source = "slurm";
  info.rank = require_int(env, "SLURM_PROCID", 0, why);
  info.world_size = require_int(env, "SLURM_NTASKS", 1, why);
  info.local_rank = require_int(env, "SLURM_LOCALID", 0, why);
  if (auto per_node = env("SLURM_TASKS_PER_NODE")) {
    info.local_world_size =
        slurm_tasks_on_node(*per_node, read_int(env, "SLURM_NODEID", 0).value_or(0));
  } else {
    info.local_world_size = read_int(env, "SLURM_NTASKS_PER_NODE", 1).value_or(info.world_size);
  }
}

}  // namespace

RankInfo read_rank_info(const EnvLookup& env) {
  RankInfo info;
  if (env("RANK") || env("WORLD_SIZE")) {
    read_torchrun(env, info);
  } else if (env("OMPI_COMM_WORLD_RANK")) {
    read_openmpi(env, info);
  } else if (env("SLURM_PROCID")) {
    read_slurm(env, info);
  }
  const std::string& src = info.source;
  check(info.rank < info.world_size, "rank {} is out of range for a world of {} ({} environment)",
        info.rank, info.world_size, src);
  check(info.local_world_size <= info.world_size,
        "{} ranks per node exceed the world of {} ({} environment)", info.local_world_size,
        info.world_size, src);
  check(info.local_rank < info.local_world_size,
        "local rank {} is out of range for {} ranks per node ({} environment)", info.local_rank,
        info.local_world_size, src);

  if (auto addr = env("MASTER_ADDR")) {
    check(!addr->empty(), "MASTER_ADDR is empty");
    info.master_addr = *addr;
  } else {
    // Only a job that lives on one machine can guess where rank 0 is.
    check(info.local_world_size == info.world_size,
          "MASTER_ADDR is not set: a world of {} ranks with {} per node spans machines, so "
          "rank 0's host must be given",
          info.world_size, info.local_world_size);
  }
  if (auto port = read_int(env, "MASTER_PORT", 1)) {
    check(*port <= 65535, "MASTER_PORT={} is not a TCP port", *port);
    info.master_port = *port;
  }
  if (info.rank == 0) info.store_fd = read_int(env, "LMTRAIN_STORE_FD", -1).value_or(-1);
  return info;
}

std::chrono::milliseconds rendezvous_timeout(const EnvLookup& env) {
  auto text = env("LMTRAIN_RENDEZVOUS_TIMEOUT");
  if (!text) return std::chrono::seconds(300);
  char* end = nullptr;
  double seconds = std::strtod(text->c_str(), &end);
  // Bounded so that deadlines stay far inside the clocks' range (1e10 s would overflow them).
  check(!text->empty() && *end == '\0' && std::isfinite(seconds) && seconds > 0 && seconds <= 1e7,
        "LMTRAIN_RENDEZVOUS_TIMEOUT='{}' is not a number of seconds above 0 and at most 1e7 (116 "
        "days)",
        *text);
  return std::chrono::milliseconds(int64_t(std::ceil(seconds * 1000)));
}

}  // namespace lmtrain::dist
