// Tables of matmul algorithms: for one GPU model (name and SM count) and one cuBLASLt version,
// the algorithm each matmul shape runs, as chosen by timing (LMTRAIN_MATMUL_TUNING=measure,
// docs/CUDA.md).
//
// Timing picks faster algorithms than cuBLASLt's first suggestion, but a choice made by timing
// depends on the run. A table read back gives the measured speed with the heuristic's
// reproducibility: every run on the same GPU model and library takes the same algorithm for a
// shape. configs/matmul/ holds the tables measured for the bench configs; the CUDA backend takes
// the one made for its GPU and library by default.
//
// This file knows nothing of CUDA: an algorithm is cuBLASLt's 64-byte descriptor
// (cublasLtMatmulAlgo_t), which cuBLASLt documents as serializable for the same library version.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/tensor.h"

namespace lmtrain {

// Everything that selects a cuBLASLt algorithm: shapes, transposes, dtypes, compute type, batch
// and the pointer alignments (algorithms may need more alignment than a view into a flat array
// has). Row-major terms: out (M, N) = op(a) (M, K) @ op(b) (K, N).
struct MatmulShape {
  int64_t m = 0, n = 0, k = 0, batch = 0;
  int64_t ld_a = 0, ld_b = 0, ld_out = 0;  // row pitches: the stored row length, or a band's stride
  bool trans_a = false, trans_b = false;
  DType in = DType::bf16, out = DType::bf16;
  bool tf32 = false;  // f32 inputs on TF32 tensor cores (CUBLAS_COMPUTE_32F_FAST_TF32)
  int align_a = 0, align_b = 0, align_out = 0;
  bool operator==(const MatmulShape&) const = default;
  std::string str() const;  // "MxNxK batch B ..." for messages
};

struct MatmulShapeHash {
  size_t operator()(const MatmulShape& s) const;
};

// What a table was made on. cuBLASLt promises the same results from the same algorithm only on
// the same architecture and SM count (a MIG slice has fewer SMs), and a descriptor only for the
// same library version.
struct MatmulDevice {
  std::string name;  // cudaDeviceProp::name
  int sm_count = 0;  // cudaDeviceProp::multiProcessorCount
  uint64_t cublaslt_version = 0;
  bool operator==(const MatmulDevice&) const = default;
  std::string str() const;  // "<name> (<n> SMs) with cuBLASLt <version>"
};

// One table row: the algorithm and what timing measured for it and for the first suggestion.
struct MatmulChoice {
  std::array<uint64_t, 8> algo{};
  double ms = 0, heuristic_ms = 0;
};

class MatmulTable {
 public:
  explicit MatmulTable(MatmulDevice device) : device_(std::move(device)) {}

  // Reads a table file; every error is one line naming the file and the key.
  static MatmulTable load(const std::string& path);
  // The first table (by file name) of the *.json in `dir` made for this device, if there is one.
  // A file that does not read is skipped with a warning (the tests read every one of
  // configs/matmul/), and a warning says so when there are tables for this GPU but another
  // cuBLASLt.
  static std::optional<MatmulTable> find_for(const MatmulDevice& device, const std::string& dir);
  // configs/matmul/ of the source tree this binary was built from, or, where that tree is not
  // (a bundle on another machine), under the working directory.
  static std::string builtin_dir();

  std::string dump() const;  // JSON, rows sorted by shape so that a table diffs cleanly
  void save(const std::string& path) const;  // atomically: a temporary file renamed over `path`
  // Adds this table's rows to the table file at `path`, or makes it, holding an exclusive lock
  // on `path`.lock meanwhile. Rows the file has are kept: processes measuring into one file (the
  // ranks of a run) each add the shapes the others have not. The file must be for this device.
  void merge_into(const std::string& path) const;

  const MatmulDevice& device() const { return device_; }
  // Where the table was read from ("" when it was made in memory).
  const std::string& source() const { return source_; }
  size_t size() const { return choices_.size(); }

  const MatmulChoice* find(const MatmulShape& shape) const;
  const std::unordered_map<MatmulShape, MatmulChoice, MatmulShapeHash>& rows() const {
    return choices_;
  }
  void put(const MatmulShape& shape, const MatmulChoice& choice) { choices_[shape] = choice; }

 private:
  MatmulDevice device_;
  std::string source_;
  std::unordered_map<MatmulShape, MatmulChoice, MatmulShapeHash> choices_;
};

}  // namespace lmtrain
