#include <spdlog/spdlog.h>

#include <optional>

#include "cli/commands.h"
#include "data/shard.h"
#include "train/evaluate.h"

namespace lmtrain {

namespace {

struct EvalOptions {
  std::string ckpt, data, backend;
  std::optional<int64_t> tokens;  // the config's eval.tokens when not given
  std::optional<int> batch;       // the checkpoint's device_batch when not given
};

int run_eval(const EvalOptions& o) {
  CheckpointModel m = open_checkpoint_model(o.ckpt, o.backend, o.batch.value_or(0));
  const auto shards = with_context("eval: --data", [&] {
    const auto found = list_shards(o.data, "val");
    check_shard_meta(found.front(), m.tokenizer_path, m.tokenizer->vocab_size(),
                     m.tokenizer->bos_id());
    return found;
  });
  const int64_t tokens = o.tokens.value_or(m.config.eval.tokens);
  const int B = m.model->batch(), T = m.model->shape().seq_len;
  const EvalBatches batches = eval_batches(shards, B, T, tokens, 1);
  if (batches.capped)
    fmt::print(stderr, "eval: {} tokens asked; {} holds {} in batches of {} x {}, which are read\n",
               tokens, o.data, batches.count * B * T, B, T);  // stdout keeps the result alone
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
      ->required()
      ->check(non_empty("a checkpoint directory"));
  cmd->add_option("--data", o->data, "a shard file or a directory of val_*.bin shards")
      ->required()
      ->check(non_empty("a shard file or directory"));
  cmd->add_option("--tokens", o->tokens,
                  "tokens to evaluate, in whole batches (default: the config's eval.tokens); at "
                  "most what --data holds, said on stderr")
      ->check(integer_in(1, INT64_MAX));
  cmd->add_option("--batch", o->batch, "sequences per batch (default: the config's device_batch)")
      ->check(integer_in(1, INT32_MAX));
  cmd->add_option("--backend", o->backend, "cpu | cuda | auto (default: the config's)")
      ->check(non_empty("cpu | cuda | auto"));
  cmd->callback([&action, o] { action = [o] { return run_eval(*o); }; });
}

}  // namespace lmtrain
