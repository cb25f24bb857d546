// Argument checks and dtype dispatch shared by the CUDA backend's op files. Kernels cannot check
// anything cheaply, so every shape and dtype is checked here, on the host, naming the op.
#pragma once

#include <cuda_bf16.h>

#include "backend/backend.h"

namespace lmtrain::cuda_ops {

// The data of a dense tensor: ops that do not take bands refuse them here.
template <typename T>
T* ptr(Tensor t) {
  t.require_dense();
  return static_cast<T*>(t.data);
}

// The first element of a dense tensor or a band, for ops that take each row's pitch.
template <typename T>
T* rows_ptr(Tensor t) {
  return static_cast<T*>(t.data);
}

inline void expect_dtype(const char* op, const char* name, Tensor t, DType want) {
  check(t.dtype == want, "{}: {} must be {} on the cuda backend, got {}", op, name,
        dtype_name(want), dtype_name(t.dtype));
}

inline void expect_shape(const char* op, const char* name, Tensor t, const char* like_name,
                         Tensor like) {
  check(t.shape == like.shape, "{}: {} {} does not match {} {}", op, name, t.shape.str(), like_name,
        like.shape.str());
}

// Calls f(T{}) with T = float for f32 and __nv_bfloat16 for bf16.
template <typename F>
void dispatch(const char* op, DType dtype, F&& f) {
  switch (dtype) {
    case DType::f32:
      return f(float{});
    case DType::bf16:
      return f(__nv_bfloat16{});
    case DType::i32:
      break;
  }
  fail("{}: expected f32 or bf16 data, got {}", op, dtype_name(dtype));
}

}  // namespace lmtrain::cuda_ops
