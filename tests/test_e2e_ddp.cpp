// End-to-end data parallelism on CPU ranks (Gloo) through `lmtrain launch`: N ranks train the
// same model as one rank with the same global batch, and checkpoints move between world sizes.
#include <fmt/format.h>

#include <random>

#include "data/shard.h"
#include "dist_support.h"
#include "e2e_support.h"
#include "io/safetensors.h"

using namespace lmtrain::e2e;

namespace {

// 5 steps of 512 tokens: 4 micro-batches of 4 x 32 on one rank, 2 on each of 2, 1 on each of 4,
// so every world size reads the same batches (contiguous packing gives rank r batches r, r+W...).
json ddp_config(const std::string& out_dir, const std::string& preset) {
  return tiny_config(out_dir, {{"batch", {{"total_batch_tokens", 512}}},
                               {"schedule", {{"num_iterations", 5}}},
                               {"optim", {{"preset", preset}, {"lr_reference_batch", 1024}}},
                               {"eval", {{"every", -1}, {"sample_tokens", 1}}}});
}

Result launch(int ranks, const std::vector<std::string>& train_args, const TempDir& tmp) {
  std::vector<std::string> args = {"launch", "--nproc-per-node", std::to_string(ranks),
                                   "--",     LMTRAIN_BINARY,     "train"};
  args.insert(args.end(), train_args.begin(), train_args.end());
  return run_lmtrain(args, tmp);
}

// The step records of a run, in order.
std::vector<json> step_records(const fs::path& metrics) {
  std::vector<json> out;
  for (const auto& r : read_metrics(metrics))
    if (r.contains("train_loss")) out.push_back(r);
  return out;
}

std::vector<double> losses(const fs::path& metrics) {
  std::vector<double> out;
  for (const auto& r : step_records(metrics)) out.push_back(r["train_loss"]);
  return out;
}

// The gradient norm and the NorMuon update RMS of every step and stack agree: they describe
// the whole model, whatever the number of ranks.
void check_global_metrics(const fs::path& reference, const fs::path& got) {
  const auto want = step_records(reference), have = step_records(got);
  REQUIRE(want.size() == have.size());
  for (size_t i = 0; i < want.size(); ++i) {
    for (const auto& [key, value] : want[i].items()) {
      if (key != "grad_norm" && key.rfind("muon/update_rms/", 0) != 0) continue;
      INFO("step " << i + 1 << " " << key);
      REQUIRE(have[i].contains(key));
      const double a = value, b = have[i][key];
      CHECK(std::abs(a - b) <= 1e-4 * std::abs(a));
    }
  }
}

// The largest per-tensor relative L2 distance between two checkpoints' weights.
double weight_distance(const fs::path& a, const fs::path& b) {
  auto fa = lmtrain::SafetensorsFile::open((a / "model.safetensors").string());
  auto fb = lmtrain::SafetensorsFile::open((b / "model.safetensors").string());
  double worst = 0;
  for (const auto& t : fa.tensors()) {
    auto x = fa.read_f32(t.name), y = fb.read_f32(t.name);
    double diff = 0, norm = 0;
    for (size_t i = 0; i < x.size(); ++i)
      diff += double(x[i] - y[i]) * (x[i] - y[i]), norm += double(x[i]) * x[i];
    worst = std::max(worst, std::sqrt(diff / std::max(norm, 1e-30)));
  }
  return worst;
}

}  // namespace

TEST_CASE("2 and 4 ranks train like 1 rank with the same global batch", "[e2e][ddp]") {
  // The ranks sum the gradients in another order than one rank does, so they differ by fp32
  // rounding, which both optimizers can amplify. AdamW (eps 1e-10) turns a gradient element that
  // cancels to rounding noise into a step of up to the full LR, in either direction: embedding
  // rows of rare tokens agree to 1e-4 relative (measured 4e-5 on value embeddings; how much
  // depends on the CPU's BLAS kernels). NorMuon's cautious weight decay masks elements where the
  // update times the weight is within rounding of zero, so a few elements may take the other side:
  // 1e-3 (measured 5e-4). The losses agree to 1e-5 with both.
  for (const auto& [preset, tolerance] : {std::pair{"adamw", 1e-4}, {"normuon", 1e-3}}) {
    TempDir tmp;
    const std::string one = tmp / "one";
    const Result single = run_lmtrain(
        {"train", "--config", write_config(tmp, ddp_config(one, preset), "one.json")}, tmp);
    REQUIRE(single.code == 0);
    const auto reference = losses(RunPaths(one, "e2e").metrics);
    REQUIRE(reference.size() == 5);
    for (int ranks : {2, 4}) {
      INFO(preset << " with " << ranks << " ranks");
      const std::string out = tmp / ("ranks" + std::to_string(ranks));
      const Result r = launch(
          ranks, {"--config", write_config(tmp, ddp_config(out, preset), "multi.json")}, tmp);
      REQUIRE(r.code == 0);
      const auto got = losses(RunPaths(out, "e2e").metrics);
      REQUIRE(got.size() == reference.size());
      for (size_t i = 0; i < got.size(); ++i) CHECK(std::abs(got[i] - reference[i]) < 1e-5);
      check_global_metrics(RunPaths(one, "e2e").metrics, RunPaths(out, "e2e").metrics);
      CHECK(weight_distance(RunPaths(one, "e2e").ckpt / "step_000005",
                            RunPaths(out, "e2e").ckpt / "step_000005") < tolerance);
      // Every rank wrote its optimizer shard.
      for (int k = 0; k < ranks; ++k) {
        CHECK(fs::exists(RunPaths(out, "e2e").ckpt / "step_000005" /
                         fmt::format("optimizer.rank{:05d}.safetensors", k)));
      }
    }
  }
}

// Two launchers on one machine stand in for two nodes: node 0's launcher hosts the rendezvous
// (rank 0 serves it on the socket the launcher bound), node 1's ranks 2 and 3 reach it through
// --master-addr/--master-port, and the four ranks train as four ranks of one launcher do.
TEST_CASE("two launchers as two nodes train like one launcher", "[e2e][ddp]") {
  TempDir tmp;
  const std::string one = tmp / "one", two = tmp / "two";
  REQUIRE(
      launch(4, {"--config", write_config(tmp, ddp_config(one, "adamw"), "one.json")}, tmp).code ==
      0);
  const lmtrain::test_support::ReservedPort port;
  REQUIRE(port.port > 0);
  const std::string config = write_config(tmp, ddp_config(two, "adamw"), "two.json");
  auto node = [&](int node_rank) {
    std::vector<std::string> args = {"launch", "--nproc-per-node", "2", "--nnodes", "2"};
    args.insert(args.end(), {"--node-rank", std::to_string(node_rank), "--master-addr", "127.0.0.1",
                             "--master-port", std::to_string(port.port)});
    args.insert(args.end(), {"--", LMTRAIN_BINARY, "train", "--config", config});
    return args;
  };
  Background node0;
  run_lmtrain_background(node(0), tmp, node0);
  const Result node1 = run_lmtrain(node(1), tmp);
  const Result node0_result = node0.wait();
  INFO(node0_result.err << node1.err);
  REQUIRE(node0_result.code == 0);
  REQUIRE(node1.code == 0);
  // The same ranks sum in the same order: the same losses, bit for bit.
  CHECK(losses(RunPaths(two, "e2e").metrics) == losses(RunPaths(one, "e2e").metrics));
  for (int k = 0; k < 4; ++k)  // node 1's ranks saved their shards too
    CHECK(fs::exists(RunPaths(two, "e2e").ckpt / "step_000005" /
                     fmt::format("optimizer.rank{:05d}.safetensors", k)));
}

TEST_CASE("a checkpoint from 2 ranks resumes with 1 and with 4 ranks and continues the curve",
          "[e2e][ddp]") {
  TempDir tmp;
  const std::string base = tmp / "base";
  json config = ddp_config(base, "adamw");
  config["schedule"]["num_iterations"] = 8;
  config["checkpoint"]["every"] = 4;
  // The uninterrupted 2-rank run is the reference curve.
  REQUIRE(launch(2, {"--config", write_config(tmp, config, "base.json")}, tmp).code == 0);
  const auto reference = losses(RunPaths(base, "e2e").metrics);
  REQUIRE(reference.size() == 8);
  for (int ranks : {1, 4}) {
    INFO("resumed with " << ranks << " ranks");
    const std::string out = tmp / ("resume" + std::to_string(ranks));
    json c = config;
    c["run"]["out_dir"] = out;
    fs::create_directories(RunPaths(out, "e2e").ckpt);
    fs::copy(RunPaths(base, "e2e").ckpt / "step_000004", RunPaths(out, "e2e").ckpt / "step_000004",
             fs::copy_options::recursive);
    write_text(RunPaths(out, "e2e").ckpt / "latest", "step_000004");
    const std::vector<std::string> args = {"--config", write_config(tmp, c, "resume.json"),
                                           "--resume"};
    const Result r = ranks == 1 ? run_lmtrain({"train", args[0], args[1], args[2]}, tmp)
                                : launch(ranks, args, tmp);
    REQUIRE(r.code == 0);
    const auto got = losses(RunPaths(out, "e2e").metrics);
    REQUIRE(got.size() == 4);  // steps 5..8
    // The same global batches in a different split over ranks: the curve continues.
    for (size_t i = 0; i < got.size(); ++i) CHECK(std::abs(got[i] - reference[4 + i]) < 1e-4);
  }
  // With the same world size each rank reads its own loader position: one cut short is named.
  const std::string out = tmp / "cut";
  json c = config;
  c["run"]["out_dir"] = out;
  const fs::path step = RunPaths(out, "e2e").ckpt / "step_000004";
  fs::create_directories(step.parent_path());
  fs::copy(RunPaths(base, "e2e").ckpt / "step_000004", step, fs::copy_options::recursive);
  write_text(RunPaths(out, "e2e").ckpt / "latest", "step_000004");
  const std::string loader = (step / "loader.rank00001.json").string();
  write_text(loader, read_text(loader).substr(0, 10));
  const Result r = launch(2, {"--config", write_config(tmp, c, "cut.json"), "--resume"}, tmp);
  CHECK(r.code != 0);
  CHECK_THAT(r.err, Catch::Contains(loader + ": not valid JSON: parse error"));
}

TEST_CASE("a rank that dies stops the others with a message naming it", "[e2e][ddp]") {
  TempDir tmp;
  // Rank 1 is given a missing data directory: it fails at start while rank 0 waits in the
  // rendezvous; the launcher must stop rank 0 and name rank 1.
  const std::string out = tmp / "dies";
  const std::string config = write_config(tmp, ddp_config(out, "adamw"));
  const Result r =
      run_lmtrain({"launch", "--nproc-per-node", "2", "--grace", "2", "--", "sh", "-c",
                   std::string("if [ \"$RANK\" = 1 ]; then exec ") + LMTRAIN_BINARY +
                       " train --config " + config + " --set data.train=/nonexistent; else exec " +
                       LMTRAIN_BINARY + " train --config " + config + "; fi"},
                  tmp);
  CHECK(r.code != 0);
  CHECK(r.err.find("rank 1") != std::string::npos);
}

// Started with stdout closed (`>&-`), the launcher's store socket used to become descriptor 1,
// which rank 0 then found replaced by its standard output ("LMTRAIN_STORE_FD=1: is not a
// listening socket"); lmtrain now opens /dev/null in the place of a closed standard descriptor
// before anything else.
TEST_CASE("a launch with stdout closed trains", "[e2e][ddp]") {
  TempDir tmp;
  const std::string out = tmp / "closed";
  const std::string config = write_config(tmp, ddp_config(out, "adamw"));
  const Result r = run_lmtrain(
      {"launch", "--nproc-per-node", "2", "--", LMTRAIN_BINARY, "train", "--config", config}, tmp,
      "", /*close_stdout=*/true);
  INFO(r.err);
  CHECK(r.code == 0);
  CHECK(losses(fs::path(out) / "e2e" / "metrics.jsonl").size() == 5);
}

// With more ranks than a tensor has row chunks, the last rank owns none of its rows and saves an
// empty tensor whose rows start at the end: width 32 over 9 ranks is chunks of 4 rows, and rank 8
// would begin at row 32 ("32,32").
TEST_CASE("a checkpoint where a rank owns no rows of a tensor resumes", "[e2e][ddp]") {
  TempDir tmp;
  json config =
      tiny_config(tmp / "runs", {{"model", {{"depth", 1}, {"aspect_ratio", 32}, {"head_dim", 16}}},
                                 {"batch", {{"device_batch", 1}, {"total_batch_tokens", 9 * 32}}},
                                 {"schedule", {{"num_iterations", 2}}},
                                 {"optim", {{"preset", "adamw"}}},
                                 {"eval", {{"every", -1}, {"sample_tokens", 0}}}});
  const std::string file = write_config(tmp, config, "c.json");
  REQUIRE(launch(9, {"--config", file}, tmp).code == 0);
  const RunPaths run(tmp / "runs", "e2e");
  auto last = lmtrain::SafetensorsFile::open(
      (run.ckpt / "step_000002" / "optimizer.rank00008.safetensors").string());
  bool empty_shard = false;
  for (const auto& [key, value] : last.metadata()) empty_shard |= value == "32,32";
  REQUIRE(empty_shard);
  const Result r =
      launch(9, {"--config", file, "--resume", "--set", "schedule.num_iterations=3"}, tmp);
  INFO(r.all());
  CHECK(r.code == 0);
  CHECK(losses(run.metrics).size() == 3);
}

// Each rank reads its own validation windows (rank r from r x B x T on): two shards of 40 tokens
// hold one window of 32 for rank 0 but none for rank 1. That is refused before training, not
// after it, when the final evaluation would lose the run.
TEST_CASE("validation data too small for one rank is refused before training", "[e2e][ddp]") {
  TempDir tmp;
  fs::create_directories(tmp / "val");
  for (int s = 0; s < 2; ++s) {
    std::vector<uint32_t> tokens(40);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = uint32_t(1 + i);
    lmtrain::write_shard(tmp / fmt::format("val/val_{:06d}.bin", s), tokens);
  }
  json config =
      tiny_config(tmp / "runs", {{"batch", {{"device_batch", 1}, {"total_batch_tokens", 64}}},
                                 {"data", {{"val", tmp / "val"}}},
                                 {"eval", {{"every", 0}}}});
  const Result r = launch(2, {"--config", write_config(tmp, config, "c.json")}, tmp);
  INFO(r.all());
  CHECK(r.code != 0);
  CHECK(r.err.find("[rank 1] error:") != std::string::npos);
  CHECK(r.err.find("val_000000.bin") != std::string::npos);
  // Nothing trained or written: rank 0 waits for every rank's checks before it writes.
  CHECK_FALSE(fs::exists(tmp / "runs"));
}

// The ranks split the training shards' start-up id check: a bad id at the very end of the shard
// only rank 1 reads, which this run would never reach, is refused by rank 1 before any rank
// trains, and rank 0 waits for the others' checks before it writes to the run directory.
TEST_CASE("an id outside the vocabulary in rank 1's shards is refused before training",
          "[e2e][ddp]") {
  TempDir tmp;
  fs::create_directories(tmp / "train");
  std::mt19937_64 rng(std::random_device{}());
  for (int s = 0; s < 2; ++s) {
    std::vector<uint32_t> tokens(5000);
    for (auto& t : tokens) t = uint32_t(rng() % 8192);
    if (s == 1) tokens.back() = 8192 + tokens.back();
    lmtrain::write_shard(tmp / fmt::format("train/train_{:06d}.bin", s), tokens);
  }
  json config = ddp_config(tmp / "runs", "adamw");
  config["data"]["train"] = tmp / "train";
  const Result r = launch(2, {"--config", write_config(tmp, config, "c.json")}, tmp);
  INFO(r.all());
  CHECK(r.code != 0);
  CHECK(r.err.find("[rank 1] error: " + (tmp / "c.json") + ": data.train: " +
                   (tmp / "train/train_000001.bin") + ": token 4999 has id") != std::string::npos);
  CHECK_FALSE(fs::exists(tmp / "runs"));
}

// --overwrite starting from a checkpoint of the run it replaces: every rank reads the weights
// before rank 0 deletes the earlier run.
TEST_CASE("overwriting from the replaced run's own checkpoint works on several ranks",
          "[e2e][ddp]") {
  TempDir tmp;
  const std::string file = write_config(tmp, ddp_config(tmp / "runs", "normuon"), "c.json");
  REQUIRE(launch(4, {"--config", file}, tmp).code == 0);
  const RunPaths run(tmp / "runs", "e2e");
  const Result r =
      launch(4, {"--config", file, "--overwrite", "--init-from", run.ckpt.string()}, tmp);
  INFO(r.all());
  CHECK(r.code == 0);
  CHECK(fs::exists(run.ckpt / "step_000005" / "model.safetensors"));
  CHECK(losses(run.metrics).size() == 5);  // the new run's steps only
}
