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

// Checks of an option's text, run by CLI11 before it converts the value. CLI11 2.1 converts
// with strtoll: it takes '' as 0 (or the default), 99999999999999999999999 as INT64_MAX and -1
// as 2^64 - 1 for an unsigned option. Each failure is one line naming the option.
CLI::Validator integer_in(int64_t lo, int64_t hi);
CLI::Validator unsigned_integer();  // [0, 2^64 - 1]
CLI::Validator finite_number_at_least(double lo);
// A path or name that must not be empty, `expected` saying what it is: '' was taken as "not
// given" or opened as "".
CLI::Validator non_empty(const std::string& expected);

// A model restored from a checkpoint directory with its own config and tokenizer.
struct CheckpointModel {
  Config config;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Tokenizer> tokenizer;
  std::string tokenizer_path;  // the checkpoint's tokenizer.json
  std::unique_ptr<Gpt> model;
};
// `batch` 0 takes the checkpoint's device batch.
CheckpointModel open_checkpoint_model(const std::string& path, const std::string& backend,
                                      int batch);

}  // namespace lmtrain
