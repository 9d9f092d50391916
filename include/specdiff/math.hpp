// The method's formulas, written once for host and device (SPECDIFF_HD = __host__ __device__ under nvcc).
// Host models and CUDA kernels both call these; tests hold them against hand computation.
#pragma once

#include <cfloat>
#include <cmath>

#include "common.hpp"

namespace specdiff::math {

/// Smallest value a score factor may take before its logarithm: an all-zero attention column would
/// otherwise give log(0) = -inf, and -inf ranks cannot be ordered by mass.
inline constexpr float min_factor = 1e-30f;

SPECDIFF_HD inline float safe_log(float x) { return logf(x > min_factor ? x : min_factor); }

/// log Score = log his + log fut + starvation_scale * cf. Ranking in the log domain keeps exp(cf) from
/// overflowing (exp(89) already overflows float); the product form and this sum order tokens identically.
SPECDIFF_HD inline float log_score(float attention, float future, float cache_count, float starvation_scale) {
  return safe_log(attention) + safe_log(future) + starvation_scale * cache_count;
}

/// The staleness update after a step: a computed token's cache count restarts at 0, every other token's
/// grows by one. One definition for the host accelerator and the device kernel.
SPECDIFF_HD inline float advance_cache_count(level l, float cache_count) { return l == level::compute ? 0.f : cache_count + 1.f; }

/// |C1| = ceil((1 - CR) * N), at least one token. The small tolerance keeps products such as
/// (1 - 0.7) * 10 = 3.0000000000000004 from rounding up to 4.
SPECDIFF_HD inline index_t compute_count(double cache_rate, index_t tokens) {
  if (tokens <= 0) return 0;
  const double exact = (1.0 - cache_rate) * static_cast<double>(tokens);
  index_t count = static_cast<index_t>(ceil(exact - 1e-9 * static_cast<double>(tokens)));
  if (count < 1) count = 1;
  if (count > tokens) count = tokens;
  return count;
}

/// SpecDiff's C3 weights: W_i ∝ e^{-i} (T_{t+i} - T_t), i = 1..n, normalised to sum 1.
/// `history_t[i-1]` is the timestep of the i-th most recent cached feature, `target_t` the step being filled.
/// Returns the number of weights written (n); falls back to the latest feature when every difference is
/// zero (all cached features were taken at the target timestep).
SPECDIFF_HD inline int specdiff_weights(const float* history_t, int n, float target_t, float* w) {
  float sum = 0.f;
  for (int i = 0; i < n; ++i) {
    w[i] = expf(-static_cast<float>(i + 1)) * (history_t[i] - target_t);
    sum += w[i];
  }
  if (!(sum > 0.f) && !(sum < 0.f)) {
    for (int i = 0; i < n; ++i) w[i] = i == 0 ? 1.f : 0.f;
    return n;
  }
  for (int i = 0; i < n; ++i) w[i] /= sum;
  return n;
}

/// Polynomial extrapolation through the n most recent features (Lagrange form of Newton's divided
/// differences): exact for polynomials of degree n - 1 in the tag, for any spacing. Tags must be distinct;
/// returns 0 (no weights) when two coincide so the caller can report it.
SPECDIFF_HD inline int polynomial_weights(const float* history_t, int n, float target_t, float* w) {
  for (int j = 0; j < n; ++j) {
    double wj = 1.0;
    for (int m = 0; m < n; ++m) {
      if (m == j) continue;
      const double gap = static_cast<double>(history_t[j]) - static_cast<double>(history_t[m]);
      if (gap == 0.0) return 0;
      wj *= (static_cast<double>(target_t) - static_cast<double>(history_t[m])) / gap;
    }
    w[j] = static_cast<float>(wj);
  }
  return n;
}

}  // namespace specdiff::math
