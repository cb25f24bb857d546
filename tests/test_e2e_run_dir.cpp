// End-to-end: the run directory across the lives of runs. One training at a time; what killed
// runs leave behind neither blocks a new run nor breaks a resume; what would fail after training
// (validation data, the sample prompt, the tokenizer's vocabulary) fails before it; a signal
// during the last evaluation still saves and is reported.
#include "data/shard.h"
#include "e2e_support.h"

using namespace lmtrain::e2e;

namespace {

// A checkpoint of one training step of the tiny config, in <tmp>/runs/e2e; returns its path.
fs::path one_step_checkpoint(const TempDir& tmp, const std::string& config) {
  REQUIRE(run_lmtrain({"train", "--config", config}, tmp).code == 0);
  return RunPaths(tmp / "runs", "e2e").ckpt / "step_000001";
}

}  // namespace

// A second training on a run directory in use is refused at once, whatever it asks, before it
// writes anything: also while the first run has no checkpoint yet, when there is nothing to
// resume and no earlier run to replace, but the reason to give is still that the directory is
// in use. RunLock's own refusal is tested in test_io_run_lock.cpp.
TEST_CASE("e2e: a second training on a run directory in use is refused", "[e2e]") {
  TempDir tmp;
  const std::string out_dir = tmp / "runs";
  const std::string config =
      write_config(tmp, tiny_config(out_dir, {{"schedule", {{"num_iterations", 100000}}},
                                              {"checkpoint", {{"every", 100000}}}}));
  const RunPaths run(out_dir, "e2e");
  Background first;
  run_lmtrain_background({"train", "--config", config}, tmp, first);
  REQUIRE(wait_for_step(run.metrics, 1));
  REQUIRE(!fs::exists(run.ckpt / "latest"));
  for (const std::vector<std::string> mode :
       {std::vector<std::string>{"--resume"}, {}, {"--overwrite"}}) {
    std::vector<std::string> args = {"train", "--config", config};
    args.insert(args.end(), mode.begin(), mode.end());
    const Result second = run_lmtrain(args, tmp);
    require_one_error_line(
        second, {"in use by another lmtrain run (process " + std::to_string(first.pid) + ")"});
  }
  REQUIRE(::kill(first.pid, SIGTERM) == 0);
  CHECK(first.wait().code == 143);
  CHECK(fs::exists(run.ckpt / "latest"));  // SIGTERM saved
  // The first run's metrics are its own: one record per step, in order.
  int last = 0;
  for (const auto& record : read_metrics(run.metrics)) {
    if (!record.contains("train_loss")) continue;
    CHECK(record["step"].get<int>() == last + 1);
    last = record["step"].get<int>();
  }
}

// A run killed while it saved its first checkpoint leaves only a staging directory and the
// metrics of its steps: nothing to resume, so a new run is refused without suggesting --resume,
// and --overwrite starts over. One killed before its first step leaves nothing to lose.
TEST_CASE("e2e: what a run killed before its first checkpoint leaves", "[e2e]") {
  TempDir tmp;
  const std::string out_dir = tmp / "runs";
  const std::string config = write_config(tmp, tiny_config(out_dir));
  const RunPaths run(out_dir, "e2e");
  const fs::path staging = run.ckpt / ".step_000001.tmp-999999";
  fs::create_directories(staging);
  write_text(staging / "model.safetensors", "partial");
  write_text(run.metrics, "");

  const Result fresh = run_lmtrain({"train", "--config", config}, tmp);
  INFO(fresh.all());
  REQUIRE(fresh.code == 0);
  CHECK(fresh.out.find("removed 1 unfinished checkpoint directories") != std::string::npos);
  CHECK(!fs::exists(staging));

  fs::remove_all(run.ckpt);
  fs::create_directories(staging);
  const Result refused = run_lmtrain({"train", "--config", config}, tmp);
  require_one_error_line(refused, {"holds an earlier run", "--overwrite"});
  CHECK(refused.err.find("--resume") == std::string::npos);
}

// Killed while replacing the checkpoint `latest` names, between the two renames of a filesystem
// without RENAME_EXCHANGE: the copies are kept, and the resume names what is missing.
TEST_CASE("e2e: the copies of a missing latest checkpoint are kept", "[e2e]") {
  TempDir tmp;
  const std::string out_dir = tmp / "runs";
  const std::string config = write_config(tmp, tiny_config(out_dir));
  const RunPaths run(out_dir, "e2e");
  REQUIRE(run_lmtrain({"train", "--config", config}, tmp).code == 0);
  fs::rename(run.ckpt / "step_000006", run.ckpt / ".step_000006.old-4242");
  const Result resumed = run_lmtrain({"train", "--config", config, "--resume"}, tmp);
  require_one_error_line(resumed, {"latest: points at 'step_000006'"});
  CHECK(fs::exists(run.ckpt / ".step_000006.old-4242" / "model.safetensors"));
}

TEST_CASE("e2e: validation ids outside the vocabulary fail before training", "[e2e]") {
  TempDir tmp;
  const std::string out_dir = tmp / "runs";
  std::vector<uint32_t> tokens(4000, 7);
  tokens[3000] = 8192;  // inside the evaluation's windows: 1024 tokens by default is < 3000
  const fs::path val = tmp / "val";
  fs::create_directories(val);
  lmtrain::write_shard((val / "val_000000.bin").string(), tokens);
  const std::string config = write_config(
      tmp, tiny_config(out_dir, {{"data", {{"val", val.string()}}}, {"eval", {{"tokens", 4000}}}}));
  const Result r = run_lmtrain({"train", "--config", config}, tmp);
  require_one_error_line(r, {"val_000000.bin", "8192", "vocabulary"});
  CHECK(read_metrics(RunPaths(out_dir, "e2e").metrics).empty());
}

TEST_CASE("e2e: a sample prompt longer than the sequence fails before training", "[e2e]") {
  TempDir tmp;
  const std::string out_dir = tmp / "runs";
  std::string prompt;
  for (int i = 0; i < 40; ++i) prompt += "the king said ";
  const std::string config =
      write_config(tmp, tiny_config(out_dir, {{"eval", {{"sample_prompt", prompt}}}}));
  const Result r = run_lmtrain({"train", "--config", config}, tmp);
  require_one_error_line(r, {"eval.sample_prompt", "model.sequence_len 32"});
  CHECK(read_metrics(RunPaths(out_dir, "e2e").metrics).empty());
}

// model.vocab_size above the tokenizer's: the samples come from the tokenizer's vocabulary.
TEST_CASE("e2e: a model vocabulary larger than the tokenizer's samples known tokens", "[e2e]") {
  TempDir tmp;
  const std::string out_dir = tmp / "runs";
  const std::string config = write_config(
      tmp, tiny_config(out_dir, {{"model", {{"vocab_size", 16384}}},
                                 {"schedule", {{"num_iterations", 1}}},
                                 {"eval", {{"sample_tokens", 64}, {"temperature", 100.0}}}}));
  const Result trained = run_lmtrain({"train", "--config", config}, tmp);
  INFO(trained.all());
  REQUIRE(trained.code == 0);
  const Result sampled = run_lmtrain({"sample", "--ckpt", out_dir + "/e2e", "--temperature", "100",
                                      "--top-k", "0", "--max-tokens", "30"},
                                     tmp);
  INFO(sampled.all());
  CHECK(sampled.code == 0);
}

// The checkpoint's tokenizer.json decides its vocabulary: one that does not fit the weights is
// named as the culprit.
TEST_CASE("e2e: a checkpoint whose tokenizer does not fit its weights names the tokenizer",
          "[e2e]") {
  TempDir tmp;
  const std::string config =
      write_config(tmp, tiny_config(tmp / "runs", {{"schedule", {{"num_iterations", 1}}}}));
  const fs::path ckpt = one_step_checkpoint(tmp, config);
  json tokenizer = json::parse(read_text(ckpt / "tokenizer.json"));
  json& vocab = tokenizer["model"]["vocab"];
  const int size = int(vocab.size());  // ids 0 .. size - 1, the added tokens among them
  for (int i = 0; i < 100; ++i) vocab["extra" + std::to_string(i)] = size + i;  // 2 more rows of 64
  write_text(ckpt / "tokenizer.json", tokenizer.dump());
  const Result r = run_lmtrain({"sample", "--ckpt", ckpt.string()}, tmp);
  require_one_error_line(r, {"tokenizer.json", "not the tokenizer this model was trained with"});
}

TEST_CASE("e2e: --init-from checks the checkpoint's meta.json", "[e2e]") {
  TempDir tmp;
  const std::string config =
      write_config(tmp, tiny_config(tmp / "runs", {{"schedule", {{"num_iterations", 1}}}}));
  const fs::path ckpt = one_step_checkpoint(tmp, config);
  const std::string meta = read_text(ckpt / "meta.json");
  write_text(ckpt / "meta.json", meta.substr(0, meta.size() / 2));
  const Result r = run_lmtrain(
      {"train", "--config", config, "--set", "run.name=next", "--init-from", ckpt.string()}, tmp);
  require_one_error_line(r, {"meta.json"});
}

// A signal during the last evaluation: the run saves although checkpoint.save_final is off,
// and exits with 128 + signal.
TEST_CASE("e2e: a signal during the last evaluation saves and is reported", "[e2e]") {
  TempDir tmp;
  const std::string out_dir = tmp / "runs";
  const std::string config = write_config(
      tmp, tiny_config(out_dir, {{"schedule", {{"num_iterations", 2}}},
                                 {"eval", {{"tokens", 10000000}}},  // all of data/tiny's val
                                 {"checkpoint", {{"save_final", false}}}}));
  const RunPaths run(out_dir, "e2e");
  Background bg;
  run_lmtrain_background({"train", "--config", config}, tmp, bg);
  REQUIRE(wait_for_step(run.metrics, 2));
  REQUIRE(::kill(bg.pid, SIGTERM) == 0);
  const Result stopped = bg.wait();
  INFO(stopped.all());
  CHECK(stopped.code == 143);
  CHECK(stopped.out.find("stopped by signal 15 after the last step") != std::string::npos);
  CHECK(fs::exists(run.ckpt / "step_000002" / "model.safetensors"));
}

// A signal during an evaluation before the last stops the run once the evaluation is done: no
// further step, one checkpoint at that step, marked evaluated, so that --resume goes on without
// evaluating again.
TEST_CASE("e2e: a signal during an evaluation stops the run at that step", "[e2e]") {
  TempDir tmp;
  const std::string out_dir = tmp / "runs";
  const std::string config = write_config(
      tmp, tiny_config(out_dir, {{"schedule", {{"num_iterations", 3}}},
                                 {"eval", {{"every", 2}, {"tokens", 40000}}}}));  // seconds each
  const RunPaths run(out_dir, "e2e");
  Background bg;
  run_lmtrain_background({"train", "--config", config}, tmp, bg);
  REQUIRE(wait_for_step(run.metrics, 2));  // the evaluation at step 2 follows, seconds long
  REQUIRE(::kill(bg.pid, SIGTERM) == 0);
  const Result stopped = bg.wait();
  INFO(stopped.all());
  CHECK(stopped.code == 143);
  CHECK(stopped.out.find("stopped by signal 15 after step 2; checkpoint saved") !=
        std::string::npos);
  CHECK(fs::exists(run.ckpt / "step_000002" / "model.safetensors"));
  CHECK_FALSE(fs::exists(run.ckpt / "step_000003"));
  auto val_steps = [&] {
    std::vector<int> steps;
    for (const json& record : read_metrics(run.metrics)) {
      CHECK(record["step"].get<int>() <= 3);
      if (record.contains("val/loss")) steps.push_back(record["step"].get<int>());
    }
    return steps;
  };
  CHECK(val_steps() == std::vector<int>{0, 2});

  const Result resumed = run_lmtrain({"train", "--config", config, "--resume"}, tmp);
  INFO(resumed.all());
  REQUIRE(resumed.code == 0);
  CHECK(val_steps() == std::vector<int>{0, 2, 3});
}

// A periodic save just before the evaluation at its step, and a signal during that evaluation:
// the checkpoint is saved again, now marked evaluated, so --resume does not evaluate again.
TEST_CASE("e2e: a signal during the evaluation after a periodic save marks it evaluated", "[e2e]") {
  TempDir tmp;
  const std::string out_dir = tmp / "runs";
  const std::string config = write_config(
      tmp, tiny_config(out_dir, {{"schedule", {{"num_iterations", 3}}},
                                 {"checkpoint", {{"every", 2}}},
                                 {"eval", {{"every", 2}, {"tokens", 40000}}}}));  // seconds each
  const RunPaths run(out_dir, "e2e");
  const fs::path meta = run.ckpt / "step_000002" / "meta.json";
  Background bg;
  run_lmtrain_background({"train", "--config", config}, tmp, bg);
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (!fs::exists(meta) && std::chrono::steady_clock::now() < give_up)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  REQUIRE(fs::exists(meta));
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // into the evaluation
  REQUIRE(::kill(bg.pid, SIGTERM) == 0);
  const Result stopped = bg.wait();
  INFO(stopped.all());
  CHECK(stopped.code == 143);
  CHECK(json::parse(read_text(meta))["extra"]["evaluated"] == true);
  CHECK_FALSE(fs::exists(run.ckpt / "step_000003"));

  const Result resumed = run_lmtrain({"train", "--config", config, "--resume"}, tmp);
  INFO(resumed.all());
  REQUIRE(resumed.code == 0);
  CHECK(resumed.out.find("step 2/3 | val loss") == std::string::npos);
  CHECK(resumed.out.find("step 3/3 | val loss") != std::string::npos);
}

// run.name "." would make run.out_dir itself the run directory.
TEST_CASE("e2e: the run name . is refused", "[e2e]") {
  TempDir tmp;
  const std::string config =
      write_config(tmp, tiny_config(tmp / "runs", {{"run", {{"name", "a/."}}}}));
  require_one_error_line(run_lmtrain({"train", "--config", config}, tmp), {"run.name", "'a/.'"});
  CHECK_FALSE(fs::exists(tmp / "runs"));
}

// A file where the checkpoint directory belongs: refused before anything is written.
TEST_CASE("e2e: a file in place of the checkpoint directory is refused first", "[e2e]") {
  TempDir tmp;
  const std::string config = write_config(tmp, tiny_config(tmp / "runs"));
  const RunPaths run(tmp / "runs", "e2e");
  fs::create_directories(run.run);
  write_text(run.ckpt, "not a directory");
  const auto before = snapshot(run.run);
  require_one_error_line(run_lmtrain({"train", "--config", config}, tmp),
                         {"ckpt: expected the run's checkpoint directory"});
  CHECK(snapshot(run.run) == before);
}
