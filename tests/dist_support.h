// Helpers shared by the distributed tests.
#pragma once

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

}  // namespace lmtrain::test_support
