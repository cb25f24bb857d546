// One block per row over the padded vocabulary, in packs of V logits: one pass for the
// log-sum-exp (an online softmax: each thread keeps a running max and a sum of exp relative to
// it, rescaled once per pack, then the block combines them) and, for training, a gradient pass
// that overwrites the row. The row (a few hundred KB at most) is re-read from L1/L2 by the
// second pass, which is simpler than caching tanh values in shared memory.
//
// The kernel is bound by arithmetic, not memory: a tanh and an exp per logit in each pass, on
// the special-function units, which do 16 per SM and clock against 128 fused multiply-adds. On
// bf16 logits tanh is the hardware's (tanh.approx.f32, one such instruction; relative error
// below 2^-10, where the bf16 logit itself is rounded to 2^-8) and exp is __expf (the hardware
// exp2 and a multiply; relative error a few 1e-6). That is two special-function instructions
// per logit and pass, where tanh as 1 - 2 / (exp(2x) + 1) took three. The fp32 mode, which exists
// to compare with the CPU (docs/CUDA.md), keeps tanhf, expf and the division: there even the exp2
// form of tanh (absolute error ~1e-7) made 10 training steps of the tiny model part from the CPU's
// after step 7.
#include <cstdio>

#include "common.cuh"
#include "cuda_check.cuh"
#include "softcap_cross_entropy.cuh"

namespace lmtrain::cuda {

namespace {

constexpr int kBlock = 512;

// The hardware tanh (sm_75 and later): +-inf give +-1 and NaN stays NaN.
__device__ __forceinline__ float fast_tanh(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// tanh(z / softcap) and exp(x) for logits stored as T: the fast forms for bf16, the library's
// for fp32.
template <typename T>
__device__ __forceinline__ float tanh_over(float z, float softcap) {
  if constexpr (std::is_same_v<T, float>) {
    return tanhf(z / softcap);
  } else {
    return fast_tanh(z * (1.f / softcap));
  }
}

template <typename T>
__device__ __forceinline__ float exp_of(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return expf(x);
  } else {
    return __expf(x);
  }
}

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
  // A pack starts inside the vocabulary, so its max is finite (or the pack holds a NaN, which
  // fmaxf skips and the sum carries); columns past the vocabulary get c = -inf, exp 0.
  float m = -INFINITY, sum = 0.f;
  for (int64_t j = threadIdx.x * V; j < vocab; j += blockDim.x * V) {
    float c[V];
    load(c, z + j);
    float pack_max = -INFINITY;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      c[k] = j + k < vocab ? softcap * tanh_over<T>(c[k], softcap) : -INFINITY;
      pack_max = fmaxf(pack_max, c[k]);
    }
    const float m_new = fmaxf(m, pack_max);
    sum *= exp_of<T>(m - m_new);
#pragma unroll
    for (int k = 0; k < V; ++k) sum += exp_of<T>(c[k] - m_new);
    m = m_new;
  }
  const float mx = block_max(m);
  // A thread that saw no logits has m = -inf and sum 0; one that saw only NaNs has m = -inf too
  // (NaN > m is false) but sum NaN, which must reach the loss, as on the CPU.
  sum = block_sum(m == -INFINITY ? sum : sum * exp_of<T>(m - mx));
  const float lse = mx + logf(sum);
  const float target_logit = softcap * tanh_over<T>(to_float(z[target]), softcap);
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
        const float th = tanh_over<T>(v[k], softcap);
        const float p = exp_of<T>(softcap * th - lse) - (j + k == target ? 1.f : 0.f);
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
