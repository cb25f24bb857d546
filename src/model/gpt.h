// The GPT written once against the Backend op interface: parameters, gradients and the
// activations of one micro-batch live in buffers planned up front from the shape and batch.
#pragma once

#include <functional>
#include <span>
#include <vector>

#include "backend/backend.h"
#include "backend/tensor_plan.h"
#include "model/gpt_shape.h"

namespace lmtrain {

// Memory options; the defaults suit inference and plain training.
struct GptOptions {
  // Keep only each block's output through the forward pass and recompute the block's other
  // activations just before its backward: one block's activations in memory instead of depth
  // blocks', for a second forward pass of all blocks but the last (without the MLP output
  // projection, whose result was kept).
  bool recompute_activations = false;
  // Rows of the (rows, padded_vocab) logits that the fused lm_head and loss hold at once
  // (0: as many as fit in kLossChunkBytes).
  int64_t loss_chunk_rows = 0;

  static GptOptions from(const RunConfig& run) {
    return {.recompute_activations = run.recompute_activations,
            .loss_chunk_rows = run.loss_chunk_rows};
  }
};

class Gpt {
 public:
  // Target size of one chunk of logits: small next to the activations, large enough that the
  // lm_head matmuls of a chunk still fill the device.
  static constexpr size_t kLossChunkBytes = size_t(256) << 20;

  Gpt(Backend& backend, const GptShape& shape, int batch, const GptOptions& options = {});
  // Bytes of the activations planned for `batch` sequences in `dtype` (what the constructor
  // allocates beside parameters, gradients and weight copies).
  static size_t activation_bytes(const GptShape& shape, int batch, DType dtype,
                                 const GptOptions& options = {});

  const GptShape& shape() const { return shape_; }
  const ParamTable& table() const { return table_; }
  Backend& backend() { return backend_; }
  int batch() const { return batch_; }

  Tensor params() const { return params_; }  // all parameters, flat f32
  Tensor grads() const { return grads_; }    // all gradients, flat f32, same layout
  Tensor param(const ParamSpec& spec) const { return at(params_, spec); }
  Tensor grad(const ParamSpec& spec) const { return at(grads_, spec); }
  Tensor param(const std::string& name) const { return param(table_.find(name)); }
  // The copy of a parameter the forward pass computes with: the f32 master itself on the CPU,
  // a bf16 copy when the backend's activations are bf16. refresh_weights() brings the copies up
  // to date after the masters change (initialisation, loading, every optimizer step).
  Tensor weight(const std::string& name) const { return at(weights_, table_.find(name)); }
  void refresh_weights();
  // The parameter name of layer i's value embeddings.
  static std::string value_embeds_name(int i) {
    return "value_embeds." + std::to_string(i) + ".weight";
  }

  // nanochat's initialisation, from `seed`.
  void init_weights(uint64_t seed);
  void zero_grads() { backend_.fill(grads_, 0.f); }

  // Runs the forward pass on (batch, T) tokens and targets (-1: ignored) and returns the summed
  // loss and the number of counted targets. The lm_head and the loss run fused, a chunk of rows
  // at a time, so the full (batch * T, padded_vocab) logits never exist. With need_grad, each
  // chunk's loss gradient d(loss_scale * mean loss) (the mean over this micro-batch's counted
  // targets) goes straight through the lm_head: lm_head's gradient is accumulated into grads()
  // and complete when forward() returns, and the gradient of the final hidden states is kept
  // for backward().
  struct Loss {
    double sum = 0;
    int64_t count = 0;
  };
  Loss forward(std::span<const int32_t> tokens, std::span<const int32_t> targets, bool need_grad,
               float loss_scale = 1.f);
  // Accumulates the remaining parameter gradients of the last forward(need_grad = true) into
  // grads(); with recompute_activations, recomputes each block's activations before its backward.
  // `ready`, when given, is called as gradients become final so that their reduction across
  // ranks can start while the rest of the backward runs: ready(i) once block i's gradients
  // (its matrices, value embedding and gate) and everything above it (lm_head) are complete,
  // in the order i = depth-1 .. 0, and ready(-1) at the end, when all are (wte, scalars).
  using GradsReady = std::function<void(int layer)>;
  void backward(const GradsReady& ready = {});
  // The `ready` call after which a parameter's gradient is final: depth for lm_head (final
  // before the first call), i for block i's parameters and value embedding, -1 for the rest.
  int grads_final_after(const ParamSpec& spec) const;
  // Per-token losses of the last forward, (batch * T) f32 on the device.
  Tensor token_losses() const { return acts_.losses; }
  // Computes the logits of the last forward again into `out` (batch * T, padded_vocab), in the
  // activation dtype: forward() keeps only a chunk of them at a time.
  void logits(Tensor out);

  // RoPE tables (T_max, head_dim/2), shared with inference.
  Tensor rope_cos() const { return acts_.rope_cos; }
  Tensor rope_sin() const { return acts_.rope_sin; }

 private:
  // What backward() reads of one block besides its input.
  struct BlockActs {
    // The packed projection (N, q_dim + 2 kv_dim): raw queries, raw keys, then the values (gated
    // in place); q and k are normalised and rotated copies.
    Tensor xn1, rstd1, qkv, rstd_q, q, rstd_k, k, gate, y, lse;
    Tensor x_mid, xn2, rstd2;
    Tensor hidden;  // the MLP's hidden activation: c_fc's output, then relu2'd in place
  };
  // Every tensor of a micro-batch, planned into one allocation by plan().
  struct Activations {
    Tensor tokens, targets, emb, rstd_emb, x0, xf, rstd_f, losses, rope_cos, rope_sin;
    Tensor logits;  // one chunk of rows
    Tensor x_mix;   // a block's mixed input: read by the forward only, so one for all blocks
    std::vector<BlockActs> blocks;  // one set per block, or one shared set with recompute
    std::vector<Tensor> block_out;  // each block's output: the next block's input
    // Backward scratch; dxf carries d(xf) from forward() to backward().
    Tensor dx, dx0, dxf, dxmid, dxn, dhidden, dy, dqkv, dve;
  };
  // The queries' (first), keys' (second) or values' (third) columns of a packed projection or its
  // gradient, as a (B, T, heads, D) band.
  enum class Part { q, k, v };
  Tensor part(Tensor packed, Part which) const;
  // Layer i's c_q, c_k and c_v as one (q_dim + 2 kv_dim, C) matrix of the flat array `flat`
  // (weights or gradients), or an empty tensor where they do not lie back to back (GQA: c_q
  // stacks with c_proj, c_k and c_v with each other).
  Tensor qkv_matrix(Tensor flat, int layer) const;
  static TensorPlan plan(Activations& a, const GptShape& shape, int batch, DType act,
                         const GptOptions& options);
  static Tensor at(Tensor flat, const ParamSpec& spec) {
    return flat.slice(spec.offset, spec.shape.numel()).view(spec.shape);
  }
  Tensor w(int layer, const char* suffix) const;
  Tensor dw(int layer, const char* suffix) const;
  BlockActs& block(int i) { return acts_.blocks[options_.recompute_activations ? 0 : i]; }
  Tensor block_in(int i) const { return i == 0 ? acts_.x0 : acts_.block_out[i - 1]; }

  // The device scratch the attention ops take at this batch (the largest over the layers' windows).
  size_t attention_scratch_bytes() const;
  void check_fits(size_t activation_bytes, size_t scratch_bytes) const;
  Loss upload_batch(std::span<const int32_t> tokens, std::span<const int32_t> targets);
  void forward_block(int i, bool with_output);
  void head_and_loss(bool need_grad, float grad_scale);
  void backward_block(int i);

  Backend& backend_;
  GptShape shape_;
  ParamTable table_;
  int batch_;
  GptOptions options_;

  Buffer param_memory_, grad_memory_, weight_memory_, act_memory_;
  Tensor params_, grads_, weights_;
  Activations acts_;
};

}  // namespace lmtrain
