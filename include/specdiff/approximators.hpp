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

/// Polynomial extrapolation of order `Order` through the last Order+1 features (Newton / Lagrange in the
/// tags): exact for polynomials of degree Order at any spacing. This is not TaylorSeer's own rule (see
/// taylorseer<Order>): on uneven refreshes it puts large weights of both signs on the rows (order 2 from
/// full steps 2, 1, 0 at step 5: 10, -15, 6). With fewer entries cached it uses the highest order they allow.
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

/// TaylorSeer's forecast of order `Order` as its authors' code computes it (math::taylorseer_weights, with
/// the source): Taylor factors from finite differences between full steps, each divided by the latest gap
/// between them, an order-i factor only once i+1 full steps are cached. `oldest_tag`: rows after the newest
/// whose tag is larger (cached earlier) start no difference — TaylorSeer-FLUX forms its first difference on
/// step first_enhance - 1, so a run tagged by step index sets it to the tag of step first_enhance - 2.
template <int Order>
struct taylorseer {
  static_assert(Order >= 1 && Order <= 4, "taylorseer: order must be 1..4");
  static constexpr int depth = Order + 1;
  float oldest_tag = FLT_MAX;
  SPECDIFF_HD int weights(const float* history_t, int n, float target, float* w) const {
    return math::taylorseer_weights<depth>(history_t, n, target, oldest_tag, w);
  }
};

static_assert(approximator<latest> && approximator<specdiff_weighted> && approximator<taylor<2>> && approximator<taylorseer<2>>);

}  // namespace specdiff
