#include "config/config.h"

#include <algorithm>
#include <fstream>
#include <sstream>

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

// Cross-field and range checks; each error names the key path and what was expected.
void validate(const Config& c, const std::string& src) {
  auto require = [&](bool ok, const char* key, const std::string& expected) {
    if (!ok) fail("{}: {}: expected {}", src, key, expected);
  };
  auto choice = [&](const std::string& value, const char* key,
                    std::initializer_list<const char*> allowed) {
    if (!one_of(value, allowed)) fail("{}: {}: expected {}, got \"{}\"", src, key, join(allowed), value);
  };

  choice(c.run.backend, "run.backend", {"auto", "cpu", "cuda"});
  require(c.run.threads >= 0, "run.threads", "0 (all cores) or a positive count");
  require(!c.run.name.empty(), "run.name", "a non-empty name");

  const auto& m = c.model;
  choice(m.family, "model.family", {"gpt"});
  require(m.depth >= 1, "model.depth", "an integer >= 1");
  require(m.aspect_ratio >= 1, "model.aspect_ratio", "an integer >= 1");
  require(m.head_dim >= 2 && m.head_dim % 2 == 0, "model.head_dim", "an even integer >= 2");
  require(m.sequence_len >= 2, "model.sequence_len", "an integer >= 2");
  require(m.vocab_size >= 0, "model.vocab_size", "0 (from the tokenizer) or a positive size");
  require(!m.window_pattern.empty() &&
              m.window_pattern.find_first_not_of("SL") == std::string::npos,
          "model.window_pattern", "a non-empty string of S and L");
  require(m.softcap > 0, "model.softcap", "a positive number");
  require(m.rope_base > 0, "model.rope_base", "a positive number");
  int64_t width = (int64_t(m.depth) * m.aspect_ratio + m.head_dim - 1) / m.head_dim * m.head_dim;
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
  require(s.warmup_ratio >= 0 && s.warmup_ratio <= 1, "schedule.warmup_ratio", "a number in [0, 1]");
  require(s.warmdown_ratio >= 0 && s.warmdown_ratio <= 1, "schedule.warmdown_ratio",
          "a number in [0, 1]");
  require(s.warmup_ratio + s.warmdown_ratio <= 1, "schedule.warmdown_ratio",
          "warmup_ratio + warmdown_ratio <= 1");
  require(s.final_lr_frac >= 0, "schedule.final_lr_frac", "a number >= 0");

  const auto& o = c.optim;
  choice(o.matrix_optimizer, "optim.matrix_optimizer", {"adamw"});
  for (auto [value, key] : {std::pair{o.embedding_lr, "optim.embedding_lr"},
                            {o.unembedding_lr, "optim.unembedding_lr"},
                            {o.matrix_lr, "optim.matrix_lr"},
                            {o.scalar_lr, "optim.scalar_lr"}}) {
    require(value >= 0, key, "a learning rate >= 0");
  }
  require(o.adam_beta1 >= 0 && o.adam_beta1 < 1, "optim.adam_beta1", "a number in [0, 1)");
  require(o.adam_beta2 >= 0 && o.adam_beta2 < 1, "optim.adam_beta2", "a number in [0, 1)");
  require(o.adam_eps > 0, "optim.adam_eps", "a positive number");
  require(o.lr_reference_width > 0, "optim.lr_reference_width", "a positive number");
  require(o.lr_reference_batch > 0, "optim.lr_reference_batch", "a positive number");
  require(o.grad_clip >= 0, "optim.grad_clip", "0 (off) or a positive norm");

  require(c.eval.tokens >= 0, "eval.tokens", "a token count >= 0");
  require(c.eval.sample_tokens >= 0, "eval.sample_tokens", "an integer >= 0");
  require(c.eval.temperature >= 0, "eval.temperature", "a number >= 0");
  require(c.eval.top_k >= 0, "eval.top_k", "0 (all) or a positive count");
  require(c.checkpoint.every >= 0, "checkpoint.every", "0 or a positive step count");
  require(c.log.every >= 1, "log.every", "an integer >= 1");
}

}  // namespace

Config parse_config(const nlohmann::json& document, const std::string& source) {
  check(document.is_object(), "{}: expected a JSON object at the top level", source);
  Config config;
  config::Reader reader(document, "", source);
  config.visit(reader);
  reader.reject_unknown();
  validate(config, source);
  return config;
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  nlohmann::json document = nlohmann::json::object();
  if (!path.empty()) {
    std::ifstream file(path);
    check(file.good(), "{}: cannot open config file", path);
    std::stringstream text;
    text << file.rdbuf();
    document = nlohmann::json::parse(text.str(), nullptr, /*allow_exceptions=*/false,
                                     /*ignore_comments=*/true);
    check(!document.is_discarded(), "{}: not valid JSON", path);
  }
  for (const auto& assignment : overrides) config::apply_override(document, assignment);
  return parse_config(document, path.empty() ? "config" : path);
}

nlohmann::json to_json(const Config& config) { return config::Writer::write(config); }

std::string config_reference() {
  Config defaults;
  config::Documenter doc;
  defaults.visit(doc);
  std::string out = "| key | default | meaning |\n|---|---|---|\n";
  for (const auto& row : doc.rows) out += fmt::format("| `{}` | `{}` | {} |\n", row.key, row.value, row.doc);
  return out;
}

}  // namespace lmtrain
