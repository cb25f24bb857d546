// The GPT written once against the Backend op interface: parameters, gradients and the
// activations of one micro-batch live in buffers planned up front from the shape and batch.
#pragma once

#include <functional>
#include <span>
#include <vector>

#include "backend/backend.h"
#include "model/gpt_shape.h"

namespace lmtrain {

class Gpt {
 public:
  Gpt(Backend& backend, const GptShape& shape, int batch);

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

  // nanochat's initialisation, from `seed`.
  void init_weights(uint64_t seed);
  void zero_grads() { backend_.fill(grads_, 0.f); }

  // Runs the forward pass on (batch, T) tokens and targets (-1: ignored) and returns the summed
  // loss and the number of counted targets. With need_grad, also prepares the loss gradient for
  // backward(): d(loss_scale * mean loss), the mean over this micro-batch's counted targets.
  struct Loss {
    double sum = 0;
    int64_t count = 0;
  };
  Loss forward(std::span<const int32_t> tokens, std::span<const int32_t> targets, bool need_grad,
               float loss_scale = 1.f);
  // Accumulates parameter gradients of the last forward(need_grad = true) into grads().
  // `ready`, when given, is called as gradients become final so that their reduction across
  // ranks can start while the rest of the backward runs: ready(i) once block i's gradients
  // (its matrices, value embedding and gate) and everything above it (lm_head) are complete,
  // in the order i = depth-1 .. 0, and ready(-1) at the end, when all are (wte, scalars).
  using GradsReady = std::function<void(int layer)>;
  void backward(const GradsReady& ready = {});
  // Per-token losses of the last forward, (batch * T) f32 on the device.
  Tensor token_losses() const { return losses_; }
  // Logits of the last forward, (batch * T, padded_vocab); overwritten by their gradient when
  // the forward ran with need_grad.
  Tensor logits() const { return logits_; }

  // RoPE tables (T_max, head_dim/2), shared with inference.
  Tensor rope_cos() const { return rope_cos_; }
  Tensor rope_sin() const { return rope_sin_; }

 private:
  struct LayerActs {
    Tensor x_in, x_mix, xn1, rstd1, q_raw, rstd_q, q, k_raw, rstd_k, k, v, ve, gate, y, lse;
    Tensor x_mid, xn2, rstd2, fc, act, x_out;
  };
  static Tensor at(Tensor flat, const ParamSpec& spec) {
    return flat.slice(spec.offset, spec.shape.numel()).view(spec.shape);
  }
  Tensor w(int layer, const char* suffix) const;
  Tensor dw(int layer, const char* suffix) const;

  Backend& backend_;
  GptShape shape_;
  ParamTable table_;
  int batch_;

  Buffer param_memory_, grad_memory_, weight_memory_, act_memory_;
  Tensor params_, grads_, weights_;
  Tensor tokens_, targets_, emb_, rstd_emb_, x0_, xf_, rstd_f_, logits_, losses_;
  Tensor rope_cos_, rope_sin_;
  std::vector<LayerActs> layers_;
  // Backward scratch.
  Tensor dx_, dx0_, dtmp_, dxmid_, dxn_, dhidden_, dy_, dq_, dk_, dv_, dve_;
  std::vector<int32_t> host_tokens_;
};

}  // namespace lmtrain
