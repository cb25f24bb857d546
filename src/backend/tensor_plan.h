// Plans many tensors into one allocation: declare them, then allocate once. Each tensor starts
// on a 256-byte boundary (what vectorised CPU loops and GPU kernels like).
#pragma once

#include <vector>

#include "backend/backend.h"

namespace lmtrain {

class TensorPlan {
 public:
  void add(Tensor& tensor, Shape shape, DType dtype) {
    entries_.push_back({&tensor, shape, dtype, bytes_});
    bytes_ += (size_t(shape.numel()) * dtype_size(dtype) + 255) / 256 * 256;
  }
  size_t bytes() const { return bytes_; }

  // Allocates the planned bytes and points every declared tensor into them.
  Buffer allocate(Backend& backend) const {
    Buffer buffer = backend.allocate(bytes_ ? bytes_ : 256);
    for (const auto& e : entries_) *e.tensor = buffer.tensor(e.shape, e.dtype, e.offset);
    return buffer;
  }

 private:
  struct Entry {
    Tensor* tensor;
    Shape shape;
    DType dtype;
    size_t offset;
  };
  std::vector<Entry> entries_;
  size_t bytes_ = 0;
};

}  // namespace lmtrain
