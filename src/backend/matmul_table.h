// Tables of matmul algorithms: for one GPU model and one cuBLASLt version, the algorithm each
// matmul shape runs, as chosen by timing (LMTRAIN_MATMUL_TUNING=measure, docs/CUDA.md).
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

// One table row: the algorithm and what timing measured for it and for the first suggestion.
struct MatmulChoice {
  std::array<uint64_t, 8> algo{};
  double ms = 0, heuristic_ms = 0;
};

class MatmulTable {
 public:
  MatmulTable(std::string device, uint64_t library_version)
      : device_(std::move(device)), library_version_(library_version) {}

  // Reads a table file; every error is one line naming the file and the key.
  static MatmulTable load(const std::string& path);
  // The table of configs/matmul/ made for this device and library, if there is one.
  static std::optional<MatmulTable> builtin(const std::string& device, uint64_t library_version);

  std::string dump() const;  // JSON, rows sorted by shape so that a table diffs cleanly
  void save(const std::string& path) const;  // atomically: a temporary file renamed over `path`

  const std::string& device() const { return device_; }
  uint64_t library_version() const { return library_version_; }
  // Where the table was read from ("" when it was made in memory).
  const std::string& source() const { return source_; }
  size_t size() const { return choices_.size(); }

  const MatmulChoice* find(const MatmulShape& shape) const;
  void put(const MatmulShape& shape, const MatmulChoice& choice) { choices_[shape] = choice; }

 private:
  std::string device_;
  uint64_t library_version_;
  std::string source_;
  std::unordered_map<MatmulShape, MatmulChoice, MatmulShapeHash> choices_;
};

}  // namespace lmtrain
