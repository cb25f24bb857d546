// A non-owning view of a row-major array on some device. Owning memory is a Buffer.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "core/error.h"

namespace lmtrain {

enum class DType : uint8_t { f32, bf16, i32 };

inline size_t dtype_size(DType t) { return t == DType::bf16 ? 2 : 4; }
inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::f32:
      return "f32";
    case DType::bf16:
      return "bf16";
    case DType::i32:
      return "i32";
  }
  return "?";
}

constexpr int kMaxRank = 4;

struct Shape {
  std::array<int64_t, kMaxRank> dims{};
  int rank = 0;

  Shape() = default;
  Shape(std::initializer_list<int64_t> d) {
    check(d.size() <= kMaxRank, "tensor rank {} exceeds {}", d.size(), kMaxRank);
    for (int64_t x : d) dims[rank++] = x;
  }
  int64_t operator[](int i) const { return dims[i < 0 ? rank + i : i]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= dims[i];
    return n;
  }
  bool operator==(const Shape& o) const {
    if (rank != o.rank) return false;
    for (int i = 0; i < rank; ++i)
      if (dims[i] != o.dims[i]) return false;
    return true;
  }
  std::string str() const;
};

struct Tensor {
  void* data = nullptr;
  Shape shape;
  DType dtype = DType::f32;
  // Dense unless row_stride > 0. Then the tensor is a band of columns of a wider row-major array
  // (the queries inside a packed q|k|v projection): its first row_dims dimensions index rows
  // that start row_stride elements apart, and each row (the remaining dimensions) is dense.
  // Only the ops that say so accept a band; the others refuse it (f32(), i32() and bytes()
  // check), rather than read the gaps.
  int64_t row_stride = 0;
  int row_dims = 0;

  int64_t numel() const { return shape.numel(); }
  size_t bytes() const;  // dense tensors only
  int64_t dim(int i) const { return shape[i]; }
  // Rows when viewed as a matrix whose last dimension is the row length.
  int64_t rows() const { return numel() / shape[-1]; }
  // A default-constructed Tensor stands for "none" where an op's argument is optional.
  bool empty() const { return data == nullptr; }
  bool dense() const { return row_stride == 0; }

  // Throws, naming the band, unless the tensor is dense.
  void require_dense() const {
    if (row_stride != 0) [[unlikely]]
      refuse_band();
  }
  // Typed pointers to a dense tensor.
  float* f32() const {
    require_dense();
    return static_cast<float*>(data);
  }
  int32_t* i32() const {
    require_dense();
    return static_cast<int32_t*>(data);
  }
  // The first element of a dense tensor or a band, for ops that step through rows by pitch().
  float* f32_rows() const { return static_cast<float*>(data); }

  // Elements between the starts of consecutive indices of the first `lead` dimensions
  // flattened: the product of the other dimensions when dense, row_stride for a band whose rows
  // are those indices (any other split of a band is not evenly spaced, and fails).
  int64_t pitch(int lead) const;
  // The rows of a band: the product of its first row_dims dimensions.
  int64_t band_rows() const;
  // The same memory under another shape with the same element count. A band keeps its rows: the
  // new shape must split into the same rows and row length.
  Tensor view(Shape s) const;
  // Columns [begin, begin + n) of every row of a rank-2 tensor (dense or a band), as a band.
  Tensor columns(int64_t begin, int64_t n) const;
  // Element range [begin, begin + n) of a dense tensor flattened, as a 1-D view.
  Tensor slice(int64_t begin, int64_t n) const;
  // Sub-tensor i along the first dimension of a dense tensor.
  Tensor operator[](int64_t i) const;

 private:
  [[noreturn]] void refuse_band() const;
};

}  // namespace lmtrain
