// One block per row over the padded vocabulary, in packs of V logits: one pass for the
// log-sum-exp (an online softmax: each thread keeps a running max and a sum of exp relative to
// it, then the block combines them) and, for training, a gradient pass that overwrites the row.
// The row (a few hundred KB at most) is re-read from L2 by the second pass, which is simpler
// than caching tanh values in shared memory.
#include <cstdio>

#include "common.cuh"
#include "cuda_check.cuh"
#include "softcap_cross_entropy.cuh"

namespace lmtrain::cuda {

namespace {

constexpr int kBlock = 512;

template <int V, typename T>
__global__ void softcap_cross_entropy_kernel(T* logits, float* losses, const int32_t* targets,
                                             int64_t Vp, int vocab, float softcap,
                                             float grad_scale) {
  const int64_t row = blockIdx.x;
  T* z = logits + row * Vp;
  const int32_t target = targets[row];
  if (target != -1 && (target < 0 || target >= vocab)) {
    // Thread 0 alone traps, after printing: a warp trapping first would lose the message. The
    // target is the block's, so no other thread waits at a barrier.
    if (threadIdx.x == 0) {
      printf("softcap_cross_entropy: target %d at row %lld is neither -1 nor below vocab %d\n",
             target, (long long)row, vocab);
      __trap();
    }
    return;
  }
  if (target == -1) {
    if (threadIdx.x == 0) losses[row] = 0.f;
    if (grad_scale != 0.f) {
      const float zero[V] = {};
      for (int64_t j = threadIdx.x * V; j < Vp; j += blockDim.x * V) store(z + j, zero);
    }
    return;
  }
  // Running max m and sum of exp(c - m) over this thread's logits c = softcap * tanh(z / softcap).
  float m = -INFINITY, sum = 0.f;
  for (int64_t j = threadIdx.x * V; j < vocab; j += blockDim.x * V) {
    float v[V];
    load(v, z + j);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (j + k >= vocab) break;
      const float c = softcap * tanhf(v[k] / softcap);
      if (c > m) {
        sum = sum * expf(m - c) + 1.f;
        m = c;
      } else {
        sum += expf(c - m);
      }
    }
  }
  const float mx = block_max(m);
  // A thread that saw no logits has m = -inf and sum 0; one that saw only NaNs has m = -inf too
  // (NaN > m is false) but sum NaN, which must reach the loss, as on the CPU.
  sum = block_sum(m == -INFINITY ? sum : sum * expf(m - mx));
  const float lse = mx + logf(sum);
  const float target_logit = softcap * tanhf(to_float(z[target]) / softcap);
  if (threadIdx.x == 0) losses[row] = lse - target_logit;
  if (grad_scale == 0.f) return;
  __syncthreads();  // z[target] is read by all threads above; the gradient pass overwrites it
  // dL/dc = softmax(c) - onehot(target); dc/dz = 1 - tanh^2.
  for (int64_t j = threadIdx.x * V; j < Vp; j += blockDim.x * V) {
    float v[V];
    load(v, z + j);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      float g = 0.f;
      if (j + k < vocab) {
        const float th = tanhf(v[k] / softcap);
        const float p = expf(softcap * th - lse) - (j + k == target ? 1.f : 0.f);
        g = grad_scale * p * (1.f - th * th);
      }
      v[k] = g;
    }
    store(z + j, v);
  }
}

}  // namespace

template <typename T>
void softcap_cross_entropy(T* logits, float* losses, const int32_t* targets, int64_t N, int64_t Vp,
                           int vocab, float softcap, float grad_scale, cudaStream_t stream) {
  if (N == 0) return;
  // Packs when whole rows do: Vp a multiple of the pack, the logits aligned.
  launch_packed<kPack<T>>(Vp % kPack<T> == 0 && packs_aligned(16, logits), [&](auto V) {
    softcap_cross_entropy_kernel<decltype(V)::value><<<unsigned(N), kBlock, 0, stream>>>(
        logits, losses, targets, Vp, vocab, softcap, grad_scale);
  });
  launch_check("softcap_cross_entropy", stream);
}

using bf16 = __nv_bfloat16;
template void softcap_cross_entropy<float>(float*, float*, const int32_t*, int64_t, int64_t, int,
                                           float, float, cudaStream_t);
template void softcap_cross_entropy<bf16>(bf16*, float*, const int32_t*, int64_t, int64_t, int,
                                          float, float, cudaStream_t);

}  // namespace lmtrain::cuda
