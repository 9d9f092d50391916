// C3 approximators: weights over a token's cached history. Pure functions of the tags, host-and-device,
// so the host store and the CUDA kernels apply exactly the same mix.
#pragma once

#include "concepts.hpp"
#include "math.hpp"

namespace specdiff {

/// The latest cached feature, unchanged (C2, and FORA's reuse).
struct latest {
  static constexpr int depth = 1;
  SPECDIFF_HD int weights(const float*, int n, float, float* w) const {
    if (n < 1) return 0;
    w[0] = 1.f;
    return 1;
  }
};

/// SpecDiff's C3 mix of the last three features: W_i ∝ e^{-i} (T_{t+i} - T_t), normalised.
struct specdiff_weighted {
  static constexpr int depth = 3;
  SPECDIFF_HD int weights(const float* history_t, int n, float target, float* w) const {
    return n < 1 ? 0 : math::specdiff_weights(history_t, n, target, w);
  }
};

/// Taylor extrapolation of order `Order` from the last Order+1 features, the finite-difference forecast of
/// TaylorSeer. Written as polynomial (Newton) extrapolation in the tags, so it is exact for polynomials of
/// degree Order at any spacing; TaylorSeer's own code divides every difference by the last gap, which
/// matches this only for evenly spaced refreshes (see docs/architecture.md). With fewer entries cached it
/// uses the highest order they allow.
template <int Order>
struct taylor {
  static_assert(Order >= 1 && Order <= 4, "taylor: order must be 1..4");
  static constexpr int depth = Order + 1;
  SPECDIFF_HD int weights(const float* history_t, int n, float target, float* w) const {
    return n < 1 ? 0 : math::polynomial_weights(history_t, n, target, w);
  }
};

/// Linear extrapolation through the last two features: Taylor of order 1.
using linear = taylor<1>;

static_assert(approximator<latest> && approximator<specdiff_weighted> && approximator<taylor<2>>);

}  // namespace specdiff
