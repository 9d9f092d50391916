// TaylorSeer's forecast (taylorseer<Order>): hand-computed cases, and a twin of the authors' stateful
// algorithm (factors updated on every full step, then expanded) against the stateless weights the store
// applies to its ring of cached rows.
#include <doctest/doctest.h>

#include <cmath>
#include <map>
#include <specdiff/approximators.hpp>
#include <specdiff/cache_store.hpp>

#include "../common/testing.hpp"

using namespace specdiff;

namespace {

// Tags as the module-level methods give them: steps - step, falling by one per step.
constexpr int steps = 28;
float tag(int step) { return static_cast<float>(steps - step); }

}  // namespace

TEST_CASE("taylorseer<2> on a quadratic at uneven full steps 1, 2, 8: the authors' finite differences, hand computed") {
  // F(s) = s^2. Full step 2: D1 = (F2 - F1) / 1 = 3. Full step 8: D1 = (F8 - F2) / 6 = 10, D2 = (10 - 3) / 6 = 7/6.
  // Step 11 (x = 3): 64 + 10 * 3 + 7/6 * 9 / 2 = 99.25 — not 121: backward differences, not a polynomial fit.
  const float T[3] = {tag(8), tag(2), tag(1)};
  float w[3] = {};
  REQUIRE(taylorseer<2>{}.weights(T, 3, tag(11), w) == 3);
  // as weights on (F8, F2, F1): 1 + 3/6 + 4.5/36, -3/6 - 4.5 * 7/36, 4.5/6
  CHECK(w[0] == doctest::Approx(1.625));
  CHECK(w[1] == doctest::Approx(-1.375));
  CHECK(w[2] == doctest::Approx(0.75));
  CHECK(w[0] * 64.0 + w[1] * 4.0 + w[2] * 1.0 == doctest::Approx(99.25));
  // the polynomial rule through the same rows is exact for the quadratic instead
  REQUIRE(taylor<2>{}.weights(T, 3, tag(11), w) == 3);
  CHECK(w[0] * 64.0 + w[1] * 4.0 + w[2] * 1.0 == doctest::Approx(121.0));
}

TEST_CASE("taylorseer<2> right after warm-up (full steps 0, 1, 2): 8.5, -12, 4.5 at step 5, not the polynomial's 10, -15, 6") {
  // D1 = F2 - F1, D2 = (F2 - F1) - (F1 - F0); x = 3: F2 + 3 D1 + 4.5 D2
  const float T[3] = {tag(2), tag(1), tag(0)};
  float w[3] = {};
  REQUIRE(taylorseer<2>{}.weights(T, 3, tag(5), w) == 3);
  CHECK(w[0] == doctest::Approx(8.5));
  CHECK(w[1] == doctest::Approx(-12.0));
  CHECK(w[2] == doctest::Approx(4.5));
  REQUIRE(taylor<2>{}.weights(T, 3, tag(5), w) == 3);
  CHECK(w[0] == doctest::Approx(10.0));
  CHECK(w[1] == doctest::Approx(-15.0));
  CHECK(w[2] == doctest::Approx(6.0));
}

TEST_CASE("taylorseer: fewer rows give a lower order, rows older than oldest_tag start no difference") {
  const float T[3] = {tag(2), tag(1), tag(0)};
  float w[3] = {};
  // two rows: order 1, F2 + 3 (F2 - F1)
  REQUIRE(taylorseer<2>{}.weights(T, 2, tag(5), w) == 2);
  CHECK(w[0] == doctest::Approx(4.0));
  CHECK(w[1] == doctest::Approx(-3.0));
  // one row: the latest
  REQUIRE(taylorseer<2>{}.weights(T, 1, tag(5), w) == 1);
  CHECK(w[0] == 1.f);
  // TaylorSeer-FLUX (first_enhance 3) forms no difference from step 0: the row of step 0 gets no weight
  REQUIRE(taylorseer<2>{tag(1)}.weights(T, 3, tag(5), w) == 3);
  CHECK(w[0] == doctest::Approx(4.0));
  CHECK(w[1] == doctest::Approx(-3.0));
  CHECK(w[2] == 0.f);
  // the newest row is always used, even when it is older than oldest_tag
  REQUIRE(taylorseer<2>{tag(5)}.weights(T, 3, tag(6), w) == 3);
  CHECK(w[0] == 1.f);
  CHECK(w[1] == 0.f);
  // a repeated tag cannot be differenced: reported as no weights
  const float repeated[2] = {tag(2), tag(2)};
  CHECK(taylorseer<1>{}.weights(repeated, 2, tag(5), w) == 0);
}

TEST_CASE("taylorseer reproduces a linear function exactly at any spacing (fresh random)") {
  auto rng = testing::rng(41);
  INFO("seed ", testing::fresh_seed());
  std::uniform_real_distribution<double> coef(-3.0, 3.0), gap(0.5, 7.0);
  for (int trial = 0; trial < 200; ++trial) {
    const double a = coef(rng), b = coef(rng);
    float T[4];
    double t = 0;
    for (float& x : T) x = static_cast<float>(t += gap(rng));  // newest first: older rows have larger tags
    const float target = static_cast<float>(-gap(rng));
    float w[4] = {};
    REQUIRE(taylorseer<3>{}.weights(T, 4, target, w) == 4);
    double pred = 0, magnitude = 0;
    for (int i = 0; i < 4; ++i) {
      pred += w[i] * (a + b * T[i]);
      magnitude += std::abs(w[i] * (a + b * T[i]));
    }
    // exact up to the float rounding of the weights, relative to the terms summed
    CHECK(std::abs(pred - (a + b * target)) <= 1e-6 * magnitude + 1e-9);
  }
}

// The authors' algorithm, kept as they keep it: a map of factors per full step, updated from the previous map
// (derivative_approximation), expanded on the other steps (taylor_formula); one scalar feature per token.
struct authors_twin {
  int max_order = 1, first_enhance = 3;
  std::map<int, double> factors;
  int last_full = -1, previous_full = -1;

  void full_step(int step, double feature) {
    previous_full = last_full;
    last_full = step;
    std::map<int, double> updated{{0, feature}};
    for (int i = 0; i < max_order; ++i) {
      if (factors.count(i) == 0 || !(step > first_enhance - 2)) break;
      updated[i + 1] = (updated[i] - factors[i]) / (last_full - previous_full);
    }
    factors = updated;
  }
  double forecast(int step) const {
    const double x = step - last_full;
    double out = 0, power = 1;
    for (const auto& [i, f] : factors) {
      out += f * power;
      power *= x / (i + 1);
    }
    return out;
  }
};

template <int Order>
void check_against_twin(std::mt19937_64& rng) {
  std::uniform_real_distribution<float> feature(-2.f, 2.f);
  std::uniform_int_distribution<int> interval(1, 7), warmup(1, 4), tokens_d(1, 5);
  for (int trial = 0; trial < 30; ++trial) {
    const int first_enhance = warmup(rng), tokens = tokens_d(rng);
    const taylorseer<Order> approx{tag(std::max(first_enhance - 2, 0))};
    host_cache_store<float> store({1, 1, tokens, 1, Order + 1});
    std::vector<authors_twin> twins(static_cast<std::size_t>(tokens), authors_twin{Order, first_enhance, {}, -1, -1});
    std::vector<index_t> all(static_cast<std::size_t>(tokens));
    for (index_t i = 0; i < tokens; ++i) all[static_cast<std::size_t>(i)] = i;
    std::vector<float> rows(static_cast<std::size_t>(tokens)), out(rows.size());
    int next_full = 0;
    for (int step = 0; step < steps; ++step) {
      if (step < first_enhance || step == next_full) {  // warm-up, then full steps at irregular intervals
        for (auto& r : rows) r = feature(rng);
        store.write(0, 0, tag(step), matrix_view<const float>(rows.data(), tokens, 1));
        for (int i = 0; i < tokens; ++i) twins[static_cast<std::size_t>(i)].full_step(step, rows[static_cast<std::size_t>(i)]);
        next_full = std::max(step + 1, first_enhance) + interval(rng) - 1;
        continue;
      }
      store.fill(0, 0, tag(step), all, approx, matrix_view<float>(out.data(), tokens, 1));
      for (int i = 0; i < tokens; ++i) {
        const double want = twins[static_cast<std::size_t>(i)].forecast(step);
        INFO("order ", Order, " first_enhance ", first_enhance, " step ", step, " token ", i);
        // float weights and rows: the error bound scales with the terms summed (weights reach ~100 at order 3)
        CHECK(std::abs(out[static_cast<std::size_t>(i)] - want) <= 1e-5 * (100.0 + std::abs(want)));
      }
    }
  }
}

TEST_CASE("taylorseer through the store equals the authors' stateful algorithm (fresh random schedules and features)") {
  auto rng = testing::rng(42);
  INFO("seed ", testing::fresh_seed());
  check_against_twin<1>(rng);
  check_against_twin<2>(rng);
  check_against_twin<3>(rng);
}
