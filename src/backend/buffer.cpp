#include <algorithm>

#include "backend/backend.h"

namespace lmtrain {

Tensor Buffer::tensor(Shape shape, DType dtype, size_t offset_bytes) const {
  size_t need = offset_bytes + size_t(shape.numel()) * dtype_size(dtype);
  check(need <= bytes_, "buffer view {} {} at offset {} needs {} bytes, buffer has {}", shape.str(),
        dtype_name(dtype), offset_bytes, need, bytes_);
  return Tensor{static_cast<char*>(ptr_.get()) + offset_bytes, shape, dtype};
}

Buffer Backend::track(void* ptr, size_t bytes, std::function<void(void*)> release) {
  usage_->in_use += bytes;
  usage_->peak = std::max(usage_->peak, usage_->in_use);
  return Buffer(ptr, bytes, [usage = usage_, bytes, release = std::move(release)](void* p) {
    usage->in_use -= bytes;
    release(p);
  });
}

}  // namespace lmtrain
