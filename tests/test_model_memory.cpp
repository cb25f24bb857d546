// The model's memory options change memory and nothing else: the chunked lm_head and loss give
// the losses and gradients of a single chunk, and recomputed activations give bit-identical
// losses and gradients (also over accumulated micro-steps) in less memory.
#include <catch2/catch.hpp>

#include "backend/cpu/cpu_backend.h"
#include "core/rng.h"
#include "model/gpt.h"
#include "test_support.h"

using namespace lmtrain;

namespace {

// The golden tiny model (GQA, sliding windows, value embeddings on alternate layers) at `depth`.
GptShape test_shape(int depth) {
  const Config c = load_config(test_support::source_path("tests/golden/gpt_tiny.json"),
                               {"model.depth=" + std::to_string(depth)});
  return GptShape::from(c.model, c.model.vocab_size);
}

// nanochat's initialisation starts every block as the identity (zero output projections and
// gates); noise on every weight makes every activation and gradient count.
void random_weights(Gpt& model, uint64_t seed) {
  model.init_weights(seed);
  auto params = test_support::download(model.backend(), model.params());
  Rng rng(seed + 1);
  for (float& p : params) p += float(0.05 * rng.normal());
  model.backend().upload(model.params(), params.data());
  model.refresh_weights();
}

// Random tokens and targets for one micro-batch, about one target in seven ignored.
struct Batch {
  std::vector<int32_t> tokens, targets;
};
Batch random_batch(const GptShape& shape, int batch, uint64_t seed) {
  Rng rng(seed);
  Batch b;
  for (int64_t i = 0; i < int64_t(batch) * shape.seq_len; ++i) {
    b.tokens.push_back(int32_t(rng.next() % uint64_t(shape.vocab)));
    const int32_t target = int32_t(rng.next() % uint64_t(shape.vocab));
    b.targets.push_back(rng.uniform() < 1.0 / 7 ? -1 : target);
  }
  return b;
}

// What one optimizer step sees: the loss and per-token losses of each micro-step, the final
// gradients, and the order in which backward() reported gradients ready.
struct StepResult {
  std::vector<double> loss_sums;
  std::vector<std::vector<float>> token_losses;
  std::vector<float> grads;
  std::vector<int> ready;
};

StepResult run_step(const GptShape& shape, int batch, const GptOptions& options,
                    const std::vector<Batch>& micro_batches) {
  CpuBackend backend;
  Gpt model(backend, shape, batch, options);
  random_weights(model, 42);
  StepResult r;
  model.zero_grads();
  for (const Batch& b : micro_batches) {
    const Gpt::Loss loss = model.forward(b.tokens, b.targets, true, 1.f / micro_batches.size());
    r.loss_sums.push_back(loss.sum);
    r.token_losses.push_back(test_support::download(backend, model.token_losses()));
    model.backward([&](int layer) { r.ready.push_back(layer); });
  }
  r.grads = test_support::download(backend, model.grads());
  return r;
}

// Peak bytes of a backend that holds one model through a training step.
size_t peak_bytes(const GptShape& shape, int batch, const GptOptions& options) {
  CpuBackend backend;
  Gpt model(backend, shape, batch, options);
  random_weights(model, 1);
  const Batch b = random_batch(shape, batch, 2);
  model.zero_grads();
  model.forward(b.tokens, b.targets, true);
  model.backward();
  return backend.peak_bytes();
}

}  // namespace

TEST_CASE("the chunked lm_head and loss match a single chunk", "[model]") {
  const GptShape shape = test_shape(3);
  const int batch = 2;
  const int64_t N = int64_t(batch) * shape.seq_len;
  const std::vector<Batch> micro = {random_batch(shape, batch, 7)};
  const StepResult whole = run_step(shape, batch, {.loss_chunk_rows = N}, micro);
  // 5 rows leave a partial last chunk; 16 divide the batch.
  const int64_t rows = GENERATE(5, 16);
  INFO("chunk rows " << rows);
  const StepResult chunked = run_step(shape, batch, {.loss_chunk_rows = rows}, micro);
  // Rows are independent: each loss is the same row's arithmetic. lm_head's gradient adds the
  // chunks' partial products in another order: fp32 rounding, carried into every gradient.
  CHECK(chunked.loss_sums[0] == Approx(whole.loss_sums[0]).epsilon(1e-6));
  CHECK(test_support::max_relative_error(chunked.token_losses[0], whole.token_losses[0]) < 1e-6);
  for (const auto& spec : ParamTable(shape).specs) {
    INFO(spec.name);
    auto part = [&](const std::vector<float>& g) {
      return std::vector<float>(g.begin() + spec.offset,
                                g.begin() + spec.offset + spec.shape.numel());
    };
    CHECK(test_support::max_relative_error(part(chunked.grads), part(whole.grads)) < 1e-5);
  }
}

TEST_CASE("recomputed activations give bit-identical losses and gradients", "[model]") {
  const GptShape shape = test_shape(4);
  const int batch = 2;
  // Two accumulated micro-steps; with a multi-chunk loss as well.
  const std::vector<Batch> micro = {random_batch(shape, batch, 11), random_batch(shape, batch, 12)};
  const int64_t rows = GENERATE(0, 7);
  INFO("loss_chunk_rows " << rows);
  const StepResult kept = run_step(shape, batch, {.loss_chunk_rows = rows}, micro);
  const StepResult recomputed =
      run_step(shape, batch, {.recompute_activations = true, .loss_chunk_rows = rows}, micro);
  CHECK(recomputed.loss_sums == kept.loss_sums);
  CHECK(recomputed.token_losses == kept.token_losses);
  CHECK(recomputed.grads == kept.grads);
  // backward() reports each block as its gradients become final, then the rest, per micro-step.
  const std::vector<int> order = {3, 2, 1, 0, -1, 3, 2, 1, 0, -1};
  CHECK(kept.ready == order);
  CHECK(recomputed.ready == order);
}

TEST_CASE("recomputed activations need less memory", "[model]") {
  const GptShape shape = test_shape(6);
  const int batch = 2;
  const size_t kept = Gpt::activation_bytes(shape, batch, DType::f32);
  const size_t recomputed =
      Gpt::activation_bytes(shape, batch, DType::f32, {.recompute_activations = true});
  INFO("activations: " << kept << " bytes kept, " << recomputed << " recomputed");
  // One block's activations instead of six (the rest is the blocks' outputs, the embedding,
  // the loss and the backward's scratch).
  CHECK(recomputed < kept * 6 / 10);
  // Through a training step the peak falls by exactly that difference.
  CHECK(peak_bytes(shape, batch, {}) - peak_bytes(shape, batch, {.recompute_activations = true}) ==
        kept - recomputed);

  // The constructor allocates exactly the planned activations besides parameters and gradients.
  CpuBackend backend;
  const size_t before = backend.bytes_in_use();
  Gpt model(backend, shape, batch, {.recompute_activations = true});
  CHECK(backend.bytes_in_use() - before == 2 * model.table().total * sizeof(float) + recomputed);
}

TEST_CASE("the loss holds one chunk of logits, not a batch of them", "[model]") {
  // nanochat's d12 in bf16 at batch 64 x 2048: the full logits would be 8 GiB.
  ModelConfig d12;  // the defaults are nanochat's: aspect ratio 64, head_dim 128, T 2048
  d12.depth = 12;
  const GptShape shape = GptShape::from(d12, 32768);
  const int batch = 64;
  const int64_t N = int64_t(batch) * shape.seq_len, row_bytes = int64_t(shape.padded_vocab) * 2;
  const int64_t chunk = int64_t(Gpt::kLossChunkBytes) / row_bytes;
  CHECK(chunk == 4096);
  const size_t chunked = Gpt::activation_bytes(shape, batch, DType::bf16);
  const size_t full = Gpt::activation_bytes(shape, batch, DType::bf16, {.loss_chunk_rows = N});
  CHECK(full - chunked == size_t((N - chunk) * row_bytes));
}

TEST_CASE("a model that does not fit names recompute_activations as a remedy", "[model]") {
  struct SmallDevice : CpuBackend {
    size_t free_bytes() const override { return 8 << 20; }
  } backend;
  const GptShape shape = test_shape(4);
  CHECK_THROWS_WITH(Gpt(backend, shape, 512),
                    Catch::Contains("lower batch.device_batch") &&
                        Catch::Contains("or set run.recompute_activations=true"));
  CHECK_THROWS_WITH(Gpt(backend, shape, 512, {.recompute_activations = true}),
                    !Catch::Contains("run.recompute_activations"));
}

TEST_CASE("the attention's scratch counts towards what a model needs", "[model]") {
  // A device whose activations fit, and whose attention asks for 64 MiB per batch row.
  struct WorkspaceDevice : CpuBackend {
    size_t free_bytes() const override { return size_t(256) << 20; }
    size_t attention_scratch_bytes(int B, int, int, int, int, int) override {
      return size_t(B) << 26;
    }
  } backend;
  const GptShape shape = test_shape(4);
  REQUIRE(Gpt::activation_bytes(shape, 8, DType::f32) < backend.free_bytes() / 2);
  CHECK_NOTHROW(Gpt(backend, shape, 2));
  CHECK_THROWS_WITH(Gpt(backend, shape, 8), Catch::Contains("0.50 GiB of attention workspace"));
}
