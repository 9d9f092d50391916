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

/// TaylorSeer's forecast as its authors' code computes it, written as weights over the cached rows (newest
/// first). On each full step j the order-i factor is the change of the order-(i-1) factor since the previous
/// full step divided by the gap between the two, D_i(j) = (D_{i-1}(j) - D_{i-1}(j+1)) / (T_j - T_{j+1}), so
/// an order-i factor exists once i+1 full steps were cached; the forecast is sum_i D_i(0) x^i / i!, with
/// x = target - T_0. Source: Shenyi-Z/TaylorSeer @288776d, TaylorSeer-FLUX/src/flux/taylor_utils/__init__.py,
/// derivative_approximation (lines 12-22) and taylor_formula (lines 33-38). Exact for polynomials of degree 1
/// at any spacing, not of higher degree (the factors are backward differences, not Newton's).
/// Rows after the first whose tag exceeds `oldest_t` (cached before the differences start) are not used:
/// TaylorSeer-FLUX forms no difference on steps <= first_enhance - 2 (line 19). `Rows` bounds n. Returns n
/// (weights of unused rows are 0), or 0 when two used tags coincide.
template <int Rows>
SPECDIFF_HD inline int taylorseer_weights(const float* history_t, int n, float target_t, float oldest_t, float* w) {
  static_assert(Rows >= 1, "taylorseer_weights: Rows must be positive");
  constexpr auto size = static_cast<unsigned>(Rows);
  if (n < 1 || n > Rows) return 0;
  int used = 1;
  while (used < n && history_t[used] <= oldest_t) ++used;
  // factor[j][k]: the weight of row k in the factor of the current order formed at row j
  double factor[size][size];
  for (int j = 0; j < used; ++j)
    for (int k = 0; k < used; ++k) factor[j][k] = j == k ? 1.0 : 0.0;
  for (int k = 0; k < n; ++k) w[k] = k == 0 ? 1.f : 0.f;
  double sum[size];
  for (int k = 0; k < used; ++k) sum[k] = k == 0 ? 1.0 : 0.0;
  const double x = static_cast<double>(target_t) - static_cast<double>(history_t[0]);
  double power = 1.0;  // x^i / i!
  for (int i = 1; i < used; ++i) {
    for (int j = 0; j + i < used; ++j) {  // ascending j reads row j + 1 before it is updated
      const double gap = static_cast<double>(history_t[j]) - static_cast<double>(history_t[j + 1]);
      if (gap == 0.0) return 0;
      for (int k = 0; k < used; ++k) factor[j][k] = (factor[j][k] - factor[j + 1][k]) / gap;
    }
    power *= x / i;
    for (int k = 0; k < used; ++k) sum[k] += power * factor[0][k];
  }
  for (int k = 0; k < used; ++k) w[k] = static_cast<float>(sum[k]);
  return n;
}

}  // namespace specdiff::math
