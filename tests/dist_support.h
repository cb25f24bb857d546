// Helpers shared by the distributed tests.
#pragma once

#include <random>
#include <vector>

#include "dist/env.h"

namespace lmtrain::test_support {

// A rank of a single-node job on 127.0.0.1 (local rank = rank).
inline dist::RankInfo rank_info(int rank, int world, int port) {
  dist::RankInfo info;
  info.rank = rank;
  info.world_size = world;
  info.local_rank = rank;
  info.local_world_size = world;
  info.master_addr = "127.0.0.1";
  info.master_port = port;
  return info;
}

// n normal floats from `seed`: each rank's distinct inputs.
inline std::vector<float> normal_data(int seed, size_t n) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

}  // namespace lmtrain::test_support
