// lmtrain: trains GPT language models end to end. Errors reach here as exceptions and are
// printed as one line; the exit code is non-zero.
#include <fcntl.h>
#include <fmt/core.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <string>

#include "cli/commands.h"

namespace {

// A standard descriptor the caller closed (`lmtrain ... >&-`) would be the next file or socket
// opened: log lines would land in a checkpoint, and the launcher would hand its ranks the store
// socket as their stdout. /dev/null takes each closed one's place first; it stays open for the
// whole process, as the standard streams do.
void fill_closed_standard_streams() {
  for (int fd = 0; fd <= 2; ++fd)
    if (::fcntl(fd, F_GETFD) == -1 && errno == EBADF) ::open("/dev/null", O_RDWR);
}

}  // namespace

int main(int argc, char** argv) {
  fill_closed_standard_streams();
  CLI::App app{"lmtrain: train, evaluate and sample GPT language models"};
  app.require_subcommand(1);
  lmtrain::Action action;
  lmtrain::add_train_command(app, action);
  lmtrain::add_eval_command(app, action);
  lmtrain::add_sample_command(app, action);
  lmtrain::add_info_command(app, action);
  lmtrain::add_launch_command(app, action);
  // CLI11 would say only that a subcommand is required.
  if (argc > 1 && argv[1][0] != '-') {
    const auto subs =
        app.get_subcommands([&](const CLI::App* s) { return s->get_name() == argv[1]; });
    if (subs.empty()) {
      fmt::print(stderr, "error: unknown command '{}' (see lmtrain --help)\n", argv[1]);
      return 1;
    }
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help: the usage, exit 0
    // A usage error is one line like any other error.
    std::string command = "lmtrain";
    for (const CLI::App* sub : app.get_subcommands()) command += " " + sub->get_name();
    fmt::print(stderr, "error: {} (see {} --help)\n", e.what(), command);
    return 1;
  }
  try {
    return action();
  } catch (const std::exception& e) {
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
}
