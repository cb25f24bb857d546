// The op profile (run.profile_steps): TimedBackend forwards every op unchanged and files its
// time, FLOPs or bytes under the right label; a profiled run writes op_profile.json with the
// calls the model makes, trains to bit-identical losses, and reports a window cut short.
#include "backend/cpu/cpu_backend.h"
#include "backend/timed_backend.h"
#include "e2e_support.h"
#include "model/gpt_shape.h"

using namespace lmtrain;
using namespace lmtrain::e2e;

namespace {

const OpStats* find_op(const OpProfile& p, const std::string& phase, const std::string& op) {
  for (const auto& s : p.ops)
    if (s.phase == phase && s.op == op) return &s;
  return nullptr;
}

// Calls per step of `op` in `phase`, summed over its keys.
double calls(const json& report, const std::string& phase, const std::string& op) {
  double n = 0;
  for (const auto& o : report["ops"])
    if (o["phase"] == phase && o["op"] == op) n += o["calls_per_step"].get<double>();
  return n;
}

std::string config_error(const json& run) {
  try {
    parse_config({{"run", run}}, "cfg.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("TimedBackend forwards ops unchanged and times them under their labels", "[profile]") {
  CpuBackend cpu;
  TimedBackend timed(cpu);
  const Buffer memory = timed.allocate(64 * sizeof(float));
  // Buffers come from the wrapped backend; the decorator reports its counts.
  CHECK(cpu.bytes_in_use() == 64 * sizeof(float));
  CHECK(timed.bytes_in_use() == cpu.bytes_in_use());
  CHECK(timed.peak_bytes() == cpu.peak_bytes());
  CHECK(timed.name() == "cpu");

  const Tensor a = memory.tensor({3, 4}, DType::f32), b = memory.tensor({5, 4}, DType::f32, 48);
  const Tensor out = memory.tensor({3, 5}, DType::f32, 128);
  const Tensor sums = memory.tensor({2}, DType::f32, 192);
  std::vector<float> values(32);
  for (size_t i = 0; i < values.size(); ++i) values[i] = 0.25f * float(i) - 3.f;
  cpu.upload(memory.tensor({32}, DType::f32), values.data());
  cpu.matmul(out, a, b, false, true, false);
  const auto expected = test_support::download(cpu, out);

  timed.fill(out, 0.f);
  timed.matmul(out, a, b, false, true, false);  // not timing: nothing is recorded
  CHECK(timed.profile().ops.empty());
  CHECK(test_support::download(cpu, out) == expected);

  timed.begin_step(7);
  timed.set_phase("forward");
  timed.fill(out, 0.f);
  timed.matmul(out, a, b, false, true, false);
  timed.sum_squares(sums.slice(0, 1), out);
  timed.set_phase("backward");
  timed.matmul(out, a, b, false, true, false);
  timed.matmul(out, a, b, false, true, false);
  timed.end_step(123.0);
  CHECK(test_support::download(cpu, out) == expected);
  cpu.sum_squares(sums.slice(1, 1), out);
  const auto squares = test_support::download(cpu, sums);
  CHECK(squares[0] == squares[1]);

  const OpProfile& p = timed.profile();
  REQUIRE(p.steps.size() == 1);
  CHECK(p.steps[0].step == 7);
  CHECK(p.steps[0].wall_ms == 123.0);
  REQUIRE(p.ops.size() == 4);  // forward fill, matmul, sum_squares; backward matmul
  const OpStats* fwd = find_op(p, "forward", "matmul");
  const OpStats* bwd = find_op(p, "backward", "matmul");
  REQUIRE(fwd != nullptr);
  REQUIRE(bwd != nullptr);
  CHECK(fwd->key == "3x5x4 NT f32");
  CHECK(fwd->calls == 1);
  CHECK(bwd->calls == 2);
  CHECK(fwd->flops == 2.0 * 3 * 5 * 4);
  CHECK(bwd->flops == 2 * fwd->flops);
  CHECK(fwd->bytes == 0);
  const OpStats* fill = find_op(p, "forward", "fill");
  REQUIRE(fill != nullptr);
  CHECK(fill->key.empty());
  CHECK(fill->bytes == double(out.bytes()));
  CHECK(fill->flops == 0);
  double sum = 0;
  for (const auto& s : p.ops) {
    CHECK(s.ms >= 0);
    sum += s.ms;
  }
  CHECK(p.steps[0].op_ms == Approx(sum));

  // Attention is keyed by its shape and window; FLOPs as GptShape::flops_per_token counts them.
  const Buffer attn = timed.allocate(256 * sizeof(float));
  const Tensor q = attn.tensor({1, 4, 2, 2}, DType::f32), k = attn.tensor({1, 4, 2, 2}, DType::f32);
  const Tensor y = attn.tensor({1, 4, 2, 2}, DType::f32, 64);
  const Tensor lse = attn.tensor({1, 2, 4}, DType::f32, 128);
  timed.begin_step(8);
  timed.attention_forward(y, lse, q, k, k, 2, 0);
  timed.end_step(1.0);
  const OpStats* fa = find_op(timed.profile(), "other", "attention_forward");
  REQUIRE(fa != nullptr);
  CHECK(fa->key == "B1 T4 H2 D2 window 2");
  CHECK(fa->flops == 4.0 * 1 * 4 * 2 * 2 * 2);
  CHECK(timed.profile().steps.size() == 2);
}

// A backend that does not fuse the MLP's matmul with its activation (the CPU) shows the two
// ops apart in a profile, as they run; the result is the wrapped backend's.
TEST_CASE("TimedBackend times an unfused matmul + relu2 as its two ops", "[profile]") {
  CpuBackend cpu;
  TimedBackend timed(cpu);
  REQUIRE_FALSE(timed.fuses_matmul_relu2());
  const Buffer memory = timed.allocate(96 * sizeof(float));
  // Byte offsets: x, w, out, want.
  const Tensor x = memory.tensor({3, 4}, DType::f32), w = memory.tensor({5, 4}, DType::f32, 48);
  const Tensor out = memory.tensor({3, 5}, DType::f32, 128);
  const Tensor want = memory.tensor({3, 5}, DType::f32, 192);
  std::vector<float> values(32);
  for (size_t i = 0; i < values.size(); ++i) values[i] = 0.25f * float(i) - 3.f;
  cpu.upload(memory.tensor({32}, DType::f32), values.data());
  cpu.matmul_relu2_forward(want, x, w);
  timed.begin_step(1);
  timed.set_phase("forward");
  timed.matmul_relu2_forward(out, x, w);
  timed.end_step(1.0);
  CHECK(test_support::download(cpu, out) == test_support::download(cpu, want));
  const OpProfile& p = timed.profile();
  CHECK(p.ops.size() == 2);
  REQUIRE(find_op(p, "forward", "matmul") != nullptr);
  CHECK(find_op(p, "forward", "matmul")->key == "3x5x4 NT f32");
  CHECK(find_op(p, "forward", "relu2_forward") != nullptr);
  CHECK(find_op(p, "forward", "matmul_relu2_forward") == nullptr);
}

TEST_CASE("CPU timing events measure host time and reject misuse", "[profile]") {
  CpuBackend cpu;
  Backend::TimingEvent start = cpu.make_timing_event(), end = cpu.make_timing_event();
  CHECK_THROWS_WITH(cpu.elapsed_ms(start, end), Catch::Contains("never recorded"));
  cpu.record_timing_event(start);
  std::this_thread::sleep_for(std::chrono::milliseconds(5));
  cpu.record_timing_event(end);
  CHECK(cpu.elapsed_ms(start, end) >= 5.0);
  Backend::TimingEvent none;
  CHECK_THROWS_WITH(cpu.record_timing_event(none), Catch::Contains("not a timing event"));
}

TEST_CASE("run.profile_steps and run.profile_start reject bad values", "[profile][config]") {
  CHECK(config_error({{"profile_steps", -1}}) ==
        "cfg.json: run.profile_steps: expected an integer >= 0 (0: off)");
  CHECK(config_error({{"profile_steps", "two"}}) ==
        "cfg.json: run.profile_steps: expected an integer, got the string \"two\"");
  CHECK(config_error({{"profile_start", 0}}) ==
        "cfg.json: run.profile_start: expected an integer >= 1");
  CHECK(config_error({{"profile_start", 1.5}}) ==
        "cfg.json: run.profile_start: expected an integer, got the number 1.5");
  CHECK(config_error({{"profile_step", 2}}) ==
        "cfg.json: unknown key 'run.profile_step' (did you mean 'run.profile_steps'?)");
  CHECK(config_error({{"profile_steps", 3}, {"profile_start", 1}}).empty());

  TempDir tmp;
  const std::string config = write_config(tmp, tiny_config(tmp / "runs"));
  const Result r = run_lmtrain({"train", "--config", config, "--set", "run.profile_steps=-1"}, tmp);
  require_one_error_line(r, {"run.profile_steps", "expected an integer >= 0"});
  CHECK_FALSE(fs::exists(tmp / "runs"));
}

// Two micro-steps per step, steps 2 and 3 profiled: every op the model and the optimizers run
// is there with the calls it makes per step, the op time fits in the step's wall time, and the
// losses are those of the same run unprofiled, bit for bit.
TEST_CASE("e2e: a profiled run writes op_profile.json and trains to the same losses",
          "[e2e][profile]") {
  TempDir tmp;
  const json patch = {{"schedule", {{"num_iterations", 4}}},
                      {"batch", {{"total_batch_tokens", 256}}}};  // 2 micro-steps of 4 x 32
  auto train = [&](const std::string& name, std::vector<std::string> sets) {
    const std::string config = write_config(tmp, tiny_config(tmp / name, patch));
    std::vector<std::string> args = {"train", "--config", config};
    for (const auto& s : sets) args.insert(args.end(), {"--set", s});
    const Result r = run_lmtrain(args, tmp);
    INFO(r.all());
    REQUIRE(r.code == 0);
    return r;
  };
  const Result profiled = train("profiled", {"run.profile_steps=2"});
  train("plain", {});
  const RunPaths run(tmp / "profiled", "e2e");
  CHECK_FALSE(fs::exists(RunPaths(tmp / "plain", "e2e").run / "op_profile.json"));

  std::vector<double> losses[2], step_ms;
  for (int i = 0; i < 2; ++i) {
    for (const auto& rec :
         read_metrics(RunPaths(tmp / (i ? "plain" : "profiled"), "e2e").metrics)) {
      if (!rec.contains("train_loss")) continue;
      losses[i].push_back(rec["train_loss"].get<double>());
      if (i == 0) step_ms.push_back(rec["step_ms"].get<double>());
    }
  }
  REQUIRE(losses[0].size() == 4);
  CHECK(losses[0] == losses[1]);

  REQUIRE(fs::exists(run.run / "op_profile.json"));
  const json report = json::parse(read_text(run.run / "op_profile.json"));
  INFO(report.dump(1));
  CHECK(report["backend"] == "cpu");
  CHECK(report["profiled_steps"] == 2);
  CHECK(report["complete"] == true);
  REQUIRE(report["steps"].size() == 2);
  for (int i = 0; i < 2; ++i) {
    const json& s = report["steps"][i];
    CHECK(s["step"] == i + 2);
    CHECK(s["wall_ms"].get<double>() == Approx(step_ms.at(size_t(i) + 1)));
    CHECK(s["op_ms"].get<double>() > 0);
    CHECK(s["op_ms"].get<double>() <= s["wall_ms"].get<double>());
  }
  CHECK(report["op_ms"].get<double>() > 0);
  CHECK(report["op_ms"].get<double>() <= report["step_wall_ms"].get<double>());

  // The calls the model makes: depth 2, 2 micro-steps, one forward and one backward each.
  ModelConfig m;
  m.depth = 2, m.aspect_ratio = 32, m.head_dim = 32, m.sequence_len = 32;
  const ParamTable table(GptShape::from(m, 8192));
  double adamw = 0, matrices = 0;
  for (const auto& spec : table.specs) (spec.group == ParamGroup::matrix ? matrices : adamw) += 1;
  CHECK(calls(report, "forward", "attention_forward") == 4);
  CHECK(calls(report, "backward", "attention_backward") == 4);
  CHECK(calls(report, "forward", "attention_backward") == 0);
  CHECK(calls(report, "forward", "softcap_cross_entropy") > 0);
  CHECK(calls(report, "zero_grads", "fill") == 1);
  CHECK(calls(report, "optimizer", "adamw_update") == adamw);
  CHECK(calls(report, "optimizer", "muon_momentum") == double(table.stacks.size()));
  // One update per stack, or per matrix where multipliers differ.
  CHECK(calls(report, "optimizer", "muon_apply") >= double(table.stacks.size()));
  CHECK(calls(report, "optimizer", "muon_apply") <= matrices);
  CHECK(calls(report, "optimizer", "normuon_second_moment") == double(table.stacks.size()));
  // c_q, c_k and c_v as one matmul: (128 tokens x 64) @ (192 x 64)^T in each block and
  // micro-step.
  bool found_qkv = false;
  double percent = 0;
  for (const auto& o : report["ops"]) {
    percent += o["percent"].get<double>();
    if (o["phase"] == "forward" && o["op"] == "matmul" && o["key"] == "128x192x64 NT f32") {
      found_qkv = true;
      CHECK(o["calls_per_step"] == 4.0);
      CHECK(o["flops_per_step"] == 4.0 * 2 * 128 * 192 * 64);
      CHECK(o["tflop_per_s"].is_number());
      CHECK(o["gb_per_s"].is_null());
    }
    if (o["op"] == "adamw_update") CHECK(o["gb_per_s"].is_number());
  }
  CHECK(found_qkv);
  CHECK(percent == Approx(100));
  std::vector<std::string> phases;
  for (const auto& p : report["phases"]) phases.push_back(p["phase"]);
  CHECK(phases == std::vector<std::string>{"zero_grads", "forward", "backward", "optimizer"});
  CHECK(profiled.out.find("op profile of steps 2-3 on cpu (2 steps)") != std::string::npos);
  CHECK(profiled.out.find("attention_backward") != std::string::npos);
}

TEST_CASE("e2e: a run that ends inside the profile window writes what it profiled",
          "[e2e][profile]") {
  TempDir tmp;
  const std::string config =
      write_config(tmp, tiny_config(tmp / "runs", {{"schedule", {{"num_iterations", 3}}}}));
  const Result r = run_lmtrain(
      {"train", "--config", config, "--set", "run.profile_start=3", "--set", "run.profile_steps=5"},
      tmp);
  INFO(r.all());
  REQUIRE(r.code == 0);
  const json report = json::parse(read_text(RunPaths(tmp / "runs", "e2e").run / "op_profile.json"));
  CHECK(report["complete"] == false);
  CHECK(report["profiled_steps"] == 1);
  CHECK(report["window"] == json{{"start", 3}, {"steps", 5}});
  CHECK(report["steps"][0]["step"] == 3);
  CHECK(r.out.find("the run ended after 1 of the 5 profiled steps") != std::string::npos);
}
