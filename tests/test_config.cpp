// Config parsing: defaults, overrides, presets, and one-line errors naming the key.
#include <catch2/catch.hpp>
#include <fstream>

#include "config/config.h"
#include "test_support.h"

using namespace lmtrain;
using nlohmann::json;

namespace {

std::string error_of(const json& document) {
  try {
    parse_config(document, "cfg.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("config errors name the key and what was expected", "[config]") {
  CHECK(error_of({{"model", {{"depht", 4}}}}) ==
        "cfg.json: unknown key 'model.depht' (did you mean 'model.depth'?)");
  CHECK(error_of({{"modle", json::object()}}) ==
        "cfg.json: unknown key 'modle' (did you mean 'model'?)");
  CHECK(error_of({{"model", {{"depth", "six"}}}}) ==
        "cfg.json: model.depth: expected an integer, got the string \"six\"");
  CHECK(error_of({{"model", {{"depth", 0}}}}) == "cfg.json: model.depth: expected an integer >= 1");
  CHECK(error_of({{"model", {{"depth", 2}, {"n_kv_head", 3}}}}).find("model.n_kv_head") !=
        std::string::npos);
  CHECK(error_of({{"optim", {{"muon", {{"orthogonalizer", "svd"}}}}}}) ==
        "cfg.json: optim.muon.orthogonalizer: expected polar_express | newton_schulz5 | none, got "
        "\"svd\"");
  CHECK(error_of({{"schedule", {{"warmup_ratio", 0.6}, {"warmdown_ratio", 0.6}}}})
            .find("warmdown_ratio") != std::string::npos);
  CHECK(error_of({{"schedule", {{"num_iterations", 10}, {"target_flops", 1e18}}}})
            .find("at most one") != std::string::npos);
  CHECK(error_of({{"optim", {{"preset", "nonexistent"}}}}).find("no preset \"nonexistent\"") !=
        std::string::npos);
  CHECK(error_of({{"eval", {{"every", true}}}}) ==
        "cfg.json: eval.every: expected an integer, got the boolean true");
  CHECK(error_of({{"optim", {{"muon", {{"param_overrides", {{{"patern", "x"}}}}}}}}})
            .find("optim.muon.param_overrides[0].patern") != std::string::npos);
}

TEST_CASE("set overrides parse JSON values and create nested keys", "[config]") {
  json document = {{"model", {{"depth", 4}}}};
  config::apply_override(document, "model.depth=6");
  config::apply_override(document, "data.packing=bos_bestfit");
  config::apply_override(document, "optim.muon.nesterov=false");
  config::apply_override(document, "schedule.target_flops=1e18");
  const Config c = parse_config(document, "cfg.json");
  CHECK(c.model.depth == 6);
  CHECK(c.data.packing == "bos_bestfit");
  CHECK_FALSE(c.optim.muon.nesterov);
  CHECK(c.schedule.target_flops == 1e18);
  CHECK_THROWS_WITH(config::apply_override(document, "novalue"), Catch::Contains("key.path=value"));
}

TEST_CASE("a preset is the base of the optim section and explicit keys win", "[config]") {
  const std::string source = test_support::source_path("configs/any.json");
  const Config basic = parse_config({{"optim", {{"preset", "muon-basic"}}}}, source);
  CHECK(basic.optim.muon.momentum == "classic");
  CHECK(basic.optim.muon.lr_scale == "none");
  CHECK(basic.optim.muon.weight_decay_mode == "decoupled");
  CHECK_FALSE(basic.optim.muon.second_moment);
  const Config mixed = parse_config(
      {{"optim", {{"preset", "muon-moonshot"}, {"muon", {{"ortho_steps", 3}}}}}}, source);
  CHECK(mixed.optim.muon.orthogonalizer == "newton_schulz5");
  CHECK(mixed.optim.muon.lr_scale == "moonshot");
  CHECK(mixed.optim.muon.ortho_steps == 3);
  const Config adamw = parse_config({{"optim", {{"preset", "adamw"}}}}, source);
  CHECK(adamw.optim.matrix_optimizer == "adamw");
}

TEST_CASE("the resolved config parses back to itself", "[config]") {
  const Config c = load_config(test_support::source_path("configs/tiny.json"), {"model.depth=3"});
  const json resolved = to_json(c);
  CHECK(to_json(parse_config(resolved, "resolved")) == resolved);
  CHECK(resolved["model"]["depth"] == 3);
  // The reference lists every key the parser accepts.
  const std::string reference = config_reference();
  for (const char* key : {"`run.seed`", "`model.window_pattern`", "`optim.muon.weight_decay_mode`",
                          "`optim.weight_decay.matrix`", "`checkpoint.every`"}) {
    CHECK(reference.find(key) != std::string::npos);
  }
}

// Integers outside the field's type, and shapes whose arithmetic would overflow, are refused
// instead of wrapping around (depth 4294967297 would have become depth 1).
TEST_CASE("config integers out of range and overflowing shapes are refused", "[config]") {
  CHECK(error_of({{"model", {{"depth", 4294967297ll}}}}) ==
        "cfg.json: model.depth: expected an integer in [-2147483648, 2147483647], got 4294967297");
  CHECK(error_of({{"run", {{"seed", -1}}}}) ==
        "cfg.json: run.seed: expected an integer in [0, 18446744073709551615], got -1");
  CHECK(error_of(json::parse(R"({"schedule": {"num_iterations": 3000000000}})"))
            .find("schedule.num_iterations: expected an integer in") != std::string::npos);
  CHECK(error_of({{"model", {{"aspect_ratio", 2147483647}}}}).find("model.aspect_ratio") !=
        std::string::npos);
  CHECK(error_of({{"model", {{"vocab_size", 2147483647}}}}).find("model.vocab_size") !=
        std::string::npos);
  CHECK(error_of({{"eval", {{"every", -2}}}}).find("eval.every") != std::string::npos);
  CHECK(error_of({{"eval", {{"sample_every", -1}}}}).find("eval.sample_every") !=
        std::string::npos);
  CHECK(error_of({{"run", {{"seed", 18446744073709551615ull}}}}).empty());
  CHECK(error_of({{"run", {{"name", "sweep/d12"}}}}).empty());
  CHECK(error_of({{"batch", {{"total_batch_tokens", -1}}}}).empty());
}

TEST_CASE("a directory given as the config file is named as such", "[config]") {
  test_support::TempDir dir;
  CHECK_THROWS_WITH(load_config(dir.path().string(), {}),
                    dir.path().string() + ": is a directory, expected a JSON file");
}

// JSON keeps the last of repeated keys; a config with one would silently drop a setting.
TEST_CASE("a config key given twice is refused with its path, malformed JSON with its place",
          "[config]") {
  test_support::TempDir dir;
  const std::string path = dir / "c.json";
  auto error_for = [&](const std::string& text) {
    std::ofstream(path) << text;
    try {
      load_config(path, {});
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  CHECK(error_for(R"({"model": {"depth": 2, "depth": 3}})") ==
        path + ": key 'model.depth' appears twice; keep one");
  CHECK(error_for(R"({"run": {}, "run": {"seed": 1}})") ==
        path + ": key 'run' appears twice; keep one");
  CHECK(error_for(
            R"({"optim": {"muon": {"param_overrides": [{"pattern": "a", "pattern": "b"}]}}})") ==
        path + ": key 'optim.muon.param_overrides.pattern' appears twice; keep one");
  // The same key in two array elements, or under two objects, is no repeat.
  CHECK(error_for(R"({"optim": {"muon": {"param_overrides": [{"pattern": "a"}, {"pattern": "b"}]}},
                      "model": {"depth": 2}, "batch": {"device_batch": 2}})")
            .empty());
  const std::string bad = error_for("{\"model\": {\"depth\": 2,}}");
  CHECK(bad.find(path + ": not valid JSON") == 0);
  CHECK(bad.find("line 1, column 23") != std::string::npos);
}
