// Subcommands of the lmtrain executable. Each registers its options on the app and sets
// `action` to the code that runs when it is chosen; the action returns the exit code.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>
#include <memory>

#include "backend/backend.h"
#include "config/config.h"
#include "data/tokenizer.h"
#include "model/gpt.h"

namespace lmtrain {

using Action = std::function<int()>;

void add_train_command(CLI::App& app, Action& action);
void add_eval_command(CLI::App& app, Action& action);
void add_sample_command(CLI::App& app, Action& action);
void add_info_command(CLI::App& app, Action& action);
void add_launch_command(CLI::App& app, Action& action);

// A model restored from a checkpoint directory with its own config and tokenizer.
struct CheckpointModel {
  Config config;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Tokenizer> tokenizer;
  std::unique_ptr<Gpt> model;
};
// `batch` 0 takes the checkpoint's device batch.
CheckpointModel open_checkpoint_model(const std::string& path, const std::string& backend,
                                      int batch);

}  // namespace lmtrain
