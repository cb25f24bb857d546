// The CUDA backend's lifetime, memory and elementwise utilities.
#include "backend/cuda/cuda_backend.h"

#include "backend/cuda/attention_cudnn.h"
#include "backend/cuda/checks.h"
#include "backend/op_checks.h"
#include "cuda_check.cuh"
#include "elementwise.cuh"

namespace lmtrain {

using namespace cuda_ops;
using cuda::cuda_check;

namespace {

// cuBLASLt's workspace: enough for the split-K and stream-K algorithms of large matmuls.
constexpr size_t kLtWorkspaceBytes = size_t(32) << 20;

}  // namespace

CudaBackend::CudaBackend(DType activation) : activation_(activation) {
  check(activation == DType::f32 || activation == DType::bf16,
        "cuda backend: activation dtype must be f32 or bf16, got {}", dtype_name(activation));
  cuda_check(cudaGetDevice(&device_), "cudaGetDevice");
  cudaDeviceProp prop{};
  cuda_check(cudaGetDeviceProperties(&prop, device_), "cudaGetDeviceProperties");
  device_name_ = prop.name;

  cudaStream_t stream = nullptr;
  // Non-blocking: no implicit ordering against work others put on the legacy default stream.
  cuda_check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  stream_.reset(stream);
  cublasLtHandle_t lt = nullptr;
  const cublasStatus_t status = cublasLtCreate(&lt);
  check(status == CUBLAS_STATUS_SUCCESS, "cuBLASLt error in cublasLtCreate: {}",
        cublasLtGetStatusString(status));
  lt_.reset(lt);
  lt_workspace_ = allocate(kLtWorkspaceBytes);
  configure_matmul_tuning();
  // The fp32 mode keeps our own attention kernel and the unfused relu2 (exact comparison with the
  // CPU; the cuDNN graphs are bf16 here).
  if (activation_ == DType::bf16) {
    cudnn_attention_ = cuda::CudnnAttention::create(stream_.get());
    cudnn_matmul_relu2_ = cuda::CudnnMatmulRelu2::create(stream_.get());
  }
}

// Kernels may still be running on the stream; they must finish before their memory (freed by
// the Buffers' owners) and the stream go away.
CudaBackend::~CudaBackend() { cudaStreamSynchronize(stream_.get()); }

size_t CudaBackend::free_bytes() const {
  size_t free = 0, total = 0;
  if (cudaMemGetInfo(&free, &total) != cudaSuccess) return 0;
  return free;
}

Buffer CudaBackend::allocate(size_t bytes) {
  void* ptr = nullptr;
  const cudaError_t status = cudaMalloc(&ptr, bytes);
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear the error so that later calls do not report it again
    size_t free = 0, total = 0;
    cudaMemGetInfo(&free, &total);
    fail(
        "allocate: cudaMalloc of {} bytes ({:.1f} MiB) failed on {}: {} ({:.1f} MiB free of "
        "{:.1f} MiB)",
        bytes, bytes / 1048576.0, device_name_, cudaGetErrorString(status), free / 1048576.0,
        total / 1048576.0);
  }
  return track(ptr, bytes, [](void* p) { cudaFree(p); });
}

// From pageable host memory the copy returns once `host` has been staged, so the caller may
// reuse it immediately; the transfer itself stays ordered on the stream.
void CudaBackend::upload(Tensor dst, const void* host) {
  cuda_check(cudaMemcpyAsync(dst.data, host, dst.bytes(), cudaMemcpyHostToDevice, stream_.get()),
             "upload");
}

void CudaBackend::download(void* host, Tensor src) {
  cuda_check(cudaMemcpyAsync(host, src.data, src.bytes(), cudaMemcpyDeviceToHost, stream_.get()),
             "download");
  cuda_check(cudaStreamSynchronize(stream_.get()), "download (stream synchronize)");
}

void CudaBackend::synchronize() { cuda_check(cudaStreamSynchronize(stream_.get()), "synchronize"); }

void* CudaBackend::scratch(size_t bytes) {
  if (bytes > scratch_.bytes()) {
    // Queued kernels may still read the old scratch: let them finish before it is freed.
    synchronize();
    scratch_ = Buffer();
    scratch_ = allocate(bytes);
  }
  return scratch_.data();
}

void CudaBackend::fill(Tensor x, float value) {
  dispatch("fill", x.dtype, [&](auto tag) {
    using T = decltype(tag);
    cuda::fill(ptr<T>(x), x.numel(), value, stream_.get());
  });
}

void CudaBackend::copy(Tensor dst, Tensor src) {
  check(dst.numel() == src.numel(), "copy: dst {} and src {} differ in element count",
        dst.shape.str(), src.shape.str());
  if (!dst.dense() || !src.dense()) {
    const RowCopy c = row_copy(dst, src);
    if (c.rows == 0) return;  // an empty band
    const size_t size = dtype_size(dst.dtype);
    cuda_check(cudaMemcpy2DAsync(dst.data, size_t(c.dst_pitch) * size, src.data,
                                 size_t(c.src_pitch) * size, size_t(c.width) * size, size_t(c.rows),
                                 cudaMemcpyDeviceToDevice, stream_.get()),
               "copy (band)");
    return;
  }
  if (dst.dtype == src.dtype && dst.data == src.data) return;
  // Overlapping buffers would race: a converting kernel's threads read and write packs of
  // different byte widths.
  check(!overlap(dst, src), "copy: dst and src overlap");
  if (dst.dtype == src.dtype) {
    cuda_check(
        cudaMemcpyAsync(dst.data, src.data, dst.bytes(), cudaMemcpyDeviceToDevice, stream_.get()),
        "copy");
  } else if (dst.dtype == DType::bf16 && src.dtype == DType::f32) {
    cuda::convert(ptr<__nv_bfloat16>(dst), ptr<float>(src), dst.numel(), stream_.get());
  } else if (dst.dtype == DType::f32 && src.dtype == DType::bf16) {
    cuda::convert(ptr<float>(dst), ptr<__nv_bfloat16>(src), dst.numel(), stream_.get());
  } else {
    fail("copy: no conversion from {} to {}", dtype_name(src.dtype), dtype_name(dst.dtype));
  }
}

void CudaBackend::add(Tensor y, Tensor x, float alpha) {
  check_add_args(y, x);
  expect_dtype("add", "x", x, y.dtype);
  dispatch("add", y.dtype, [&](auto tag) {
    using T = decltype(tag);
    cuda::add(ptr<T>(y), ptr<T>(x), y.numel(), alpha, stream_.get());
  });
}

void CudaBackend::scale(Tensor x, float alpha) {
  dispatch("scale", x.dtype, [&](auto tag) {
    using T = decltype(tag);
    cuda::scale(ptr<T>(x), x.numel(), alpha, stream_.get());
  });
}

// The chunk sums go to the scratch: stream order keeps one sum's from the next one's.
void CudaBackend::sum_squares(Tensor out, Tensor x) {
  expect_dtype("sum_squares", "out", out, DType::f32);
  check(out.numel() == 1, "sum_squares: out must have one element, got {}", out.shape.str());
  void* partials = scratch(cuda::sum_squares_scratch_bytes(x.numel()));
  dispatch("sum_squares", x.dtype, [&](auto tag) {
    using T = decltype(tag);
    cuda::sum_squares(ptr<float>(out), ptr<T>(x), x.numel(), partials, stream_.get());
  });
}

}  // namespace lmtrain
