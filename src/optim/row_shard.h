// How one tensor's rows are split over ranks for the sharded optimizer step. Rows are padded
// to a multiple of the world size and rank r owns the contiguous chunk r; padding rows are
// zero gradients on zero weights and never leave the optimizer.
#pragma once

#include <algorithm>
#include <cstdint>

namespace lmtrain {

struct RowShard {
  int64_t rows = 0, row_len = 0, chunk_rows = 0;
  int rank = 0, world = 1;

  RowShard() = default;
  RowShard(int64_t rows_, int64_t row_len_, int rank_, int world_)
      : rows(rows_),
        row_len(row_len_),
        chunk_rows((rows_ + world_ - 1) / world_),
        rank(rank_),
        world(world_) {}

  int64_t padded_rows() const { return chunk_rows * world; }
  // The real rows this rank owns: [begin, end), possibly empty at the tail.
  int64_t begin() const { return std::min(rows, rank * chunk_rows); }
  int64_t end() const { return std::min(rows, (rank + 1) * chunk_rows); }
  int64_t owned() const { return end() - begin(); }
};

}  // namespace lmtrain
