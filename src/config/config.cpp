#include "config/config.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>

#include "io/json_reason.h"

namespace lmtrain {

namespace {

bool one_of(const std::string& value, std::initializer_list<const char*> allowed) {
  return std::any_of(allowed.begin(), allowed.end(), [&](const char* a) { return value == a; });
}

std::string join(std::initializer_list<const char*> allowed) {
  std::string s;
  for (const char* a : allowed) s += (s.empty() ? "" : " | ") + std::string(a);
  return s;
}

// Past the deepest transformers trained (DeepNet's 1000 layers) a depth is a typo, and one
// spent gigabytes on per-layer tables before failing.
constexpr int kMaxDepth = 1024;
constexpr int kMaxThreads = 1024;

// In [0, 1) also as the float the kernels use: 0.99999999999 rounds to 1.
bool below_one(double x) { return x >= 0 && float(x) < 1.0f; }
constexpr const char* kBelowOne = "a number in [0, 1) (at most 0.99999994, the last float below 1)";

// Cross-field and range checks; each error names the key path and what was expected.
void validate(const Config& c, const config::Source& src) {
  auto require = [&](bool ok, std::string_view key, const std::string& expected) {
    if (!ok) fail("{}: {}: expected {}", src.at(key), key, expected);
  };
  auto choice = [&](const std::string& value, const char* key,
                    std::initializer_list<const char*> allowed) {
    if (!one_of(value, allowed))
      fail("{}: {}: expected {}, got \"{}\"", src.at(key), key, join(allowed), value);
  };

  choice(c.run.backend, "run.backend", {"auto", "cpu", "cuda"});
  choice(c.run.dtype, "run.dtype", {"bf16", "fp32"});
  // More threads than any machine has cores only spins (OpenBLAS under an address-space limit).
  require(c.run.threads >= 0 && c.run.threads <= kMaxThreads, "run.threads",
          fmt::format("0 (OMP_NUM_THREADS, else all cores) or a count up to {}, got {}",
                      kMaxThreads, c.run.threads));
  require(!c.run.name.empty(), "run.name", "a non-empty name");
  // An empty path would reach the error of whatever opens it as ": no such file".
  for (auto [value, key] : {std::pair{&c.run.out_dir, "run.out_dir"},
                            {&c.data.train, "data.train"},
                            {&c.data.val, "data.val"},
                            {&c.data.tokenizer, "data.tokenizer"}}) {
    require(!value->empty(), key, "a path, got an empty string");
  }
  require(c.run.loss_chunk_rows >= 0, "run.loss_chunk_rows",
          "an integer >= 0 (0: as many rows as fit in 256 MiB)");
  require(c.run.profile_steps >= 0, "run.profile_steps", "an integer >= 0 (0: off)");
  require(c.run.profile_start >= 1, "run.profile_start", "an integer >= 1");

  const auto& m = c.model;
  choice(m.family, "model.family", {"gpt"});
  require(m.depth >= 1, "model.depth", "an integer >= 1");
  require(m.depth <= kMaxDepth, "model.depth",
          fmt::format("at most {} layers, got {}", kMaxDepth, m.depth));
  require(m.aspect_ratio >= 1, "model.aspect_ratio", "an integer >= 1");
  require(m.head_dim >= 2 && m.head_dim % 2 == 0, "model.head_dim", "an even integer >= 2");
  require(m.sequence_len >= 2, "model.sequence_len", "an integer >= 2");
  require(m.vocab_size >= 0 && m.vocab_size <= INT32_MAX - 63, "model.vocab_size",
          "0 (from the tokenizer) or a positive size up to 2147483584");
  require(
      !m.window_pattern.empty() && m.window_pattern.find_first_not_of("SL") == std::string::npos,
      "model.window_pattern", "a non-empty string of S and L");
  require(m.softcap > 0, "model.softcap", "a positive number");
  require(m.rope_base > 0, "model.rope_base", "a positive number");
  int64_t width = (int64_t(m.depth) * m.aspect_ratio + m.head_dim - 1) / m.head_dim * m.head_dim;
  // The model computes in int: the MLP's 4 x width must fit.
  require(width <= INT32_MAX / 4, "model.aspect_ratio",
          fmt::format("a width ceil(depth x aspect_ratio / head_dim) x head_dim below 2^29, got {}",
                      width));
  int64_t n_head = width / m.head_dim;
  require(m.n_kv_head >= 0 && (m.n_kv_head == 0 || n_head % m.n_kv_head == 0), "model.n_kv_head",
          fmt::format("0 or a divisor of n_head = {}", n_head));

  choice(c.data.packing, "data.packing", {"contiguous", "bos_bestfit"});
  require(c.batch.device_batch >= 1, "batch.device_batch", "an integer >= 1");
  require(c.batch.total_batch_tokens == -1 || c.batch.total_batch_tokens >= 1,
          "batch.total_batch_tokens", "-1 or a positive token count");

  const auto& s = c.schedule;
  require(s.num_iterations == -1 || s.num_iterations >= 1, "schedule.num_iterations",
          "-1 or an integer >= 1");
  int horizons = (s.num_iterations > 0) + (s.target_flops > 0) + (s.target_param_data_ratio > 0);
  require(horizons <= 1, "schedule",
          "at most one of num_iterations, target_flops, target_param_data_ratio");
  require(s.warmup_ratio >= 0 && s.warmup_ratio <= 1, "schedule.warmup_ratio",
          "a number in [0, 1]");
  require(s.warmdown_ratio >= 0 && s.warmdown_ratio <= 1, "schedule.warmdown_ratio",
          "a number in [0, 1]");
  require(s.warmup_ratio + s.warmdown_ratio <= 1, "schedule.warmdown_ratio",
          "warmup_ratio + warmdown_ratio <= 1");
  require(s.final_lr_frac >= 0, "schedule.final_lr_frac", "a number >= 0");

  const auto& o = c.optim;
  choice(o.matrix_optimizer, "optim.matrix_optimizer", {"normuon", "adamw"});
  const auto& mu = o.muon;
  choice(mu.momentum, "optim.muon.momentum", {"lerp", "classic"});
  require(below_one(mu.momentum_start), "optim.muon.momentum_start", kBelowOne);
  require(below_one(mu.momentum_end), "optim.muon.momentum_end", kBelowOne);
  require(mu.momentum_warmup_steps >= 0, "optim.muon.momentum_warmup_steps", "an integer >= 0");
  choice(mu.orthogonalizer, "optim.muon.orthogonalizer",
         {"polar_express", "newton_schulz5", "none"});
  require(mu.ortho_steps >= 1, "optim.muon.ortho_steps", "an integer >= 1");
  choice(mu.lr_scale, "optim.muon.lr_scale", {"rectangular", "moonshot", "sqrt_max", "none"});
  require(below_one(mu.beta2), "optim.muon.beta2", kBelowOne);
  choice(mu.weight_decay_mode, "optim.muon.weight_decay_mode", {"cautious", "decoupled", "none"});
  require(mu.weight_decay >= 0, "optim.muon.weight_decay", "a number >= 0");
  require(mu.weight_decay_reference_depth > 0, "optim.muon.weight_decay_reference_depth",
          "a positive depth");
  for (size_t i = 0; i < mu.param_overrides.size(); ++i) {
    const auto& rule = mu.param_overrides[i];
    const std::string at = fmt::format("optim.muon.param_overrides[{}]", i);
    require(!rule.pattern.empty(), at + ".pattern", "a non-empty pattern");
    require(rule.lr_mul >= 0, at + ".lr_mul", "a number >= 0");
    require(rule.wd_mul >= 0, at + ".wd_mul", "a number >= 0");
  }
  for (auto [value, key] : {std::pair{o.embedding_lr, "optim.embedding_lr"},
                            {o.unembedding_lr, "optim.unembedding_lr"},
                            {o.matrix_lr, "optim.matrix_lr"},
                            {o.scalar_lr, "optim.scalar_lr"}}) {
    require(value >= 0, key, "a learning rate >= 0");
  }
  require(below_one(o.adam_beta1), "optim.adam_beta1", kBelowOne);
  require(below_one(o.adam_beta2), "optim.adam_beta2", kBelowOne);
  require(o.adam_eps > 0, "optim.adam_eps", "a positive number");
  // A negative decay would grow the weights away from zero, which no optimizer means.
  for (auto [value, key] : {std::pair{o.weight_decay.embedding, "optim.weight_decay.embedding"},
                            {o.weight_decay.value_embeds, "optim.weight_decay.value_embeds"},
                            {o.weight_decay.unembedding, "optim.weight_decay.unembedding"},
                            {o.weight_decay.resid, "optim.weight_decay.resid"},
                            {o.weight_decay.x0, "optim.weight_decay.x0"},
                            {o.weight_decay.matrix, "optim.weight_decay.matrix"}}) {
    require(value >= 0, key, "a number >= 0");
  }
  require(o.lr_reference_width > 0, "optim.lr_reference_width", "a positive number");
  require(o.lr_reference_batch > 0, "optim.lr_reference_batch", "a positive number");
  require(o.grad_clip >= 0, "optim.grad_clip", "0 (off) or a positive norm");

  require(c.eval.every >= -1, "eval.every", "-1 (never), 0 (only at the end) or a step count");
  require(c.eval.sample_every >= 0, "eval.sample_every", "0 (only at the end) or a step count");
  require(c.eval.tokens >= 0, "eval.tokens", "a token count >= 0");
  require(c.eval.sample_tokens >= 0, "eval.sample_tokens", "an integer >= 0");
  require(c.eval.temperature >= 0, "eval.temperature", "a number >= 0");
  require(c.eval.top_k >= 0, "eval.top_k", "0 (all) or a positive count");
  require(c.checkpoint.every >= 0, "checkpoint.every", "0 or a positive step count");
  require(c.log.every >= 1, "log.every", "an integer >= 1");

  // Kernels and optimizer state take these as float: a double that becomes 0 or inf there
  // passed the checks above and failed at step 1 (model.softcap 1e-300 became 0). The horizon
  // stays in double and is checked by the plan.
  config::DoubleFields doubles;
  const_cast<Config&>(c).visit(doubles);
  for (const auto& [key, value] : doubles.found) {
    if (key == "schedule.target_flops" || key == "schedule.target_param_data_ratio") continue;
    const double magnitude = std::abs(value);
    require(magnitude == 0 || (magnitude >= FLT_MIN && magnitude <= FLT_MAX), key.c_str(),
            fmt::format("0 or a magnitude in [{:g}, {:g}] (a float), got {:g}", FLT_MIN, FLT_MAX,
                        value));
  }
}

// Keys of `top` replace those of `base`, recursing into objects present in both.
void deep_merge(nlohmann::json& base, const nlohmann::json& top) {
  for (const auto& [key, value] : top.items()) {
    if (value.is_object() && base.contains(key) && base[key].is_object()) {
      deep_merge(base[key], value);
    } else {
      base[key] = value;
    }
  }
}

// optim.preset names configs/optim/<preset>.json, searched next to the config file, under the
// working directory, then in the source tree this binary was built from.
std::string find_preset(const std::string& name, const std::string& source) {
  namespace fs = std::filesystem;
  check(name.find('/') == std::string::npos, "{}: optim.preset: expected a preset name, got \"{}\"",
        source, name);
  std::vector<fs::path> candidates = {fs::path(source).parent_path() / "optim" / (name + ".json"),
                                      fs::path("configs/optim") / (name + ".json"),
                                      fs::path(LMTRAIN_CONFIG_DIR) / "optim" / (name + ".json")};
  for (const auto& path : candidates) {
    if (fs::exists(path)) return path.string();
  }
  fail("{}: optim.preset: no preset \"{}\" (looked for {})", source, name, candidates[1].string());
}

// A config is a few KB: the bound keeps a device (/dev/zero) or a stray huge file from filling
// memory before the parser can object.
constexpr size_t kMaxConfigBytes = size_t(16) << 20;
// Configs nest 5 levels (optim.muon.param_overrides[i].pattern); a file nested 100,000 deep
// cost memory quadratic in its depth.
constexpr size_t kMaxNesting = 16;

std::string read_config_text(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code error;
  const fs::file_status status = fs::status(path, error);
  check(!fs::is_directory(status), "{}: is a directory, expected a JSON file", path);
  check(fs::exists(status), "{}: cannot open", path);
  check(fs::is_regular_file(status), "{}: not a regular file, expected a JSON file", path);
  std::ifstream file(path, std::ios::binary);
  check(file.good(), "{}: cannot open", path);
  std::string text;
  char chunk[65536];
  while (file.read(chunk, sizeof chunk), file.gcount() > 0) {
    text.append(chunk, size_t(file.gcount()));
    check(text.size() <= kMaxConfigBytes, "{}: larger than {} MiB, expected a JSON config", path,
          kMaxConfigBytes >> 20);
  }
  return text;
}

}  // namespace

nlohmann::json read_json_file(const std::string& path) {
  const std::string text = read_config_text(path);
  // JSON lets a key repeat and keeps the last value; in a config that silently drops a setting.
  using Event = nlohmann::json::parse_event_t;
  struct Scope {
    std::string path;  // of the object or array, "" at the top
    bool array;
    std::set<std::string> keys;
  };
  std::vector<Scope> scopes;
  std::string key, duplicate;
  // The dotted path of the value being parsed; an array's elements share its path.
  auto current_path = [&] {
    if (scopes.empty()) return std::string();
    const Scope& outer = scopes.back();
    return outer.array ? outer.path : outer.path.empty() ? key : outer.path + "." + key;
  };
  auto on_event = [&](int, Event event, nlohmann::json& parsed) {
    if (event == Event::object_start || event == Event::array_start) {
      // Refused before the scope is stored: the check is what bounds the memory.
      check(scopes.size() < kMaxNesting, "{}: nested deeper than {} levels, expected a config",
            path, kMaxNesting);
      scopes.push_back({current_path(), event == Event::array_start, {}});
    } else if (event == Event::object_end || event == Event::array_end) {
      scopes.pop_back();
    } else if (event == Event::key) {
      key = parsed.get<std::string>();
      if (duplicate.empty() && !scopes.back().keys.insert(key).second) duplicate = current_path();
    }
    return true;
  };
  nlohmann::json document;
  try {
    document = nlohmann::json::parse(text, on_event, /*allow_exceptions=*/true,
                                     /*ignore_comments=*/true);
  } catch (const nlohmann::json::parse_error& e) {
    fail("{}: not valid JSON: {}", path, json_reason(e));
  } catch (const nlohmann::json::exception& e) {
    // A number beyond a double (1e999): nlohmann names neither a line nor a key.
    const std::string at = current_path();
    fail("{}: {}{}{}; expected a number within +-1.8e308", path, at, at.empty() ? "" : ": ",
         json_reason(e));
  }
  check(duplicate.empty(), "{}: key '{}' appears twice; keep one", path, duplicate);
  return document;
}

Config parse_config(const nlohmann::json& input, const std::string& source) {
  return parse_config(input, config::Source{source, {}});
}

Config parse_config(const nlohmann::json& input, const config::Source& source_of) {
  const std::string& source = source_of.file;
  check(input.is_object(), "{}: expected a JSON object at the top level", source);
  nlohmann::json document = input;
  if (document.contains("optim") && document["optim"].is_object() &&
      document["optim"].contains("preset") && document["optim"]["preset"].is_string() &&
      !document["optim"]["preset"].get<std::string>().empty()) {
    const std::string path = find_preset(document["optim"]["preset"].get<std::string>(), source);
    nlohmann::json optim = read_json_file(path);
    check(optim.is_object() && !optim.contains("preset"),
          "{}: a preset is an optim section without 'preset'", path);
    deep_merge(optim, document["optim"]);
    document["optim"] = optim;
  }
  Config config;
  config::Reader reader(document, "", source_of);
  config.visit(reader);
  reader.reject_unknown();
  validate(config, source_of);
  return config;
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  nlohmann::json document = path.empty() ? nlohmann::json::object() : read_json_file(path);
  const config::Source source{path.empty() ? "config" : path, overrides};
  for (const auto& assignment : overrides)
    config::apply_override(document, assignment, source.file);
  return parse_config(document, source);
}

nlohmann::json to_json(const Config& config) { return config::Writer::write(config); }

std::string config_reference() {
  Config defaults;
  config::Documenter doc;
  defaults.visit(doc);
  std::string out = "| key | default | meaning |\n|---|---|---|\n";
  for (const auto& row : doc.rows)
    out += fmt::format("| `{}` | `{}` | {} |\n", row.key, row.value, row.doc);
  return out;
}

}  // namespace lmtrain
