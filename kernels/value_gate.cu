#include "common.cuh"
#include "cuda_check.cuh"
#include "reduce.cuh"
#include "value_gate.cuh"

namespace lmtrain::cuda {

namespace {

// A group of L lanes per (token, kv head) (launch_rows: 16 at D = 128 in bf16, two rows per
// warp); lane l moves elements [l * W, l * W + W) of each L * W of the head's D.
template <typename T, int W>
__global__ void value_gate_forward_kernel(T* v, float* gate, const T* xn, const T* gate_w,
                                          const T* table, const int32_t* tokens, ValueGateShape s,
                                          int L) {
  const LaneGroup r(s.N * s.Hkv, L);
  const int64_t n = r.row / s.Hkv, h = r.row % s.Hkv;
  float a = 0.f;
  for (int64_t g = r.lane; r.valid && g < s.G; g += L)
    a += to_float(xn[n * s.C + g]) * to_float(gate_w[h * s.G + g]);
  a = warp_sum(a, L);
  if (!r.valid) return;
  const float sg = 2.f / (1.f + expf(-a));
  if (r.lane == 0) gate[r.row] = sg;
  const int32_t id = tokens[n];
  check_token(id, n, s.V);
  T* vr = v + n * s.pitch + h * s.D;
  const T* er = table + (int64_t(id) * s.Hkv + h) * s.D;
  for (int64_t d = int64_t(r.lane) * W; d < s.D; d += L * W) {
    float x[W], e[W];
    load<W>(x, vr + d);
    load<W>(e, er + d);
#pragma unroll
    for (int k = 0; k < W; ++k) x[k] += sg * e[k];
    store<W>(vr + d, x);
  }
}

// Lane groups as in the forward: the gate's logit gradient da, and dve.
template <typename T, int W>
__global__ void gate_grad_kernel(float* da, T* dve, const T* dv, const T* table,
                                 const int32_t* tokens, const float* gate, ValueGateShape s,
                                 int L) {
  const LaneGroup r(s.N * s.Hkv, L);
  const int64_t n = r.row / s.Hkv, h = r.row % s.Hkv;
  float dgate = 0.f;
  if (r.valid) {
    const int32_t id = tokens[n];
    check_token(id, n, s.V);
    const T* gr = dv + n * s.pitch + h * s.D;
    const T* er = table + (int64_t(id) * s.Hkv + h) * s.D;
    const float sg = gate[r.row];
    for (int64_t d = int64_t(r.lane) * W; d < s.D; d += L * W) {
      float g[W], e[W];
      load<W>(g, gr + d);
      load<W>(e, er + d);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        dgate += g[k] * e[k];
        g[k] *= sg;
      }
      store<W>(dve + r.row * s.D + d, g);
    }
  }
  dgate = warp_sum(dgate, L);
  if (r.valid && r.lane == 0) {
    const float sg = gate[r.row];
    da[r.row] = dgate * sg * (1.f - 0.5f * sg);
  }
}

// One thread per (token, gate channel): dxn[n, g] += sum_h da[n, h] gate_w[h, g].
template <typename T>
__global__ void dxn_kernel(T* dxn, const float* da, const T* gate_w, ValueGateShape s) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= s.N * s.G) return;
  const int64_t n = i / s.G, g = i % s.G;
  float acc = 0.f;
  for (int64_t h = 0; h < s.Hkv; ++h) acc += da[n * s.Hkv + h] * to_float(gate_w[h * s.G + g]);
  dxn[n * s.C + g] = from_float<T>(to_float(dxn[n * s.C + g]) + acc);
}

// dgate_w[h, g] += sum_n da[n, h] xn[n, g] in two passes with a split fixed by the sizes alone:
// block c sums rows [c * kGateRows, (c + 1) * kGateRows) for every weight (lanes along g read
// each row's first G channels together) into partials[w * chunks + c], then one block per weight
// adds its chunks (reduce.cuh's segment_total). One block per weight walking all N rows left
// most of the GPU idle (Hkv * G = 192 blocks), and so did one thread per weight adding 512
// chunks of 256 rows one after another (a d12 batch, 131072 rows); chunks of 64 rows give 2048
// blocks for the first pass and 8 partials per thread for the second.
constexpr int64_t kGateRows = 64;

template <typename T>
__global__ void dgate_w_chunk_kernel(float* partials, const float* da, const T* xn,
                                     ValueGateShape s, int64_t chunks) {
  const int64_t begin = int64_t(blockIdx.x) * kGateRows, end = min(s.N, begin + kGateRows);
  const int64_t weights = s.Hkv * s.G;
  for (int64_t w = threadIdx.x; w < weights; w += blockDim.x) {
    const int64_t h = w / s.G, g = w % s.G;
    float acc = 0.f;
    for (int64_t n = begin; n < end; ++n) acc += da[n * s.Hkv + h] * to_float(xn[n * s.C + g]);
    partials[w * chunks + blockIdx.x] = acc;
  }
}

int64_t gate_chunks(const ValueGateShape& s) { return (s.N + kGateRows - 1) / kGateRows; }

}  // namespace

template <typename T>
void value_gate_forward(T* v, float* gate, const T* xn, const T* gate_w, const T* table,
                        const int32_t* tokens, const ValueGateShape& s, cudaStream_t stream) {
  if (s.N * s.Hkv == 0) return;
  launch_rows<kPack<T>>(rows_packed<T>(s.D, v, table) && s.pitch % kPack<T> == 0, s.N * s.Hkv, s.D,
                        [&](auto W, int L, unsigned blocks) {
                          value_gate_forward_kernel<T, decltype(W)::value>
                              <<<blocks, kThreads, 0, stream>>>(v, gate, xn, gate_w, table, tokens,
                                                                s, L);
                        });
  launch_check("value_gate_forward", stream);
}

size_t value_gate_backward_scratch_bytes(const ValueGateShape& s) {
  return size_t(s.N * s.Hkv + gate_chunks(s) * s.Hkv * s.G) * sizeof(float);
}

template <typename T>
void value_gate_backward(T* dxn, float* dgate_w, T* dve, const T* dv, const T* xn, const T* gate_w,
                         const T* table, const int32_t* tokens, const float* gate,
                         const ValueGateShape& s, void* scratch, cudaStream_t stream) {
  if (s.N * s.Hkv == 0) return;
  auto* da = static_cast<float*>(scratch);
  launch_rows<kPack<T>>(rows_packed<T>(s.D, dve, dv, table) && s.pitch % kPack<T> == 0, s.N * s.Hkv,
                        s.D, [&](auto W, int L, unsigned blocks) {
                          gate_grad_kernel<T, decltype(W)::value><<<blocks, kThreads, 0, stream>>>(
                              da, dve, dv, table, tokens, gate, s, L);
                        });
  launch_check("value_gate_backward (gate)", stream);
  if (s.G == 0) return;
  dxn_kernel<<<blocks_for(s.N * s.G, kThreads), kThreads, 0, stream>>>(dxn, da, gate_w, s);
  launch_check("value_gate_backward (dxn)", stream);
  float* partials = da + s.N * s.Hkv;
  const int64_t chunks = gate_chunks(s), weights = s.Hkv * s.G;
  dgate_w_chunk_kernel<<<unsigned(chunks), kThreads, 0, stream>>>(partials, da, xn, s, chunks);
  launch_check("value_gate_backward (dgate_w chunks)", stream);
  reduce_detail::segment_total<float, true>
      <<<unsigned(weights), kThreads, 0, stream>>>(dgate_w, partials, chunks);
  launch_check("value_gate_backward (dgate_w)", stream);
}

using bf16 = __nv_bfloat16;
template void value_gate_forward<float>(float*, float*, const float*, const float*, const float*,
                                        const int32_t*, const ValueGateShape&, cudaStream_t);
template void value_gate_forward<bf16>(bf16*, float*, const bf16*, const bf16*, const bf16*,
                                       const int32_t*, const ValueGateShape&, cudaStream_t);
template void value_gate_backward<float>(float*, float*, float*, const float*, const float*,
                                         const float*, const float*, const int32_t*, const float*,
                                         const ValueGateShape&, void*, cudaStream_t);
template void value_gate_backward<bf16>(bf16*, float*, bf16*, const bf16*, const bf16*, const bf16*,
                                        const bf16*, const int32_t*, const float*,
                                        const ValueGateShape&, void*, cudaStream_t);

}  // namespace lmtrain::cuda
