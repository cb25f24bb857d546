// out = alpha * op(a) @ op(b) (+ out, or + another addend) through cuBLASLt.
//
// cuBLASLt is column-major. A row-major (r, c) array is the column-major (c, r) array holding its
// transpose, so the row-major product out = op(a) op(b) is computed as the column-major product
// out^T = op(b)^T op(a)^T: cuBLASLt's A is our b, its B is our a, each with its own transpose
// flag, and its C (N, M) is our out. Rank-3 tensors are dense, so batches are strided; rank-2
// ones may be bands of a wider array, whose row stride is the leading dimension.
//
// Compute is fp32 (CUBLAS_COMPUTE_32F). With f32 activations (the mode that is compared with the
// CPU) f32 matmuls stay true fp32; with bf16 activations an f32 matmul may use TF32 tensor cores
// (the model and the optimizer's orthogonalization run theirs in bf16 there).
//
// The algorithm of each shape (LMTRAIN_MATMUL_TUNING):
// - table (the default): the one a table of measured algorithms gives for this GPU and cuBLASLt
//   (backend/matmul_table.h: configs/matmul/, or the file LMTRAIN_MATMUL_TABLE names), and for a
//   shape the table lacks, cuBLASLt's first suggestion. Either way the choice is fixed by the GPU
//   model, the library and the table, so runs stay bit-identical.
// - heuristic: always cuBLASLt's first suggestion.
// - measure: the fastest of cuBLASLt's first kTuneCandidates suggestions, timed on the shape's
//   first call. Timing makes the choice depend on the run (another run may pick another
//   algorithm, which can sum in another order). With LMTRAIN_MATMUL_TABLE the choices are
//   written to that file, which table mode then reads back.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <utility>

#include "backend/cuda/cuda_backend.h"
#include "backend/op_checks.h"
#include "cuda_check.cuh"

namespace lmtrain {

using cuda::cuda_check;

namespace {

void lt_check(cublasStatus_t status, const char* what) {
  check(status == CUBLAS_STATUS_SUCCESS, "cuBLASLt error in {}: {}", what,
        cublasLtGetStatusString(status));
}

cudaDataType_t cuda_type(DType t) { return t == DType::bf16 ? CUDA_R_16BF : CUDA_R_32F; }

// The largest power of two up to 256 that divides the address.
int alignment(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  int align = 256;
  while (align > 1 && address % align != 0) align /= 2;
  return align;
}

constexpr int kTuneCandidates = 8;  // suggestions timed per shape
constexpr int kTuneRuns = 5;        // timed runs of each, after one warm-up run
// Another suggestion replaces the first only when it is faster by more than this fraction:
// less is within the timing noise, and a table should not record a choice noise made.
constexpr double kTuneMargin = 0.01;
// A call that accumulates into its output is timed on a scratch output instead; above this
// size it keeps the first suggestion rather than grow the scratch.
constexpr size_t kTuneScratchLimit = size_t(64) << 20;

}  // namespace

void CudaBackend::configure_matmul_tuning() {
  const char* mode = std::getenv("LMTRAIN_MATMUL_TUNING");
  const std::string name = mode ? mode : "";
  if (name.empty() || name == "table") {
    matmul_tuning_ = MatmulTuning::table;
  } else if (name == "heuristic") {
    matmul_tuning_ = MatmulTuning::heuristic;
  } else if (name == "measure") {
    matmul_tuning_ = MatmulTuning::measure;
  } else {
    fail("LMTRAIN_MATMUL_TUNING={} is not one of table (the default), heuristic, measure", name);
  }
  int sm_count = 0;
  cuda_check(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device_),
             "cudaDeviceGetAttribute");
  const MatmulDevice device{device_name_, sm_count, cublasLtGetVersion()};
  const char* path = std::getenv("LMTRAIN_MATMUL_TABLE");
  if (path && *path) {
    check(matmul_tuning_ != MatmulTuning::heuristic,
          "LMTRAIN_MATMUL_TABLE={} is set, but LMTRAIN_MATMUL_TUNING=heuristic reads no table",
          path);
    if (matmul_tuning_ == MatmulTuning::measure) {
      // Made now if missing, so that a path that cannot be written fails before training; the
      // rows it holds already are taken, not timed again.
      matmul_table_out_ = path;
      MatmulTable(device).merge_into(path);
    }
    matmul_table_ = MatmulTable::load(path);
    check(matmul_table_->device() == device, "{}: a table for {}, but this is {}", path,
          matmul_table_->device().str(), device.str());
  } else if (matmul_tuning_ == MatmulTuning::table) {
    matmul_table_ = MatmulTable::find_for(device, MatmulTable::builtin_dir());
  } else if (matmul_tuning_ == MatmulTuning::measure) {
    matmul_table_.emplace(device);
  }
  const bool read = matmul_table_ && !matmul_table_->source().empty();
  const std::string from =
      read ? fmt::format(" ({} shapes from {})", matmul_table_->size(), matmul_table_->source())
           : "";
  spdlog::info("{}: matmul algorithms {}{}", device.str(),
               matmul_tuning_ == MatmulTuning::measure ? "timed per shape, not reproducible"
               : read ? "from the table, else cuBLASLt's first suggestion"
                      : "from cuBLASLt's first suggestion",
               from);
}

CudaBackend::MatmulPlan& CudaBackend::matmul_plan(const MatmulShape& key) {
  if (auto it = matmul_plans_.find(key); it != matmul_plans_.end()) return it->second;

  MatmulPlan plan;
  const cublasComputeType_t compute = key.tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  cublasLtMatmulDesc_t desc = nullptr;
  lt_check(cublasLtMatmulDescCreate(&desc, compute, CUDA_R_32F), "cublasLtMatmulDescCreate");
  plan.desc.reset(desc);
  // cuBLASLt's A is our b (transposed when trans_b), its B is our a (transposed when trans_a).
  const cublasOperation_t op_a = key.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasOperation_t op_b = key.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  lt_check(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)),
           "matmul transa");
  lt_check(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)),
           "matmul transb");

  // A column-major (rows, cols) layout with leading dimension ld (rows when dense), strided over
  // the batch.
  auto layout = [&](DType dtype, int64_t rows, int64_t cols, int64_t ld) {
    cublasLtMatrixLayout_t l = nullptr;
    lt_check(cublasLtMatrixLayoutCreate(&l, cuda_type(dtype), uint64_t(rows), uint64_t(cols), ld),
             "cublasLtMatrixLayoutCreate");
    Layout owned(l);
    if (key.batch > 1) {
      const int32_t count = int32_t(key.batch);
      const int64_t stride = rows * cols;
      lt_check(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count,
                                                sizeof(count)),
               "matmul batch count");
      lt_check(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                                &stride, sizeof(stride)),
               "matmul batch stride");
    }
    return owned;
  };
  // Our b is stored (K, N), or (N, K) when transposed; our a (M, K), or (K, M) when transposed.
  plan.a =
      key.trans_b ? layout(key.in, key.k, key.n, key.ld_b) : layout(key.in, key.n, key.k, key.ld_b);
  plan.b =
      key.trans_a ? layout(key.in, key.m, key.k, key.ld_a) : layout(key.in, key.k, key.m, key.ld_a);
  plan.out = layout(key.out, key.n, key.m, key.ld_out);

  cublasLtMatmulPreference_t pref = nullptr;
  lt_check(cublasLtMatmulPreferenceCreate(&pref), "cublasLtMatmulPreferenceCreate");
  Handle<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy> pref_owner(pref);
  const uint64_t workspace = lt_workspace_.bytes();
  lt_check(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                &workspace, sizeof(workspace)),
           "matmul workspace preference");
  const uint32_t aligns[] = {uint32_t(key.align_b), uint32_t(key.align_a), uint32_t(key.align_out),
                             uint32_t(key.align_out)};
  const cublasLtMatmulPreferenceAttributes_t align_attrs[] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  for (int i = 0; i < 4; ++i)
    lt_check(
        cublasLtMatmulPreferenceSetAttribute(pref, align_attrs[i], &aligns[i], sizeof(aligns[i])),
        "matmul alignment preference");

  // A table's algorithm, if cuBLASLt confirms that it runs this shape within the workspace.
  if (const MatmulChoice* choice = matmul_table_ ? matmul_table_->find(key) : nullptr) {
    static_assert(sizeof(plan.algo.data) == sizeof(choice->algo));
    std::memcpy(plan.algo.data, choice->algo.data(), sizeof(plan.algo.data));
    cublasLtMatmulHeuristicResult_t checked{};
    const cublasStatus_t status =
        cublasLtMatmulAlgoCheck(lt_.get(), desc, plan.a.get(), plan.b.get(), plan.out.get(),
                                plan.out.get(), &plan.algo, &checked);
    if (status == CUBLAS_STATUS_SUCCESS && checked.workspaceSize <= workspace)
      return matmul_plans_.emplace(key, std::move(plan)).first->second;
    spdlog::warn(
        "matmul {}: {} gives an algorithm that does not run here ({}); taking cuBLASLt's "
        "first suggestion",
        key.str(), matmul_table_->source().empty() ? "the table" : matmul_table_->source(),
        status == CUBLAS_STATUS_SUCCESS ? "needs more workspace" : cublasLtGetStatusString(status));
  }

  // Every mode asks for the same number of suggestions, so that the first is the same in all.
  cublasLtMatmulHeuristicResult_t results[kTuneCandidates] = {};
  int found = 0;
  lt_check(
      cublasLtMatmulAlgoGetHeuristic(lt_.get(), desc, plan.a.get(), plan.b.get(), plan.out.get(),
                                     plan.out.get(), pref, kTuneCandidates, results, &found),
      "cublasLtMatmulAlgoGetHeuristic");
  check(found > 0, "matmul: cuBLASLt has no algorithm for {}", key.str());
  plan.algo = results[0].algo;
  if (matmul_tuning_ == MatmulTuning::measure && found > 1) {
    for (int i = 0; i < found; ++i) plan.untimed.push_back(results[i].algo);
  }
  return matmul_plans_.emplace(key, std::move(plan)).first->second;
}

cublasStatus_t CudaBackend::lt_matmul(const MatmulPlan& plan, const cublasLtMatmulAlgo_t& algo,
                                      const void* a, const void* b, const void* c, void* d,
                                      float alpha, float beta) {
  return cublasLtMatmul(lt_.get(), plan.desc.get(), &alpha, b, plan.a.get(), a, plan.b.get(), &beta,
                        c, plan.out.get(), d, plan.out.get(), &algo, lt_workspace_.data(),
                        lt_workspace_.bytes(), stream_.get());
}

// Times each untimed suggestion and keeps the fastest, unless it beats the first suggestion by
// no more than kTuneMargin; records the choice in the table (and its file, if any). The runs
// read a, b and c as the real call will; they write out itself when the real call overwrites it
// anyway, and a scratch output when out is also the addend (accumulation in place), so nothing
// the call reads is changed before it runs. A suggestion that fails to run is skipped.
void CudaBackend::tune_matmul(MatmulPlan& plan, const MatmulShape& key, const void* a,
                              const void* b, const void* c, Tensor out, float alpha, float beta) {
  const std::vector<cublasLtMatmulAlgo_t> candidates = std::exchange(plan.untimed, {});
  void* d = out.data;
  if (c == out.data && beta != 0.f) {
    // out's rows at its pitch: a band's scratch keeps its layout.
    const size_t span = size_t(key.batch * key.m * key.ld_out) * dtype_size(key.out);
    if (span > kTuneScratchLimit) return;
    d = scratch(span);
    c = d;
    beta = 0.f;  // the scratch holds nothing to add
  }
  TimingEvent start = make_timing_event(), end = make_timing_event();
  double best_ms = INFINITY, first_ms = INFINITY;
  int best = -1;
  for (size_t i = 0; i < candidates.size(); ++i) {
    if (lt_matmul(plan, candidates[i], a, b, c, d, alpha, beta) != CUBLAS_STATUS_SUCCESS) continue;
    record_timing_event(start);
    bool ran = true;
    for (int r = 0; r < kTuneRuns; ++r)
      ran = ran && lt_matmul(plan, candidates[i], a, b, c, d, alpha, beta) == CUBLAS_STATUS_SUCCESS;
    record_timing_event(end);
    synchronize();
    const double ms = elapsed_ms(start, end) / kTuneRuns;
    if (!ran) continue;
    if (i == 0) first_ms = ms;
    if (ms < best_ms) best_ms = ms, best = int(i);
  }
  if (best < 0) return;  // none ran: keep the first suggestion, and let the real call report
  if (best > 0 && std::isfinite(first_ms) && best_ms > first_ms * (1 - kTuneMargin))
    best = 0, best_ms = first_ms;
  plan.algo = candidates[size_t(best)];
  spdlog::debug("matmul tuning {}: suggestion {} of {}, {:.3f} ms against the first's {:.3f} ms",
                key.str(), best + 1, candidates.size(), best_ms, first_ms);
  // The first suggestion's time is kept beside the choice (when it ran) to show the gain.
  MatmulChoice choice;
  std::memcpy(choice.algo.data(), plan.algo.data, sizeof(plan.algo.data));
  choice.ms = best_ms;
  choice.heuristic_ms = std::isfinite(first_ms) ? first_ms : best_ms;
  matmul_table_->put(key, choice);
  if (!matmul_table_out_.empty()) matmul_table_->merge_into(matmul_table_out_);
}

void CudaBackend::matmul(Tensor out, Tensor a, Tensor b, bool trans_a, bool trans_b,
                         bool accumulate, float alpha) {
  gemm(out, a, b, trans_a, trans_b, accumulate ? out : Tensor{}, alpha, 1.f);
}

void CudaBackend::matmul_add(Tensor out, Tensor a, Tensor b, bool trans_a, bool trans_b,
                             Tensor addend, float alpha, float beta) {
  check_matmul_addend(out, addend);
  check(out.dense() && addend.dense(), "matmul_add: out and addend must be dense");
  gemm(out, a, b, trans_a, trans_b, addend, alpha, beta);
}

void CudaBackend::gemm(Tensor out, Tensor a, Tensor b, bool trans_a, bool trans_b, Tensor addend,
                       float alpha, float beta) {
  const int rank = out.shape.rank;
  check((rank == 2 || rank == 3) && a.shape.rank == rank && b.shape.rank == rank,
        "matmul: out {}, a {} and b {} must all be rank 2 or all rank 3", out.shape.str(),
        a.shape.str(), b.shape.str());
  const int64_t batch = rank == 3 ? out.dim(0) : 1;
  const int64_t M = trans_a ? a.dim(-1) : a.dim(-2);
  const int64_t K = trans_a ? a.dim(-2) : a.dim(-1);
  const int64_t N = trans_b ? b.dim(-2) : b.dim(-1);
  const int64_t Kb = trans_b ? b.dim(-1) : b.dim(-2);
  check(K == Kb && out.dim(-2) == M && out.dim(-1) == N &&
            (rank == 2 || (a.dim(0) == batch && b.dim(0) == batch)),
        "matmul: a {}{} times b {}{} does not give out {}", a.shape.str(), trans_a ? "^T" : "",
        b.shape.str(), trans_b ? "^T" : "", out.shape.str());
  // Inputs share a dtype: the activation dtype, or f32 (the optimizer's matrices). f32 inputs
  // give f32 outputs; activation inputs give activations or f32 parameter gradients.
  check(a.dtype == b.dtype && (a.dtype == activation_ || a.dtype == DType::f32) &&
            (out.dtype == DType::f32 || (out.dtype == activation_ && a.dtype == activation_)),
        "matmul: unsupported dtypes out {}, a {}, b {} with {} activations", dtype_name(out.dtype),
        dtype_name(a.dtype), dtype_name(b.dtype), dtype_name(activation_));
  if (batch * M * N == 0) return;
  const bool accumulate = addend.data != nullptr;
  if (K == 0) {
    if (!accumulate) fill(out, 0.f);
    if (accumulate && addend.data != out.data) copy(out, addend);
    if (accumulate && beta != 1.f) scale(out, beta);
    return;
  }

  // Rank 2 takes bands: the row pitch is the leading dimension (matmul_add's out and addend
  // are dense, so C and D share out's layout).
  const bool bands = rank == 2;
  const int64_t ld_out = bands ? out.pitch(1) : out.dim(-1);
  check(bands || (a.dense() && b.dense() && out.dense()), "matmul: rank-3 operands must be dense");
  const MatmulShape key{M,
                        N,
                        K,
                        batch,
                        bands ? a.pitch(1) : a.dim(-1),
                        bands ? b.pitch(1) : b.dim(-1),
                        ld_out,
                        trans_a,
                        trans_b,
                        a.dtype,
                        out.dtype,
                        a.dtype == DType::f32 && activation_ == DType::bf16,
                        alignment(a.data),
                        alignment(b.data),
                        std::min(alignment(out.data), accumulate ? alignment(addend.data) : 256)};
  MatmulPlan& plan = matmul_plan(key);
  if (!accumulate) beta = 0.f;
  const void* c = accumulate ? addend.data : out.data;
  if (!plan.untimed.empty()) tune_matmul(plan, key, a.data, b.data, c, out, alpha, beta);
  lt_check(lt_matmul(plan, plan.algo, a.data, b.data, c, out.data, alpha, beta), "cublasLtMatmul");
}

}  // namespace lmtrain
