// End-to-end: a tiny run learns and logs the metrics it promises; a diverging run stops with an
// error naming the step.
#include "e2e_support.h"

using namespace lmtrain::e2e;

// 30 steps of a tiny model lower the validation loss by well over a nat, and every step record
// of metrics.jsonl carries the documented metric names.
TEST_CASE("e2e: the loss falls and metrics.jsonl has the expected metrics", "[e2e]") {
  TempDir tmp;
  const std::string out_dir = tmp / "runs";
  // LRs tuned at a 1024-token batch, so the 128-token batch is not scaled down to a crawl.
  const json patch = {
      {"schedule", {{"num_iterations", 30}, {"warmup_ratio", 0.0}, {"warmdown_ratio", 0.2}}},
      {"eval", {{"every", 10}}},
      {"optim", {{"lr_reference_batch", 1024}}}};
  const std::string config = write_config(tmp, tiny_config(out_dir, patch));
  const Result r = run_lmtrain({"train", "--config", config}, tmp);
  INFO(r.all());
  REQUIRE(r.code == 0);
  CHECK(r.err.empty());

  const auto records = read_metrics(RunPaths(out_dir, "e2e").metrics);
  std::vector<json> evals, steps;
  for (const auto& rec : records) {
    if (rec.contains("val/loss")) evals.push_back(rec);
    if (rec.contains("train_loss")) steps.push_back(rec);
  }
  REQUIRE(evals.size() == 4);  // steps 0, 10, 20, 30
  CHECK(evals.front()["step"] == 0);
  CHECK(evals.back()["step"] == 30);
  const double first = evals.front()["val/loss"], last = evals.back()["val/loss"];
  INFO("val/loss " << first << " -> " << last);
  CHECK(last < first - 1.0);
  CHECK(evals.back()["val/bpb"].get<double>() < evals.front()["val/bpb"].get<double>());
  for (const auto& e : evals) CHECK(e.contains("val/bpb"));

  REQUIRE(steps.size() == 30);
  for (size_t i = 0; i < steps.size(); ++i) {
    const json& s = steps[i];
    INFO(s.dump());
    CHECK(s["step"] == int(i) + 1);
    for (const char* key :
         {"train_loss", "lr_multiplier", "lr/embedding", "lr/matrix", "lr/unembedding",
          "tokens_per_second", "mfu", "muon/momentum", "muon/weight_decay"}) {
      CHECK(s.contains(key));
    }
    CHECK(std::isfinite(s["train_loss"].get<double>()));
    CHECK(s["tokens_per_second"].get<double>() > 0);
  }
  // The warmdown (the last 20%) lowers the LR multiplier to the end.
  CHECK(steps.front()["lr_multiplier"] == 1.0);
  CHECK(steps.back()["lr_multiplier"].get<double>() < 0.5);
  // The console shows the same run: a step line per step and the final sample.
  CHECK(r.out.find("step 30/30") != std::string::npos);
  CHECK(r.out.find("sample: ") != std::string::npos);
  CHECK(fs::exists(RunPaths(out_dir, "e2e").ckpt / "step_000030" / "model.safetensors"));
}

// Absurd matrix learning rates blow the model up in the second step: the run stops with one
// error line naming that step (the first one not in metrics.jsonl), exits non-zero and saves no
// checkpoint.
TEST_CASE("e2e: a diverging run stops with an error naming the step", "[e2e]") {
  TempDir tmp;
  const std::string out_dir = tmp / "runs";
  const std::string config =
      write_config(tmp, tiny_config(out_dir, {{"schedule", {{"num_iterations", 10}}}}));
  const Result r = run_lmtrain({"train", "--config", config, "--set", "optim.matrix_lr=1e30"}, tmp);
  const RunPaths run(out_dir, "e2e");
  int last_logged = 0;
  for (const auto& rec : read_metrics(run.metrics)) {
    if (rec.contains("train_loss")) last_logged = rec["step"].get<int>();
  }
  INFO("last step in metrics.jsonl: " << last_logged);
  REQUIRE(last_logged < 10);
  const std::string failed = "step " + std::to_string(last_logged + 1) + ":";
  require_one_error_line(r, {failed, "stopping"});
  CHECK((r.err.find("nan") != std::string::npos || r.err.find("inf") != std::string::npos ||
         r.err.find("not finite") != std::string::npos));
  CHECK_FALSE(fs::exists(run.ckpt));
}

// run.recompute_activations changes the memory a run needs, not the run: the same losses step
// for step, a falling validation loss, and a lower peak. run.loss_chunk_rows changes only the
// order in which the lm_head's gradient is summed.
TEST_CASE("e2e: recomputed activations train to the same losses in less memory", "[e2e]") {
  TempDir tmp;
  const json patch = {{"schedule", {{"num_iterations", 10}}},
                      {"eval", {{"every", 10}}},
                      {"optim", {{"lr_reference_batch", 1024}}}};
  auto train = [&](const std::string& name, const std::string& setting) {
    const std::string out_dir = tmp / name;
    const std::string config = write_config(tmp, tiny_config(out_dir, patch));
    const Result r = run_lmtrain({"train", "--config", config, "--set", setting}, tmp);
    INFO(r.all());
    REQUIRE(r.code == 0);
    return read_metrics(RunPaths(out_dir, "e2e").metrics);
  };
  const auto kept = train("kept", "run.recompute_activations=false");
  const auto recomputed = train("recomputed", "run.recompute_activations=true");
  const auto chunked = train("chunked", "run.loss_chunk_rows=48");  // 128 rows: 48 + 48 + 32
  auto values = [](const std::vector<json>& records, const char* key) {
    std::vector<double> out;
    for (const auto& rec : records)
      if (rec.contains(key)) out.push_back(rec[key].get<double>());
    return out;
  };
  const auto losses = values(recomputed, "train_loss"), val = values(recomputed, "val/loss");
  REQUIRE(losses.size() == 10);
  CHECK(losses == values(kept, "train_loss"));
  REQUIRE(val.size() == 2);  // steps 0 and 10
  CHECK(val == values(kept, "val/loss"));
  CHECK(val.back() < val.front() - 0.5);
  const auto peak = values(recomputed, "peak_memory_bytes");
  REQUIRE(peak.size() == 1);
  CHECK(peak[0] < values(kept, "peak_memory_bytes").at(0));
  const auto chunked_losses = values(chunked, "train_loss");
  REQUIRE(chunked_losses.size() == losses.size());
  for (size_t i = 0; i < losses.size(); ++i)
    CHECK(chunked_losses[i] == Approx(losses[i]).epsilon(1e-5));
  CHECK(values(chunked, "peak_memory_bytes").at(0) < values(kept, "peak_memory_bytes").at(0));
}
