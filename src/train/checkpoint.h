// Checkpoint directories: model.safetensors (fp32, nanochat's names), optimizer.safetensors
// (per-parameter state), tokenizer.json and meta.json (the resolved config, step, loader
// position, RNG and loop state). Written atomically; <dir>/latest names the newest.
#pragma once

#include <nlohmann/json.hpp>

#include <string>

#include "config/config.h"
#include "model/gpt.h"
#include "optim/optimizer.h"

namespace lmtrain {

// The state of the loop that is not in the model or optimizer.
struct LoopState {
  int step = 0;  // optimizer steps completed
  nlohmann::json loader;
  nlohmann::json extra;  // timing and bookkeeping, restored verbatim
};

// Saves into <parent>/step_<step> and points <parent>/latest at it. Returns the directory.
std::string save_checkpoint(const std::string& parent, const nlohmann::json& resolved_config,
                            const Gpt& model, const Optimizer* optimizer, const LoopState& loop,
                            const std::string& tokenizer_path);

// A checkpoint directory, or a directory whose `latest` (directly or under ckpt/) names one.
std::string resolve_checkpoint(const std::string& path);

// meta.json of a checkpoint, validated to hold the keys a resume needs.
nlohmann::json read_checkpoint_meta(const std::string& checkpoint_dir);

// Loads weights; every tensor must be present with the model's shape.
void load_model_weights(const std::string& checkpoint_dir, Gpt& model);
// Loads optimizer state saved by save_checkpoint for the same parameter table.
void load_optimizer_state(const std::string& checkpoint_dir, Optimizer& optimizer);

}  // namespace lmtrain
