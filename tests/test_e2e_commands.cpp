// End-to-end: the info, sample and eval commands on real configs and checkpoints.
#include <cmath>
#include <random>
#include <regex>

#include "config/config.h"
#include "data/shard.h"
#include "e2e_support.h"

using namespace lmtrain::e2e;

namespace {

// Every leaf key path of a resolved config ("run.name", "optim.muon.beta2", ...).
void leaf_keys(const json& node, const std::string& prefix, std::vector<std::string>& out) {
  for (const auto& [key, value] : node.items()) {
    const std::string path = prefix.empty() ? key : prefix + "." + key;
    if (value.is_object()) {
      leaf_keys(value, path, out);
    } else {
      out.push_back(path);
    }
  }
}

// Trains a 2-step tiny run under `tmp` and returns its run directory.
fs::path train_checkpoint(const TempDir& tmp) {
  const std::string out_dir = tmp / "runs";
  const std::string config =
      write_config(tmp, tiny_config(out_dir, {{"schedule", {{"num_iterations", 2}}}}));
  const Result r = run_lmtrain({"train", "--config", config}, tmp);
  INFO(r.all());
  REQUIRE(r.code == 0);
  return RunPaths(out_dir, "e2e").run;
}

// A directory holding one validation shard of 1,000 random ids below the default corpus's
// vocabulary: 7 batches of the e2e model's 4 x 32 tokens.
std::string small_val_dir(const TempDir& tmp) {
  const fs::path dir = tmp / "small_val";
  fs::create_directories(dir);
  std::mt19937 rng(std::random_device{}());
  std::vector<uint32_t> tokens(1000);
  for (auto& t : tokens) t = rng() % 8192;
  lmtrain::write_shard((dir / "val_000000.bin").string(), tokens);
  return dir.string();
}

}  // namespace

// A run whose eval.tokens exceed the validation data says at start what each evaluation reads.
TEST_CASE("e2e: eval.tokens beyond the validation data is reported at start", "[e2e]") {
  TempDir tmp;
  const std::string out_dir = tmp / "runs";
  const std::string config =
      write_config(tmp, tiny_config(out_dir, {{"schedule", {{"num_iterations", 1}}},
                                              {"data", {{"val", small_val_dir(tmp)}}},
                                              {"eval", {{"every", 1}, {"tokens", 1000000000}}}}));
  const Result r = run_lmtrain({"train", "--config", config}, tmp);
  INFO(r.all());
  REQUIRE(r.code == 0);
  CHECK(r.all().find("eval.tokens 1000000000: the validation shards hold 896 tokens") !=
        std::string::npos);
}

// The parameter table of configs/tiny.json adds up: each row's count is its shape's product,
// the rows sum to the per-kind totals and to the total, and the FLOPs per token are
// 6 x (matrices + lm_head) + 12 x width x (sum of attention windows), nanochat's estimate.
TEST_CASE("e2e: info prints a parameter table that adds up and the FLOPs per token", "[e2e]") {
  TempDir tmp;
  data_dir();  // info reads the tokenizer for the vocabulary size
  const Result r = run_lmtrain({"info", "--config", "configs/tiny.json"}, tmp);
  INFO(r.all());
  REQUIRE(r.code == 0);
  CHECK(r.err.empty());

  const auto lines = lines_of(r.out);
  REQUIRE(!lines.empty());
  REQUIRE(lines[0].find("parameter") != std::string::npos);
  std::map<std::string, int64_t> by_group;
  int64_t rows_sum = 0;
  size_t i = 1;
  const std::regex row(R"(^(\S+)\s+\(([0-9, ]+)\)\s+(\S+)\s+([0-9]+)$)");
  for (; i < lines.size() && !lines[i].empty(); ++i) {
    std::smatch m;
    INFO(lines[i]);
    REQUIRE(std::regex_match(lines[i], m, row));
    int64_t product = 1;
    std::stringstream dims(m[2].str());
    for (std::string d; std::getline(dims, d, ',');) product *= std::stoll(d);
    const int64_t count = std::stoll(m[4].str());
    CHECK(product == count);
    by_group[m[3].str()] += count;
    rows_sum += count;
  }
  REQUIRE(i > 10);
  std::map<std::string, int64_t> totals;
  double flops = 0;
  int64_t width = 0;
  std::vector<int64_t> windows;
  for (; i < lines.size(); ++i) {
    std::smatch m;
    if (std::regex_match(lines[i], m, std::regex(R"(^(\w+) ([0-9]+)$)"))) {
      totals[m[1].str()] = std::stoll(m[2].str());
    } else if (std::regex_search(lines[i], m, std::regex(R"(^flops per token: (\S+)$)"))) {
      flops = std::stod(m[1].str());
    } else if (std::regex_search(lines[i], m, std::regex(R"(^width ([0-9]+) )"))) {
      width = std::stoll(m[1].str());
    } else if (lines[i].rfind("windows per layer", 0) == 0) {
      const std::regex window(R"(([0-9]+)(\+ve)?)");
      const std::string rest = lines[i].substr(lines[i].find(':') + 1);
      for (std::sregex_iterator it(rest.begin(), rest.end(), window), end; it != end; ++it) {
        windows.push_back(std::stoll((*it)[1].str()));
      }
    }
  }
  REQUIRE(totals.count("total") == 1);
  CHECK(rows_sum == totals["total"]);
  CHECK(totals["wte"] + totals["value_embeds"] + totals["lm_head"] +
            totals["transformer_matrices"] + totals["scalars"] ==
        totals["total"]);
  CHECK(by_group["embedding"] == totals["wte"]);
  CHECK(by_group["value_embeds"] == totals["value_embeds"]);
  CHECK(by_group["unembedding"] == totals["lm_head"]);
  CHECK(by_group["matrix"] == totals["transformer_matrices"]);
  CHECK(by_group["resid"] + by_group["x0"] == totals["scalars"]);

  // One attention window per layer.
  const json tiny = json::parse(read_text(lmtrain::test_support::source_path("configs/tiny.json")),
                                nullptr, true, true);
  REQUIRE(windows.size() == tiny["model"]["depth"].get<size_t>());
  REQUIRE(width > 0);
  double window_sum = 0;
  for (auto w : windows) window_sum += double(w);
  const double expected = 6.0 * double(totals["transformer_matrices"] + totals["lm_head"]) +
                          12.0 * double(width) * window_sum;
  CHECK(flops == Approx(expected).epsilon(1e-4));
}

// `info --keys` documents every key the config reader accepts, one table row each.
TEST_CASE("e2e: info --keys lists every config key", "[e2e]") {
  TempDir tmp;
  const Result r = run_lmtrain({"info", "--keys"}, tmp);
  INFO(r.all());
  REQUIRE(r.code == 0);
  std::vector<std::string> keys;
  leaf_keys(lmtrain::to_json(lmtrain::Config{}), "", keys);
  REQUIRE(keys.size() > 50);
  for (const auto& key : keys) {
    INFO(key);
    CHECK(r.out.find("| `" + key + "` |") != std::string::npos);
  }
  // ... and nothing else: one row per key plus the two header lines.
  CHECK(lines_of(r.out).size() == keys.size() + 2);
}

// Greedy sampling from a checkpoint is deterministic and continues the prompt; eval prints loss
// and bits per byte that agree with the validation the run logged for the same weights.
TEST_CASE("e2e: sample is deterministic at temperature 0 and eval prints loss and bpb", "[e2e]") {
  TempDir tmp;
  const fs::path run = train_checkpoint(tmp);

  const std::vector<std::string> sample = {"sample",   "--ckpt",        run.string(),
                                           "--prompt", "To be, or not", "--max-tokens",
                                           "5",        "--temperature", "0"};
  const Result first = run_lmtrain(sample, tmp), second = run_lmtrain(sample, tmp);
  INFO(first.all());
  REQUIRE(first.code == 0);
  REQUIRE(second.code == 0);
  CHECK(first.out == second.out);
  CHECK(first.out.rfind("To be, or not", 0) == 0);
  CHECK(first.out.size() > std::string("To be, or not\n").size());
  CHECK(first.err.find("sample:") == std::string::npos);  // the 5 tokens asked for

  // More tokens than the sequence holds: it stops early, says why on stderr and prints no BOS.
  const Result long_sample = run_lmtrain(
      {"sample", "--ckpt", run.string(), "--max-tokens", "100000", "--temperature", "0"}, tmp);
  INFO(long_sample.all());
  REQUIRE(long_sample.code == 0);
  CHECK(long_sample.err.find(" of 100000 tokens: ") != std::string::npos);
  CHECK(long_sample.out.find("<|bos|>") == std::string::npos);

  // A --backend that does not exist is named as the option, not as the checkpoint's config key.
  const Result bad_backend =
      run_lmtrain({"sample", "--ckpt", run.string(), "--backend", "gpu"}, tmp);
  CHECK(bad_backend.code == 1);
  CHECK(bad_backend.err.find("error: --backend: unknown backend \"gpu\"") == 0);

  const Result eval = run_lmtrain(
      {"eval", "--ckpt", (run / "ckpt" / "step_000002").string(), "--data", "data/tiny"}, tmp);
  INFO(eval.all());
  REQUIRE(eval.code == 0);
  std::smatch m;
  const std::regex line(R"(loss ([0-9.]+) \| bpb ([0-9.]+) \| tokens ([0-9]+))");
  REQUIRE(std::regex_search(eval.out, m, line));
  const double loss = std::stod(m[1].str()), bpb = std::stod(m[2].str());
  CHECK(std::stoll(m[3].str()) == 1024);  // the checkpoint's eval.tokens
  CHECK(loss > 0);
  CHECK(bpb > 0);

  // Asked for more than the data holds, eval reads all of it and says so on stderr.
  const std::string small = small_val_dir(tmp);
  const Result capped = run_lmtrain({"eval", "--ckpt", (run / "ckpt" / "step_000002").string(),
                                     "--data", small, "--tokens", "1000000000"},
                                    tmp);
  INFO(capped.all());
  REQUIRE(capped.code == 0);
  CHECK(capped.err.find("eval: 1000000000 tokens asked; " + small + " holds 896 ") !=
        std::string::npos);
  REQUIRE(std::regex_search(capped.out, m, line));
  CHECK(m[3].str() == "896");

  json final_eval;
  for (const auto& rec : read_metrics(run / "metrics.jsonl")) {
    if (rec.contains("val/loss")) final_eval = rec;
  }
  REQUIRE(final_eval["step"] == 2);
  CHECK(loss == Approx(final_eval["val/loss"].get<double>()).margin(2e-6));
  CHECK(bpb == Approx(final_eval["val/bpb"].get<double>()).margin(2e-6));
}
