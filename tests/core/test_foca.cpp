// FoCa's forecast (foca): its weights by hand on even and uneven spacing, exactness on lines, its known error on
// quadratics (the BDF2 step with the derivative held at the newest tag), and its fallbacks — fresh random tags.
#include <doctest/doctest.h>

#include <cmath>
#include <random>
#include <specdiff/approximators.hpp>

#include "../common/testing.hpp"

using namespace specdiff;

TEST_CASE("foca on even spacing one gap ahead: 7/3, -5/3, 1/3 (rising and falling tags)") {
  float w[3] = {};
  const float rising[3] = {3.f, 2.f, 1.f};
  REQUIRE(foca{}.weights(rising, 3, 4.f, w) == 3);
  CHECK(w[0] == doctest::Approx(7.0 / 3.0));
  CHECK(w[1] == doctest::Approx(-5.0 / 3.0));
  CHECK(w[2] == doctest::Approx(1.0 / 3.0));
  // tags as the forecast gives step indices (steps - k: falling by one per step), full steps 10, 12, 14 -> step 16
  const float falling[3] = {14.f, 16.f, 18.f};
  REQUIRE(foca{}.weights(falling, 3, 12.f, w) == 3);
  CHECK(w[0] == doctest::Approx(7.0 / 3.0));
  CHECK(w[1] == doctest::Approx(-5.0 / 3.0));
  CHECK(w[2] == doctest::Approx(1.0 / 3.0));
}

TEST_CASE("foca at N = 2, one step after the newest: 27/16, -7/8, 3/16 (hand computed)") {
  // a = b = 2, h = 1, r = 1/2: c0 = (3/2)^2 / 2 = 9/8, c1 = (1/4) / 2 = 1/8, beta = 1 * (3/2) / 2 = 3/4;
  // g = F0 (1/2 + 1/4) - F1 (4/4) + F2 (2/8): w = 9/8 + 3/4 * 3/4, -1/8 - 3/4, 3/4 * 1/4.
  const float T[3] = {4.f, 2.f, 0.f};
  float w[3] = {};
  REQUIRE(foca{}.weights(T, 3, 5.f, w) == 3);
  CHECK(w[0] == doctest::Approx(27.0 / 16.0));
  CHECK(w[1] == doctest::Approx(-7.0 / 8.0));
  CHECK(w[2] == doctest::Approx(3.0 / 16.0));
}

TEST_CASE("foca at uneven gaps (3 then 1), two steps ahead: hand computed") {
  // tags 0, 3, 4 (newest 4), target 6: a = 1, b = 3, h = 2, r = 2: c0 = 9/5, c1 = 4/5, beta = 2 * 3 / 5 = 6/5;
  // g = F0 (1 + 1/4) - F1 (4/3) + F2 (1/12): w = 9/5 + 6/5 * 5/4, -4/5 - 6/5 * 4/3, 6/5 * 1/12.
  const float T[3] = {4.f, 3.f, 0.f};
  float w[3] = {};
  REQUIRE(foca{}.weights(T, 3, 6.f, w) == 3);
  CHECK(w[0] == doctest::Approx(3.3));
  CHECK(w[1] == doctest::Approx(-2.4));
  CHECK(w[2] == doctest::Approx(0.1));
}

TEST_CASE("foca: exact on lines, low by 2 c h^2 (1+r)/(1+2r) on c t^2, weights sum to 1 (fresh random tags)") {
  auto rng = testing::rng(53);
  INFO("seed ", testing::fresh_seed());
  std::uniform_real_distribution<double> coef(-3.0, 3.0), gap(0.5, 7.0);
  for (int trial = 0; trial < 300; ++trial) {
    const double c0 = coef(rng), c1 = coef(rng), c2 = coef(rng);
    const bool falling = trial % 2 == 1;  // the forecast's step tags fall, timesteps fall too; rising works the same
    const double s = falling ? -1.0 : 1.0;
    float T[3];
    double t = 0;
    for (float& x : T) x = static_cast<float>(t -= s * gap(rng));  // newest first
    const double base = T[0];
    for (float& x : T) x = static_cast<float>(x - base);  // newest at 0: the checks below see float tags exactly
    const float target = static_cast<float>(s * gap(rng));
    float w[3] = {};
    REQUIRE(foca{}.weights(T, 3, target, w) == 3);
    CHECK(w[0] + w[1] + w[2] == doctest::Approx(1.0).epsilon(1e-5));
    double line = 0, quad = 0, magnitude = 0;
    for (int i = 0; i < 3; ++i) {
      const double ti = T[i];
      line += w[i] * (c0 + c1 * ti);
      quad += w[i] * (c0 + c1 * ti + c2 * ti * ti);
      magnitude += std::abs(w[i]) * (std::abs(c0) + std::abs(c1 * ti) + std::abs(c2 * ti * ti));
    }
    const double tt = target, h = tt - T[0], r = h / (T[0] - T[1]);
    CHECK(std::abs(line - (c0 + c1 * tt)) <= 1e-5 * magnitude + 1e-9);
    const double expected = c0 + c1 * tt + c2 * tt * tt - 2.0 * c2 * h * h * (1.0 + r) / (1.0 + 2.0 * r);
    CHECK(std::abs(quad - expected) <= 1e-5 * magnitude + 1e-9);
  }
}

TEST_CASE("foca with fewer features: two give linear extrapolation (taylor<1>), one reuse; coincident tags none") {
  auto rng = testing::rng(54);
  INFO("seed ", testing::fresh_seed());
  std::uniform_real_distribution<double> gap(0.5, 7.0);
  for (int trial = 0; trial < 100; ++trial) {
    const float T[2] = {0.f, static_cast<float>(-gap(rng))};
    const float target = static_cast<float>(gap(rng));
    float w[2] = {}, lin[2] = {};
    REQUIRE(foca{}.weights(T, 2, target, w) == 2);
    REQUIRE(taylor<1>{}.weights(T, 2, target, lin) == 2);
    CHECK(w[0] == doctest::Approx(lin[0]).epsilon(1e-5));
    CHECK(w[1] == doctest::Approx(lin[1]).epsilon(1e-5));
  }
  float w[3] = {};
  const float one[1] = {5.f};
  REQUIRE(foca{}.weights(one, 1, 7.f, w) == 1);
  CHECK(w[0] == 1.f);
  const float same[3] = {5.f, 5.f, 3.f};
  CHECK(foca{}.weights(same, 3, 7.f, w) == 0);
  const float same_old[3] = {5.f, 3.f, 3.f};
  CHECK(foca{}.weights(same_old, 3, 7.f, w) == 0);
  CHECK(foca{}.weights(one, 0, 7.f, w) == 0);
}
