#include "cli/commands.h"
#include "train/trainer.h"

namespace lmtrain {

void add_train_command(CLI::App& app, Action& action) {
  auto options = std::make_shared<TrainOptions>();
  CLI::App* cmd = app.add_subcommand("train", "train a model from a JSON config");
  cmd->add_option("--config", options->config_path, "config file (configs/*.json)")
      ->required()
      ->check(non_empty("a config file"));
  cmd->add_option("--set", options->overrides,
                  "override one key: --set model.depth=6 (repeatable)");
  cmd->add_flag("--resume", options->resume, "continue from the run's latest checkpoint");
  cmd->add_option("--init-from", options->init_from, "start a new run from a checkpoint's weights")
      ->check(non_empty("a checkpoint directory"));
  cmd->add_flag("--overwrite", options->overwrite,
                "start a new run in a run directory that holds an earlier one, replacing it "
                "(kept in replaced_run/ until the new run saves its first checkpoint)");
  cmd->callback([&action, options] { action = [options] { return train(*options); }; });
}

}  // namespace lmtrain
