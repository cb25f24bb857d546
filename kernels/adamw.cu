#include "adamw.cuh"
#include "cuda_check.cuh"

namespace lmtrain::cuda {

namespace {

__global__ void adamw_kernel(float* __restrict__ param, const float* __restrict__ grad,
                             float* __restrict__ m, float* __restrict__ v, int64_t n, float lr,
                             float beta1, float beta2, float eps, float decay, float bias1,
                             float bias2_sqrt) {
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float g = grad[i];
  float p = param[i] * (1.0f - lr * decay);
  float mi = beta1 * m[i] + (1.0f - beta1) * g;
  float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
  m[i] = mi;
  v[i] = vi;
  float denom = sqrtf(vi) / bias2_sqrt + eps;
  param[i] = p - (lr / bias1) * (mi / denom);
}

}  // namespace

void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n,
                  const AdamWArgs& a, cudaStream_t stream) {
  if (n == 0) return;
  const float bias1 = 1.0f - powf(a.beta1, float(a.step));
  const float bias2_sqrt = sqrtf(1.0f - powf(a.beta2, float(a.step)));
  constexpr int kThreads = 256;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  adamw_kernel<<<blocks, kThreads, 0, stream>>>(param, grad, m, v, n, a.lr, a.beta1, a.beta2,
                                                a.eps, a.weight_decay, bias1, bias2_sqrt);
  cuda_check(cudaGetLastError(), "adamw_update launch");
}

}  // namespace lmtrain::cuda
