// End-to-end: bad input is refused with one "error:" line that names the file or key and what
// was expected, a non-zero exit, and nothing written.
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>

#include "data/shard.h"
#include "e2e_support.h"
#include "io/safetensors.h"

using namespace lmtrain::e2e;

namespace {

// Trains with `tiny_config` patched by `patch` (plus `extra` arguments) and checks the run is
// refused with one error line containing every one of `parts`, leaving no run directory.
// Returns what the run printed.
Result expect_refused(const json& patch, const std::vector<std::string>& extra,
                      const std::vector<std::string>& parts) {
  TempDir tmp;
  const std::string out_dir = tmp / "runs";
  const std::string config = write_config(tmp, tiny_config(out_dir, patch));
  std::vector<std::string> args = {"train", "--config", config};
  args.insert(args.end(), extra.begin(), extra.end());
  const Result r = run_lmtrain(args, tmp);
  require_one_error_line(r, parts);
  CHECK_FALSE(fs::exists(fs::path(out_dir) / "e2e"));
  CHECK_FALSE(fs::exists(out_dir));
  return r;
}

// A shard with the given header words followed by `tokens` uint16 tokens.
void write_shard_bytes(const std::string& path, int32_t magic, int32_t version, int32_t count,
                       size_t tokens) {
  std::vector<int32_t> header(256, 0);
  header[0] = magic, header[1] = version, header[2] = count;
  std::string bytes(reinterpret_cast<const char*>(header.data()), header.size() * 4);
  for (size_t i = 0; i < tokens; ++i) {
    const uint16_t t = uint16_t(1 + i % 100);
    bytes.append(reinterpret_cast<const char*>(&t), 2);
  }
  write_text(path, bytes);
}

// A shard of `count` random ids (seeded afresh) below the default corpus's vocabulary of 8192;
// returns the ids.
std::vector<uint32_t> write_random_shard(const std::string& path, size_t count) {
  std::mt19937_64 rng(std::random_device{}());
  std::vector<uint32_t> tokens(count);
  for (auto& t : tokens) t = uint32_t(rng() % 8192);
  lmtrain::write_shard(path, tokens);
  return tokens;
}

// Rewrites the safetensors `file` with tensor `name` saved as `shape` (as many elements).
void reshape_saved_tensor(const fs::path& file, const std::string& name,
                          const std::vector<int64_t>& shape) {
  const auto saved = lmtrain::SafetensorsFile::open(file.string());
  lmtrain::SafetensorsWriter out;
  for (const auto& [key, value] : saved.metadata()) out.set_metadata(key, value);
  for (const auto& info : saved.tensors()) {
    const std::vector<float> values = saved.read_f32(info.name);
    out.add(info.name, "F32", info.name == name ? shape : info.shape, values.data(),
            values.size() * sizeof(float));
  }
  out.write(file.string());
}

// A 2-step run of the tiny config, trained once: the checkpoint a test then damages or reuses.
struct TrainedRun {
  TempDir tmp;
  std::string out_dir = tmp / "runs";
  std::string config =
      write_config(tmp, tiny_config(out_dir, {{"schedule", {{"num_iterations", 2}}}}));
  RunPaths run{out_dir, "e2e"};
  fs::path ckpt = run.ckpt / "step_000002";
  TrainedRun() { REQUIRE(run_lmtrain({"train", "--config", config}, tmp).code == 0); }
};

}  // namespace

// A misspelt key names its full path and suggests the key that was meant.
TEST_CASE("e2e: an unknown config key is refused with a suggestion", "[e2e]") {
  expect_refused({{"model", {{"depht", 4}}}}, {},
                 {"config.json", "model.depht", "did you mean", "depth"});
}

// A value of the wrong JSON type names the key and the type it needs.
TEST_CASE("e2e: a wrongly typed config value is refused", "[e2e]") {
  expect_refused({{"model", {{"depth", "six"}}}}, {},
                 {"config.json", "model.depth", "expected an integer", "six"});
}

// Values that parse but describe an impossible run are refused before anything is written.
TEST_CASE("e2e: impossible config values are refused", "[e2e]") {
  SECTION("depth 0") {
    expect_refused({{"model", {{"depth", 0}}}}, {}, {"model.depth", "expected", ">= 1"});
  }
  SECTION("n_kv_head that does not divide n_head") {
    // depth 2 x aspect 64 = width 128 = 4 heads of 32; 3 kv heads cannot be shared evenly.
    expect_refused({{"model", {{"aspect_ratio", 64}, {"n_kv_head", 3}}}}, {},
                   {"model.n_kv_head", "divisor of n_head = 4"});
  }
  SECTION("total_batch_tokens not a multiple of device_batch x T") {
    expect_refused({{"batch", {{"total_batch_tokens", 100}}}}, {},
                   {"batch.total_batch_tokens", "100", "not a multiple", "128"});
  }
  SECTION("warmup_ratio + warmdown_ratio > 1") {
    expect_refused({{"schedule", {{"warmup_ratio", 0.6}, {"warmdown_ratio", 0.6}}}}, {},
                   {"schedule.warmdown_ratio", "warmup_ratio + warmdown_ratio <= 1"});
  }
  SECTION("unknown matrix optimizer") {
    expect_refused({{"optim", {{"matrix_optimizer", "sgd"}}}}, {},
                   {"optim.matrix_optimizer", "normuon | adamw", "sgd"});
  }
  SECTION("unknown optimizer preset") {
    expect_refused({{"optim", {{"preset", "lion"}}}}, {}, {"optim.preset", "lion"});
  }
  SECTION("a param_overrides pattern that matches no NorMuon matrix") {
    const json overrides = json::array({{{"pattern", "transformer.h.*.mlp.c_prj.weight"}}});
    expect_refused({{"optim", {{"muon", {{"param_overrides", overrides}}}}}}, {},
                   {"optim.muon.param_overrides[0].pattern", "c_prj", "matches none"});
  }
  SECTION("negative loss_chunk_rows") {
    expect_refused({{"run", {{"loss_chunk_rows", -5}}}}, {}, {"run.loss_chunk_rows", ">= 0"});
  }
}

// --set goes through the same validation as the file: a bad key or a missing '=' is refused.
TEST_CASE("e2e: a bad --set is refused", "[e2e]") {
  SECTION("unknown key") {
    expect_refused({}, {"--set", "model.depht=4"}, {"model.depht", "depth"});
  }
  SECTION("wrong type") {
    expect_refused({}, {"--set", "batch.device_batch=four"},
                   {"batch.device_batch", "expected an integer"});
  }
  SECTION("no '='") {
    expect_refused({}, {"--set", "model.depth"}, {"--set model.depth", "key.path=value"});
  }
}

// A damaged token shard is named in the error, whichever way it is damaged.
TEST_CASE("e2e: a corrupt training shard is refused, naming the file", "[e2e]") {
  TempDir shards;
  SECTION("truncated") {
    const std::string shard = shards / "train_000000.bin";
    write_shard_bytes(shard, 20240520, 1, 4000, 3000);
    expect_refused({{"data", {{"train", shard}}}}, {}, {shard, "truncated", "4000 tokens"});
  }
  SECTION("wrong magic") {
    const std::string shard = shards / "train_000000.bin";
    write_shard_bytes(shard, 12345, 1, 4000, 4000);
    expect_refused({{"data", {{"train", shard}}}}, {}, {shard, "magic 12345", "20240520"});
  }
  SECTION("shorter than the header") {
    const std::string shard = shards / "train_000000.bin";
    write_text(shard, "not a shard");
    expect_refused({{"data", {{"train", shard}}}}, {}, {shard, "header"});
  }
  SECTION("missing") {
    const std::string shard = shards / "nothing_here.bin";
    expect_refused({{"data", {{"train", shard}}}}, {}, {shard});
  }
}

// Every training id is read at start: a bad id at the very end of a shard, which this run would
// never reach, or a long run only hours in, is refused before a step and before anything is
// written.
TEST_CASE("e2e: an id outside the vocabulary at the end of a training shard is refused at start",
          "[e2e]") {
  TempDir shards;
  const std::string shard = shards / "train_000000.bin";
  auto tokens = write_random_shard(shard, 20000);
  tokens.back() = 8192 + tokens.back();
  lmtrain::write_shard(shard, tokens);
  const Result r = expect_refused(
      {{"data", {{"train", shard}}}}, {},
      {shard, "token 19999 has id " + std::to_string(tokens.back()), "vocabulary of 8192"});
  CHECK(r.out.find("step ") == std::string::npos);
}

// Shards whose meta.json (prepare_data.py's) names another tokenizer than data.tokenizer would
// train on garbage: both files and their values are named. A malformed meta.json is named too.
TEST_CASE("e2e: shards made with another tokenizer are refused naming both files", "[e2e]") {
  TempDir shards;
  const std::string dir = shards.path().string(), meta = shards / "meta.json";
  const std::string tokenizer = data_dir() + "/tokenizer.json";
  write_random_shard(shards / "train_000000.bin", 20000);
  write_random_shard(shards / "val_000000.bin", 20000);
  SECTION("train: GPT-2's vocabulary") {
    write_text(meta, R"({"tokenizer": "gpt2", "vocab_size": 50257, "bos_id": 50256})");
    expect_refused(
        {{"data", {{"train", dir}}}}, {},
        {meta, "vocab_size 50257 and bos_id 50256", tokenizer, "vocab_size 8192 and bos_id 0"});
  }
  SECTION("val, as a prefix: another BOS") {
    write_text(meta, R"({"tokenizer": "bpe", "vocab_size": 8192, "bos_id": 1})");
    expect_refused({{"data", {{"val", shards / "val_"}}}}, {},
                   {meta, "bos_id 1", tokenizer, "bos_id 0"});
  }
  SECTION("malformed") {
    write_text(meta, R"({"vocab_size": 8192, "bos_id": )");
    expect_refused({{"data", {{"train", dir}}}}, {}, {meta, "not valid JSON: parse error"});
    write_text(meta, R"({"vocab_size": 8192.5, "bos_id": 0})");
    expect_refused({{"data", {{"train", dir}}}}, {}, {meta, "'vocab_size'", "8192.5"});
  }
}

// eval checks the shards' meta.json against the checkpoint's tokenizer, as train does against
// data.tokenizer: a loss over ids from another tokenizer would mean nothing.
TEST_CASE("e2e: eval refuses shards made with another tokenizer", "[e2e]") {
  TrainedRun trained;
  TempDir shards;
  const std::string meta = shards / "meta.json";
  write_random_shard(shards / "val_000000.bin", 20000);
  write_text(meta, R"({"tokenizer": "gpt2", "vocab_size": 50257, "bos_id": 50256})");
  const Result r = run_lmtrain(
      {"eval", "--ckpt", trained.ckpt.string(), "--data", shards.path().string()}, trained.tmp);
  require_one_error_line(r, {"eval: --data", meta, "vocab_size 50257 and bos_id 50256",
                             (trained.ckpt / "tokenizer.json").string()});
}

// A checkpoint that cannot be used is named in the error and left exactly as it was.
TEST_CASE("e2e: a corrupt or mismatched checkpoint is refused and left untouched", "[e2e]") {
  TrainedRun trained;
  const auto& [tmp, out_dir, config, run, ckpt] = trained;
  REQUIRE(fs::exists(ckpt / "model.safetensors"));

  SECTION("truncated model.safetensors") {
    const fs::path weights = ckpt / "model.safetensors";
    fs::resize_file(weights, fs::file_size(weights) / 2);
    const auto before = snapshot(run.run);

    const Result eval = run_lmtrain({"eval", "--ckpt", ckpt.string(), "--data", data_dir()}, tmp);
    require_one_error_line(eval, {weights.string(), "truncated"});

    const Result resume = run_lmtrain({"train", "--config", config, "--resume"}, tmp);
    require_one_error_line(resume, {weights.string(), "truncated"});

    const Result sample =
        run_lmtrain({"sample", "--ckpt", run.run.string(), "--max-tokens", "2"}, tmp);
    require_one_error_line(sample, {"model.safetensors", "truncated"});

    CHECK(snapshot(run.run) == before);
  }

  SECTION("resume with a different model") {
    const auto before = snapshot(run.run);
    const Result r =
        run_lmtrain({"train", "--config", config, "--resume", "--set", "model.depth=3"}, tmp);
    require_one_error_line(
        r, {(ckpt / "meta.json").string(), "model.depth is 2 in the checkpoint but 3 now"});
    CHECK(snapshot(run.run) == before);
  }

  SECTION("init-from into a model of another shape") {
    const auto before = snapshot(run.run);
    const std::string other = tmp / "other";
    const Result r = run_lmtrain({"train", "--config", config, "--set", "run.out_dir=" + other,
                                  "--set", "model.depth=3", "--init-from", ckpt.string()},
                                 tmp);
    require_one_error_line(r, {(ckpt / "model.safetensors").string()});
    CHECK_FALSE(fs::exists(other));
    CHECK(snapshot(run.run) == before);
  }

  SECTION("eval of a directory that is not a checkpoint") {
    const Result r = run_lmtrain({"eval", "--ckpt", tmp / "nowhere", "--data", data_dir()}, tmp);
    require_one_error_line(r, {tmp / "nowhere"});
  }
}

// A damaged validation shard is refused at start: validation runs last when eval.every is 0, and
// failing then lost the whole run (no final checkpoint).
TEST_CASE("e2e: a corrupt validation shard is refused before training", "[e2e]") {
  TempDir shards;
  const std::string shard = shards / "val_000000.bin";
  write_shard_bytes(shard, 12345, 1, 4000, 4000);
  expect_refused({{"data", {{"val", shard}}}}, {}, {shard, "magic 12345"});
}

// Likewise a validation set too small for one batch (the tiny config's B x T is 4 x 32).
TEST_CASE("e2e: validation data smaller than one batch is refused before training", "[e2e]") {
  TempDir shards;
  const std::string shard = shards / "val_000000.bin";
  write_shard_bytes(shard, 20240520, 1, 40, 40);
  expect_refused({{"data", {{"val", shard}}}, {"eval", {{"every", 0}}}}, {},
                 {shard, "validation data too small for one batch"});
}

// Values the checkpoint's files hold are checked when loaded: NaN weights or optimizer state
// and a malformed meta.json are named with the file instead of producing a NaN loss, an
// uncaught json exception or a silently wrong run.
TEST_CASE("e2e: a checkpoint with NaN values or a malformed meta.json is refused", "[e2e]") {
  TrainedRun trained;
  const auto& [tmp, out_dir, config, run, ckpt] = trained;
  // The last 4 bytes of a safetensors file are the last element of its last tensor.
  auto poison_last_float = [](const fs::path& file) {
    std::string bytes = read_text(file);
    const float nan = std::nanf("");
    std::memcpy(bytes.data() + bytes.size() - sizeof nan, &nan, sizeof nan);
    write_text(file, bytes);
  };
  auto rewrite_meta = [&](const std::function<void(json&)>& edit) {
    json meta = json::parse(read_text(ckpt / "meta.json"));
    edit(meta);
    write_text(ckpt / "meta.json", meta.dump());
  };

  SECTION("NaN in the weights") {
    const fs::path weights = ckpt / "model.safetensors";
    poison_last_float(weights);
    const auto before = snapshot(run.run);
    require_one_error_line(
        run_lmtrain({"eval", "--ckpt", ckpt.string(), "--data", data_dir()}, tmp),
        {weights.string(), "holds nan"});
    require_one_error_line(
        run_lmtrain({"sample", "--ckpt", ckpt.string(), "--max-tokens", "2"}, tmp),
        {weights.string(), "holds nan"});
    require_one_error_line(run_lmtrain({"train", "--config", config, "--resume"}, tmp),
                           {weights.string(), "holds nan"});
    CHECK(snapshot(run.run) == before);
  }
  SECTION("NaN in the optimizer state") {
    const fs::path state = ckpt / "optimizer.safetensors";
    poison_last_float(state);
    const auto before = snapshot(run.run);
    require_one_error_line(run_lmtrain({"train", "--config", config, "--resume"}, tmp),
                           {state.string(), "holds nan"});
    CHECK(snapshot(run.run) == before);
  }
  SECTION("optimizer state saved in another shape with rows as long") {
    // wte's (8192, 64) state as (8192, 8, 8): the row length matches, the shape does not.
    const fs::path state = ckpt / "optimizer.safetensors";
    reshape_saved_tensor(state, "exp_avg.transformer.wte.weight", {8192, 8, 8});
    const auto before = snapshot(run.run);
    require_one_error_line(run_lmtrain({"train", "--config", config, "--resume"}, tmp),
                           {state.string(), "'exp_avg.transformer.wte.weight'",
                            "shape (8192, 8, 8), expected (8192, 64)"});
    CHECK(snapshot(run.run) == before);
  }
  SECTION("step of the wrong type") {
    rewrite_meta([](json& m) { m["step"] = "2"; });
    const auto before = snapshot(run.run);
    require_one_error_line(run_lmtrain({"train", "--config", config, "--resume"}, tmp),
                           {(ckpt / "meta.json").string(), "'step' must be an integer"});
    CHECK(snapshot(run.run) == before);
  }
  SECTION("loader position missing") {
    rewrite_meta([](json& m) { m["loader"].erase("epoch"); });
    const auto before = snapshot(run.run);
    require_one_error_line(run_lmtrain({"train", "--config", config, "--resume"}, tmp),
                           {(ckpt / "meta.json").string(), "loader state", "'epoch'"});
    CHECK(snapshot(run.run) == before);
  }
  SECTION("extra of the wrong type") {
    rewrite_meta([](json& m) { m["extra"] = "x"; });
    require_one_error_line(run_lmtrain({"train", "--config", config, "--resume"}, tmp),
                           {(ckpt / "meta.json").string(), "'extra'"});
  }
  SECTION("meta.json cut short, or not an object") {
    const std::string meta = (ckpt / "meta.json").string();
    write_text(meta, read_text(meta).substr(0, 100));
    require_one_error_line(run_lmtrain({"sample", "--ckpt", ckpt.string()}, tmp),
                           {meta, "not valid JSON: parse error at line"});
    write_text(meta, "[]");
    require_one_error_line(run_lmtrain({"sample", "--ckpt", ckpt.string()}, tmp),
                           {meta, "expected a JSON object, got an array"});
  }
}

// Options of eval and sample outside their range are refused instead of silently replaced by a
// default (eval --tokens -5) or used (sample --temperature -1).
TEST_CASE("e2e: eval and sample refuse out-of-range options", "[e2e]") {
  TrainedRun trained;
  const auto& tmp = trained.tmp;
  const std::string run = trained.run.run.string();
  require_one_error_line(
      run_lmtrain({"eval", "--ckpt", run, "--data", data_dir(), "--tokens", "-5"}, tmp),
      {"--tokens", "-5"});
  require_one_error_line(
      run_lmtrain({"eval", "--ckpt", run, "--data", data_dir(), "--batch", "0"}, tmp),
      {"--batch", "0"});
  require_one_error_line(run_lmtrain({"sample", "--ckpt", run, "--temperature", "-1"}, tmp),
                         {"--temperature", "-1"});
  require_one_error_line(run_lmtrain({"sample", "--ckpt", run, "--max-tokens", "-3"}, tmp),
                         {"--max-tokens", "-3"});
  require_one_error_line(run_lmtrain({"sample", "--ckpt", run, "--prompt", "a\xff\xfe"}, tmp),
                         {"--prompt", "UTF-8"});
  const std::string missing = tmp / "missing";
  require_one_error_line(run_lmtrain({"eval", "--ckpt", run, "--data", missing}, tmp),
                         {"eval: --data: " + missing});
  // The whole range of the seed, and of the other options, stays usable.
  const Result seeded = run_lmtrain({"sample", "--ckpt", run, "--max-tokens", "2", "--seed",
                                     "18446744073709551615", "--top-k", "0", "--temperature", "0"},
                                    tmp);
  CHECK(seeded.code == 0);
  const Result evaluated = run_lmtrain(
      {"eval", "--ckpt", run, "--data", data_dir(), "--tokens", "256", "--batch", "2"}, tmp);
  CHECK(evaluated.code == 0);
  // A tokenizer.json without a 'model' is named, not reported as a bare json exception.
  write_text(trained.ckpt / "tokenizer.json", "{}");
  require_one_error_line(run_lmtrain({"sample", "--ckpt", run, "--max-tokens", "2"}, tmp),
                         {"tokenizer.json", "'model'"});
}

// A directory where a file is expected, and option values CLI11's checks let through, are
// named in one line.
TEST_CASE("e2e: a tokenizer directory and a NaN --grace are refused", "[e2e]") {
  TempDir tmp;
  expect_refused({{"data", {{"tokenizer", tmp.path().string()}}}}, {},
                 {tmp.path().string(), "is a directory"});
  require_one_error_line(
      run_lmtrain({"launch", "--nproc-per-node", "1", "--grace", "nan", "--", "/bin/true"}, tmp),
      {"--grace", "nan"});
}

// A run directory that cannot be made is named with the keys that chose it, and nothing is
// written: the output directory is a file.
TEST_CASE("e2e: a run directory that cannot be made names its keys", "[e2e]") {
  TempDir tmp;
  const fs::path file = tmp / "runs";
  write_text(file, "not a directory");
  const std::string config = write_config(tmp, tiny_config(file.string()));
  require_one_error_line(run_lmtrain({"train", "--config", config}, tmp),
                         {config + ": run.out_dir and run.name: " + (file / "e2e").string() +
                          ": cannot create the run directory"});
  CHECK(read_text(file) == "not a directory");
}

// A new run into a directory that holds an earlier one is refused, leaving it untouched, unless
// --overwrite asks for the earlier run to be replaced.
TEST_CASE("e2e: a new run never replaces an earlier one unasked", "[e2e]") {
  TrainedRun trained;
  const auto& [tmp, out_dir, config, run, ckpt] = trained;
  const auto before = snapshot(run.run);

  const Result again = run_lmtrain({"train", "--config", config}, tmp);
  require_one_error_line(
      again, {run.run.string(), "holds an earlier run", "--resume", "run.name", "--overwrite"});
  CHECK(snapshot(run.run) == before);
  const Result both = run_lmtrain({"train", "--config", config, "--resume", "--overwrite"}, tmp);
  require_one_error_line(both, {"--resume or --overwrite"});
  CHECK(snapshot(run.run) == before);

  const Result replaced = run_lmtrain(
      {"train", "--config", config, "--overwrite", "--set", "schedule.num_iterations=1"}, tmp);
  REQUIRE(replaced.code == 0);
  CHECK_FALSE(fs::exists(run.ckpt / "step_000002"));  // the earlier run's checkpoint is gone
  CHECK(fs::exists(run.ckpt / "step_000001" / "model.safetensors"));
  const auto records = lines_of(read_text(run.run / "metrics.jsonl"));
  int steps = 0;
  for (const auto& line : records) steps += json::parse(line).contains("train_loss");
  CHECK(steps == 1);                                  // only the new run's step
  CHECK_FALSE(fs::exists(run.run / "replaced_run"));  // gone with the new run's checkpoint
}

// --overwrite keeps the earlier run in replaced_run/ until the new run has a checkpoint: a new
// run killed before its first one loses neither, the next command says where the earlier run
// is, and moved back it resumes.
TEST_CASE("e2e: --overwrite keeps the earlier run until the new run has a checkpoint", "[e2e]") {
  TrainedRun trained;
  const auto& [tmp, out_dir, config, run, ckpt] = trained;
  const fs::path replaced = run.run / "replaced_run";
  Background second;
  run_lmtrain_background({"train", "--config", config, "--overwrite", "--set",
                          "schedule.num_iterations=100000", "--set", "checkpoint.every=100000"},
                         tmp, second);
  // The earlier run's metrics have step 1 too: wait for them to be set aside first.
  REQUIRE(wait_until([&] { return fs::exists(replaced / "metrics.jsonl"); }));
  REQUIRE(wait_for_step(run.metrics, 1));
  REQUIRE(::kill(second.pid, SIGKILL) == 0);
  second.wait();
  CHECK(fs::exists(replaced / "ckpt" / "step_000002" / "model.safetensors"));
  CHECK(fs::exists(replaced / "metrics.jsonl"));
  CHECK_FALSE(fs::exists(run.ckpt));

  const std::string hint = "the run --overwrite replaced is kept in " + replaced.string();
  require_one_error_line(run_lmtrain({"train", "--config", config, "--resume"}, tmp),
                         {"no such checkpoint directory", hint});
  require_one_error_line(run_lmtrain({"train", "--config", config}, tmp),
                         {"holds an earlier run", hint});
  require_one_error_line(run_lmtrain({"sample", "--ckpt", run.run.string()}, tmp),
                         {"not a checkpoint", hint});
  const Result kept =
      run_lmtrain({"sample", "--ckpt", replaced.string(), "--max-tokens", "3"}, tmp);
  INFO(kept.all());
  CHECK(kept.code == 0);

  fs::rename(replaced / "ckpt", run.ckpt);
  fs::rename(replaced / "metrics.jsonl", run.metrics);
  fs::remove_all(replaced);
  const Result resumed = run_lmtrain({"train", "--config", config, "--resume"}, tmp);
  INFO(resumed.all());
  CHECK(resumed.code == 0);
  CHECK(resumed.out.find("resuming from") != std::string::npos);
}

// What a failed replacement can leave besides: no metrics at all (it died in set-up or its
// first step), a set-aside killed halfway, and a replaced_run that is not a directory.
TEST_CASE("e2e: what a failed --overwrite leaves is never taken for nothing", "[e2e]") {
  TrainedRun trained;
  const auto& [tmp, out_dir, config, run, ckpt] = trained;
  const fs::path replaced = run.run / "replaced_run";
  // Died before its first record: an empty metrics file, the earlier run aside. A plain start
  // must not take the directory for empty (its first save would delete the earlier run).
  fs::create_directories(replaced);
  fs::rename(run.ckpt, replaced / "ckpt");
  fs::rename(run.metrics, replaced / "metrics.jsonl");
  write_text(run.metrics, "");
  require_one_error_line(run_lmtrain({"train", "--config", config}, tmp),
                         {"holds an earlier run", "kept in " + replaced.string()});
  CHECK(fs::exists(replaced / "ckpt" / "step_000002"));

  // Killed while setting aside: replaced_run is built under a temporary name; the next run
  // moves its files back, and --resume continues the earlier run.
  fs::remove(run.metrics);
  fs::rename(replaced, run.run / ".replaced_run.tmp");
  const Result resumed = run_lmtrain({"train", "--config", config, "--resume"}, tmp);
  INFO(resumed.all());
  CHECK(resumed.code == 0);
  CHECK(resumed.out.find("moved back the files of a run that --overwrite was setting aside") !=
        std::string::npos);
  CHECK(fs::exists(run.ckpt / "step_000002"));
  CHECK_FALSE(fs::exists(run.run / ".replaced_run.tmp"));

  // A file where replaced_run goes: refused before anything moves.
  write_text(replaced, "not a directory");
  require_one_error_line(run_lmtrain({"train", "--config", config, "--overwrite"}, tmp),
                         {replaced.string(), "found something else"});
  CHECK(fs::exists(run.ckpt / "step_000002"));
  CHECK(fs::exists(run.metrics));
}

// A run writes only inside run.out_dir; the name is checked by train alone, so a checkpoint's
// saved config stays readable by eval and sample whatever its name.
TEST_CASE("e2e: a run name outside run.out_dir is refused", "[e2e]") {
  expect_refused({{"run", {{"name", "../elsewhere"}}}}, {}, {"run.name", "no '..'"});
  expect_refused({{"run", {{"name", "/tmp/abs"}}}}, {}, {"run.name", "relative"});
}

// A run name from --set is any bytes: invalid UTF-8 made the run directory and then failed on
// the config's JSON dump; a newline made a directory whose name split every line showing it.
TEST_CASE("e2e: a run name that is not UTF-8 text or holds control characters is refused",
          "[e2e]") {
  expect_refused({}, {"--set", "run.name=ab\xff"},
                 {"config.json with --set run.name=ab\\xff: run.name: expected UTF-8 text"});
  // C0, DEL, C1 (U+0085), and Unicode's line separator and bidirectional overrides.
  for (const char* name : {"a\nb", "a\x7f",
                           "a\xc2\x85"
                           "b",
                           "a\xe2\x80\xa8"
                           "b",
                           "a\xe2\x80\xae"
                           "b",
                           "a\xe2\x81\xa6"
                           "b"}) {
    CAPTURE(name);
    const std::string set = std::string("run.name=") + name;
    expect_refused({}, {"--set", set},
                   {"config.json with --set " + lmtrain::escape_unprintable(set) +
                    ": run.name: expected a name without control characters"});
  }
  // Other characters outside ASCII are names like any other.
  TempDir tmp;
  const Result r = run_lmtrain(
      {"train", "--config",
       write_config(tmp, tiny_config(tmp / "runs", {{"schedule", {{"num_iterations", 1}}}})),
       "--set", "run.name=\xc3\xa9t\xc3\xa9-\xe2\x80\x94"},
      tmp);
  CHECK(r.code == 0);
  CHECK(fs::exists(fs::path(tmp / "runs") / "\xc3\xa9t\xc3\xa9-\xe2\x80\x94"));
  expect_refused({}, {"--set", "eval.sample_prompt=To be\xe2\x82"},
                 {"config.json with --set eval.sample_prompt=To be\\xe2\\x82: "
                  "eval.sample_prompt: expected UTF-8 text"});
}

// A data path that leads nowhere names the config key that gave it, not only the path.
TEST_CASE("e2e: missing data paths name their config key", "[e2e]") {
  TempDir tmp;
  const std::string missing = tmp / "missing";
  for (const char* key : {"train", "val", "tokenizer"}) {
    expect_refused({{"data", {{key, missing}}}}, {},
                   {fmt::format("config.json: data.{}: {}", key, missing)});
  }
  expect_refused({{"data", {{"tokenizer", tmp.path().string()}}}}, {},
                 {"config.json: data.tokenizer: " + tmp.path().string() + ": is a directory"});
  // A path the system refuses outright (too long) is one line naming the key too.
  expect_refused({{"data", {{"train", "/" + std::string(5000, 'x')}}}}, {},
                 {"config.json: data.train: ", "File name too long"});

  const std::string config = write_config(tmp, tiny_config(tmp / "runs"));
  // From --set, they name the --set.
  require_one_error_line(
      run_lmtrain({"info", "--config", config, "--set", "data.tokenizer=" + missing}, tmp),
      {config + " with --set data.tokenizer=" + missing + ": data.tokenizer: " + missing +
       " does not exist"});
  require_one_error_line(
      run_lmtrain({"info", "--config", config, "--set", "data.tokenizer=" + tmp.path().string()},
                  tmp),
      {config + " with --set data.tokenizer=" + tmp.path().string() +
       ": data.tokenizer: " + tmp.path().string() + ": is a directory"});
  expect_refused({}, {"--set", "data.val=" + missing},
                 {"config.json with --set data.val=" + missing + ": data.val: " + missing});
}

// Checks outside the config's schema (the batch plan, the horizon, the run name, the sample
// prompt's length) name the --set that wrote a key they are about, like the schema's own.
TEST_CASE("e2e: errors about keys a --set wrote name the --set", "[e2e]") {
  expect_refused({}, {"--set", "batch.total_batch_tokens=1000"},
                 {"config.json with --set batch.total_batch_tokens=1000: "
                  "batch.total_batch_tokens: 1000 is not a multiple of device_batch"});
  expect_refused({}, {"--set", "batch.device_batch=3"},
                 {"config.json with --set batch.device_batch=3: batch.total_batch_tokens: "});
  expect_refused({},
                 {"--set", "schedule.target_flops=1e300", "--set", "schedule.num_iterations=-1"},
                 {"config.json with --set schedule.num_iterations=-1: schedule.target_flops: "
                  "the horizon comes to"});
  expect_refused({}, {"--set", "run.name=../x"},
                 {"config.json with --set run.name=../x: run.name: expected a relative name"});
  // A --set of a whole section covers its keys; a --set of a key that cannot cause the error is
  // not named.
  expect_refused({}, {"--set", R"(batch={"device_batch": 3})"},
                 {R"(config.json with --set batch={"device_batch": 3}: batch.total_batch_tokens)"});
  expect_refused({}, {"--set", "schedule.num_iterations=-1", "--set", "run.seed=4"},
                 {"config.json with --set schedule.num_iterations=-1: schedule: set one of"});
  // The file's own values are the file's.
  expect_refused({{"batch", {{"total_batch_tokens", 1000}}}}, {"--set", "run.seed=3"},
                 {"config.json: batch.total_batch_tokens: 1000 is not a multiple"});
}

// A horizon no step counter can hold, and a checkpoint resumed past the run's horizon.
TEST_CASE("e2e: a horizon out of range is refused", "[e2e]") {
  expect_refused({{"schedule", {{"num_iterations", -1}, {"target_flops", 1e300}}}}, {},
                 {"schedule.target_flops", "more than a run can count"});

  TrainedRun trained;
  const auto& [tmp, out_dir, config, run, ckpt] = trained;
  const auto before = snapshot(run.run);
  const Result r = run_lmtrain(
      {"train", "--config", config, "--resume", "--set", "schedule.num_iterations=1"}, tmp);
  require_one_error_line(r, {"meta.json", "step 2 is past this run's horizon of 1 steps"});
  CHECK(snapshot(run.run) == before);
}

// Command-line usage errors are one line too, naming the command whose --help lists the options.
TEST_CASE("e2e: command-line usage errors are one line", "[e2e]") {
  TempDir tmp;
  require_one_error_line(run_lmtrain({"train"}, tmp),
                         {"--config is required", "see lmtrain train --help"});
  require_one_error_line(run_lmtrain({"sample", "--ckpt", "x", "--max-tokens", "abc"}, tmp),
                         {"--max-tokens", "abc", "see lmtrain sample --help"});
  require_one_error_line(run_lmtrain({}, tmp), {"subcommand", "see lmtrain --help"});
  require_one_error_line(run_lmtrain({"trian"}, tmp),
                         {"unknown command 'trian'", "see lmtrain --help"});
  require_one_error_line(run_lmtrain({"launch", "--grace", "-1", "--", "true"}, tmp),
                         {"--grace", "not in range 0.000000 to 1000000000.000000"});
  const Result help = run_lmtrain({"train", "--help"}, tmp);
  CHECK(help.code == 0);
  CHECK(help.out.find("--overwrite") != std::string::npos);
}

// A config file that is no config: a device read without end, nesting that cost memory
// quadratic in its depth, a number beyond a double, a NUL in a value, and a section that --set
// silently replaced.
TEST_CASE("e2e: a config that is no config is refused in one line naming the file", "[e2e]") {
  TempDir tmp;
  require_one_error_line(run_lmtrain({"info", "--config", "/dev/zero"}, tmp),
                         {"/dev/zero", "not a regular file"});
  const std::string deep = tmp / "deep.json";
  write_text(deep, std::string(100000, '[') + std::string(100000, ']'));
  require_one_error_line(run_lmtrain({"train", "--config", deep}, tmp),
                         {deep, "nested deeper than 16 levels"});
  const std::string overflow = tmp / "overflow.json";
  write_text(overflow, R"({"model": {"softcap": 1e999}})");
  require_one_error_line(run_lmtrain({"train", "--config", overflow}, tmp),
                         {overflow, "model.softcap", "1e999"});
  expect_refused({{"run", {{"name", std::string(1, '\0')}}}}, {}, {"run.name", "NUL"});
  expect_refused(json{{"run", 5}}, {"--set", "run.seed=3"},
                 {"config.json", "run: expected an object, got the integer 5"});
}

// Empty paths reached whatever opened them: "error: : no such checkpoint directory".
TEST_CASE("e2e: empty paths are refused naming the key or option", "[e2e]") {
  for (const char* key : {"train", "val", "tokenizer"}) {
    expect_refused({{"data", {{key, ""}}}}, {}, {std::string("data.") + key, "empty"});
  }
  TempDir tmp;
  const std::string config = write_config(tmp, tiny_config(tmp / "runs"));
  require_one_error_line(run_lmtrain({"eval", "--ckpt", "", "--data", data_dir()}, tmp),
                         {"--ckpt", "got ''"});
  require_one_error_line(run_lmtrain({"eval", "--ckpt", "x", "--data", ""}, tmp),
                         {"--data", "got ''"});
  require_one_error_line(run_lmtrain({"sample", "--ckpt", ""}, tmp), {"--ckpt", "got ''"});
  require_one_error_line(run_lmtrain({"train", "--config", ""}, tmp), {"--config", "got ''"});
  require_one_error_line(run_lmtrain({"info", "--config", ""}, tmp), {"--config", "got ''"});
  require_one_error_line(run_lmtrain({"train", "--config", config, "--init-from", ""}, tmp),
                         {"--init-from", "got ''"});
  CHECK_FALSE(fs::exists(tmp / "runs"));
}

// Values that passed validation and failed later: softcap 1e-300 became 0 as a float at step
// 1, depth 16777215 spent 5 GB, run.threads 100000 spun OpenBLAS.
TEST_CASE("e2e: values out of a float's or a machine's range are refused naming the key", "[e2e]") {
  expect_refused({}, {"--set", "model.softcap=1e-300"}, {"model.softcap", "1e-300"});
  expect_refused({{"run", {{"threads", 100000}}}}, {}, {"run.threads", "1024"});
  TempDir tmp;
  const std::string config = lmtrain::test_support::source_path("configs/tiny.json");
  require_one_error_line(
      run_lmtrain({"info", "--config", config, "--set", "model.depth=16777215"}, tmp),
      {"model.depth", "at most 1024"});
  require_one_error_line(run_lmtrain({"info", "--config", config, "--set", "model.depth=1024",
                                      "--set", "model.aspect_ratio=16384"},
                                     tmp),
                         {"2^44", "model.aspect_ratio"});
}

// CLI11 took '' as the default, -1 as "not given" (eval) or 2^64 - 1 (an unsigned seed), and
// saturated 99999999999999999999999; none of these reach a checkpoint.
TEST_CASE("e2e: eval and sample option values are checked as written", "[e2e]") {
  TempDir tmp;
  auto eval = [&](const std::string& option, const std::string& value) {
    return run_lmtrain({"eval", "--ckpt", "x", "--data", "x", option, value}, tmp);
  };
  require_one_error_line(eval("--tokens", "-1"), {"--tokens", "'-1'"});
  require_one_error_line(eval("--batch", "-1"), {"--batch", "'-1'"});
  require_one_error_line(eval("--tokens", "99999999999999999999999"),
                         {"--tokens", "99999999999999999999999"});
  for (const char* option : {"--max-tokens", "--temperature", "--top-k", "--seed"}) {
    require_one_error_line(run_lmtrain({"sample", "--ckpt", "x", option, ""}, tmp),
                           {option, "got ''"});
  }
  for (const char* seed : {"-1", "18446744073709551616"}) {
    require_one_error_line(run_lmtrain({"sample", "--ckpt", "x", "--seed", seed}, tmp),
                           {"--seed", seed});
  }
}

// A million ranks forked for minutes before the launcher ran out of files; when starting ranks
// fails midway, those started are stopped at once.
TEST_CASE("e2e: launch refuses absurd rank counts and stops the ranks it started", "[e2e]") {
  TempDir tmp;
  require_one_error_line(run_lmtrain({"launch", "--nproc-per-node", "1000000", "--", "true"}, tmp),
                         {"--nproc-per-node", "1 to 1024"});
  require_one_error_line(
      run_lmtrain({"launch", "--nproc-per-node", "1", "--nnodes", "1000000", "--", "true"}, tmp),
      {"--nnodes", "1000000"});
  // 64 open files hold about 28 ranks' pipes; the started ranks would sleep 30 s.
  const auto start = std::chrono::steady_clock::now();
  const Result r =
      run_lmtrain({"launch", "--nproc-per-node", "40", "--", "sleep", "30"}, tmp, "ulimit -n 64;");
  require_one_error_line(r, {"Too many open files", "ulimit -n", "--nproc-per-node"});
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(10));
}
