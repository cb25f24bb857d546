// Argument checks that mean the same on every backend; `act` is the backend's activation dtype.
// Each names the op and what was expected.
#pragma once

#include "backend/backend.h"

namespace lmtrain {

// Whether two tensors share any byte of memory.
inline bool overlap(Tensor a, Tensor b) {
  const char* pa = static_cast<const char*>(a.data);
  const char* pb = static_cast<const char*>(b.data);
  return pa < pb + b.bytes() && pb < pa + a.bytes();
}

// y += alpha * x elementwise: x may be y itself, but no other tensor that shares y's memory
// (the elements would be read after they are written, in an order the threads decide).
inline void check_add_args(Tensor y, Tensor x) {
  check(y.numel() == x.numel(), "add: y {} and x {} differ in element count", y.shape.str(),
        x.shape.str());
  check(y.data == x.data || !overlap(y, x),
        "add: y {} and x {} overlap (only the same tensor may be both)", y.shape.str(),
        x.shape.str());
}

// An op in place: `out` may be `in` itself, but not the same memory under another layout, whose
// rows written first would be read afterwards as other rows.
inline void check_in_place(const char* op, const char* out_name, Tensor out, const char* in_name,
                           Tensor in) {
  check(out.data != in.data || (out.row_stride == in.row_stride && out.row_dims == in.row_dims),
        "{}: {} and {} start at the same element with different row pitches ({} and {}); in place "
        "they must be one tensor",
        op, out_name, in_name, out.row_stride, in.row_stride);
}

// x (B, T, H, D) in `act` with D even, y (out, dout or dx) like x, rstd f32 with one entry per
// head row; cos/sin f32 (T_max, D/2) covering positions [pos0, pos0 + T).
inline void check_norm_rope_args(const char* op, Tensor y, const char* y_name, Tensor x,
                                 Tensor rstd, Tensor cos, Tensor sin, int pos0, DType act) {
  check(x.dtype == act && y.dtype == act && rstd.dtype == DType::f32 && cos.dtype == DType::f32 &&
            sin.dtype == DType::f32,
        "{}: x and {} must be {}, rstd, cos and sin f32, got {}, {}, {}, {}, {}", op, y_name,
        dtype_name(act), dtype_name(x.dtype), dtype_name(y.dtype), dtype_name(rstd.dtype),
        dtype_name(cos.dtype), dtype_name(sin.dtype));
  check(y.shape == x.shape, "{}: {} {} does not match x {}", op, y_name, y.shape.str(),
        x.shape.str());
  check(rstd.numel() == x.rows(), "{}: rstd {} needs one entry per head row of x {}", op,
        rstd.shape.str(), x.shape.str());
  check(x.shape.rank == 4 && x.dim(3) % 2 == 0, "{}: x {} must be (B, T, H, D) with D even", op,
        x.shape.str());
  check(cos.shape.rank == 2 && cos.shape == sin.shape && cos.dim(1) == x.dim(3) / 2,
        "{}: cos {} and sin {} must both be (T_max, {})", op, cos.shape.str(), sin.shape.str(),
        x.dim(3) / 2);
  check(pos0 >= 0 && pos0 + x.dim(1) <= cos.dim(0),
        "{}: positions [{}, {}) exceed the {} rows of the tables", op, pos0, pos0 + x.dim(1),
        cos.dim(0));
}

// A copy where dst or src is a band (core/tensor.h): `rows` rows of `width` elements, each
// tensor's rows its pitch apart. Both must split into the same rows, and share a dtype.
struct RowCopy {
  int64_t rows, width, dst_pitch, src_pitch;
};
// Empty (rows 0) when there is nothing to copy.
inline RowCopy row_copy(Tensor dst, Tensor src) {
  check(dst.dtype == src.dtype, "copy: a band copies without converting, got {} to {}",
        dtype_name(src.dtype), dtype_name(dst.dtype));
  if (dst.numel() == 0) return {0, 0, 0, 0};
  const int64_t rows = (dst.dense() ? src : dst).band_rows(), width = dst.numel() / rows;
  auto pitch = [&](const Tensor& t) {
    if (t.dense()) return width;
    check(t.band_rows() == rows, "copy: the bands {} and {} split into different rows",
          dst.shape.str(), src.shape.str());
    return t.row_stride;
  };
  const RowCopy c{rows, width, pitch(dst), pitch(src)};
  // The bytes from each one's first element to its last: rows copied one after another (or by
  // cudaMemcpy2D) must not read what an earlier row wrote.
  auto span_end = [&](const Tensor& t, int64_t p) {
    return static_cast<const char*>(t.data) + size_t((rows - 1) * p + width) * dtype_size(t.dtype);
  };
  check(span_end(dst, c.dst_pitch) <= src.data || span_end(src, c.src_pitch) <= dst.data,
        "copy: the bands {} and {} overlap", dst.shape.str(), src.shape.str());
  return c;
}

// matmul_add's addend stands in for out: the same shape and dtype.
inline void check_matmul_addend(Tensor out, Tensor addend) {
  check(addend.shape == out.shape && addend.dtype == out.dtype,
        "matmul_add: addend {} {} must have out's shape and dtype, {} {}", addend.shape.str(),
        dtype_name(addend.dtype), out.shape.str(), dtype_name(out.dtype));
}

// The value-embedding gate: v (N, Hkv * D) and gate (N, Hkv) f32 from xn (N, C) and gate_w
// (Hkv, G), G <= C, all but gate in `act`; table (V, Hkv * D) in `act` holds the value
// embeddings, gathered by tokens (N) i32. Returns D.
inline int64_t check_value_gate_args(const char* op, Tensor v, Tensor gate, Tensor xn,
                                     Tensor gate_w, Tensor table, Tensor tokens, DType act) {
  check(v.dtype == act && xn.dtype == act && gate_w.dtype == act && table.dtype == act &&
            gate.dtype == DType::f32 && tokens.dtype == DType::i32,
        "{}: v, xn, gate_w and table must be {}, gate f32 and tokens i32, got {}, {}, {}, {}, {} "
        "and {}",
        op, dtype_name(act), dtype_name(v.dtype), dtype_name(xn.dtype), dtype_name(gate_w.dtype),
        dtype_name(table.dtype), dtype_name(gate.dtype), dtype_name(tokens.dtype));
  check(gate_w.shape.rank == 2 && xn.shape.rank >= 1 && gate_w.dim(1) <= xn.dim(-1),
        "{}: gate_w {} must be (Hkv, G) with G at most the width of xn {}", op, gate_w.shape.str(),
        xn.shape.str());
  const int64_t N = xn.rows(), Hkv = gate_w.dim(0);
  check(gate.numel() == N * Hkv, "{}: gate {} must hold (N, Hkv) = ({}, {})", op, gate.shape.str(),
        N, Hkv);
  // Rank 2, so that v's row pitch is that of its N rows (it may be a band).
  check(N * Hkv > 0 && v.shape.rank == 2 && v.dim(0) == N && v.dim(1) % Hkv == 0,
        "{}: v {} must be (N, Hkv * D) with N = {}, Hkv = {}", op, v.shape.str(), N, Hkv);
  const int64_t width = v.numel() / N;
  check(table.shape.rank == 2 && table.dim(1) == width,
        "{}: table {} must be (V, {}), rows as wide as those of v {}", op, table.shape.str(), width,
        v.shape.str());
  check(tokens.numel() == N, "{}: tokens {} must hold the N = {} ids of xn's rows", op,
        tokens.shape.str(), N);
  return width / Hkv;
}

// A stack of matrices x (K, m, n) and out of the same shape, or (K, n, m) when transposed.
inline void check_stack_pair(const char* op, Tensor out, Tensor x, bool transpose) {
  check(x.shape.rank == 3 && out.shape.rank == 3, "{}: x {} and out {} must be stacks (K, m, n)",
        op, x.shape.str(), out.shape.str());
  const Shape want = transpose ? Shape{x.dim(0), x.dim(2), x.dim(1)} : x.shape;
  check(out.shape == want, "{}: out {} must be {}{}", op, out.shape.str(), want.str(),
        transpose ? ", the transpose of x's matrices" : ", the shape of x");
  check(!transpose || out.data != x.data, "{}: out must not alias x when transposing", op);
}

// The per-layer residual scalars: 1-D f32 vectors of length n_layer, and a layer inside them.
inline void check_layer_scalars(const char* op, Tensor resid, Tensor x0l, int layer) {
  check(resid.dtype == DType::f32 && x0l.dtype == DType::f32 && resid.shape.rank == 1 &&
            resid.shape == x0l.shape,
        "{}: resid {} {} and x0l {} {} must be 1-D f32 of length n_layer", op, resid.shape.str(),
        dtype_name(resid.dtype), x0l.shape.str(), dtype_name(x0l.dtype));
  check(layer >= 0 && layer < resid.dim(0), "{}: layer {} outside the {} layers", op, layer,
        resid.dim(0));
}

// The residual mix's output may not overwrite its inputs: the CUDA kernel reads x and x0 again
// after storing mixed (to normalise the fp32 mix rather than its rounded copy).
inline void check_mix_output(const char* op, Tensor mixed, Tensor x, Tensor x0) {
  check(mixed.data != x.data && mixed.data != x0.data, "{}: mixed may not alias x or x0", op);
}

}  // namespace lmtrain
