// Step-level caching: a schedule decided online from one engine metric. First-Block cache, DBCache and
// TeaCache skip the whole network (or its middle blocks) on a step when a cheap proxy has barely moved
// since a reference step, and add a cached residual instead. The engine computes the proxy and its
// relative change (relative_l1 below); the policy (relative_change_gate) decides from that one number.
//
// Sources (read at the commits named in docs/methods.md):
//   diffusers hooks/first_block_cache.py: threshold 0.05 (line 48); r = out0 - in0 (85-87); compute the rest
//     iff there is no previous r or mean|r - r_prev| / mean|r_prev| > threshold (134-142).
//   cache-dit cache_contexts/cache_config.py: Fn 8, Bn 0, threshold 0.08, warm-up 8, max_cached_steps -1,
//     max_continuous_cached_steps -1 (lines 28-59); cache_manager.py: caches iff diff < threshold (626),
//     limits checked first (883-913).
//   TeaCache TeaCache4FLUX/teacache_flux.py: the first and last steps compute and reset the accumulator
//     (109-111); otherwise A += P(relative L1 of block 0's modulated input) (113-115); skip iff A < threshold,
//     else compute and A = 0 (116-120); threshold 0.6, with 0.25 / 0.4 / 0.8 as the README's other settings (323).
#pragma once

#include <cfloat>
#include <cmath>
#include <cstddef>
#include <limits>
#include <span>
#include <type_traits>

#include "common.hpp"

namespace specdiff {

/// Relative L1 change of a tensor: sum|now - before| / sum|before| over every element, which equals the
/// peers' mean|now - before| / mean|before| (the sizes are equal). Accumulated in double. Both all-zero:
/// 0 (nothing moved); only `before` all zero: +inf (any change is infinitely large against nothing).
/// A non-finite element makes the result non-finite, which a relative_change_gate treats as "compute".
/// Throws std::invalid_argument when the sizes differ.
inline double relative_l1(std::span<const float> now, std::span<const float> before) {
  detail::expect_size("relative_l1: now (against before)", now.size(), before.size());
  double change = 0.0, base = 0.0;
  for (std::size_t i = 0; i < now.size(); ++i) {
    change += std::fabs(static_cast<double>(now[i]) - static_cast<double>(before[i]));
    base += std::fabs(static_cast<double>(before[i]));
  }
  if (base == 0.0) return change == 0.0 ? 0.0 : std::numeric_limits<double>::infinity();
  return change / base;
}

/// A polynomial applied to the measured change before the gate compares or accumulates it:
/// c[0] + c[1] x + ... + c[4] x^4 (ascending powers). TeaCache fits one per model family (np.polyfit of the
/// model output's relative change against the proxy's, degree 4); the identity leaves the change as is.
struct change_rescale {
  static constexpr int terms = 5;
  double c[terms] = {0.0, 1.0, 0.0, 0.0, 0.0};

  SPECDIFF_HD double operator()(double x) const {
    double y = c[terms - 1];
    for (int i = terms - 2; i >= 0; --i) y = y * x + c[i];
    return y;
  }
  static constexpr change_rescale identity() { return {}; }
  /// TeaCache's FLUX polynomial (teacache_flux.py:113, written there highest power first). Fitted on FLUX
  /// runs by its authors, not on any model of ours; it never falls below 0.18 on [0, 1], so every skipped
  /// step adds at least that much to the accumulator.
  static constexpr change_rescale teacache_flux() {
    return {{2.64230861e-01, -3.82021401e+00, 5.58554382e+01, -2.83781631e+02, 4.98651651e+02}};
  }
};

/// What a relative_change_gate remembers between steps.
struct gate_state {
  double accumulated = 0.0;     ///< accumulating gates: the rescaled change summed since the last computed step
  index_t consecutive_skips = 0;  ///< steps skipped since the last computed step
  index_t skips = 0;              ///< steps skipped since reset()
};

/// One step's decision and the state it leads to.
struct gate_decision {
  bool compute = true;
  gate_state next{};
};

/// No limit on skipped steps (gate_options::max_consecutive_skips, max_skips), as cache-dit's -1.
inline constexpr index_t unlimited_skips = -1;

/// The settings of a relative_change_gate (see there).
struct gate_options {
  double threshold = 0.05;                        ///< >= 0 (+inf: skip whenever nothing forces a computation)
  index_t warmup_steps = 0;                       ///< steps that always compute at the start (the first always does)
  index_t max_consecutive_skips = unlimited_skips;  ///< >= 0, or unlimited_skips
  index_t max_skips = unlimited_skips;            ///< skipped steps per image, >= 0, or unlimited_skips
  bool accumulate = false;                        ///< TeaCache: sum the rescaled changes since the last computed step
  bool compute_last = false;                      ///< TeaCache: the last step always computes
  change_rescale rescale{};                       ///< finite coefficients
};

/// The step gate of First-Block cache, DBCache and TeaCache. The engine measures, each step, the relative
/// change of its proxy (relative_l1) and hands it to the gate:
///   value = rescale(change)                      (accumulate = false: FBCache / DBCache, the change is
///                                                 measured against the last *computed* step's proxy)
///   value = state.accumulated + rescale(change)  (accumulate = true: TeaCache, consecutive steps)
/// The step is skipped iff value < threshold and none of these forces a computation: the first step, a step
/// before `warmup_steps`, the last step when `compute_last`, a change that is not a finite number >= 0,
/// `max_consecutive_skips` or `max_skips` reached, or threshold 0 (0 switches caching off, as in cache-dit).
/// A computed step resets `accumulated` and `consecutive_skips` to 0.
///
/// Contract: the options are checked once, in the constructor (std::invalid_argument naming the option and its
/// value); `decide` is pure and host-and-device (it reads the options and the given state only, never throws,
/// never allocates), so a device engine can copy the gate (trivially copyable) and decide in a kernel;
/// `advance` is the host convenience that decides and keeps the state; `reset` starts a new image.
class relative_change_gate {
 public:
  using options = gate_options;

  /// diffusers' FirstBlockCacheConfig: threshold 0.05, no warm-up beyond the first step, no limits.
  static options first_block_cache() { return {}; }
  /// cache-dit's DBCache defaults: threshold 0.08, 8 warm-up steps, no limits.
  static options dbcache() {
    options o;
    o.threshold = 0.08;
    o.warmup_steps = 8;
    return o;
  }
  /// TeaCache for FLUX: threshold 0.6, accumulating, first and last steps computed, the FLUX polynomial.
  static options teacache() {
    options o;
    o.threshold = 0.6;
    o.accumulate = true;
    o.compute_last = true;
    o.rescale = change_rescale::teacache_flux();
    return o;
  }

  explicit relative_change_gate(const options& o = {}) : o_(checked(o)) {}

  /// The decision at `step` of `steps` for the measured `change`, from state `s`. Pure; see the class comment.
  SPECDIFF_HD gate_decision decide(const gate_state& s, index_t step, index_t steps, double change) const {
    gate_decision d;
    d.next.skips = s.skips;
    const bool forced = step <= 0 || step < o_.warmup_steps || (o_.compute_last && step >= steps - 1) ||
                        !(change >= 0.0 && change <= DBL_MAX) || !(o_.threshold > 0.0) ||
                        (o_.max_consecutive_skips >= 0 && s.consecutive_skips >= o_.max_consecutive_skips) ||
                        (o_.max_skips >= 0 && s.skips >= o_.max_skips);
    if (forced) return d;
    const double value = (o_.accumulate ? s.accumulated : 0.0) + o_.rescale(change);
    if (!(value < o_.threshold)) return d;
    d.compute = false;
    d.next.accumulated = o_.accumulate ? value : 0.0;
    d.next.consecutive_skips = s.consecutive_skips + 1;
    d.next.skips = s.skips + 1;
    return d;
  }

  /// Host: decides for `step` (in [0, steps)) from the current state, keeps the new state, returns whether the
  /// step computes. Throws std::invalid_argument for a step outside [0, steps), leaving the state unchanged.
  bool advance(index_t step, index_t steps, double change) {
    if (steps <= 0) detail::fail("steps: must be positive, got ", steps);
    if (step < 0 || step >= steps) detail::fail("step = ", step, " is out of range [0, ", steps, ")");
    const gate_decision d = decide(s_, step, steps, change);
    s_ = d.next;
    return d.compute;
  }

  void reset() { s_ = {}; }
  const gate_state& state() const { return s_; }
  const options& settings() const { return o_; }

 private:
  static options checked(const options& o) {
    if (!(o.threshold >= 0.0)) detail::fail("threshold: must be >= 0, got ", o.threshold);
    if (o.warmup_steps < 0) detail::fail("warmup_steps: must be >= 0, got ", o.warmup_steps);
    if (o.max_consecutive_skips < unlimited_skips)
      detail::fail("max_consecutive_skips: must be >= 0 or unlimited (-1), got ", o.max_consecutive_skips);
    if (o.max_skips < unlimited_skips) detail::fail("max_skips: must be >= 0 or unlimited (-1), got ", o.max_skips);
    for (int i = 0; i < change_rescale::terms; ++i)
      if (!std::isfinite(o.rescale.c[i])) detail::fail("rescale.c[", i, "]: must be finite, got ", o.rescale.c[i]);
    return o;
  }

  options o_;
  gate_state s_{};
};

static_assert(std::is_trivially_copyable_v<relative_change_gate>, "a device engine copies the gate into a kernel");

}  // namespace specdiff
