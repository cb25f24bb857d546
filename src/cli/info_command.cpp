#include <filesystem>

#include "cli/commands.h"
#include "train/plan.h"

namespace lmtrain {

namespace {

struct InfoOptions {
  std::string config_path;
  std::vector<std::string> overrides;
  bool keys = false;
};

// What the model's activations take on a GPU (in run.dtype; the CPU computes in fp32), both
// ways of run.recompute_activations: what decides the device batch that fits.
void print_activation_memory(const Config& config, const GptShape& shape) {
  const DType dtype = config.run.dtype == "bf16" ? DType::bf16 : DType::f32;
  const int batch = config.batch.device_batch;
  auto gib = [&](bool recompute) {
    GptOptions options = GptOptions::from(config.run);
    options.recompute_activations = recompute;
    return double(Gpt::activation_bytes(shape, batch, dtype, options)) / 1073741824.0;
  };
  fmt::print(
      "activations per rank at batch.device_batch {} in {}: {:.2f} GiB kept, {:.2f} GiB "
      "recomputed (run.recompute_activations: {})\n",
      batch, config.run.dtype, gib(false), gib(true), config.run.recompute_activations);
}

int run_info(const InfoOptions& o) {
  if (o.keys) {
    fmt::print("{}", config_reference());
    return 0;
  }
  check(!o.config_path.empty(), "info: --config is required (or --keys for the key reference)");
  Config config = load_config(o.config_path, o.overrides);
  const config::Source source{o.config_path, o.overrides};
  int vocab = config.model.vocab_size;
  const std::string tokenizer_key = source.at("data.tokenizer") + ": data.tokenizer";
  auto tokenizer_vocab = [&] {
    return with_context(tokenizer_key,
                        [&] { return Tokenizer::load(config.data.tokenizer).vocab_size(); });
  };
  if (vocab == 0) {
    check(std::filesystem::exists(config.data.tokenizer),
          "{}: {} does not exist, and model.vocab_size 0 takes the vocabulary from it; prepare "
          "the data or --set model.vocab_size=N",
          tokenizer_key, config.data.tokenizer);
    vocab = tokenizer_vocab();
  } else if (std::filesystem::exists(config.data.tokenizer)) {
    // train refuses this; say so here rather than print a plan for a run that cannot start.
    const int needed = tokenizer_vocab();
    check(vocab >= needed, "{}: model.vocab_size: {} is smaller than the {} tokens of {}",
          source.at({"model.vocab_size", "data.tokenizer"}), vocab, needed, config.data.tokenizer);
  }
  const GptShape shape = GptShape::from(config.model, vocab);
  const ParamTable table(shape);
  fmt::print("{:<44} {:>16} {:>14} {:>12}\n", "parameter", "shape", "group", "count");
  for (const auto& spec : table.specs) {
    fmt::print("{:<44} {:>16} {:>14} {:>12}\n", spec.name, spec.shape.str(), group_name(spec.group),
               spec.shape.numel());
  }
  const ParamCounts n = count_params(table);
  fmt::print(
      "\nwte {}\nvalue_embeds {}\nlm_head {}\ntransformer_matrices {}\nscalars {}\ntotal {}\n",
      n.wte, n.value_embeds, n.lm_head, n.transformer_matrices, n.scalars, n.total);
  fmt::print("\nwidth {} | heads {} (kv {}) | head_dim {} | T {} | vocab {} (padded {})\n",
             shape.width, shape.n_head, shape.n_kv_head, shape.head_dim, shape.seq_len, shape.vocab,
             shape.padded_vocab);
  std::string windows;
  for (size_t i = 0; i < shape.windows.size(); ++i) {
    windows +=
        fmt::format("{}{}{}", i ? " " : "", shape.windows[i], shape.value_embed[i] ? "+ve" : "");
  }
  fmt::print("windows per layer (+ve: value embedding): {}\n", windows);
  print_activation_memory(config, shape);
  fmt::print("\n");
  fmt::print("{}", make_plan(config, shape, 1, source, /*require_horizon=*/false).describe());
  return 0;
}

}  // namespace

void add_info_command(CLI::App& app, Action& action) {
  auto o = std::make_shared<InfoOptions>();
  CLI::App* cmd = app.add_subcommand(
      "info", "parameter table, FLOPs per token and the training horizon of a config");
  cmd->add_option("--config", o->config_path, "config file")->check(non_empty("a config file"));
  cmd->add_option("--set", o->overrides, "override one key: --set schedule.target_flops=1e18");
  cmd->add_flag("--keys", o->keys, "print every config key with its default and meaning");
  cmd->callback([&action, o] { action = [o] { return run_info(*o); }; });
}

}  // namespace lmtrain
