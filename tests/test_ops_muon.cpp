// The CPU backend's Muon pieces against their definitions in src/backend/backend.h, computed
// here in double: momentum in its four modes, per-matrix normalisation (with and without the
// transpose, in place), the transpose, NorMuon's second moment (its state and the norm it
// keeps, per row for square and tall matrices and per column for wide ones) and the update with
// cautious or decoupled weight decay. The CPU is the GPU's reference, so each is checked alone.
#include "op_check.h"

using namespace lmtrain;
using namespace op_check;

TEST_CASE("muon_momentum follows its definition in every mode", "[ops][muon]") {
  CpuBackend cpu;
  std::mt19937 rng(41);
  const int64_t n = 37;
  const float mu = 0.9f;
  const std::vector<float> grad = randn(n, rng), buf0 = randn(n, rng);
  for (bool lerp : {true, false})
    for (bool nesterov : {true, false}) {
      std::vector<float> g = grad, buf = buf0, u(n);
      cpu.muon_momentum(f32(u, {n}), f32(buf, {n}), f32(g, {n}), mu, lerp, nesterov);
      std::vector<double> want_buf(n), want_u(n);
      for (int64_t i = 0; i < n; ++i) {
        const double gi = grad[i], bi = buf0[i];
        const double b = lerp ? bi + (1 - mu) * (gi - bi) : mu * bi + gi;
        want_buf[i] = b;
        want_u[i] = !nesterov ? b : lerp ? gi + mu * (b - gi) : gi + mu * b;
      }
      const std::string mode = fmt::format("lerp {} nesterov {}", lerp, nesterov);
      require_close(mode + " buf", buf, want_buf, 1e-6);
      require_close(mode + " u", u, want_u, 1e-6);
    }
}

TEST_CASE("normalize_matrices divides each matrix by its norm, transposed or in place",
          "[ops][muon]") {
  CpuBackend cpu;
  std::mt19937 rng(42);
  const int64_t K = 3, rows = 5, cols = 7, size = rows * cols;
  const float norm_mult = 1.02f, eps = 1e-6f;
  std::vector<float> x = randn(K * size, rng, 3.f);
  std::fill(x.begin() + size, x.begin() + 2 * size, 0.f);  // a zero matrix: eps keeps it finite
  std::vector<double> scale(K);
  for (int64_t k = 0; k < K; ++k) {
    double ss = 0;
    for (int64_t i = 0; i < size; ++i) ss += double(x[k * size + i]) * x[k * size + i];
    scale[k] = 1.0 / (std::sqrt(ss) * norm_mult + eps);
  }
  for (bool transpose : {false, true}) {
    std::vector<float> out(K * size);
    cpu.normalize_matrices(f32(out, transpose ? Shape{K, cols, rows} : Shape{K, rows, cols}),
                           f32(x, {K, rows, cols}), norm_mult, eps, transpose);
    std::vector<double> want(K * size);
    for (int64_t k = 0; k < K; ++k)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c)
          want[k * size + (transpose ? c * rows + r : r * cols + c)] =
              x[k * size + r * cols + c] * scale[k];
    require_close(fmt::format("transpose {}", transpose), out, want, 1e-6);
    if (!transpose) {
      std::vector<float> in_place = x;  // out may alias x without the transpose
      cpu.normalize_matrices(f32(in_place, {K, rows, cols}), f32(in_place, {K, rows, cols}),
                             norm_mult, eps, false);
      CHECK(in_place == out);
    }
  }
}

TEST_CASE("transpose_matrices transposes every matrix of a stack", "[ops][muon]") {
  CpuBackend cpu;
  std::mt19937 rng(43);
  const int64_t K = 2, rows = 3, cols = 4;
  std::vector<float> x = randn(K * rows * cols, rng), out(x.size());
  cpu.transpose_matrices(f32(out, {K, cols, rows}), f32(x, {K, rows, cols}));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c)
        CHECK(out[(k * cols + c) * rows + r] == x[(k * rows + r) * cols + c]);
}

TEST_CASE("normuon_second_moment updates its state and keeps each matrix's norm", "[ops][muon]") {
  CpuBackend cpu;
  std::mt19937 rng(44);
  const float beta2 = 0.95f;
  // Square and tall: one state slot per row; wide: per column.
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{4, 4}, {6, 3}, {3, 5}}) {
    const int64_t K = 2, size = rows * cols;
    const bool per_row = rows >= cols;
    const int64_t slots = per_row ? rows : cols;
    std::vector<float> x = randn(K * size, rng), x0 = x;
    std::vector<float> state = randn(K * slots, rng), state0 = state;
    for (float& s : state) s = s * s * 0.5f;  // a mean of squares is positive
    state0 = state;
    cpu.normuon_second_moment(f32(x, {K, rows, cols}), f32(state, {K, slots}), beta2);
    std::vector<double> want_state(K * slots), want_x(K * size);
    for (int64_t k = 0; k < K; ++k) {
      const float* m = x0.data() + k * size;
      double before = 0, after = 0;
      for (int64_t j = 0; j < slots; ++j) {
        double mean = 0;
        for (int64_t i = 0; i < (per_row ? cols : rows); ++i) {
          const double v = per_row ? m[j * cols + i] : m[i * cols + j];
          mean += v * v;
        }
        mean /= double(per_row ? cols : rows);
        const double s0 = state0[k * slots + j];
        want_state[k * slots + j] = s0 + (1 - beta2) * (mean - s0);
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) {
          const double v = m[r * cols + c];
          const double scaled = v / std::sqrt(want_state[k * slots + (per_row ? r : c)]);
          want_x[k * size + r * cols + c] = scaled;
          before += v * v;
          after += scaled * scaled;
        }
      for (int64_t i = 0; i < size; ++i) want_x[k * size + i] *= std::sqrt(before / after);
    }
    const std::string what = fmt::format("{}x{}", rows, cols);
    require_close(what + " state", state, want_state, 1e-6);
    require_close(what + " x", x, want_x, 1e-5);
  }
}

TEST_CASE("muon_apply decays cautiously where update and weight agree in sign", "[ops][muon]") {
  CpuBackend cpu;
  std::mt19937 rng(45);
  const int64_t n = 41;
  const float lr = 0.02f, decay = 0.003f;
  std::vector<float> p0 = randn(n, rng), x = randn(n, rng);
  x[3] = 0.f;   // x * p == 0 counts as agreeing (the mask is x * p >= 0)
  p0[7] = 0.f;  // likewise, and a zero weight stays out of the decay's reach anyway
  for (bool cautious : {true, false}) {
    std::vector<float> p = p0;
    cpu.muon_apply(f32(p, {n}), f32(x, {n}), lr, decay, cautious);
    std::vector<double> want(n);
    for (int64_t i = 0; i < n; ++i) {
      const double pi = p0[i], xi = x[i];
      want[i] =
          cautious ? pi - lr * xi - (xi * pi >= 0 ? decay * pi : 0.0) : pi * (1 - decay) - lr * xi;
    }
    require_close(fmt::format("cautious {}", cautious), p, want, 1e-6);
    if (cautious) CHECK(p[3] == Approx(p0[3] * (1 - decay)).epsilon(1e-6));
  }
}
