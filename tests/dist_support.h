// Helpers shared by the distributed tests.
#pragma once

#include <netinet/in.h>
#include <sys/socket.h>

#include <random>
#include <utility>
#include <vector>

#include "dist/env.h"
#include "dist/socket.h"

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

// Rank 0's store socket, listening on a free port of 127.0.0.1 before any rank starts: a port
// picked by binding and closing a socket could be taken by another test's connection (as its
// local port) before rank 0 binds it again.
struct StoreSocket {
  dist::Fd listener = dist::listen_tcp("127.0.0.1", 0);
  int port = dist::bound_port(listener.get());

  // What `rank` passes to its TcpStore: the listener for rank 0, nothing for the others.
  dist::Fd listener_for(int rank) { return rank == 0 ? std::move(listener) : dist::Fd(); }
};

// A free port of 127.0.0.1 held by a bound socket that does not listen: connections to it are
// refused, no other program can take it, and a store that binds it itself (both set
// SO_REUSEADDR, and only one listens) still can.
struct ReservedPort {
  dist::Fd socket{::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)};
  int port = reserve();

 private:
  int reserve() {
    int one = 1;
    ::setsockopt(socket.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(socket.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) return -1;
    return dist::bound_port(socket.get());
  }
};

// n normal floats from `seed`: each rank's distinct inputs.
inline std::vector<float> normal_data(int seed, size_t n) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> v(n);
  for (float& x : v) x = normal(rng);
  return v;
}

}  // namespace lmtrain::test_support
