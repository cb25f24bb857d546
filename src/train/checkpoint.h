// Checkpoint directories: model.safetensors (fp32, nanochat's names), the optimizer state as
// safetensors (one file per rank when sharded), tokenizer.json and meta.json (the resolved
// config, step, loader position and loop state). Written atomically; <dir>/latest names the
// newest. docs/FORMATS.md describes every file.
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "config/config.h"
#include "dist/communicator.h"
#include "model/gpt.h"
#include "optim/optimizer.h"

namespace lmtrain {

// The state of the loop that is not in the model or optimizer.
struct LoopState {
  int step = 0;           // optimizer steps completed
  nlohmann::json loader;  // this rank's training loader position
  nlohmann::json extra;   // timing and bookkeeping, restored verbatim
};

// Saves into <parent>/step_<step> and points <parent>/latest at it; a collective call when
// comm has several ranks (rank 0 writes the shared files, every rank its optimizer shard and
// loader position). Returns the directory.
std::string save_checkpoint(const std::string& parent, const nlohmann::json& resolved_config,
                            const Gpt& model, const Optimizer* optimizer, const LoopState& loop,
                            const std::string& tokenizer_path, dist::Communicator& comm);

// A checkpoint directory, or a directory whose `latest` (directly or under ckpt/) names one.
std::string resolve_checkpoint(const std::string& path);

// meta.json of a checkpoint, validated to hold the keys a resume needs.
nlohmann::json read_checkpoint_meta(const std::string& checkpoint_dir);

// The loader position saved for `rank`, adapted when the checkpoint had another world size.
nlohmann::json checkpoint_loader_state(const std::string& checkpoint_dir, int rank, int world,
                                       int64_t batch_tokens);

// Loads weights; every tensor must be present with the model's shape.
void load_model_weights(const std::string& checkpoint_dir, Gpt& model);
// Loads this rank's optimizer state from the shards written by any number of ranks.
void load_optimizer_state(const std::string& checkpoint_dir, Optimizer& optimizer);

}  // namespace lmtrain
