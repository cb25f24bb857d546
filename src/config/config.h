// Every setting of a run, as typed structs. Each struct lists its keys once in `visit`, with the
// default (the member initialiser) and a one-line doc: that list is the configuration reference.
#pragma once

#include <string>
#include <vector>

#include "config/schema.h"

namespace lmtrain {

struct RunConfig {
  std::string name = "tiny";
  std::string out_dir = "runs";
  uint64_t seed = 1337;
  std::string backend = "auto";
  std::string dtype = "bf16";
  int threads = 0;
  bool recompute_activations = false;
  int64_t loss_chunk_rows = 0;
  int profile_steps = 0;
  int profile_start = 2;
  template <class V>
  void visit(V& v) {
    v("name", name, "run name; the run directory is out_dir/name");
    v("out_dir", out_dir, "directory that holds run directories");
    v("seed", seed, "seed for initialisation, data order and sampling");
    v("backend", backend,
      "auto | cpu | cuda (auto: cuda when a GPU is present; a GPU whose driver cannot be used is "
      "an error)");
    v("dtype", dtype,
      "activation and matmul dtype on the GPU: bf16 | fp32 (the CPU backend always computes in "
      "fp32)");
    v("threads", threads,
      "CPU threads, up to 1024 (0: OMP_NUM_THREADS if set, else all cores; lmtrain launch sets "
      "each rank's share of the cores)");
    v("recompute_activations", recompute_activations,
      "keep only each block's output through the forward and recompute the block's activations "
      "in the backward: one block's activations in memory instead of depth blocks', for about "
      "20% more FLOPs per step");
    v("loss_chunk_rows", loss_chunk_rows,
      "rows of logits the fused lm_head and loss compute at once (0: as many as fit in 256 MiB, "
      "in whole multiples of 128)");
    v("profile_steps", profile_steps,
      "time every op of this many training steps and write op_profile.json into the run "
      "directory (0: off)");
    v("profile_start", profile_start,
      "first profiled step (1-based; step 1 holds one-time costs such as matmul heuristics)");
  }
};

struct ModelConfig {
  std::string family = "gpt";
  int depth = 4;
  int aspect_ratio = 64;
  int head_dim = 128;
  int n_kv_head = 0;
  int sequence_len = 2048;
  int vocab_size = 0;
  std::string window_pattern = "SSSL";
  double softcap = 15.0;
  double rope_base = 10000.0;
  template <class V>
  void visit(V& v) {
    v("family", family, "model family: gpt");
    v("depth", depth, "number of transformer layers, 1 to 1024");
    v("aspect_ratio", aspect_ratio, "width = ceil(depth * aspect_ratio / head_dim) * head_dim");
    v("head_dim", head_dim, "channels per attention head");
    v("n_kv_head", n_kv_head,
      "key/value heads for grouped-query attention (0: one per query head)");
    v("sequence_len", sequence_len, "tokens per sequence (T)");
    v("vocab_size", vocab_size, "vocabulary size (0: taken from the tokenizer)");
    v("window_pattern", window_pattern,
      "per-layer attention windows tiled over layers: S = T/2, L = T; the last layer is always L");
    v("softcap", softcap, "logits are softcapped as softcap * tanh(z / softcap)");
    v("rope_base", rope_base, "rotary embedding base");
  }
};

struct DataConfig {
  std::string train = "data/tiny";
  std::string val = "data/tiny";
  std::string tokenizer = "data/tiny/tokenizer.json";
  std::string packing = "contiguous";
  template <class V>
  void visit(V& v) {
    v("train", train, "training shards: a .bin file or a directory of train_*.bin");
    v("val", val, "validation shards: a .bin file or a directory of val_*.bin");
    v("tokenizer", tokenizer, "tokenizer.json written by scripts/prepare_data.py");
    v("packing", packing, "contiguous (consecutive windows) | bos_bestfit (rows start at BOS)");
  }
};

struct BatchConfig {
  int device_batch = 32;
  int64_t total_batch_tokens = 524288;
  template <class V>
  void visit(V& v) {
    v("device_batch", device_batch, "sequences per micro-step on each rank");
    v("total_batch_tokens", total_batch_tokens,
      "tokens per optimizer step across ranks (-1: one micro-step); must be a multiple of "
      "device_batch * sequence_len * ranks");
  }
};

struct ScheduleConfig {
  int num_iterations = -1;
  double target_flops = -1;
  double target_param_data_ratio = -1;
  double warmup_ratio = 0.0;
  double warmdown_ratio = 0.2;
  double final_lr_frac = 0.0;
  template <class V>
  void visit(V& v) {
    v("num_iterations", num_iterations, "optimizer steps (-1: from target_flops or the ratio)");
    v("target_flops", target_flops, "FLOPs budget: steps = round(F / (flops_per_token * batch))");
    v("target_param_data_ratio", target_param_data_ratio,
      "tokens per scaling parameter (matrices + lm_head) when neither of the above is set");
    v("warmup_ratio", warmup_ratio, "fraction of steps with linear LR warmup");
    v("warmdown_ratio", warmdown_ratio, "fraction of final steps with linear LR warmdown");
    v("final_lr_frac", final_lr_frac, "LR multiplier reached at the end of warmdown");
  }
};

// Decoupled weight decay of the AdamW groups.
struct AdamWDecayConfig {
  double embedding = 0.0, value_embeds = 0.0, unembedding = 0.0, resid = 0.0, x0 = 0.0,
         matrix = 0.0;
  template <class V>
  void visit(V& v) {
    v("embedding", embedding, "AdamW weight decay of wte");
    v("value_embeds", value_embeds, "AdamW weight decay of value embeddings");
    v("unembedding", unembedding, "AdamW weight decay of lm_head");
    v("resid", resid, "AdamW weight decay of resid_lambdas");
    v("x0", x0, "AdamW weight decay of x0_lambdas");
    v("matrix", matrix, "AdamW weight decay of block matrices (when they use AdamW)");
  }
};

// Per-parameter multipliers for Muon parameters whose name matches a glob pattern.
struct ParamOverride {
  std::string pattern;
  double lr_mul = 1.0, wd_mul = 1.0;
  template <class V>
  void visit(V& v) {
    v("pattern", pattern, "glob over parameter names, e.g. transformer.h.*.mlp.c_proj.weight");
    v("lr_mul", lr_mul, "learning-rate multiplier");
    v("wd_mul", wd_mul, "weight-decay multiplier");
  }
};

// The Muon family: every difference between the implementations the reference notes compare is
// a switch here. Defaults are NorMuon as nanochat's MuonAdamW of late January 2026.
struct MuonConfig {
  std::string momentum = "lerp";
  bool nesterov = true;
  double momentum_start = 0.85, momentum_end = 0.95;
  int momentum_warmup_steps = 300;
  std::string orthogonalizer = "polar_express";
  int ortho_steps = 5;
  std::string lr_scale = "rectangular";
  bool second_moment = true;
  double beta2 = 0.95;
  std::string weight_decay_mode = "cautious";
  double weight_decay = 0.1;
  double weight_decay_reference_depth = 12;
  double weight_decay_depth_exponent = 2;
  std::vector<ParamOverride> param_overrides;
  template <class V>
  void visit(V& v) {
    v("momentum", momentum, "lerp (buf = lerp(buf, g, 1-mu)) | classic (buf = mu*buf + g)");
    v("nesterov", nesterov, "lerp: u = lerp(g, buf, mu); classic: u = g + mu*buf; off: u = buf");
    v("momentum_start", momentum_start, "momentum at step 0");
    v("momentum_end", momentum_end, "momentum after the warmup");
    v("momentum_warmup_steps", momentum_warmup_steps, "steps of linear momentum warmup");
    v("orthogonalizer", orthogonalizer, "polar_express | newton_schulz5 | none");
    v("ortho_steps", ortho_steps, "orthogonalizer iterations");
    v("lr_scale", lr_scale,
      "rectangular sqrt(max(1, m/n)) | moonshot 0.2*sqrt(max(m, n)) | sqrt_max sqrt(max(m, n)) | "
      "none");
    v("second_moment", second_moment, "NorMuon's per-neuron second moment");
    v("beta2", beta2, "second-moment EMA coefficient");
    v("weight_decay_mode", weight_decay_mode,
      "cautious (where update and weight agree in sign) | decoupled (p *= 1 - lr*wd) | none");
    v("weight_decay", weight_decay, "weight decay at the reference depth, decaying linearly to 0");
    v("weight_decay_reference_depth", weight_decay_reference_depth,
      "depth where weight_decay is tuned");
    v("weight_decay_depth_exponent", weight_decay_depth_exponent,
      "wd scales as (reference_depth / depth)^exponent");
    v("param_overrides", param_overrides,
      "per-parameter lr_mul / wd_mul by name pattern (last match wins)");
  }
};

struct OptimConfig {
  std::string preset = "";
  std::string matrix_optimizer = "normuon";
  double embedding_lr = 0.3;
  double unembedding_lr = 0.004;
  double matrix_lr = 0.02;
  double scalar_lr = 0.5;
  double adam_beta1 = 0.8;
  double adam_beta2 = 0.95;
  double adam_eps = 1e-10;
  double lr_reference_width = 768;
  double lr_reference_batch = 524288;
  double grad_clip = 0.0;
  AdamWDecayConfig weight_decay;
  MuonConfig muon;
  template <class V>
  void visit(V& v) {
    v("preset", preset,
      "configs/optim/<preset>.json gives the base of this section; keys beside it override");
    v("matrix_optimizer", matrix_optimizer, "optimizer of the block matrices: normuon | adamw");
    v("embedding_lr", embedding_lr, "AdamW LR of wte and value embeddings (x (C/ref_width)^-0.5)");
    v("unembedding_lr", unembedding_lr, "AdamW LR of lm_head (x (C/ref_width)^-0.5)");
    v("matrix_lr", matrix_lr, "LR of the block matrices");
    v("scalar_lr", scalar_lr, "LR of x0_lambdas; resid_lambdas use scalar_lr * 0.01");
    v("adam_beta1", adam_beta1, "AdamW beta1 (x0_lambdas use 0.96)");
    v("adam_beta2", adam_beta2, "AdamW beta2");
    v("adam_eps", adam_eps, "AdamW epsilon");
    v("lr_reference_width", lr_reference_width, "width at which the AdamW LRs were tuned");
    v("lr_reference_batch", lr_reference_batch,
      "batch in tokens at which all LRs were tuned; LRs scale by sqrt(batch / this)");
    v("grad_clip", grad_clip, "clip the global gradient norm to this (0: off)");
    v("weight_decay", weight_decay, "");
    v("muon", muon, "");
  }
};

struct EvalConfig {
  int every = 100;
  int64_t tokens = 1 << 20;
  int sample_every = 0;
  std::string sample_prompt = "";
  int sample_tokens = 64;
  double temperature = 0.8;
  int top_k = 50;
  template <class V>
  void visit(V& v) {
    v("every", every,
      "validation at step 0 and every this many steps, and at the end (0: only at the end, -1: "
      "never)");
    v("tokens", tokens,
      "validation tokens per evaluation: whole batches, at least one, at most what data.val holds "
      "(a warning at start says so)");
    v("sample_every", sample_every, "print a sample every this many steps (0: only at the end)");
    v("sample_prompt", sample_prompt, "prompt for samples (empty: start from BOS)");
    v("sample_tokens", sample_tokens, "tokens generated per sample");
    v("temperature", temperature, "sampling temperature (0: greedy)");
    v("top_k", top_k, "sample from the top k tokens (0: all)");
  }
};

struct CheckpointConfig {
  int every = 0;
  bool save_final = true;
  template <class V>
  void visit(V& v) {
    v("every", every, "save a checkpoint every this many steps (0: only at the end)");
    v("save_final", save_final, "save a checkpoint when the run ends");
  }
};

struct LogConfig {
  int every = 1;
  template <class V>
  void visit(V& v) {
    v("every", every, "print a console line every this many steps");
  }
};

struct Config {
  RunConfig run;
  ModelConfig model;
  DataConfig data;
  BatchConfig batch;
  ScheduleConfig schedule;
  OptimConfig optim;
  EvalConfig eval;
  CheckpointConfig checkpoint;
  LogConfig log;
  template <class V>
  void visit(V& v) {
    v("run", run, "");
    v("model", model, "");
    v("data", data, "");
    v("batch", batch, "");
    v("schedule", schedule, "");
    v("optim", optim, "");
    v("eval", eval, "");
    v("checkpoint", checkpoint, "");
    v("log", log, "");
  }
};

// Parses a JSON document into a Config; `source` names it in errors. Validates every value.
Config parse_config(const nlohmann::json& document, const std::string& source);
// The same, naming the --set that wrote a key in errors about it.
Config parse_config(const nlohmann::json& document, const config::Source& source);
// Reads `path`, applies `--set key=value` overrides, parses and validates.
Config load_config(const std::string& path, const std::vector<std::string>& overrides);
nlohmann::json to_json(const Config& config);
// A JSON file read strictly: a key that appears twice in an object is an error (JSON would keep
// the last), as are files over 16 MiB or nested deeper than 16 levels. Errors name the path.
nlohmann::json read_json_file(const std::string& path);
// Markdown table of every key with its default and doc.
std::string config_reference();

}  // namespace lmtrain
