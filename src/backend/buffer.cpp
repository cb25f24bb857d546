#include "backend/backend.h"

namespace lmtrain {

Tensor Buffer::tensor(Shape shape, DType dtype, size_t offset_bytes) const {
  size_t need = offset_bytes + size_t(shape.numel()) * dtype_size(dtype);
  check(need <= bytes_, "buffer view {} {} at offset {} needs {} bytes, buffer has {}", shape.str(),
        dtype_name(dtype), offset_bytes, need, bytes_);
  return Tensor{static_cast<char*>(ptr_.get()) + offset_bytes, shape, dtype};
}

}  // namespace lmtrain
