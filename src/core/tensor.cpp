#include "core/tensor.h"

namespace lmtrain {

std::string Shape::str() const {
  std::string s = "(";
  for (int i = 0; i < rank; ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + ")";
}

namespace {

// The product of dims [begin, end) of s.
int64_t product(const Shape& s, int begin, int end) {
  int64_t n = 1;
  for (int i = begin; i < end; ++i) n *= s.dims[i];
  return n;
}

}  // namespace

size_t Tensor::bytes() const {
  check(dense(), "a band of rows {} apart has no single byte range", row_stride);
  return size_t(numel()) * dtype_size(dtype);
}

void Tensor::refuse_band() const {
  fail("this op needs a dense tensor, got a band {} with rows {} apart", shape.str(), row_stride);
}

int64_t Tensor::band_rows() const { return product(shape, 0, row_dims); }

int64_t Tensor::pitch(int lead) const {
  check(lead >= 1 && lead <= shape.rank, "pitch: {} leading dimensions of {}", lead, shape.str());
  if (dense()) return product(shape, lead, shape.rank);
  // Dimensions of size 1 may move the split: the count of rows is what must agree.
  check(product(shape, 0, lead) == band_rows(),
        "pitch: the band {} has rows over its first {} dimensions, not {}", shape.str(), row_dims,
        lead);
  return row_stride;
}

Tensor Tensor::view(Shape s) const {
  check(s.numel() == numel(), "cannot view {} as {}", shape.str(), s.str());
  Tensor t{data, s, dtype};
  if (dense()) return t;
  const int64_t rows = band_rows();
  for (int k = 1; k <= s.rank; ++k) {
    if (product(s, 0, k) == rows && product(s, k, s.rank) == numel() / rows) {
      t.row_stride = row_stride;
      t.row_dims = k;
      return t;
    }
  }
  fail("cannot view the band {} (rows {} apart) as {}: its rows do not split off", shape.str(),
       row_stride, s.str());
}

Tensor Tensor::columns(int64_t begin, int64_t n) const {
  check(shape.rank == 2 && begin >= 0 && n >= 1 && begin + n <= shape[1],
        "columns [{}, {}) of {}: expected a rank-2 tensor that has them", begin, begin + n,
        shape.str());
  if (begin == 0 && n == shape[1]) return *this;
  Tensor t{static_cast<char*>(data) + size_t(begin) * dtype_size(dtype), Shape{shape[0], n}, dtype};
  t.row_stride = pitch(1);
  t.row_dims = 1;
  return t;
}

Tensor Tensor::slice(int64_t begin, int64_t n) const {
  check(dense(), "slice of the band {}: only dense tensors slice", shape.str());
  check(begin >= 0 && n >= 0 && begin + n <= numel(), "slice [{}, {}) out of range for {}", begin,
        begin + n, shape.str());
  return Tensor{static_cast<char*>(data) + size_t(begin) * dtype_size(dtype), Shape{n}, dtype};
}

Tensor Tensor::operator[](int64_t i) const {
  check(dense(), "index into the band {}: only dense tensors index", shape.str());
  check(shape.rank >= 1 && i >= 0 && i < shape[0], "index {} out of range for {}", i, shape.str());
  Shape s;
  for (int d = 1; d < shape.rank; ++d) s.dims[s.rank++] = shape.dims[d];
  if (s.rank == 0) s = Shape{1};
  int64_t n = s.numel();
  return Tensor{static_cast<char*>(data) + size_t(i * n) * dtype_size(dtype), s, dtype};
}

}  // namespace lmtrain
