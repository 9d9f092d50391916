#include <doctest/doctest.h>

#include <cmath>
#include <specdiff/approximators.hpp>
#include <specdiff/math.hpp>

#include "../common/testing.hpp"

using namespace specdiff;

TEST_CASE("log_score is log his + log fut + scale * cf") {
  CHECK(math::log_score(2.f, 3.f, 4.f, 1.f) == doctest::Approx(std::log(2.0) + std::log(3.0) + 4.0));
  CHECK(math::log_score(1.f, 1.f, 0.f, 1.f) == 0.f);
  CHECK(math::log_score(0.5f, 1.f, 10.f, 0.1f) == doctest::Approx(std::log(0.5) + 1.0));
  // a zero factor is clamped, not -inf, so ranks stay orderable
  CHECK(std::isfinite(math::log_score(0.f, 1.f, 0.f, 1.f)));
  // the product form overflows where the log form does not
  CHECK(std::isinf(std::exp(100.f)));
  CHECK(math::log_score(1.f, 1.f, 100.f, 1.f) == doctest::Approx(100.0));
}

TEST_CASE("compute_count = ceil((1 - CR) * N), at least one") {
  CHECK(math::compute_count(0.9, 256) == 26);   // 25.6 -> 26
  CHECK(math::compute_count(0.0, 256) == 256);
  CHECK(math::compute_count(0.7, 10) == 3);     // (1-0.7)*10 = 3.0000000000000004
  CHECK(math::compute_count(0.75, 100) == 25);
  CHECK(math::compute_count(0.99, 10) == 1);    // 0.1 -> 1
  CHECK(math::compute_count(0.999999, 4) == 1); // never zero
  CHECK(math::compute_count(0.5, 1) == 1);
  CHECK(math::compute_count(0.5, 0) == 0);
}

TEST_CASE("SpecDiff weights follow W_i = e^-i (T_{t+i} - T_t) / sum, hand computed") {
  const float T[3] = {950.f, 975.f, 1000.f};  // newest first: the cached steps are earlier (larger t)
  float w[3] = {};
  REQUIRE(specdiff_weighted{}.weights(T, 3, 900.f, w) == 3);
  const double r1 = std::exp(-1.0) * 50, r2 = std::exp(-2.0) * 75, r3 = std::exp(-3.0) * 100;
  const double s = r1 + r2 + r3;
  CHECK(w[0] == doctest::Approx(r1 / s).epsilon(1e-6));
  CHECK(w[1] == doctest::Approx(r2 / s).epsilon(1e-6));
  CHECK(w[2] == doctest::Approx(r3 / s).epsilon(1e-6));
  CHECK(w[0] + w[1] + w[2] == doctest::Approx(1.0).epsilon(1e-6));
}

TEST_CASE("SpecDiff weights on fresh random tags sum to 1 and equal the formula") {
  std::mt19937_64 rng(testing::fresh_seed());
  INFO("seed ", testing::fresh_seed());
  for (int trial = 0; trial < 200; ++trial) {
    std::uniform_real_distribution<float> d(0.f, 1000.f);
    const float target = d(rng);
    const int n = 1 + trial % 3;
    float T[3] = {}, w[3] = {};
    float t = target;
    for (int i = 0; i < n; ++i) T[i] = (t += 1.f + d(rng) / 10.f);
    REQUIRE(specdiff_weighted{}.weights(T, n, target, w) == n);
    double sum = 0, norm = 0;
    for (int i = 0; i < n; ++i) norm += std::exp(-(i + 1.0)) * (T[i] - target);
    for (int i = 0; i < n; ++i) {
      sum += w[i];
      CHECK(w[i] == doctest::Approx(std::exp(-(i + 1.0)) * (T[i] - target) / norm).epsilon(1e-5));
    }
    CHECK(sum == doctest::Approx(1.0).epsilon(1e-6));
  }
}

TEST_CASE("SpecDiff weights fall back to the latest feature when all tags equal the target") {
  const float T[3] = {5.f, 5.f, 5.f};
  float w[3] = {};
  REQUIRE(specdiff_weighted{}.weights(T, 3, 5.f, w) == 3);
  CHECK(w[0] == 1.f);
  CHECK(w[1] == 0.f);
  CHECK(w[2] == 0.f);
}

template <int Order>
void check_taylor_reproduces_polynomials(std::mt19937_64& rng) {
  std::uniform_real_distribution<double> coef(-2.0, 2.0), gap(0.5, 3.0);
  for (int trial = 0; trial < 100; ++trial) {
    double c[Order + 1];
    for (auto& x : c) x = coef(rng);
    auto poly = [&](double t) {
      double y = 0, p = 1;
      for (int k = 0; k <= Order; ++k, p *= t) y += c[k] * p;
      return y;
    };
    float T[Order + 1];
    double t = 0;
    for (int i = 0; i <= Order; ++i) T[i] = static_cast<float>(t += gap(rng));  // uneven spacing
    const float target = static_cast<float>(-gap(rng));                          // extrapolate
    float w[Order + 1] = {};
    REQUIRE(taylor<Order>{}.weights(T, Order + 1, target, w) == Order + 1);
    double pred = 0, magnitude = 0;
    for (int i = 0; i <= Order; ++i) {
      pred += w[i] * poly(T[i]);
      magnitude += std::abs(w[i] * poly(T[i]));
    }
    // exact up to float rounding of the weights: the error is relative to the terms summed
    CHECK(std::abs(pred - poly(target)) <= 1e-6 * magnitude + 1e-9);
  }
}

TEST_CASE("Taylor of order k reproduces a polynomial of degree k exactly (fresh random)") {
  std::mt19937_64 rng(testing::fresh_seed());
  INFO("seed ", testing::fresh_seed());
  check_taylor_reproduces_polynomials<1>(rng);
  check_taylor_reproduces_polynomials<2>(rng);
  check_taylor_reproduces_polynomials<3>(rng);
}

TEST_CASE("Taylor order 1 is linear extrapolation, hand computed") {
  const float T[2] = {10.f, 20.f};  // f(10) = a, f(20) = b -> f(0) = 2a - b
  float w[2] = {};
  REQUIRE(linear{}.weights(T, 2, 0.f, w) == 2);
  CHECK(w[0] == doctest::Approx(2.0));
  CHECK(w[1] == doctest::Approx(-1.0));
  const float repeated[2] = {10.f, 10.f};
  CHECK(linear{}.weights(repeated, 2, 0.f, w) == 0);
}
