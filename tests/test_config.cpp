// Config parsing: defaults, overrides, presets, and one-line errors naming the key.
#include <catch2/catch.hpp>
#include <filesystem>
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

// The error of loading a file that holds `text`, with `overrides`; "" when it loads.
std::string load_error(const std::string& path, const std::string& text,
                       const std::vector<std::string>& overrides = {}) {
  std::ofstream(path, std::ios::binary) << text;
  try {
    load_config(path, overrides);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("config errors name the key and what was expected", "[config]") {
  CHECK(error_of({{"run", {{"name", 123}}}}) ==
        "cfg.json: run.name: expected a string, got the integer 123");
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
  CHECK(error_of({{"optim", {{"weight_decay", {{"x0", -0.1}}}}}}) ==
        "cfg.json: optim.weight_decay.x0: expected a number >= 0");
  const json rules = {{{"pattern", "a"}}, {{"pattern", "b"}, {"wd_mul", -1}}};
  CHECK(error_of({{"optim", {{"muon", {{"param_overrides", rules}}}}}}) ==
        "cfg.json: optim.muon.param_overrides[1].wd_mul: expected a number >= 0");
  CHECK(error_of({{"optim", {{"muon", {{"param_overrides", {{{"pattern", ""}}}}}}}}}) ==
        "cfg.json: optim.muon.param_overrides[0].pattern: expected a non-empty pattern");
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
  auto error_for = [&](const std::string& text) { return load_error(path, text); };
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
  // A byte that is not UTF-8 is named by position and shown escaped, not echoed raw.
  const std::string not_utf8 = error_for("{\"run\": {\"name\": \"a\xff\"}}");
  CHECK(not_utf8.find(path + ": not valid JSON: parse error at line 1") == 0);
  CHECK(not_utf8.find("ill-formed UTF-8 byte") != std::string::npos);
  CHECK(not_utf8.find("\\xff") != std::string::npos);
  CHECK(not_utf8.find('\xff') == std::string::npos);
}

// A config nests 5 levels; a file nested 100,000 deep cost memory quadratic in its depth (7 GB
// before bad_alloc), and /dev/zero was read without end.
TEST_CASE("a config nested too deep or not a small regular file is refused", "[config]") {
  test_support::TempDir dir;
  const std::string path = dir / "c.json";
  const int depth = 100000;
  std::string deep;
  for (int i = 0; i < depth; ++i) deep += "{\"a\": ";
  deep += "1" + std::string(depth, '}');
  CHECK(load_error(path, deep) == path + ": nested deeper than 16 levels, expected a config");
  CHECK_THROWS_WITH(load_config("/dev/zero", {}),
                    "/dev/zero: not a regular file, expected a JSON file");
  load_error(path, "{}");
  std::filesystem::resize_file(path, (16 << 20) + 1);
  CHECK_THROWS_WITH(load_config(path, {}), path + ": larger than 16 MiB, expected a JSON config");
}

// nlohmann reports 1e999 as a bare "number overflow" exception, naming neither file nor key.
TEST_CASE("a number beyond a double names the file and the key", "[config]") {
  test_support::TempDir dir;
  const std::string path = dir / "c.json";
  CHECK(load_error(path, R"({"run": {"seed": 1e999}})") ==
        path + ": run.seed: number overflow parsing '1e999'; expected a number within +-1.8e308");
  CHECK(load_error(path, R"({"model": {"depth": 2}, "schedule": {"target_flops": -1e999}})") ==
        path +
            ": schedule.target_flops: number overflow parsing '-1e999'; expected a number "
            "within +-1.8e308");
}

// A NUL cut the messages that held the value ("error: " and nothing after).
TEST_CASE("config strings and keys holding NUL are refused", "[config]") {
  CHECK(error_of({{"run", {{"name", std::string("a\0b", 3)}}}}) ==
        "cfg.json: run.name: expected a string without NUL characters");
  CHECK(error_of({{"run", {{std::string("na\0me", 5), 1}}}}) ==
        "cfg.json: run: expected keys without NUL characters");
  test_support::TempDir dir;
  const std::string path = dir / "c.json";
  CHECK(load_error(path, R"({"data": {"tokenizer": "\u0000"}})") ==
        path + ": data.tokenizer: expected a string without NUL characters");
  CHECK(load_error(path, "{}", {R"(run.name="x\u0000")"}) ==
        path + R"( with --set run.name="x\u0000": run.name: expected a string without NUL )"
               "characters");
}

// An empty path reached whatever opened it, as "error: : no such checkpoint directory".
TEST_CASE("empty path keys are refused", "[config]") {
  for (const char* key : {"train", "val", "tokenizer"}) {
    CHECK(error_of({{"data", {{key, ""}}}}) ==
          fmt::format("cfg.json: data.{}: expected a path, got an empty string", key));
  }
  CHECK(error_of({{"run", {{"out_dir", ""}}}}) ==
        "cfg.json: run.out_dir: expected a path, got an empty string");
}

// --set run.seed=3 silently replaced a file's "run": 5 with {"seed": 3}.
TEST_CASE("a section that is not an object is refused with or without --set", "[config]") {
  test_support::TempDir dir;
  const std::string path = dir / "c.json";
  const std::string expected = path + ": run: expected an object, got the integer 5";
  CHECK(load_error(path, R"({"run": 5})") == expected);
  CHECK(load_error(path, R"({"run": 5})", {"run.seed=3"}) == expected);
  CHECK(load_error(path, R"({"run": 5})", {"model.depth=3"}) == expected);
  CHECK(load_error(path, R"({"optim": {"muon": []}})", {"optim.muon.beta2=0.9"}) ==
        path + ": optim.muon: expected an object, got an array");
  CHECK(load_error(path, R"({"run": null})", {"run.seed=3"}) ==
        path + ": run: expected an object, got null");
  CHECK(load_error(path, "[]", {"run.seed=3"}) ==
        path + ": expected a JSON object at the top level");
  CHECK(load_error(path, "{}", {"run.seed=3", "optim.muon.beta2=0.9"}).empty());
}

// An error about a key a --set wrote names that --set: the file may say something else.
TEST_CASE("errors about a key given by --set name the --set", "[config]") {
  test_support::TempDir dir;
  const std::string path = dir / "c.json";
  const std::string file = R"({"model": {"depth": 4}, "run": {"name": "x"}})";
  CHECK(load_error(path, file, {"model.depth=0"}) ==
        path + " with --set model.depth=0: model.depth: expected an integer >= 1");
  CHECK(load_error(path, file, {"model.depth=0", "model.depth=2"}).empty());
  CHECK(load_error(path, file, {"model.depht=4"}) ==
        path +
            " with --set model.depht=4: unknown key 'model.depht' (did you mean "
            "'model.depth'?)");
  // A --set of a whole section covers the keys under it.
  CHECK(load_error(path, file, {R"(optim.muon={"beta2": 2})"})
            .starts_with(path + R"( with --set optim.muon={"beta2": 2}: optim.muon.beta2: )"));
  // --set reads values as JSON first: a string key given a number says how to quote it.
  CHECK(load_error(path, file, {"run.name=123"}) ==
        path +
            " with --set run.name=123: run.name: expected a string, got the integer 123 "
            "(quote it: --set run.name='\"123\"')");
  // A key the --set did not write is the file's.
  CHECK(load_error(path, R"({"model": {"depth": 0}})", {"run.seed=3"}) ==
        path + ": model.depth: expected an integer >= 1");
}

// model.softcap 1e-300 passed "> 0" and became 0 as the kernels' float, failing at step 1.
TEST_CASE("float-valued keys stay in range as floats", "[config]") {
  CHECK(error_of({{"model", {{"softcap", 1e-300}}}}) ==
        "cfg.json: model.softcap: expected 0 or a magnitude in [1.17549e-38, 3.40282e+38] (a "
        "float), got 1e-300");
  CHECK(error_of({{"model", {{"rope_base", 1e300}}}}).find("model.rope_base: expected 0 or a") !=
        std::string::npos);
  CHECK(error_of({{"optim", {{"matrix_lr", 1e39}}}}).find("optim.matrix_lr") != std::string::npos);
  CHECK(error_of(
            {{"optim", {{"muon", {{"param_overrides", {{{"pattern", "x"}, {"lr_mul", 1e-40}}}}}}}}})
            .find("optim.muon.param_overrides[0].lr_mul") != std::string::npos);
  // In [0, 1) as a double, 1 as a float: AdamW's bias correction would divide by 0.
  CHECK(error_of({{"optim", {{"adam_beta2", 0.99999999999}}}}).find("optim.adam_beta2") !=
        std::string::npos);
  CHECK(error_of({{"optim", {{"muon", {{"momentum_end", 0.99999999999}}}}}})
            .find("optim.muon.momentum_end") != std::string::npos);
  CHECK(error_of({{"optim", {{"adam_beta2", 0.9999999}, {"adam_eps", 1e-30}, {"grad_clip", 0}}}})
            .empty());
  // The horizon stays a double; the plan bounds it.
  CHECK(error_of({{"schedule", {{"target_flops", 1e300}}}}).empty());
}

// run.threads 100000 spun OpenBLAS; depth 16777215 spent 5 GB before failing.
TEST_CASE("run.threads and model.depth have upper bounds", "[config]") {
  CHECK(error_of({{"run", {{"threads", 1025}}}}) ==
        "cfg.json: run.threads: expected 0 (OMP_NUM_THREADS, else all cores) or a count up to "
        "1024, got 1025");
  CHECK(error_of({{"run", {{"threads", 1024}}}}).empty());
  CHECK(error_of({{"model", {{"depth", 16777215}, {"aspect_ratio", 32}}}}) ==
        "cfg.json: model.depth: expected at most 1024 layers, got 16777215");
  CHECK(error_of({{"model", {{"depth", 1024}, {"aspect_ratio", 16}}}}).empty());
}

// --set run.name=$'\xff' made the run directory, then the config's JSON dump threw ("invalid
// UTF-8 byte at index 0"); --set eval.sample_prompt reached the tokenizer, named nowhere.
TEST_CASE("config strings that are not UTF-8 are refused naming the key", "[config]") {
  CHECK(error_of({{"run", {{"name", "ab\xff"}}}}) == "cfg.json: run.name: expected UTF-8 text");
  CHECK(error_of({{"eval", {{"sample_prompt", "caf\xc3"}}}}) ==
        "cfg.json: eval.sample_prompt: expected UTF-8 text");
  CHECK(error_of({{"optim", {{"muon", {{"param_overrides", {{{"pattern", "\xc0\xae"}}}}}}}}}) ==
        "cfg.json: optim.muon.param_overrides[0].pattern: expected UTF-8 text");
  CHECK(error_of({{"run", {{"name", "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x99\x82"}}}}).empty());
  test_support::TempDir dir;
  const std::string path = dir / "c.json";
  // The --set is quoted with the bytes that are not text escaped.
  CHECK(load_error(path, "{}", {"run.name=\xed\xa0\x80"}) ==
        path + " with --set run.name=\\xed\\xa0\\x80: run.name: expected UTF-8 text");
  CHECK(load_error(path, "{}", {"eval.sample_prompt=To be\xe2\x82"}) ==
        path +
            " with --set eval.sample_prompt=To be\\xe2\\x82: eval.sample_prompt: expected "
            "UTF-8 text");
  // A non-string key given such bytes is described, replaced, rather than thrown on by dump().
  CHECK(load_error(path, "{}", {"batch.device_batch=\xff"}) ==
        path +
            " with --set batch.device_batch=\\xff: batch.device_batch: expected an integer, "
            "got the string \"\xef\xbf\xbd\"");
}
