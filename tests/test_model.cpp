// Model-level properties that the PyTorch goldens do not cover: the real initialisation, the
// parameter table and FLOPs against the reference's numbers, KV-cache generation against the full
// forward pass, and the packed q/k/v projection of models without GQA against finite differences.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <fstream>
#include <numeric>
#include <random>

#include "backend/cpu/cpu_backend.h"
#include "model/generator.h"
#include "model/gpt.h"
#include "test_support.h"

using namespace lmtrain;

TEST_CASE("initialisation follows the reference distributions and parameter table", "[model]") {
  std::ifstream in(test_support::source_path("tests/golden/gpt_tiny_init.json"));
  const auto golden = nlohmann::json::parse(in);
  const Config config = parse_config({{"model", golden["model"]}}, "gpt_tiny_init.json");
  const GptShape shape = GptShape::from(config.model, config.model.vocab_size);
  CHECK(shape.flops_per_token() == Approx(golden["flops_per_token"].get<double>()));
  CHECK(shape.windows == golden["derived"]["windows"].get<std::vector<int>>());

  CpuBackend backend;
  Gpt model(backend, shape, 1);
  model.init_weights(1234);
  CHECK(model.table().specs.size() == golden["params"].size());
  for (const auto& spec : model.table().specs) {
    INFO(spec.name);
    REQUIRE(golden["params"].contains(spec.name));
    const auto& want = golden["params"][spec.name];
    CHECK(
        std::vector<int64_t>(spec.shape.dims.begin(), spec.shape.dims.begin() + spec.shape.rank) ==
        want["shape"].get<std::vector<int64_t>>());
    auto values = test_support::download(backend, model.param(spec));
    double sum = 0, sum_sq = 0, lo = INFINITY, hi = -INFINITY;
    for (float v : values)
      sum += v, sum_sq += double(v) * v, lo = std::min<double>(lo, v), hi = std::max<double>(hi, v);
    const double n = double(values.size()), mean = sum / n,
                 std = std::sqrt(sum_sq / n - mean * mean);
    const auto& e = want["expected"];
    const std::string dist = e["dist"];
    if (dist == "constant") {
      CHECK(lo == Approx(e["value"].get<double>()));
      CHECK(hi == Approx(e["value"].get<double>()));
      continue;
    }
    const double want_std = e["std"];
    CHECK(std::abs(mean - e["mean"].get<double>()) < 5 * want_std / std::sqrt(n));
    CHECK(std == Approx(want_std).epsilon(0.03));
    if (dist == "uniform") {
      CHECK(lo >= e["low"].get<double>());
      CHECK(hi <= e["high"].get<double>());
    }
  }
}

TEST_CASE(
    "KV-cache generation equals greedy decoding and stops at the stop token or the sequence end",
    "[model]") {
  const Config c = test_support::golden_config();
  const GptShape shape = GptShape::from(c.model, c.model.vocab_size);
  CpuBackend backend;
  Gpt model(backend, shape, 1);
  model.init_weights(7);
  // Real init starts the blocks as identities (zero projections); perturb every weight so the
  // attention, windows and value embeddings all shape the logits.
  auto params = test_support::download(backend, model.params());
  Rng rng(99);
  for (float& p : params) p += float(0.05 * rng.normal());
  backend.upload(model.params(), params.data());
  model.refresh_weights();

  const std::vector<int32_t> prompt = {3, 17, 42};
  const int new_tokens = shape.seq_len - int(prompt.size());
  Generator generator(model);
  const Generation cached = generator.generate(prompt, {new_tokens, 0.0, 0, 1});
  REQUIRE(int(cached.tokens.size()) == new_tokens);
  CHECK(cached.end == Generation::End::max_tokens);

  // Reference: run the whole sequence each time and take the argmax at the last real position.
  std::vector<int32_t> sequence = prompt;
  const int T = shape.seq_len, Vp = shape.padded_vocab;
  for (int i = 0; i < new_tokens; ++i) {
    std::vector<int32_t> tokens(T, 0), targets(T, -1);
    std::copy(sequence.begin(), sequence.end(), tokens.begin());
    model.forward(tokens, targets, false);
    const auto logits = test_support::logits(model);
    const float* row = logits.data() + size_t(sequence.size() - 1) * Vp;
    sequence.push_back(int32_t(std::max_element(row, row + shape.vocab) - row));
  }
  CHECK(std::vector<int32_t>(sequence.begin() + prompt.size(), sequence.end()) == cached.tokens);

  // Asked for more than the sequence holds, it stops with one token more: the one predicted
  // after the last position, which is never run.
  const Generation full = generator.generate(prompt, {T, 0.0, 0, 1});
  CHECK(full.end == Generation::End::sequence_len);
  REQUIRE(int(full.tokens.size()) == new_tokens + 1);
  CHECK(std::equal(cached.tokens.begin(), cached.tokens.end(), full.tokens.begin()));

  // Asked for exactly what the sequence holds, it ends at max_tokens.
  const Generation exact = generator.generate(prompt, {new_tokens + 1, 0.0, 0, 1});
  CHECK(exact.end == Generation::End::max_tokens);
  CHECK(exact.tokens == full.tokens);
  const Generation none = generator.generate(prompt, {0, 0.0, 0, 1});
  CHECK(none.tokens.empty());
  CHECK(none.end == Generation::End::max_tokens);

  // The stop token ends the generation and is not returned, also as the first pick.
  for (size_t at : {size_t(0), size_t(2)}) {
    const int32_t stop = cached.tokens[at];
    const auto first_stop = std::find(cached.tokens.begin(), cached.tokens.end(), stop);
    const Generation stopped = generator.generate(prompt, {new_tokens, 0.0, 0, 1}, stop);
    CHECK(stopped.end == Generation::End::stop_token);
    CHECK(stopped.tokens == std::vector<int32_t>(cached.tokens.begin(), first_stop));
  }
}

TEST_CASE("a batch whose activations do not fit is refused before allocating", "[model]") {
  // A CPU backend that reports a small device, as a GPU with little free memory would.
  struct SmallDevice : CpuBackend {
    size_t free_bytes() const override { return 8 << 20; }
  } backend;
  const Config c = test_support::golden_config();
  const GptShape shape = GptShape::from(c.model, c.model.vocab_size);
  CHECK_NOTHROW(Gpt(backend, shape, 2));
  CHECK_THROWS_WITH(Gpt(backend, shape, 4096),
                    Catch::Contains("out of memory: batch.device_batch 4096") &&
                        Catch::Contains("lower batch.device_batch"));
}

TEST_CASE("every tensor and stack of the parameter table starts on an aligned boundary",
          "[model]") {
  // Depth 26's lambdas (52 floats) used to leave lm_head's bf16 copy 8-byte aligned.
  for (int depth : {1, 2, 3, 5, 6, 12, 20, 26, 32}) {
    ModelConfig m;
    m.depth = depth, m.aspect_ratio = 32, m.head_dim = 32, m.sequence_len = 64, m.n_kv_head = 1;
    const ParamTable table(GptShape::from(m, 1000));
    INFO("depth " << depth);
    std::vector<std::pair<size_t, size_t>> ranges;
    size_t numel = 0;
    for (const auto& spec : table.specs) {
      INFO(spec.name);
      if (spec.group != ParamGroup::matrix) CHECK(spec.offset % kParamAlignment == 0);
      ranges.emplace_back(spec.offset, spec.offset + size_t(spec.shape.numel()));
      numel += size_t(spec.shape.numel());
    }
    for (const auto& stack : table.stacks) {
      CHECK(stack.offset % kParamAlignment == 0);
      size_t next = stack.offset;  // members back to back, as the optimizer views them
      for (size_t i : stack.members) {
        CHECK(table.specs[i].offset == next);
        next += size_t(table.specs[i].shape.numel());
      }
    }
    std::sort(ranges.begin(), ranges.end());
    for (size_t i = 1; i < ranges.size(); ++i) CHECK(ranges[i - 1].second <= ranges[i].first);
    CHECK(ranges.back().second <= table.total);
    CHECK(table.total % kParamAlignment == 0);
    CHECK(count_params(table).total == numel);  // the gaps are not parameters
  }
}

// The count a config is bounded by, taken before the table is built, is the table's count.
TEST_CASE("the arithmetic parameter count matches the table and bounds the model", "[model]") {
  for (int depth : {1, 2, 3, 6}) {
    for (int n_kv_head : {0, 1}) {
      ModelConfig m;
      m.depth = depth, m.aspect_ratio = 64, m.head_dim = 32, m.n_kv_head = n_kv_head;
      const GptShape shape = GptShape::from(m, 1000);
      INFO("depth " << depth << ", n_kv_head " << n_kv_head);
      CHECK(shape.param_count() == double(count_params(ParamTable(shape)).total));
    }
  }
  // Depth 1024 at width 2^24 was 3.5e18 parameters: refused before any table or vector.
  ModelConfig huge;
  huge.depth = 1024, huge.aspect_ratio = 16384;
  CHECK_THROWS_WITH(GptShape::from(huge, 8192),
                    Catch::Contains("are more than 2^44") && Catch::Contains("model.depth"));
  // Large but sensible: 400 layers of width 16448 with a vocabulary of a million.
  ModelConfig large;
  large.depth = 400, large.aspect_ratio = 41, large.head_dim = 64;
  CHECK_NOTHROW(GptShape::from(large, 1000000));
}

// Without GQA, c_q, c_k and c_v lie back to back and the model runs them as one packed matmul
// (the golden config has GQA, whose three matmuls write bands of the same packed buffer). Its
// gradients, and those of the value gate reading v inside it, against central differences of
// the loss, with every weight random (the zero-initialised output projections would leave the
// attention without gradients).
TEST_CASE("the packed q/k/v projection's gradients match finite differences", "[model]") {
  ModelConfig m;
  m.depth = 2, m.aspect_ratio = 32, m.head_dim = 16, m.n_kv_head = 0, m.sequence_len = 16;
  m.window_pattern = "SL";
  const GptShape shape = GptShape::from(m, 64);
  CpuBackend backend;
  Gpt model(backend, shape, 2);
  REQUIRE(shape.n_kv_head == shape.n_head);
  model.init_weights(5);
  std::mt19937 rng(11);
  std::normal_distribution<float> noise(0.f, 0.1f);
  auto params = test_support::download(backend, model.params());
  for (float& p : params) p += noise(rng);
  backend.upload(model.params(), params.data());
  model.refresh_weights();
  std::uniform_int_distribution<int32_t> id(0, 63);
  std::vector<int32_t> tokens(32), targets(32);
  for (auto* v : {&tokens, &targets})
    for (int32_t& t : *v) t = id(rng);

  model.zero_grads();
  model.forward(tokens, targets, /*need_grad=*/true);
  model.backward();
  const auto grads = test_support::download(backend, model.grads());
  auto mean_loss = [&] {
    const Gpt::Loss l = model.forward(tokens, targets, /*need_grad=*/false);
    return l.sum / double(l.count);
  };
  for (int layer = 0; layer < shape.depth; ++layer) {
    for (const char* name : {"c_q", "c_k", "c_v", "ve_gate"}) {
      const std::string full =
          "transformer.h." + std::to_string(layer) + ".attn." + name + ".weight";
      if (std::string(name) == "ve_gate" && !shape.value_embed[layer]) continue;
      const ParamSpec& spec = model.table().find(full);
      INFO(full);
      // The three largest gradients of the matrix, where the differences are least noisy.
      std::vector<size_t> order(size_t(spec.shape.numel()));
      std::iota(order.begin(), order.end(), spec.offset);
      std::partial_sort(order.begin(), order.begin() + 3, order.end(), [&](size_t a, size_t b) {
        return std::abs(grads[a]) > std::abs(grads[b]);
      });
      const double largest = std::abs(grads[order[0]]);
      REQUIRE(largest > 1e-4);
      for (size_t k = 0; k < 3; ++k) {
        const size_t at = order[k];
        const float eps = 1e-2f, kept = params[at];
        auto loss_with = [&](float value) {
          params[at] = value;
          backend.upload(model.params(), params.data());
          model.refresh_weights();
          return mean_loss();
        };
        const double fd = (loss_with(kept + eps) - loss_with(kept - eps)) / (2.0 * eps);
        loss_with(kept);
        CHECK(std::abs(fd - grads[at]) < 0.03 * largest);
      }
    }
  }
}
