// The CPU backend against the PyTorch reference (tests/reference, goldens in tests/golden):
// logits, loss, every parameter gradient (also with the memory options), and the weights after
// 4 AdamW steps (with warmup, warmdown and gradient clipping).
#include <catch2/catch.hpp>
#include <cmath>

#include "backend/cpu/cpu_backend.h"
#include "io/safetensors.h"
#include "model/gpt.h"
#include "optim/optimizer.h"
#include "optim/schedule.h"
#include "test_support.h"

using namespace lmtrain;

namespace {

struct Golden {
  Config config = test_support::golden_config();
  SafetensorsFile file =
      SafetensorsFile::open(test_support::source_path("tests/golden/gpt_tiny.safetensors"));

  std::vector<int32_t> ints(const std::string& name) const {
    std::vector<int32_t> out(file.info(name).bytes / sizeof(int32_t));
    file.read(name, out.data(), out.size() * sizeof(int32_t));
    return out;
  }
};

void load_params(Gpt& model, const Golden& g, const std::string& prefix) {
  for (const auto& spec : model.table().specs) {
    auto values = g.file.read_f32(prefix + spec.name);
    REQUIRE(int64_t(values.size()) == spec.shape.numel());
    model.backend().upload(model.param(spec), values.data());
  }
  model.refresh_weights();
}

}  // namespace

TEST_CASE("gpt forward and backward match the PyTorch reference", "[golden]") {
  Golden g;
  CpuBackend backend;
  const GptShape shape = GptShape::from(g.config.model, g.config.model.vocab_size);
  // The defaults (one chunk of 32 rows), a loss in chunks of 5 rows, and recomputation.
  const GptOptions options = GENERATE(GptOptions{}, GptOptions{.loss_chunk_rows = 5},
                                      GptOptions{.recompute_activations = true});
  INFO("loss_chunk_rows " << options.loss_chunk_rows << ", recompute_activations "
                          << options.recompute_activations);
  Gpt model(backend, shape, g.config.batch.device_batch, options);
  load_params(model, g, "param.");
  const auto tokens = g.ints("tokens"), targets = g.ints("targets");

  Gpt::Loss eval = model.forward(tokens, targets, /*need_grad=*/false);
  const auto logits = test_support::logits(model);
  const auto want_logits = g.file.read_f32("logits");
  const int V = shape.vocab, Vp = shape.padded_vocab;
  std::vector<float> capped(want_logits.size());
  for (size_t row = 0; row < want_logits.size() / V; ++row) {
    for (int j = 0; j < V; ++j) {
      capped[row * V + j] = float(shape.softcap * std::tanh(logits[row * Vp + j] / shape.softcap));
    }
  }
  CHECK(test_support::max_relative_error(capped, want_logits) < 1e-5);
  const double want_loss = g.file.read_f32("loss")[0];
  CHECK(std::abs(eval.sum / eval.count - want_loss) / want_loss < 1e-5);

  model.zero_grads();
  Gpt::Loss loss = model.forward(tokens, targets, /*need_grad=*/true);
  CHECK(std::abs(loss.sum / loss.count - want_loss) / want_loss < 1e-5);
  model.backward();
  for (const auto& spec : model.table().specs) {
    INFO(spec.name);
    auto grad = test_support::download(backend, model.grad(spec));
    CHECK(test_support::max_relative_error(grad, g.file.read_f32("grad." + spec.name)) < 1e-4);
  }
  CHECK(shape.flops_per_token() == Approx(1880832.0));
}

TEST_CASE("AdamW steps with warmup, warmdown and clipping match the PyTorch reference",
          "[golden]") {
  Golden g;
  CpuBackend backend;
  Config& c = g.config;
  c.optim.matrix_optimizer = "adamw";  // the golden trains every group with AdamW
  const GptShape shape = GptShape::from(c.model, c.model.vocab_size);
  Gpt model(backend, shape, c.batch.device_batch);
  load_params(model, g, "param.");
  dist::LocalCommunicator comm(backend);
  Optimizer optimizer(model, c.optim, double(c.batch.total_batch_tokens), c.schedule.num_iterations,
                      comm);
  const auto tokens = g.ints("tokens"), targets = g.ints("targets");
  const int steps = c.schedule.num_iterations;
  for (int step = 0; step < steps; ++step) {
    model.zero_grads();
    Gpt::Loss loss = model.forward(tokens, targets, true);
    const double want = g.file.read_f32(fmt::format("step{}.loss", step + 1))[0];
    // Relative to the loss, or absolute once it falls below 1 (the golden memorises its one
    // batch: the last loss is 0.06, where the fp32 golden itself is 6e-7 from float64).
    CHECK(std::abs(loss.sum / loss.count - want) < 1e-5 * std::max(want, 1.0));
    model.backward();
    optimizer.step(step, lr_multiplier(step, steps, c.schedule), c.optim.grad_clip);
    for (const auto& spec : model.table().specs) {
      INFO("step " << step + 1 << " " << spec.name);
      auto param = test_support::download(backend, model.param(spec));
      auto expected = g.file.read_f32(fmt::format("step{}.{}", step + 1, spec.name));
      CHECK(test_support::max_relative_error(param, expected) < 1e-4);
    }
  }
}
