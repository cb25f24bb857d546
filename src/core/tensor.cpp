#include "core/tensor.h"

namespace lmtrain {

std::string Shape::str() const {
  std::string s = "(";
  for (int i = 0; i < rank; ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + ")";
}

Tensor Tensor::view(Shape s) const {
  check(s.numel() == numel(), "cannot view {} as {}", shape.str(), s.str());
  return Tensor{data, s, dtype};
}

Tensor Tensor::slice(int64_t begin, int64_t n) const {
  check(begin >= 0 && n >= 0 && begin + n <= numel(), "slice [{}, {}) out of range for {}", begin,
        begin + n, shape.str());
  return Tensor{static_cast<char*>(data) + size_t(begin) * dtype_size(dtype), Shape{n}, dtype};
}

Tensor Tensor::operator[](int64_t i) const {
  check(shape.rank >= 1 && i >= 0 && i < shape[0], "index {} out of range for {}", i, shape.str());
  Shape s;
  for (int d = 1; d < shape.rank; ++d) s.dims[s.rank++] = shape.dims[d];
  if (s.rank == 0) s = Shape{1};
  int64_t n = s.numel();
  return Tensor{static_cast<char*>(data) + size_t(i * n) * dtype_size(dtype), s, dtype};
}

}  // namespace lmtrain
