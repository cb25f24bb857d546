// Rank environment: torchrun, OpenMPI and Slurm conventions, defaults and malformed values.
#include <catch2/catch.hpp>
#include <map>

#include "core/error.h"
#include "dist/env.h"

using namespace lmtrain;
using namespace lmtrain::dist;

namespace {

EnvLookup env_of(std::map<std::string, std::string> vars) {
  return [vars](const std::string& name) -> std::optional<std::string> {
    auto it = vars.find(name);
    if (it == vars.end()) return std::nullopt;
    return it->second;
  };
}

}  // namespace

TEST_CASE("rank info: no launcher means rank 0 of 1", "[dist]") {
  RankInfo info = read_rank_info(env_of({}));
  CHECK(info.rank == 0);
  CHECK(info.world_size == 1);
  CHECK(info.local_rank == 0);
  CHECK(info.local_world_size == 1);
  CHECK(info.master_addr == "127.0.0.1");
  CHECK(info.source == "none");
}

TEST_CASE("rank info: torchrun variables", "[dist]") {
  RankInfo info = read_rank_info(env_of({{"RANK", "5"},
                                         {"LOCAL_RANK", "1"},
                                         {"WORLD_SIZE", "8"},
                                         {"LOCAL_WORLD_SIZE", "4"},
                                         {"MASTER_ADDR", "node0"},
                                         {"MASTER_PORT", "1234"},
                                         // torchrun's take precedence over a surrounding srun.
                                         {"SLURM_PROCID", "0"},
                                         {"SLURM_NTASKS", "1"}}));
  CHECK(info.source == "torchrun");
  CHECK(info.rank == 5);
  CHECK(info.local_rank == 1);
  CHECK(info.world_size == 8);
  CHECK(info.local_world_size == 4);
  CHECK(info.master_addr == "node0");
  CHECK(info.master_port == 1234);

  // PyTorch's bare env:// contract: all ranks on this machine, the default port.
  info = read_rank_info(env_of({{"RANK", "1"}, {"WORLD_SIZE", "2"}}));
  CHECK(info.local_rank == 1);
  CHECK(info.local_world_size == 2);
  CHECK(info.master_addr == "127.0.0.1");
  CHECK(info.master_port == 29500);
  CHECK(info.store_fd == -1);
}

TEST_CASE("rank info: the store socket lmtrain launch hands to rank 0", "[dist]") {
  CHECK(read_rank_info(env_of({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LMTRAIN_STORE_FD", "7"}}))
            .store_fd == 7);
  // Only rank 0 serves the store: another rank ignores the variable.
  CHECK(read_rank_info(env_of({{"RANK", "1"}, {"WORLD_SIZE", "2"}, {"LMTRAIN_STORE_FD", "7"}}))
            .store_fd == -1);
  CHECK_THROWS_WITH(
      read_rank_info(env_of({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {"LMTRAIN_STORE_FD", "3x"}})),
      Catch::Matchers::Contains("LMTRAIN_STORE_FD='3x' is not an integer"));
}

TEST_CASE("rank info: OpenMPI variables", "[dist]") {
  RankInfo info = read_rank_info(env_of({{"OMPI_COMM_WORLD_RANK", "3"},
                                         {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                                         {"OMPI_COMM_WORLD_SIZE", "4"},
                                         {"OMPI_COMM_WORLD_LOCAL_SIZE", "2"},
                                         {"MASTER_ADDR", "10.0.0.1"}}));
  CHECK(info.source == "openmpi");
  CHECK(info.rank == 3);
  CHECK(info.local_rank == 1);
  CHECK(info.world_size == 4);
  CHECK(info.local_world_size == 2);
  CHECK(info.master_addr == "10.0.0.1");
}

TEST_CASE("rank info: Slurm variables", "[dist]") {
  RankInfo info = read_rank_info(env_of({{"SLURM_PROCID", "6"},
                                         {"SLURM_LOCALID", "0"},
                                         {"SLURM_NTASKS", "7"},
                                         {"SLURM_NODEID", "3"},
                                         {"SLURM_TASKS_PER_NODE", "2(x3),1"},
                                         {"MASTER_ADDR", "n0"},
                                         {"MASTER_PORT", "4000"}}));
  CHECK(info.source == "slurm");
  CHECK(info.rank == 6);
  CHECK(info.world_size == 7);
  CHECK(info.local_world_size == 1);
  CHECK(info.master_port == 4000);

  info = read_rank_info(env_of({{"SLURM_PROCID", "1"},
                                {"SLURM_LOCALID", "1"},
                                {"SLURM_NTASKS", "2"},
                                {"SLURM_NTASKS_PER_NODE", "2"}}));
  CHECK(info.local_world_size == 2);
  CHECK(info.master_addr == "127.0.0.1");  // one node: rank 0 is here
}

TEST_CASE("rank info: malformed values name the variable", "[dist]") {
  using Catch::Matchers::Contains;
  CHECK_THROWS_WITH(read_rank_info(env_of({{"RANK", "one"}, {"WORLD_SIZE", "2"}})),
                    Contains("RANK='one' is not an integer"));
  CHECK_THROWS_WITH(read_rank_info(env_of({{"RANK", "0"}, {"WORLD_SIZE", "2x"}})),
                    Contains("WORLD_SIZE='2x' is not an integer"));
  CHECK_THROWS_WITH(read_rank_info(env_of({{"RANK", "2"}, {"WORLD_SIZE", "2"}})),
                    Contains("rank 2 is out of range for a world of 2"));
  CHECK_THROWS_WITH(read_rank_info(env_of({{"RANK", "0"}})), Contains("WORLD_SIZE is not set"));
  CHECK_THROWS_WITH(read_rank_info(env_of({{"RANK", "0"}, {"WORLD_SIZE", "0"}})),
                    Contains("WORLD_SIZE=0 must be at least 1"));
  CHECK_THROWS_WITH(
      read_rank_info(env_of({{"RANK", "0"}, {"WORLD_SIZE", "1"}, {"MASTER_PORT", "70000"}})),
      Contains("MASTER_PORT=70000 is not a TCP port"));
  CHECK_THROWS_WITH(
      read_rank_info(env_of(
          {{"RANK", "0"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "0"}, {"LOCAL_WORLD_SIZE", "4"}})),
      Contains("MASTER_ADDR is not set"));
  CHECK_THROWS_WITH(read_rank_info(env_of({{"OMPI_COMM_WORLD_RANK", "0"}})),
                    Contains("OMPI_COMM_WORLD_SIZE is not set"));
  CHECK_THROWS_WITH(read_rank_info(env_of({{"SLURM_PROCID", "0"},
                                           {"SLURM_LOCALID", "0"},
                                           {"SLURM_NTASKS", "2"},
                                           {"SLURM_TASKS_PER_NODE", "2(x"}})),
                    Contains("SLURM_TASKS_PER_NODE"));
}

TEST_CASE("rendezvous timeout from LMTRAIN_RENDEZVOUS_TIMEOUT", "[dist]") {
  CHECK(rendezvous_timeout(env_of({})) == std::chrono::seconds(300));
  CHECK(rendezvous_timeout(env_of({{"LMTRAIN_RENDEZVOUS_TIMEOUT", "2.5"}})) ==
        std::chrono::milliseconds(2500));
  CHECK_THROWS_WITH(rendezvous_timeout(env_of({{"LMTRAIN_RENDEZVOUS_TIMEOUT", "soon"}})),
                    Catch::Matchers::Contains("LMTRAIN_RENDEZVOUS_TIMEOUT='soon'"));
  CHECK(rendezvous_timeout(env_of({{"LMTRAIN_RENDEZVOUS_TIMEOUT", "1e7"}})) ==
        std::chrono::seconds(10000000));
  // "Forever" written as a huge number would overflow the deadlines into the past.
  CHECK_THROWS_WITH(rendezvous_timeout(env_of({{"LMTRAIN_RENDEZVOUS_TIMEOUT", "1e10"}})),
                    "LMTRAIN_RENDEZVOUS_TIMEOUT='1e10' is not a number of seconds above 0 and at "
                    "most 1e7 (116 days)");
}
