// One block per row over the padded vocabulary: a max pass, a sum-of-exp pass and, for
// training, a gradient pass that overwrites the row. The row (a few hundred KB at most) is
// re-read from L2 by each pass, which is simpler than caching tanh values in shared memory.
#include <cstdio>

#include "common.cuh"
#include "cuda_check.cuh"
#include "softcap_cross_entropy.cuh"

namespace lmtrain::cuda {

namespace {

constexpr int kBlock = 512;

template <typename T>
__global__ void softcap_cross_entropy_kernel(T* logits, float* losses, const int32_t* targets,
                                             int64_t Vp, int vocab, float softcap,
                                             float grad_scale) {
  const int64_t row = blockIdx.x;
  T* z = logits + row * Vp;
  const int32_t target = targets[row];
  if (target != -1 && (target < 0 || target >= vocab)) {
    if (threadIdx.x == 0)
      printf("softcap_cross_entropy: target %d at row %lld is neither -1 nor below vocab %d\n",
             target, (long long)row, vocab);
    __trap();
  }
  if (target == -1) {
    if (threadIdx.x == 0) losses[row] = 0.f;
    if (grad_scale != 0.f)
      for (int64_t j = threadIdx.x; j < Vp; j += blockDim.x) z[j] = from_float<T>(0.f);
    return;
  }
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x)
    mx = fmaxf(mx, softcap * tanhf(to_float(z[j]) / softcap));
  mx = block_max(mx);
  float sum = 0.f;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x)
    sum += expf(softcap * tanhf(to_float(z[j]) / softcap) - mx);
  sum = block_sum(sum);
  const float lse = mx + logf(sum);
  const float target_logit = softcap * tanhf(to_float(z[target]) / softcap);
  if (threadIdx.x == 0) losses[row] = lse - target_logit;
  if (grad_scale == 0.f) return;
  __syncthreads();  // z[target] is read by all threads above; the gradient pass overwrites it
  // dL/dc = softmax(c) - onehot(target); dc/dz = 1 - tanh^2.
  for (int64_t j = threadIdx.x; j < Vp; j += blockDim.x) {
    float g = 0.f;
    if (j < vocab) {
      const float th = tanhf(to_float(z[j]) / softcap);
      const float p = expf(softcap * th - lse) - (j == target ? 1.f : 0.f);
      g = grad_scale * p * (1.f - th * th);
    }
    z[j] = from_float<T>(g);
  }
}

}  // namespace

template <typename T>
void softcap_cross_entropy(T* logits, float* losses, const int32_t* targets, int64_t N, int64_t Vp,
                           int vocab, float softcap, float grad_scale, cudaStream_t stream) {
  if (N == 0) return;
  softcap_cross_entropy_kernel<<<unsigned(N), kBlock, 0, stream>>>(logits, losses, targets, Vp,
                                                                   vocab, softcap, grad_scale);
  launch_check("softcap_cross_entropy", stream);
}

using bf16 = __nv_bfloat16;
template void softcap_cross_entropy<float>(float*, float*, const int32_t*, int64_t, int64_t, int,
                                           float, float, cudaStream_t);
template void softcap_cross_entropy<bf16>(bf16*, float*, const int32_t*, int64_t, int64_t, int,
                                          float, float, cudaStream_t);

}  // namespace lmtrain::cuda
