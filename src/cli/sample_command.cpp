#include <cstdio>

#include "cli/commands.h"
#include "model/generator.h"

namespace lmtrain {

namespace {

struct SampleCommandOptions {
  std::string ckpt, prompt, backend;
  SampleOptions sample;
};

int run_sample(const SampleCommandOptions& o) {
  CheckpointModel m = open_checkpoint_model(o.ckpt, o.backend, 1);
  std::vector<int32_t> prompt = {m.tokenizer->bos_id()};
  const auto encoded =
      with_context("sample: --prompt", [&] { return m.tokenizer->encode(o.prompt); });
  prompt.insert(prompt.end(), encoded.begin(), encoded.end());
  Generator generator(*m.model);
  SampleOptions options = o.sample;
  options.vocab_limit = m.tokenizer->vocab_size();
  const Generation generation = generator.generate(prompt, options, m.tokenizer->bos_id());
  fmt::print("{}{}\n", o.prompt, m.tokenizer->decode(generation.tokens));
  // On stderr, so that stdout stays the text alone; after it, also when both go to one pipe.
  std::fflush(stdout);
  if (generation.end == Generation::End::stop_token)
    fmt::print(stderr,
               "sample: {} of {} tokens: the model ended the document (its next token was BOS)\n",
               generation.tokens.size(), options.max_tokens);
  else if (generation.end == Generation::End::sequence_len)
    fmt::print(
        stderr,
        "sample: {} of {} tokens: the prompt and the text reach the model's sequence length {}\n",
        generation.tokens.size(), options.max_tokens, m.model->shape().seq_len);
  return 0;
}

}  // namespace

void add_sample_command(CLI::App& app, Action& action) {
  auto o = std::make_shared<SampleCommandOptions>();
  CLI::App* cmd = app.add_subcommand("sample", "generate text from a checkpoint (KV cache)");
  cmd->add_option("--ckpt", o->ckpt, "checkpoint directory (or a run whose ckpt/latest names one)")
      ->required()
      ->check(non_empty("a checkpoint directory"));
  cmd->add_option("--prompt", o->prompt, "text to continue (a BOS token is put before it)");
  cmd->add_option("--max-tokens", o->sample.max_tokens, "tokens to generate")
      ->capture_default_str()
      ->check(integer_in(0, INT32_MAX));
  cmd->add_option("--temperature", o->sample.temperature, "0 for greedy")
      ->capture_default_str()
      ->check(finite_number_at_least(0));
  cmd->add_option("--top-k", o->sample.top_k, "sample among the k most likely (0: all)")
      ->capture_default_str()
      ->check(integer_in(0, INT32_MAX));
  cmd->add_option("--seed", o->sample.seed, "sampling seed")
      ->capture_default_str()
      ->check(unsigned_integer());
  cmd->add_option("--backend", o->backend, "cpu | cuda | auto (default: the config's)")
      ->check(non_empty("cpu | cuda | auto"));
  cmd->callback([&action, o] { action = [o] { return run_sample(*o); }; });
}

}  // namespace lmtrain
