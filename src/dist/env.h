// Where this process sits among the ranks of a job, read from the launcher's environment.
// torchrun's variables come first (`lmtrain launch` sets them), then OpenMPI's (mpirun), then
// Slurm's (srun); with none of them the process is rank 0 of 1.
#pragma once

#include <chrono>
#include <functional>
#include <optional>
#include <string>

namespace lmtrain::dist {

struct RankInfo {
  int rank = 0, local_rank = 0, world_size = 1, local_world_size = 1;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  // Which convention supplied the values: "torchrun", "openmpi", "slurm" or "none".
  std::string source = "none";
  // Rank 0 only: a socket already listening on master_port that rank 0's store serves on,
  // inherited from `lmtrain launch` as LMTRAIN_STORE_FD. -1: rank 0 binds the port itself.
  int store_fd = -1;
};

// Looks up one environment variable; std::nullopt when unset. Tests pass a map instead.
using EnvLookup = std::function<std::optional<std::string>(const std::string&)>;
std::optional<std::string> process_env(const std::string& name);

// Throws lmtrain::Error naming the variable for malformed or inconsistent values.
RankInfo read_rank_info(const EnvLookup& env = process_env);

// How long rendezvous and collectives wait for the other ranks: LMTRAIN_RENDEZVOUS_TIMEOUT
// seconds (fractions allowed), 300 s by default.
std::chrono::milliseconds rendezvous_timeout(const EnvLookup& env = process_env);

}  // namespace lmtrain::dist
