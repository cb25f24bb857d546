// End-to-end: checkpoints resume a run exactly, and SIGTERM stops a run with a checkpoint that
// --resume continues from.
#include "e2e_support.h"

using namespace lmtrain::e2e;

namespace {

// A tiny config with far more steps than can run before the test stops it by a signal.
std::string endless_config(const TempDir& tmp, const std::string& out_dir) {
  return write_config(tmp, tiny_config(out_dir, {{"schedule", {{"num_iterations", 100000}}}}));
}

// The step records (those with train_loss) of a metrics file, by step.
std::map<int, json> train_records(const fs::path& metrics) {
  std::map<int, json> by_step;
  for (const auto& r : read_metrics(metrics)) {
    if (r.contains("train_loss")) by_step[r["step"].get<int>()] = r;
  }
  return by_step;
}

// Trains 6 steps in one go (run A), and 3 + 3 steps through the checkpoint A saved at step 3
// (run B): steps 4..6 of B must repeat A's to the bit, and the final weights and optimizer state
// must be byte-identical.
void check_bit_exact_resume(const std::vector<std::string>& extra) {
  TempDir tmp;
  const std::string out_a = tmp / "a", out_b = tmp / "b";
  const json patch = {{"schedule", {{"num_iterations", 6}}}, {"checkpoint", {{"every", 3}}}};
  const std::string config_a = write_config(tmp, tiny_config(out_a, patch), "a.json");
  const std::string config_b = write_config(tmp, tiny_config(out_b, patch), "b.json");

  std::vector<std::string> args_a = {"train", "--config", config_a};
  args_a.insert(args_a.end(), extra.begin(), extra.end());
  const Result a = run_lmtrain(args_a, tmp);
  INFO(a.all());
  REQUIRE(a.code == 0);
  const RunPaths run_a(out_a, "e2e"), run_b(out_b, "e2e");
  REQUIRE(fs::exists(run_a.ckpt / "step_000003" / "meta.json"));
  REQUIRE(fs::exists(run_a.ckpt / "step_000006" / "model.safetensors"));

  // B starts where A was after 3 steps: its checkpoint folder holds A's step-3 checkpoint.
  fs::create_directories(run_b.ckpt);
  fs::copy(run_a.ckpt / "step_000003", run_b.ckpt / "step_000003", fs::copy_options::recursive);
  write_text(run_b.ckpt / "latest", "step_000003\n");

  std::vector<std::string> args_b = {"train", "--config", config_b, "--resume"};
  args_b.insert(args_b.end(), extra.begin(), extra.end());
  const Result b = run_lmtrain(args_b, tmp);
  INFO(b.all());
  REQUIRE(b.code == 0);
  CHECK(b.out.find("at step 3") != std::string::npos);

  const auto steps_a = train_records(run_a.metrics), steps_b = train_records(run_b.metrics);
  REQUIRE(steps_a.size() == 6);
  REQUIRE(steps_b.size() == 3);
  for (int step = 4; step <= 6; ++step) {
    INFO("step " << step);
    REQUIRE(steps_b.count(step) == 1);
    const json &ra = steps_a.at(step), &rb = steps_b.at(step);
    // Same double, so the same shortest round-trip text in the JSONL.
    CHECK(rb["train_loss"].dump() == ra["train_loss"].dump());
    CHECK(rb["train_loss"].get<double>() == ra["train_loss"].get<double>());
    CHECK(rb["grad_norm"].dump() == ra["grad_norm"].dump());
    CHECK(rb["lr_multiplier"].dump() == ra["lr_multiplier"].dump());
    CHECK(rb["lr/matrix"].dump() == ra["lr/matrix"].dump());
  }
  for (const char* file : {"model.safetensors", "optimizer.safetensors"}) {
    INFO(file);
    CHECK(read_text(run_b.ckpt / "step_000006" / file) ==
          read_text(run_a.ckpt / "step_000006" / file));
  }
}

}  // namespace

// The default optimizer (NorMuon for the matrices, AdamW for the rest) resumes bit-exactly.
TEST_CASE("e2e: resume is bit-exact with the normuon preset", "[e2e]") {
  check_bit_exact_resume({});
}

// AdamW for every parameter resumes bit-exactly too.
TEST_CASE("e2e: resume is bit-exact with the adamw preset", "[e2e]") {
  check_bit_exact_resume({"--set", "optim.preset=adamw"});
}

// SIGTERM mid-run: the step in flight completes, a checkpoint is saved, the exit code is 143,
// and --resume continues from the saved step.
TEST_CASE("e2e: SIGTERM saves a checkpoint that --resume continues from", "[e2e]") {
  TempDir tmp;
  const std::string out_dir = tmp / "runs";
  const std::string config = endless_config(tmp, out_dir);
  const RunPaths run(out_dir, "e2e");

  Background bg;
  run_lmtrain_background({"train", "--config", config}, tmp, bg);
  REQUIRE(wait_for_step(run.metrics, 1));
  REQUIRE(::kill(bg.pid, SIGTERM) == 0);
  const Result stopped = bg.wait();
  INFO(stopped.all());
  CHECK(stopped.code == 143);
  CHECK(stopped.out.find("checkpoint saved") != std::string::npos);
  CHECK(stopped.err.empty());

  // The checkpoint is the last step logged.
  const auto records = read_metrics(run.metrics);
  int saved = 0;
  for (const auto& rec : records) {
    if (rec.contains("train_loss")) saved = rec["step"].get<int>();
  }
  REQUIRE(saved >= 1);
  REQUIRE(saved < 100000);
  char name[32];
  std::snprintf(name, sizeof name, "step_%06d", saved);
  CHECK(fs::exists(run.ckpt / name / "model.safetensors"));
  CHECK(lines_of(read_text(run.ckpt / "latest")) == std::vector<std::string>{name});

  // Resume with a horizon two steps past the checkpoint: only those two steps run.
  const Result resumed = run_lmtrain({"train", "--config", config, "--resume", "--set",
                                      "schedule.num_iterations=" + std::to_string(saved + 2)},
                                     tmp);
  INFO(resumed.all());
  REQUIRE(resumed.code == 0);
  CHECK(resumed.out.find("at step " + std::to_string(saved)) != std::string::npos);
  std::vector<int> steps_after;
  const auto all = read_metrics(run.metrics);
  for (size_t i = records.size(); i < all.size(); ++i) {
    if (all[i].contains("train_loss")) steps_after.push_back(all[i]["step"].get<int>());
  }
  CHECK(steps_after == std::vector<int>{saved + 1, saved + 2});
}

namespace {

// The (step, kind) of each record in file order, kind being "train", "val" or "end".
std::vector<std::pair<int, std::string>> record_kinds(const fs::path& metrics) {
  std::vector<std::pair<int, std::string>> kinds;
  for (const auto& r : read_metrics(metrics)) {
    const std::string kind = r.contains("train_loss") ? "train"
                             : r.contains("val/loss") ? "val"
                                                      : "end";
    kinds.emplace_back(r["step"].get<int>(), kind);
  }
  return kinds;
}

}  // namespace

// A run that died after its step-3 checkpoint had logged steps 4..6: resuming drops those lines
// and logs the redone steps once, so the file reads as one uninterrupted run.
TEST_CASE("e2e: a resumed run drops the metrics logged after its checkpoint", "[e2e]") {
  TempDir tmp;
  const std::string out_dir = tmp / "runs";
  const json patch = {{"checkpoint", {{"every", 3}}}, {"eval", {{"every", 2}}}};
  const std::string config = write_config(tmp, tiny_config(out_dir, patch));
  const Result whole = run_lmtrain({"train", "--config", config}, tmp);
  INFO(whole.all());
  REQUIRE(whole.code == 0);
  const RunPaths run(out_dir, "e2e");
  const auto uninterrupted = record_kinds(run.metrics);
  const auto losses = train_records(run.metrics);
  REQUIRE(uninterrupted.size() == 11);  // val 0, 2, 4, 6; train 1..6; the end

  fs::remove_all(run.ckpt / "step_000006");
  write_text(run.ckpt / "latest", "step_000003\n");
  const Result resumed = run_lmtrain({"train", "--config", config, "--resume"}, tmp);
  INFO(resumed.all());
  REQUIRE(resumed.code == 0);
  CHECK(resumed.out.find("dropped the 6 lines written after step 3") != std::string::npos);
  CHECK(record_kinds(run.metrics) == uninterrupted);
  for (const auto& [step, record] : train_records(run.metrics)) {
    INFO("step " << step);
    CHECK(record["train_loss"].dump() == losses.at(step)["train_loss"].dump());
  }
}

// The final checkpoint is saved after the last evaluation: a run resumed from it with a longer
// horizon does not evaluate that step again.
TEST_CASE("e2e: a run resumed from its final checkpoint does not repeat the last evaluation",
          "[e2e]") {
  TempDir tmp;
  const std::string out_dir = tmp / "runs";
  const std::string config = write_config(
      tmp, tiny_config(out_dir, {{"schedule", {{"num_iterations", 4}}}, {"eval", {{"every", 2}}}}));
  const Result first = run_lmtrain({"train", "--config", config}, tmp);
  INFO(first.all());
  REQUIRE(first.code == 0);
  // The same horizon: nothing to train, said so, and the final checkpoint is not written again.
  const Result again = run_lmtrain({"train", "--config", config, "--resume"}, tmp);
  INFO(again.all());
  REQUIRE(again.code == 0);
  CHECK(again.all().find("the run is complete at step 4: nothing left to train") !=
        std::string::npos);
  CHECK(again.all().find("saved checkpoint") == std::string::npos);
  const Result longer = run_lmtrain(
      {"train", "--config", config, "--resume", "--set", "schedule.num_iterations=6"}, tmp);
  INFO(longer.all());
  REQUIRE(longer.code == 0);
  std::vector<int> val_steps;
  for (const auto& [step, kind] : record_kinds(RunPaths(out_dir, "e2e").metrics)) {
    if (kind == "val") val_steps.push_back(step);
  }
  CHECK(val_steps == std::vector<int>{0, 2, 4, 6});
}

// A hangup (the terminal went away) stops a run like SIGTERM, with a checkpoint; started with
// SIGHUP ignored (nohup), the run trains on.
TEST_CASE("e2e: SIGHUP saves a checkpoint unless it is ignored", "[e2e]") {
  TempDir tmp;
  const std::string out_dir = tmp / "runs";
  const std::string config = endless_config(tmp, out_dir);
  {
    Background bg;
    run_lmtrain_background({"train", "--config", config}, tmp, bg);
    REQUIRE(wait_for_step(RunPaths(out_dir, "e2e").metrics, 1));
    REQUIRE(::kill(bg.pid, SIGHUP) == 0);
    const Result stopped = bg.wait();
    INFO(stopped.all());
    CHECK(stopped.code == 129);
    CHECK(stopped.out.find("stopped by signal 1") != std::string::npos);
  }
  Background bg;
  run_lmtrain_background({"train", "--config", config, "--set", "run.name=nohup"}, tmp, bg,
                         {.ignore_hangup = true});
  const fs::path metrics = RunPaths(out_dir, "nohup").metrics;
  REQUIRE(wait_for_step(metrics, 1));
  REQUIRE(::kill(bg.pid, SIGHUP) == 0);
  const int before = train_records(metrics).rbegin()->first;
  CHECK(wait_for_step(metrics, before + 2));
  REQUIRE(::kill(bg.pid, SIGTERM) == 0);
  const Result stopped = bg.wait();
  INFO(stopped.all());
  CHECK(stopped.code == 143);
}

// A reader of the output that goes away (a pager quit) does not end the run: it trains on, and
// SIGTERM then stops it with a checkpoint as usual.
TEST_CASE("e2e: a run whose stdout reader has gone trains on and saves when stopped", "[e2e]") {
  TempDir tmp;
  const std::string out_dir = tmp / "runs";
  const std::string config = endless_config(tmp, out_dir);
  const RunPaths run(out_dir, "e2e");
  Background bg;
  run_lmtrain_background({"train", "--config", config}, tmp, bg, {.stdout_to_pipe = true});
  REQUIRE(wait_for_step(run.metrics, 1));
  bg.close_stdout_reader();
  // Each step logs a line: the writes after the close fail (with SIGPIPE's default action, the
  // first of them would have ended the process).
  const int before = train_records(run.metrics).rbegin()->first;
  CHECK(wait_for_step(run.metrics, before + 3));
  REQUIRE(::kill(bg.pid, SIGTERM) == 0);
  const Result stopped = bg.wait();
  INFO(stopped.all());
  CHECK(stopped.code == 143);
  CHECK(fs::exists(run.ckpt / "latest"));
}
