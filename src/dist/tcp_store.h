// The rendezvous store: a small TCP key-value service through which ranks exchange what they
// need to connect (Gloo addresses, the NCCL id) and count arrivals for barriers. Rank 0 serves
// it on MASTER_ADDR:MASTER_PORT from a background thread; every rank, 0 included, is a client.
// docs/DISTRIBUTED.md describes the wire protocol.
//
// Every blocking call gives up after the timeout with an error that names the rank, the keys it
// waited for and the rendezvous address, since a missing or misconfigured rank shows up as a wait
// that never ends.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "dist/env.h"
#include "dist/socket.h"

namespace lmtrain::dist {

using Bytes = std::vector<char>;

// The listening socket `lmtrain launch` handed to rank 0 (RankInfo::store_fd), owned from here
// on; empty when there is none. Throws naming LMTRAIN_STORE_FD when it is not a socket listening
// on master_port.
Fd inherited_store_listener(const RankInfo& info);

class TcpStore {
 public:
  // Rank 0 starts the server, on `listener` when given (a socket already listening on
  // master_port), else on a socket it binds to master_addr:master_port; then every rank connects
  // (retrying until the timeout, as rank 0 may start after the others).
  TcpStore(const RankInfo& info, std::chrono::milliseconds timeout, Fd listener = Fd());
  ~TcpStore();
  TcpStore(const TcpStore&) = delete;
  TcpStore& operator=(const TcpStore&) = delete;

  void set(const std::string& key, const Bytes& value);
  // Blocks until the key is present.
  Bytes get(const std::string& key);
  // Blocks until every key is present; `timeout` 0 means the store's own timeout.
  void wait(const std::vector<std::string>& keys,
            std::chrono::milliseconds timeout = std::chrono::milliseconds(0));
  // Adds `n` to the counter at `key` (0 when absent) and returns the new value. The counter is
  // also readable with get() as decimal text.
  int64_t add(const std::string& key, int64_t n);
  // Returns once all world_size ranks have called barrier() with the same name.
  void barrier(const std::string& name);

  const RankInfo& info() const { return info_; }
  std::chrono::milliseconds timeout() const { return timeout_; }

 private:
  class Server;
  std::vector<Bytes> request(const std::vector<Bytes>& message, const std::string& waited_for,
                             std::chrono::milliseconds timeout);

  RankInfo info_;
  std::chrono::milliseconds timeout_;
  std::unique_ptr<Server> server_;
  std::mutex mutex_;  // one request in flight per connection
  Fd socket_;
  int64_t barriers_ = 0;
  bool all_met_ = false;  // a barrier has passed: every rank had started
};

}  // namespace lmtrain::dist
