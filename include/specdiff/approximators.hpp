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

/// FoCa's forecast (Forecast-then-Calibrate, arXiv 2508.16211: the cached features as the solution of an ODE in
/// the tag) as weights over the last three cached features, newest first. Derived here for any spacing (FoCa's
/// paper states the even case): with tags t0 (newest), t1, t2, a = t0 - t1, b = t1 - t2, target t = t0 + h and
/// r = h / a, the derivative at t0 is the one of the quadratic through the three (second-order backward
/// difference) g = F0 (1/a + 1/(a+b)) - F1 (a+b)/(ab) + F2 a/(b(a+b)), and the forecast is the variable-step BDF2
/// step from (t1, t0) to t with that derivative standing in for the one at t:
///   F(t) = (1+r)^2/(1+2r) F0 - r^2/(1+2r) F1 + h (1+r)/(1+2r) g.
/// Even spacing, one gap ahead (h = a = b): 7/3, -5/3, 1/3. Exact for features linear in the tag; on a quadratic
/// c t^2 it is low by 2 c h^2 (1+r)/(1+2r) (the derivative held at t0's) — between linear extrapolation and the
/// polynomial through three (taylor<2>), whose large weights of both signs it damps. Two features: the same step
/// with g = (F0 - F1)/a, which is linear extrapolation; one: reuse. Returns 0 when two tags coincide or 1 + 2r = 0.
/// Only the forecast (FoCa's predictor); what its calibration step becomes on an output-level forecast is
/// methods::forecast_options::correct (docs/methods.md, "FoCa and TACache").
struct foca {
  static constexpr int depth = 3;
  SPECDIFF_HD int weights(const float* history_t, int n, float target, float* w) const {
    if (n < 1) return 0;
    w[0] = 1.f;
    if (n == 1) return 1;
    const double a = static_cast<double>(history_t[0]) - static_cast<double>(history_t[1]);
    const double h = static_cast<double>(target) - static_cast<double>(history_t[0]);
    if (a == 0.0) return 0;
    const double r = h / a, den = 1.0 + 2.0 * r;
    if (den == 0.0) return 0;
    const double c0 = (1.0 + r) * (1.0 + r) / den, c1 = r * r / den, beta = h * (1.0 + r) / den;  // beta multiplies g
    if (n == 2) {
      w[0] = static_cast<float>(c0 + beta / a);
      w[1] = static_cast<float>(-c1 - beta / a);
      return 2;
    }
    const double b = static_cast<double>(history_t[1]) - static_cast<double>(history_t[2]);
    if (b == 0.0 || a + b == 0.0) return 0;
    w[0] = static_cast<float>(c0 + beta * (1.0 / a + 1.0 / (a + b)));
    w[1] = static_cast<float>(-c1 - beta * (a + b) / (a * b));
    w[2] = static_cast<float>(beta * a / (b * (a + b)));
    return 3;
  }
};

static_assert(approximator<latest> && approximator<specdiff_weighted> && approximator<taylor<2>> && approximator<taylorseer<2>> && approximator<foca>);

}  // namespace specdiff
