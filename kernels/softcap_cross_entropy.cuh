// Cross-entropy on softcapped logits c = cap * tanh(z / cap) over the first `vocab` columns of
// logits (N, Vp); losses (N) f32; targets i32 (-1: ignored, loss 0).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lmtrain::cuda {

// When grad_scale != 0 the logits are overwritten by d(grad_scale * sum(losses))/dz, with zeros
// in the padded columns and in ignored rows. A target outside {-1} u [0, vocab) traps the kernel
// after printing it.
template <typename T>
void softcap_cross_entropy(T* logits, float* losses, const int32_t* targets, int64_t N, int64_t Vp,
                           int vocab, float softcap, float grad_scale, cudaStream_t stream);

}  // namespace lmtrain::cuda
