#include <cmath>

#include "cli/commands.h"
#include "dist/launcher.h"

namespace lmtrain {

void add_launch_command(CLI::App& app, Action& action) {
  auto options = std::make_shared<dist::LaunchOptions>();
  CLI::App* cmd = app.add_subcommand("launch",
                                     "run a command as the ranks of a distributed job: launch "
                                     "--nproc-per-node 8 -- lmtrain train ...");
  cmd->add_option("--nproc-per-node", options->nproc_per_node, "ranks on this machine")->required();
  cmd->add_option("--nnodes", options->nnodes, "machines in the job");
  cmd->add_option("--node-rank", options->node_rank, "this machine's index, 0 .. nnodes-1");
  cmd->add_option("--master-addr", options->master_addr,
                  "host of node rank 0 (default 127.0.0.1 on a single node)");
  cmd->add_option("--master-port", options->master_port,
                  "rendezvous port (default: a free port on a single node, 29500 across nodes)");
  auto grace_s = std::make_shared<double>(10.0);
  cmd->add_option("--grace", *grace_s,
                  "seconds the other ranks get after SIGTERM, once one failed, before SIGKILL")
      ->check(CLI::Range(0.0, 1e9));
  cmd->add_option("command", options->command, "the rank's command line, after --")->required();
  cmd->callback([&action, options, grace_s] {
    action = [options, grace_s] {
      // NonNegativeNumber lets nan through, and a huge value overflows the milliseconds.
      check(std::isfinite(*grace_s) && *grace_s >= 0 && *grace_s <= 1e9,
            "launch: --grace: expected seconds in [0, 1e9], got {}", *grace_s);
      options->grace = std::chrono::milliseconds(int64_t(*grace_s * 1000));
      return dist::launch(*options);
    };
  });
}

}  // namespace lmtrain
