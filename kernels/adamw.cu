#include <cmath>

#include "adamw.cuh"
#include "common.cuh"
#include "cuda_check.cuh"

namespace lmtrain::cuda {

namespace {

__global__ void adamw_kernel(float* __restrict__ param, const float* __restrict__ grad,
                             float* __restrict__ m, float* __restrict__ v, int64_t n, float beta1,
                             float beta2, float eps, float decay, float step_size, float bc2_sqrt) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float g = grad[i];
  const float mi = beta1 * m[i] + (1.f - beta1) * g;
  const float vi = beta2 * v[i] + (1.f - beta2) * (g * g);
  m[i] = mi;
  v[i] = vi;
  const float denom = sqrtf(vi) / bc2_sqrt + eps;
  const float p = param[i] * decay;
  param[i] = p - step_size * (mi / denom);
}

}  // namespace

void adamw_update(float* param, const float* grad, float* m, float* v, int64_t n,
                  const AdamWArgs& a, cudaStream_t stream) {
  if (n == 0) return;
  // torch forms the bias corrections in double and hands them to float kernels.
  const double bc1 = 1.0 - std::pow(double(a.beta1), a.step);
  const double bc2 = 1.0 - std::pow(double(a.beta2), a.step);
  const float step_size = float(a.lr / bc1), bc2_sqrt = float(std::sqrt(bc2));
  const float decay = float(1.0 - double(a.lr) * a.weight_decay);
  adamw_kernel<<<blocks_for(n, kThreads), kThreads, 0, stream>>>(
      param, grad, m, v, n, a.beta1, a.beta2, a.eps, decay, step_size, bc2_sqrt);
  launch_check("adamw_update", stream);
}

}  // namespace lmtrain::cuda
