// Learned C3 weights (after L2P, shared/research/beyond.md): for each main step and history length, fixed linear
// weights over a token's cached rows, fitted by least squares on calibration runs and applied by the `learned`
// approximator. Every forecasting rule the library ships (latest, SpecDiff's mix, Taylor, TaylorSeer) is such a
// linear combination with hand-written weights; this one takes them from data.
//
//   history_fit fit(timesteps, 3);             // moments, one set per (step, history length)
//   acc.calibrate(&fit); ... run calibration samples ... acc.calibrate(nullptr);
//   learned_table table = fit.solve();         // or learned_table::load(...) by an engine's own file reader
//   learned<3> approx = table.approximator<3>(run_timesteps);   // a view: host or device memory alike
//
// The calibration pairs are free: on a partial step the accelerator computes the C1 rows anyway, and before it
// caches them their history is exactly what a C3 token's would be (self-calibration, the method's own schedule).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <span>
#include <vector>

#include "concepts.hpp"
#include "storage.hpp"

namespace specdiff {

/// C3 approximator with learned weights, read through pointers (a view of a learned_table in host or device
/// memory). `table` is [steps][Depth][Depth]: row (k, n - 1) holds the n weights used at main step k
/// (timesteps[k]) for a token with n cached rows, newest first; a NaN first weight marks (k, n) as not fitted.
/// At a target timestep not in `timesteps`, or an unfitted (k, n), it reuses the latest row (C2's rule):
/// learned_table::approximator checks the run's timesteps up front, so that happens only by design.
template <int Depth = 3>
struct learned {
  static_assert(Depth >= 1 && Depth <= cache_shape::max_history, "learned: depth must be 1..max_history");
  static constexpr int depth = Depth;
  const float* timesteps = nullptr;
  const float* table = nullptr;
  int steps = 0;

  SPECDIFF_HD int weights(const float*, int n, float target, float* w) const {
    if (n < 1) return 0;
    for (int k = 0; k < steps; ++k) {
      if (timesteps[k] != target) continue;
      const float* row = table + (k * Depth + (n - 1)) * Depth;
      if (row[0] != row[0]) break;  // NaN: this (step, length) had no calibration pairs
      for (int i = 0; i < n; ++i) w[i] = row[i];
      return n;
    }
    for (int i = 0; i < n; ++i) w[i] = i == 0 ? 1.f : 0.f;
    return n;
  }
};

/// The fitted weights of every (main step, history length), with the timesteps they were fitted at. Owns host
/// memory; copy `weights()` and `timesteps()` to a device and point a learned<Depth> at them there.
class learned_table {
 public:
  learned_table() = default;
  /// `timesteps`: the main grid, strictly falling; `weights`: steps x depth x depth (NaN first weight = not
  /// fitted; every other value finite). Throws naming the field on any mismatch.
  learned_table(std::vector<float> timesteps, int depth, std::vector<float> weights)
      : timesteps_(std::move(timesteps)), weights_(std::move(weights)), depth_(depth) {
    if (depth_ < 1 || depth_ > cache_shape::max_history) detail::fail("depth: must lie in [1, ", cache_shape::max_history, "], got ", depth_);
    if (timesteps_.empty()) detail::fail("timesteps: empty");
    detail::expect_finite("timesteps", timesteps_);
    for (std::size_t i = 1; i < timesteps_.size(); ++i)
      if (!(timesteps_[i] < timesteps_[i - 1]))
        detail::fail("timesteps: must strictly decrease, got ", timesteps_[i - 1], " then ", timesteps_[i], " at ", i);
    const auto per_step = static_cast<std::size_t>(depth_) * static_cast<std::size_t>(depth_);
    detail::expect_size("weights", weights_.size(), timesteps_.size() * per_step);
    for (std::size_t row = 0; row < weights_.size() / static_cast<std::size_t>(depth_); ++row) {
      const float* w = weights_.data() + row * static_cast<std::size_t>(depth_);
      const int n = static_cast<int>(row % static_cast<std::size_t>(depth_)) + 1;
      if (std::isnan(w[0])) continue;
      for (int i = 0; i < n; ++i)
        if (!std::isfinite(w[i])) detail::fail("weights: step ", row / static_cast<std::size_t>(depth_), " length ", n, " weight ", i, " is not finite (", w[i], ")");
    }
  }

  int depth() const { return depth_; }
  int steps() const { return static_cast<int>(timesteps_.size()); }
  std::span<const float> timesteps() const { return timesteps_; }
  std::span<const float> weights() const { return weights_; }
  /// The n weights of step k (NaN first: not fitted).
  std::span<const float> weights(int step, int n) const {
    detail::expect_index("step", step, steps());
    if (n < 1 || n > depth_) detail::fail("n: must lie in [1, ", depth_, "], got ", n);
    return {weights_.data() + (static_cast<std::size_t>(step) * static_cast<std::size_t>(depth_) + static_cast<std::size_t>(n - 1)) * static_cast<std::size_t>(depth_),
            static_cast<std::size_t>(n)};
  }

  /// The host approximator over this table, for a run on `run_timesteps` — which must be the table's own
  /// (the same sampler, steps and shift): weights fitted for one grid mean nothing on another.
  template <int Depth>
  learned<Depth> approximator(std::span<const float> run_timesteps) const {
    if (Depth != depth_) detail::fail("learned<", Depth, ">: the table was fitted with depth ", depth_);
    detail::expect_size("run_timesteps", run_timesteps.size(), timesteps_.size());
    for (std::size_t i = 0; i < timesteps_.size(); ++i)
      if (run_timesteps[i] != timesteps_[i])
        detail::fail("run_timesteps: step ", i, " is at t = ", run_timesteps[i], ", the table was fitted at t = ", timesteps_[i],
                     " (calibrate for this sampler, step count and shift)");
    return {timesteps_.data(), weights_.data(), steps()};
  }

 private:
  std::vector<float> timesteps_;
  std::vector<float> weights_;
  int depth_ = 0;
};

/// Least-squares moments of (history, computed row) pairs per (main step, history length): for the pairs of
/// (k, n), the n x n Gram matrix of the history rows, their products with the computed row, and the pair count.
/// solve() minimises sum ||y - sum_i w_i h_i||^2 + ridge * scale * ||w - e_1||^2 per (k, n): the ridge pulls
/// toward reusing the latest row, and `scale` (the Gram's mean diagonal) makes it unit-free.
class history_fit {
 public:
  history_fit(std::span<const float> timesteps, int depth) : timesteps_(timesteps.begin(), timesteps.end()), depth_(depth) {
    if (depth_ < 1 || depth_ > cache_shape::max_history) detail::fail("depth: must lie in [1, ", cache_shape::max_history, "], got ", depth_);
    if (timesteps_.empty()) detail::fail("timesteps: empty");
    const std::size_t cells = timesteps_.size() * static_cast<std::size_t>(depth_);
    gram_.assign(cells * static_cast<std::size_t>(depth_ * depth_), 0.0);
    rhs_.assign(cells * static_cast<std::size_t>(depth_), 0.0);
    count_.assign(cells, 0);
  }

  int depth() const { return depth_; }
  std::span<const float> timesteps() const { return timesteps_; }
  /// Pairs added at step k with n cached rows.
  std::size_t pairs(int step, int n) const {
    detail::expect_index("step", step, static_cast<index_t>(timesteps_.size()));
    if (n < 1 || n > depth_) detail::fail("n: must lie in [1, ", depth_, "], got ", n);
    return count_[cell(step, n)];
  }

  /// Adds one pair per listed token at main step `step`: its cached rows (newest first, up to depth) in
  /// `store`'s slot (layer, site), and its computed row, row truth_rows[i] of `truth`. Call before the computed
  /// rows are cached. `Store` has the host store's history accessors (entries, history).
  template <class Store>
  void add(const Store& store, index_t layer, index_t site, index_t step, std::span<const index_t> tokens, matrix_view<const float> truth,
           std::span<const index_t> truth_rows) {
    detail::expect_index("step", step, static_cast<index_t>(timesteps_.size()));
    detail::expect_size("truth_rows", truth_rows.size(), tokens.size());
    if (truth.cols != store.shape().dim) detail::fail("truth: expected ", store.shape().dim, " columns, got ", truth.cols);
    for (std::size_t i = 0; i < tokens.size(); ++i) {  // everything checked before anything is added
      detail::expect_index("tokens[i]", tokens[i], store.shape().tokens);
      detail::expect_index("truth_rows[i]", truth_rows[i], truth.rows);
    }
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      const int n = std::min(depth_, store.entries(layer, site, tokens[i]));
      if (n == 0) continue;
      const float* y = truth.row_ptr(truth_rows[i]);
      const std::size_t c = cell(static_cast<int>(step), n);
      double* g = gram_.data() + c * static_cast<std::size_t>(depth_ * depth_);
      double* b = rhs_.data() + c * static_cast<std::size_t>(depth_);
      std::array<decltype(store.history(layer, site, tokens[i], 0)), cache_shape::max_history> h{};  // newest first
      for (int a = 0; a < n; ++a) h[static_cast<std::size_t>(a)] = store.history(layer, site, tokens[i], a);
      for (int a = 0; a < n; ++a) {
        const auto& ha = h[static_cast<std::size_t>(a)];
        b[a] += dot(ha, [&](std::size_t col) { return static_cast<double>(y[col]); });
        for (int e = 0; e <= a; ++e) {
          const auto& he = h[static_cast<std::size_t>(e)];
          const double s = dot(ha, [&](std::size_t col) { return value(he[col]); });
          g[a * depth_ + e] += s;
          if (e != a) g[e * depth_ + a] += s;
        }
      }
      ++count_[c];
    }
  }

  /// Forgets every pair.
  void clear() {
    std::fill(gram_.begin(), gram_.end(), 0.0);
    std::fill(rhs_.begin(), rhs_.end(), 0.0);
    std::fill(count_.begin(), count_.end(), std::size_t{0});
  }

  /// The weights: a (k, n) with fewer than `min_pairs` pairs stays unfitted (NaN: the approximator reuses).
  learned_table solve(double ridge = 1e-3, std::size_t min_pairs = 16) const {
    if (!(ridge >= 0.0 && std::isfinite(ridge))) detail::fail("ridge: must be finite and >= 0, got ", ridge);
    const auto d = static_cast<std::size_t>(depth_);
    std::vector<float> weights(timesteps_.size() * d * d, 0.f);
    for (std::size_t k = 0; k < timesteps_.size(); ++k)
      for (int n = 1; n <= depth_; ++n) {
        float* out = weights.data() + (k * d + static_cast<std::size_t>(n - 1)) * d;
        const std::size_t c = cell(static_cast<int>(k), n);
        if (count_[c] < std::max<std::size_t>(min_pairs, 1)) {
          out[0] = std::numeric_limits<float>::quiet_NaN();
          continue;
        }
        std::array<double, cache_shape::max_history * cache_shape::max_history> a{};
        std::array<double, cache_shape::max_history> x{};
        const double* g = gram_.data() + c * d * d;
        double scale = 0.0;
        for (int i = 0; i < n; ++i) scale += g[i * depth_ + i];
        scale = scale > 0.0 ? scale / n : 1.0;
        for (int i = 0; i < n; ++i) {
          for (int j = 0; j < n; ++j) a[static_cast<std::size_t>(i * n + j)] = g[i * depth_ + j] + (i == j ? ridge * scale : 0.0);
          x[static_cast<std::size_t>(i)] = rhs_[c * d + static_cast<std::size_t>(i)] + (i == 0 ? ridge * scale : 0.0);
        }
        if (!solve_in_place(a.data(), x.data(), n)) {
          out[0] = std::numeric_limits<float>::quiet_NaN();
          continue;
        }
        for (int i = 0; i < n; ++i) out[i] = static_cast<float>(x[static_cast<std::size_t>(i)]);
      }
    return learned_table(timesteps_, depth_, std::move(weights));
  }

 private:
  std::size_t cell(int step, int n) const { return static_cast<std::size_t>(step) * static_cast<std::size_t>(depth_) + static_cast<std::size_t>(n - 1); }
  template <class T>
  static double value(T x) {
    return static_cast<double>(storage_traits<std::remove_cv_t<T>>::load(x));
  }
  template <class Row, class Other>
  static double dot(const Row& h, Other&& other) {
    double s = 0.0;
    for (std::size_t col = 0; col < h.size(); ++col) s += value(h[col]) * other(col);
    return s;
  }
  // Gaussian elimination with partial pivoting on the n x n system a x = b (row-major); false when singular.
  static bool solve_in_place(double* a, double* b, int n) {
    for (int col = 0; col < n; ++col) {
      int pivot = col;
      for (int r = col + 1; r < n; ++r)
        if (std::abs(a[r * n + col]) > std::abs(a[pivot * n + col])) pivot = r;
      if (!(std::abs(a[pivot * n + col]) > 1e-300)) return false;
      if (pivot != col) {
        for (int j = 0; j < n; ++j) std::swap(a[col * n + j], a[pivot * n + j]);
        std::swap(b[col], b[pivot]);
      }
      for (int r = col + 1; r < n; ++r) {
        const double f = a[r * n + col] / a[col * n + col];
        for (int j = col; j < n; ++j) a[r * n + j] -= f * a[col * n + j];
        b[r] -= f * b[col];
      }
    }
    for (int r = n - 1; r >= 0; --r) {
      double s = b[r];
      for (int j = r + 1; j < n; ++j) s -= a[r * n + j] * b[j];
      b[r] = s / a[r * n + r];
    }
    for (int i = 0; i < n; ++i)
      if (!std::isfinite(b[i])) return false;
    return true;
  }

  std::vector<float> timesteps_;
  int depth_ = 0;
  std::vector<double> gram_, rhs_;  // [step][n - 1][depth][depth], [step][n - 1][depth]
  std::vector<std::size_t> count_;  // [step][n - 1]
};

static_assert(approximator<learned<3>>);

}  // namespace specdiff
