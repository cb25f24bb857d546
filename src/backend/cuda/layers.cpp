// The model's ops on the CUDA backend: argument checks, then the kernels of kernels/<op>.cu.
// Token ids and targets are range-checked on the device (the kernels trap, printing the bad id);
// Gpt::forward has checked them on the host already.
#include <algorithm>

#include "attention.cuh"
#include "backend/cuda/attention_cudnn.h"
#include "backend/cuda/checks.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/op_checks.h"
#include "embedding.cuh"
#include "norm_rope.cuh"
#include "relu2.cuh"
#include "residual_mix_norm.cuh"
#include "rmsnorm.cuh"
#include "softcap_cross_entropy.cuh"
#include "value_gate.cuh"

namespace lmtrain {

using namespace cuda_ops;

namespace {

void check_embedding(const char* op, Tensor rows, Tensor table, Tensor tokens) {
  expect_dtype(op, "tokens", tokens, DType::i32);
  check(table.shape.rank == 2 && rows.shape.rank >= 1 && rows.dim(-1) == table.dim(1) &&
            rows.rows() == tokens.numel(),
        "{}: rows {} do not fit table {} and tokens {}", op, rows.shape.str(), table.shape.str(),
        tokens.shape.str());
}

void check_rmsnorm(const char* op, Tensor y, const char* y_name, Tensor x, Tensor rstd, DType act) {
  expect_dtype(op, "x", x, act);
  expect_dtype(op, y_name, y, act);
  expect_dtype(op, "rstd", rstd, DType::f32);
  expect_shape(op, y_name, y, "x", x);
  check(rstd.numel() == x.rows(), "{}: rstd {} needs one entry per row of x {}", op,
        rstd.shape.str(), x.shape.str());
}

void check_attention(const char* op, Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v,
                     int window, DType act) {
  expect_dtype(op, "out", out, act);
  expect_dtype(op, "q", q, act);
  expect_dtype(op, "k", k, act);
  expect_dtype(op, "v", v, act);
  expect_dtype(op, "lse", lse, DType::f32);
  check(q.shape.rank == 4 && k.shape.rank == 4, "{}: q {} and k {} must be (B, T, heads, D)", op,
        q.shape.str(), k.shape.str());
  expect_shape(op, "v", v, "k", k);
  expect_shape(op, "out", out, "q", q);
  check(k.dim(0) == q.dim(0) && k.dim(3) == q.dim(3) && k.dim(2) > 0 && q.dim(2) % k.dim(2) == 0,
        "{}: k {} does not pair with q {} (same B and D, heads dividing the query heads)", op,
        k.shape.str(), q.shape.str());
  const int64_t D = q.dim(3);
  check(D == 16 || D == 32 || D == 64 || D == 128,
        "{}: head_dim {} is not supported by the cuda attention kernels (16, 32, 64 or 128)", op,
        D);
  check(lse.shape == Shape{q.dim(0), q.dim(2), q.dim(1)}, "{}: lse {} must be (B, H, Tq) = {}", op,
        lse.shape.str(), Shape{q.dim(0), q.dim(2), q.dim(1)}.str());
  check(window >= 0, "{}: window {} must be non-negative", op, window);
}

void check_relu2(const char* op, Tensor y, const char* y_name, Tensor x, DType act) {
  expect_dtype(op, "x", x, act);
  expect_dtype(op, y_name, y, act);
  expect_shape(op, y_name, y, "x", x);
}

// t must be an activation-dtype tensor shaped like `like`.
void check_like(const char* op, const char* name, Tensor t, Tensor like, DType act) {
  expect_dtype(op, name, t, act);
  check(t.shape == like.shape, "{}: {} {} must have the shape {}", op, name, t.shape.str(),
        like.shape.str());
}

// Our own attention kernels read and write dense tensors: a band goes through a dense copy made
// for the call. They run in the fp32 comparison mode, for generation and where cuDNN cannot,
// none of them where the copies' cost shows.
class DenseStaging {
 public:
  explicit DenseStaging(Backend& backend) : backend_(backend) {}
  Tensor input(Tensor t) {
    if (t.dense()) return t;
    Tensor copy = fresh(t);
    backend_.copy(copy, t);
    return copy;
  }
  Tensor output(Tensor t) {
    if (t.dense()) return t;
    Tensor copy = fresh(t);
    outputs_.emplace_back(t, copy);
    return copy;
  }
  // After the kernel: the outputs' copies into their bands, then a wait for the stream, so that
  // the copies' memory is not freed under queued work.
  void write_back() {
    for (const auto& [band, copy] : outputs_) backend_.copy(band, copy);
    if (!buffers_.empty()) backend_.synchronize();
  }

 private:
  Tensor fresh(Tensor like) {
    buffers_.push_back(backend_.allocate(size_t(like.numel()) * dtype_size(like.dtype)));
    return buffers_.back().tensor(like.shape, like.dtype);
  }
  Backend& backend_;
  std::vector<Buffer> buffers_;
  std::vector<std::pair<Tensor, Tensor>> outputs_;
};

cuda::ValueGateShape check_value_gate(const char* op, Tensor v, Tensor gate, Tensor xn,
                                      Tensor gate_w, Tensor table, Tensor tokens, DType act) {
  const int64_t D = check_value_gate_args(op, v, gate, xn, gate_w, table, tokens, act);
  return {xn.rows(), xn.dim(-1), gate_w.dim(0), gate_w.dim(1), D, table.dim(0), v.pitch(1)};
}

}  // namespace

void CudaBackend::embedding_forward(Tensor out, Tensor table, Tensor tokens) {
  const char* op = "embedding_forward";
  check_embedding(op, out, table, tokens);
  expect_dtype(op, "out", out, activation_);
  expect_dtype(op, "table", table, activation_);
  dispatch(op, activation_, [&](auto tag) {
    using T = decltype(tag);
    cuda::embedding_forward(ptr<T>(out), ptr<T>(table), ptr<int32_t>(tokens), out.rows(),
                            table.dim(1), table.dim(0), stream_.get());
  });
}

void CudaBackend::embedding_backward(Tensor dtable, Tensor dout, Tensor tokens) {
  const char* op = "embedding_backward";
  check_embedding(op, dout, dtable, tokens);
  expect_dtype(op, "dtable", dtable, DType::f32);
  expect_dtype(op, "dout", dout, activation_);
  const int64_t N = dout.rows(), C = dtable.dim(1), V = dtable.dim(0);
  const size_t bytes = cuda::embedding_backward_scratch_bytes(N, C, V);
  void* work = scratch(bytes);
  dispatch(op, activation_, [&](auto tag) {
    using T = decltype(tag);
    cuda::embedding_backward(ptr<float>(dtable), ptr<T>(dout), ptr<int32_t>(tokens), N, C, V, work,
                             bytes, stream_.get());
  });
}

void CudaBackend::rmsnorm_forward(Tensor out, Tensor rstd, Tensor x) {
  check_rmsnorm("rmsnorm_forward", out, "out", x, rstd, activation_);
  dispatch("rmsnorm_forward", activation_, [&](auto tag) {
    using T = decltype(tag);
    cuda::rmsnorm_forward(ptr<T>(out), ptr<float>(rstd), ptr<T>(x), x.rows(), x.dim(-1),
                          stream_.get());
  });
}

void CudaBackend::rmsnorm_backward(Tensor dx, Tensor dout, Tensor x, Tensor rstd, Tensor residual) {
  const char* op = "rmsnorm_backward";
  check_rmsnorm(op, dout, "dout", x, rstd, activation_);
  check_like(op, "dx", dx, x, activation_);
  if (!residual.empty()) check_like(op, "residual", residual, x, activation_);
  dispatch(op, activation_, [&](auto tag) {
    using T = decltype(tag);
    cuda::rmsnorm_backward(ptr<T>(dx), ptr<T>(dout), ptr<T>(x), ptr<float>(rstd), ptr<T>(residual),
                           x.rows(), x.dim(-1), stream_.get());
  });
}

void CudaBackend::norm_rope_forward(Tensor out, Tensor rstd, Tensor x, Tensor cos, Tensor sin,
                                    int pos0) {
  check_norm_rope_args("norm_rope_forward", out, "out", x, rstd, cos, sin, pos0, activation_);
  check_in_place("norm_rope_forward", "out", out, "x", x);
  dispatch("norm_rope_forward", activation_, [&](auto tag) {
    using T = decltype(tag);
    cuda::norm_rope_forward(rows_ptr<T>(out), ptr<float>(rstd), rows_ptr<T>(x), ptr<float>(cos),
                            ptr<float>(sin), x.dim(0), x.dim(1), x.dim(2), x.dim(3), pos0,
                            {x.pitch(2), out.pitch(2), 0}, stream_.get());
  });
}

void CudaBackend::norm_rope_backward(Tensor dx, Tensor dout, Tensor x, Tensor rstd, Tensor cos,
                                     Tensor sin, int pos0) {
  check_norm_rope_args("norm_rope_backward", dout, "dout", x, rstd, cos, sin, pos0, activation_);
  check_norm_rope_args("norm_rope_backward", dx, "dx", x, rstd, cos, sin, pos0, activation_);
  check_in_place("norm_rope_backward", "dx", dx, "dout", dout);
  dispatch("norm_rope_backward", activation_, [&](auto tag) {
    using T = decltype(tag);
    cuda::norm_rope_backward(rows_ptr<T>(dx), rows_ptr<T>(dout), rows_ptr<T>(x), ptr<float>(rstd),
                             ptr<float>(cos), ptr<float>(sin), x.dim(0), x.dim(1), x.dim(2),
                             x.dim(3), pos0, {x.pitch(2), dx.pitch(2), dout.pitch(2)},
                             stream_.get());
  });
}

void CudaBackend::attention_forward(Tensor out, Tensor lse, Tensor q, Tensor k, Tensor v,
                                    int window, int q_offset) {
  const char* op = "attention_forward";
  check_attention(op, out, lse, q, k, v, window, activation_);
  const int B = int(q.dim(0)), Tq = int(q.dim(1)), H = int(q.dim(2)), D = int(q.dim(3));
  const int Tk = int(k.dim(1)), Hkv = int(k.dim(2));
  check(q_offset >= 0 && q_offset + Tq <= Tk,
        "{}: queries at positions [{}, {}) need keys up to there, have {}", op, q_offset,
        q_offset + Tq, Tk);
  // Training and full-sequence evaluation in bf16 go to cuDNN; generation (q_offset, Tq < Tk),
  // the fp32 mode and shapes cuDNN rejects run our own kernel (docs/CUDA.md, "Attention").
  cuda::AttentionPitches pitch;
  pitch.q = q.pitch(2), pitch.k = k.pitch(2), pitch.v = v.pitch(2), pitch.out = out.pitch(2);
  if (cudnn_attention_ && activation_ == DType::bf16 && q_offset == 0 && Tq == Tk &&
      cudnn_attention_->forward(out.data, ptr<float>(lse), q.data, k.data, v.data,
                                {B, Tq, H, Hkv, D, window, pitch},
                                [this](size_t bytes) { return scratch(bytes); }))
    return;
  DenseStaging dense(*this);
  const Tensor qd = dense.input(q), kd = dense.input(k), vd = dense.input(v);
  const Tensor od = dense.output(out);
  dispatch(op, activation_, [&](auto tag) {
    using T = decltype(tag);
    cuda::attention_forward(ptr<T>(od), ptr<float>(lse), ptr<T>(qd), ptr<T>(kd), ptr<T>(vd), B, Tq,
                            Tk, H, Hkv, D, window, q_offset, stream_.get());
  });
  dense.write_back();
}

void CudaBackend::attention_backward(Tensor dq, Tensor dk, Tensor dv, Tensor dout, Tensor q,
                                     Tensor k, Tensor v, Tensor out, Tensor lse, int window) {
  const char* op = "attention_backward";
  check_attention(op, out, lse, q, k, v, window, activation_);
  check(q.dim(1) == k.dim(1), "{}: q {} and k {} must cover the same positions", op, q.shape.str(),
        k.shape.str());
  check_like(op, "dq", dq, q, activation_);
  check_like(op, "dk", dk, k, activation_);
  check_like(op, "dv", dv, v, activation_);
  check_like(op, "dout", dout, out, activation_);
  const int B = int(q.dim(0)), Tn = int(q.dim(1)), H = int(q.dim(2)), D = int(q.dim(3));
  const int Hkv = int(k.dim(2));
  const cuda::AttentionPitches pitch{q.pitch(2),  k.pitch(2),  v.pitch(2),  out.pitch(2),
                                     dq.pitch(2), dk.pitch(2), dv.pitch(2), dout.pitch(2)};
  if (cudnn_attention_ && activation_ == DType::bf16 &&
      cudnn_attention_->backward(dq.data, dk.data, dv.data, dout.data, q.data, k.data, v.data,
                                 out.data, ptr<float>(lse), {B, Tn, H, Hkv, D, window, pitch},
                                 [this](size_t bytes) { return scratch(bytes); }))
    return;
  DenseStaging dense(*this);
  const Tensor qd = dense.input(q), kd = dense.input(k), vd = dense.input(v);
  const Tensor od = dense.input(out), doutd = dense.input(dout);
  const Tensor dqd = dense.output(dq), dkd = dense.output(dk), dvd = dense.output(dv);
  void* work = scratch(cuda::attention_backward_workspace_bytes(B, Tn, H, Hkv, D));
  dispatch(op, activation_, [&](auto tag) {
    using T = decltype(tag);
    cuda::attention_backward(ptr<T>(dqd), ptr<T>(dkd), ptr<T>(dvd), ptr<T>(doutd), ptr<T>(qd),
                             ptr<T>(kd), ptr<T>(vd), ptr<T>(od), ptr<float>(lse), B, Tn, H, Hkv, D,
                             window, work, stream_.get());
  });
  dense.write_back();
}

// What the two ops above will ask scratch() for: per direction cuDNN's graph workspace, or the
// own kernel's (none forward) where cuDNN has no graph; plus, where the own kernel runs the
// model's layout, the dense copies of its bands (DenseStaging: v forward; v, dq, dk and dv
// backward), which are not scratch but must fit beside it. Builds the cuDNN graphs, which the
// ops then find cached.
size_t CudaBackend::attention_scratch_bytes(int B, int T, int H, int Hkv, int D, int window) {
  size_t forward = 0, backward = cuda::attention_backward_workspace_bytes(B, T, H, Hkv, D);
  bool own_forward = true, own_backward = true;  // for the model's layout
  if (cudnn_attention_ && activation_ == DType::bf16) {
    // Dense tensors, and the model's layout: v and the gradients as bands of the packed q|k|v
    // projection (docs/CUDA.md), whose graphs are then built and cached before the first step.
    const int64_t P = int64_t(H + 2 * Hkv) * D;
    const cuda::AttentionPitches model{.v = P, .dq = P, .dk = P, .dv = P};
    for (const cuda::AttentionPitches pitch : {cuda::AttentionPitches{}, model}) {
      const cuda::AttentionShape s{B, T, H, Hkv, D, window, pitch};
      const int64_t fwd = cudnn_attention_->workspace_bytes(s, false);
      const int64_t bwd = cudnn_attention_->workspace_bytes(s, true);
      if (fwd >= 0) forward = std::max(forward, size_t(fwd));
      if (bwd >= 0) backward = std::max(backward, size_t(bwd));
      if (pitch == model) own_forward = fwd < 0, own_backward = bwd < 0;
    }
  }
  const int64_t staged_heads = own_backward ? H + 3 * Hkv : own_forward ? Hkv : 0;
  const size_t staging = size_t(B) * T * staged_heads * D * dtype_size(activation_);
  return std::max(forward, backward) + staging;
}

void CudaBackend::relu2_forward(Tensor out, Tensor x) {
  check_relu2("relu2_forward", out, "out", x, activation_);
  dispatch("relu2_forward", activation_, [&](auto tag) {
    using T = decltype(tag);
    cuda::relu2_forward(ptr<T>(out), ptr<T>(x), x.numel(), stream_.get());
  });
}

void CudaBackend::relu2_backward(Tensor dx, Tensor dout, Tensor out) {
  check_relu2("relu2_backward", dout, "dout", out, activation_);
  check_relu2("relu2_backward", dx, "dx", out, activation_);
  dispatch("relu2_backward", activation_, [&](auto tag) {
    using T = decltype(tag);
    cuda::relu2_backward(ptr<T>(dx), ptr<T>(dout), ptr<T>(out), out.numel(), stream_.get());
  });
}

void CudaBackend::residual_mix_norm_forward(Tensor mixed, Tensor normed, Tensor rstd, Tensor x,
                                            Tensor x0, Tensor resid, Tensor x0l, int layer) {
  const char* op = "residual_mix_norm_forward";
  check_layer_scalars(op, resid, x0l, layer);
  check_rmsnorm(op, normed, "normed", x, rstd, activation_);
  check_like(op, "x0", x0, x, activation_);
  check_like(op, "mixed", mixed, x, activation_);
  check_mix_output(op, mixed, x, x0);
  dispatch(op, activation_, [&](auto tag) {
    using T = decltype(tag);
    cuda::residual_mix_norm_forward(ptr<T>(mixed), ptr<T>(normed), ptr<float>(rstd), ptr<T>(x),
                                    ptr<T>(x0), ptr<float>(resid), ptr<float>(x0l), layer, x.rows(),
                                    x.dim(-1), stream_.get());
  });
}

void CudaBackend::residual_mix_norm_backward(Tensor dx, Tensor dx0, Tensor dresid, Tensor dx0l,
                                             Tensor dnormed, Tensor dmixed, Tensor x, Tensor x0,
                                             Tensor rstd, Tensor resid, Tensor x0l, int layer) {
  const char* op = "residual_mix_norm_backward";
  check_layer_scalars(op, resid, x0l, layer);
  check_layer_scalars(op, dresid, dx0l, layer);
  expect_shape(op, "dresid", dresid, "resid", resid);
  check_rmsnorm(op, dnormed, "dnormed", x, rstd, activation_);
  check_like(op, "x0", x0, x, activation_);
  check_like(op, "dx", dx, x, activation_);
  check_like(op, "dx0", dx0, x, activation_);
  check_like(op, "dmixed", dmixed, x, activation_);
  void* work = scratch(cuda::residual_mix_norm_backward_scratch_bytes(x.rows()));
  dispatch(op, activation_, [&](auto tag) {
    using T = decltype(tag);
    cuda::residual_mix_norm_backward(ptr<T>(dx), ptr<T>(dx0), ptr<float>(dresid), ptr<float>(dx0l),
                                     ptr<T>(dnormed), ptr<T>(dmixed), ptr<T>(x), ptr<T>(x0),
                                     ptr<float>(rstd), ptr<float>(resid), ptr<float>(x0l), layer,
                                     x.rows(), x.dim(-1), work, stream_.get());
  });
}

void CudaBackend::value_gate_forward(Tensor v, Tensor gate, Tensor xn, Tensor gate_w, Tensor table,
                                     Tensor tokens) {
  const char* op = "value_gate_forward";
  const cuda::ValueGateShape s =
      check_value_gate(op, v, gate, xn, gate_w, table, tokens, activation_);
  dispatch(op, activation_, [&](auto tag) {
    using T = decltype(tag);
    cuda::value_gate_forward(rows_ptr<T>(v), ptr<float>(gate), ptr<T>(xn), ptr<T>(gate_w),
                             ptr<T>(table), ptr<int32_t>(tokens), s, stream_.get());
  });
}

void CudaBackend::value_gate_backward(Tensor dxn, Tensor dgate_w, Tensor dve, Tensor dv, Tensor xn,
                                      Tensor gate_w, Tensor table, Tensor tokens, Tensor gate) {
  const char* op = "value_gate_backward";
  const cuda::ValueGateShape s =
      check_value_gate(op, dv, gate, xn, gate_w, table, tokens, activation_);
  expect_dtype(op, "dxn", dxn, activation_);
  expect_shape(op, "dxn", dxn, "xn", xn);
  expect_dtype(op, "dgate_w", dgate_w, DType::f32);
  expect_shape(op, "dgate_w", dgate_w, "gate_w", gate_w);
  expect_dtype(op, "dve", dve, activation_);
  expect_shape(op, "dve", dve, "dv", dv);
  void* work = scratch(cuda::value_gate_backward_scratch_bytes(s));
  dispatch(op, activation_, [&](auto tag) {
    using T = decltype(tag);
    cuda::value_gate_backward(ptr<T>(dxn), ptr<float>(dgate_w), ptr<T>(dve), rows_ptr<T>(dv),
                              ptr<T>(xn), ptr<T>(gate_w), ptr<T>(table), ptr<int32_t>(tokens),
                              ptr<float>(gate), s, work, stream_.get());
  });
}

void CudaBackend::softcap_cross_entropy(Tensor logits, Tensor losses, Tensor targets, int vocab,
                                        float softcap, float grad_scale) {
  const char* op = "softcap_cross_entropy";
  expect_dtype(op, "logits", logits, activation_);
  expect_dtype(op, "losses", losses, DType::f32);
  expect_dtype(op, "targets", targets, DType::i32);
  const int64_t N = logits.rows(), Vp = logits.dim(-1);
  check(losses.numel() == N && targets.numel() == N,
        "{}: losses {} and targets {} need one entry per row of logits {}", op, losses.shape.str(),
        targets.shape.str(), logits.shape.str());
  check(vocab > 0 && vocab <= Vp, "{}: vocab {} must be in [1, {}]", op, vocab, Vp);
  check(softcap > 0.f, "{}: softcap {} must be positive", op, softcap);
  dispatch(op, activation_, [&](auto tag) {
    using T = decltype(tag);
    cuda::softcap_cross_entropy(ptr<T>(logits), ptr<float>(losses), ptr<int32_t>(targets), N, Vp,
                                vocab, softcap, grad_scale, stream_.get());
  });
}

}  // namespace lmtrain
