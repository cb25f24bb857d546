// Host memory and the elementwise utilities. On the CPU every float tensor is f32, so the only
// dtype conversion `copy` has to support is none at all.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "backend/cpu/checks.h"
#include "backend/cpu/cpu_backend.h"
#include "backend/op_checks.h"

namespace lmtrain {

namespace {

void check_f32(const char* op, const char* name, Tensor t) {
  check(t.dtype == DType::f32, "{}: {} must be f32 on the cpu backend, got {}", op, name,
        dtype_name(t.dtype));
}

}  // namespace

// 64-byte alignment keeps rows cache-line aligned for the vectorised loops and OpenBLAS.
Buffer CpuBackend::allocate(size_t bytes) {
  constexpr size_t kAlign = 64;
  size_t padded = (bytes + kAlign - 1) / kAlign * kAlign;  // aligned_alloc needs a multiple
  void* ptr = std::aligned_alloc(kAlign, padded == 0 ? kAlign : padded);
  // The backend cannot tell what the memory was for: name the keys that size every allocation.
  check(ptr != nullptr,
        "allocate: out of host memory for {} bytes ({:.2f} GiB); `lmtrain info --config ...` "
        "prints the parameters and activation memory of a config: lower batch.device_batch (eval "
        "--batch), model.sequence_len, model.depth, model.aspect_ratio or model.vocab_size",
        bytes, double(bytes) / 1073741824.0);
  return track(ptr, bytes, [](void* p) { std::free(p); });
}

// An empty tensor (a rank's share of rows it does not own) may come with a null host pointer,
// which memcpy must not be given even for 0 bytes.
void CpuBackend::upload(Tensor dst, const void* host) {
  if (const size_t bytes = dst.bytes()) std::memcpy(dst.data, host, bytes);
}

void CpuBackend::download(void* host, Tensor src) {
  if (const size_t bytes = src.bytes()) std::memcpy(host, src.data, bytes);
}

void CpuBackend::fill(Tensor x, float value) {
  cpu::require_dense("fill", {x});
  check_f32("fill", "x", x);
  float* p = x.f32();
  int64_t n = x.numel();
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) p[i] = value;
}

void CpuBackend::copy(Tensor dst, Tensor src) {
  check(dst.numel() == src.numel(), "copy: dst {} and src {} differ in element count",
        dst.shape.str(), src.shape.str());
  check(dst.dtype == src.dtype && dst.dtype != DType::bf16,
        "copy: the cpu backend copies f32 to f32 or i32 to i32, not {} to {}",
        dtype_name(src.dtype), dtype_name(dst.dtype));
  if (dst.dense() && src.dense()) {
    std::memmove(dst.data, src.data, dst.bytes());
    return;
  }
  const RowCopy c = row_copy(dst, src);
  const size_t size = dtype_size(dst.dtype);
  for (int64_t r = 0; r < c.rows; ++r) {
    std::memmove(static_cast<char*>(dst.data) + size_t(r * c.dst_pitch) * size,
                 static_cast<const char*>(src.data) + size_t(r * c.src_pitch) * size,
                 size_t(c.width) * size);
  }
}

void CpuBackend::add(Tensor y, Tensor x, float alpha) {
  cpu::require_dense("add", {y, x});
  check_f32("add", "y", y);
  check_f32("add", "x", x);
  check_add_args(y, x);
  float* py = y.f32();
  const float* px = x.f32();
  int64_t n = y.numel();
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) py[i] += alpha * px[i];
}

void CpuBackend::scale(Tensor x, float alpha) {
  cpu::require_dense("scale", {x});
  check_f32("scale", "x", x);
  float* p = x.f32();
  int64_t n = x.numel();
#pragma omp parallel for
  for (int64_t i = 0; i < n; ++i) p[i] *= alpha;
}

// Partial sums over fixed-size chunks, added in chunk order: the result is the same for any
// thread count, which bit-exact training resume depends on (this feeds gradient clipping).
void CpuBackend::sum_squares(Tensor out, Tensor x) {
  cpu::require_dense("sum_squares", {out, x});
  check_f32("sum_squares", "x", x);
  check_f32("sum_squares", "out", out);
  check(out.numel() == 1, "sum_squares: out must have one element, got {}", out.shape.str());
  constexpr int64_t kChunk = 1 << 14;
  const float* p = x.f32();
  int64_t n = x.numel();
  int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks, 0.0);
#pragma omp parallel for
  for (int64_t c = 0; c < chunks; ++c) {
    double s = 0.0;
    for (int64_t i = c * kChunk; i < std::min(n, (c + 1) * kChunk); ++i) s += double(p[i]) * p[i];
    partial[c] = s;
  }
  double total = 0.0;
  for (double s : partial) total += s;
  out.f32()[0] = float(total);
}

}  // namespace lmtrain
