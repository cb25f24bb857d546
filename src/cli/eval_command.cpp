#include <spdlog/spdlog.h>

#include "cli/commands.h"
#include "data/shard.h"
#include "train/evaluate.h"

namespace lmtrain {

namespace {

struct EvalOptions {
  std::string ckpt, data, backend;
  int64_t tokens = -1;  // -1: not given
  int batch = -1;       // -1: not given
};

int run_eval(const EvalOptions& o) {
  check(o.tokens == -1 || o.tokens > 0, "eval: --tokens: expected a positive token count, got {}",
        o.tokens);
  check(o.batch == -1 || o.batch > 0, "eval: --batch: expected a positive batch size, got {}",
        o.batch);
  CheckpointModel m = open_checkpoint_model(o.ckpt, o.backend, o.batch);
  const auto shards = list_shards(o.data, "val");
  const int64_t tokens = o.tokens > 0 ? o.tokens : m.config.eval.tokens;
  EvalResult r = evaluate(*m.model, shards, *m.tokenizer, tokens);
  fmt::print("loss {:.6f} | bpb {:.6f} | tokens {}\n", r.loss(), r.bpb(), int64_t(r.tokens));
  return 0;
}

}  // namespace

void add_eval_command(CLI::App& app, Action& action) {
  auto o = std::make_shared<EvalOptions>();
  CLI::App* cmd =
      app.add_subcommand("eval", "loss and bits per byte of a checkpoint on token shards");
  cmd->add_option("--ckpt", o->ckpt, "checkpoint directory (or a run whose ckpt/latest names one)")
      ->required();
  cmd->add_option("--data", o->data, "a shard file or a directory of val_*.bin shards")->required();
  cmd->add_option("--tokens", o->tokens, "tokens to evaluate (default: the config's eval.tokens)");
  cmd->add_option("--batch", o->batch, "sequences per batch (default: the config's device_batch)");
  cmd->add_option("--backend", o->backend, "cpu | cuda | auto (default: the config's)");
  cmd->callback([&action, o] { action = [o] { return run_eval(*o); }; });
}

}  // namespace lmtrain
