#include "common.cuh"
#include "cuda_check.cuh"
#include "relu2.cuh"

namespace lmtrain::cuda {

namespace {

template <typename T>
__global__ void relu2_forward_kernel(T* out, const T* x, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float r = fmaxf(to_float(x[i]), 0.f);
  out[i] = from_float<T>(r * r);
}

template <typename T>
__global__ void relu2_backward_kernel(T* dx, const T* dout, const T* x, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float r = fmaxf(to_float(x[i]), 0.f);
  dx[i] = from_float<T>(2.f * r * to_float(dout[i]));
}

}  // namespace

template <typename T>
void relu2_forward(T* out, const T* x, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  relu2_forward_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(out, x, n);
  launch_check("relu2_forward", stream);
}

template <typename T>
void relu2_backward(T* dx, const T* dout, const T* x, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  relu2_backward_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(dx, dout, x, n);
  launch_check("relu2_backward", stream);
}

using bf16 = __nv_bfloat16;
template void relu2_forward<float>(float*, const float*, int64_t, cudaStream_t);
template void relu2_forward<bf16>(bf16*, const bf16*, int64_t, cudaStream_t);
template void relu2_backward<float>(float*, const float*, const float*, int64_t, cudaStream_t);
template void relu2_backward<bf16>(bf16*, const bf16*, const bf16*, int64_t, cudaStream_t);

}  // namespace lmtrain::cuda
