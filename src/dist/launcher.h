// `lmtrain launch`: starts the local ranks of a job with torchrun's environment, prefixes
// their output with "[rank R] ", and stops all of them when one fails.
#pragma once

#include <chrono>
#include <string>
#include <vector>

namespace lmtrain::dist {

struct LaunchOptions {
  int nproc_per_node = 1;
  int nnodes = 1;
  int node_rank = 0;
  std::string master_addr;  // empty: 127.0.0.1, allowed only for a single node
  int master_port = 0;      // 0: a free port on a single node, 29500 across nodes
  // How long ranks get to exit after SIGTERM before SIGKILL, once one of them has failed.
  std::chrono::milliseconds grace{10'000};
  // The rank's command line; "lmtrain" as the program means this executable.
  std::vector<std::string> command;
};

// Runs the ranks to completion. Returns 0 when all exit 0; throws lmtrain::Error naming the
// first rank that failed otherwise. SIGINT, SIGTERM and SIGHUP are forwarded to every rank; a
// SIGHUP ignored when the launcher starts (nohup) stays ignored, by the ranks too.
int launch(const LaunchOptions& options);

}  // namespace lmtrain::dist
