// Step-level caching policy (step_cache.hpp): relative_l1 against hand computations, relative_change_gate against
// hand-worked sequences (FBCache-like, TeaCache-like with the identity and the FLUX polynomial, warm-up, limits,
// first and last steps) and against a plain re-statement of the rule on fresh random sequences.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <specdiff/step_cache.hpp>
#include <vector>

#include "../common/testing.hpp"

using namespace specdiff;

namespace {

constexpr double inf = std::numeric_limits<double>::infinity();
constexpr double not_a_number = std::numeric_limits<double>::quiet_NaN();

// Runs a gate over `changes` (one per step) and returns which steps computed.
std::vector<int> computed(relative_change_gate& gate, const std::vector<double>& changes) {
  std::vector<int> out;
  const auto steps = static_cast<index_t>(changes.size());
  for (index_t s = 0; s < steps; ++s) out.push_back(gate.advance(s, steps, changes[static_cast<std::size_t>(s)]) ? 1 : 0);
  return out;
}

}  // namespace

TEST_CASE("relative_l1: sum |now - before| / sum |before|, against hand computations") {
  const std::vector<float> now = {1.f, -2.f, 3.f}, before = {2.f, 2.f, -1.f};
  CHECK(relative_l1(now, before) == doctest::Approx(9.0 / 5.0).epsilon(1e-15));  // |-1| + |-4| + |4| = 9; 2 + 2 + 1 = 5
  CHECK(relative_l1(before, now) == doctest::Approx(9.0 / 6.0).epsilon(1e-15));  // the denominator is `before`'s
  CHECK(relative_l1(now, now) == 0.0);
  const std::vector<float> zeros(3, 0.f);
  CHECK(relative_l1(zeros, zeros) == 0.0);          // nothing moved
  CHECK(relative_l1(now, zeros) == inf);            // any change against nothing
  CHECK(relative_l1(std::vector<float>{}, std::vector<float>{}) == 0.0);
  CHECK(std::isnan(relative_l1(std::vector<float>{std::nanf("")}, std::vector<float>{1.f})));
  testing::expect_error<std::invalid_argument>([&] { (void)relative_l1(now, std::vector<float>(2, 1.f)); },
                                               {"relative_l1", "expected 2", "got 3"});
}

TEST_CASE("relative_l1 equals mean|a - b| / mean|b| on fresh random tensors") {
  auto rng = testing::rng(71);
  INFO("seed ", testing::fresh_seed());
  for (int trial = 0; trial < 20; ++trial) {
    const auto n = static_cast<std::size_t>(1 + rng() % 5000);
    const auto a = testing::random_vector(rng, n, -3.f, 3.f), b = testing::random_vector(rng, n, -3.f, 3.f);
    long double diff = 0, base = 0;
    for (std::size_t i = 0; i < n; ++i) {
      diff += std::fabs(static_cast<long double>(a[i]) - b[i]);
      base += std::fabs(static_cast<long double>(b[i]));
    }
    CHECK(relative_l1(a, b) == doctest::Approx(static_cast<double>((diff / n) / (base / n))).epsilon(1e-12));
  }
}

TEST_CASE("change_rescale: the identity, and TeaCache's FLUX polynomial against a hand evaluation") {
  CHECK(change_rescale::identity()(0.37) == 0.37);
  // 498.65165 d^4 - 283.781631 d^3 + 55.8554382 d^2 - 3.82021401 d + 0.264230861 at d = 0.1, by hand:
  // 0.0498651651 - 0.283781631 + 0.558554382 - 0.382021401 + 0.264230861 = 0.2068473761
  CHECK(change_rescale::teacache_flux()(0.1) == doctest::Approx(0.2068473761).epsilon(1e-12));
  CHECK(change_rescale::teacache_flux()(0.0) == doctest::Approx(0.264230861).epsilon(1e-12));
  const change_rescale quadratic{{1.0, -2.0, 3.0, 0.0, 0.0}};
  CHECK(quadratic(2.0) == 1.0 - 4.0 + 12.0);
}

TEST_CASE("gate, FBCache-like (no accumulation): hand-worked sequence with warm-up") {
  gate_options o;
  o.threshold = 0.125;
  o.warmup_steps = 2;
  relative_change_gate gate(o);
  // step 0 first; 1 warm-up; 2: 0.0625 < 0.125 skip; 3: 0.25 compute; 4: 0.1 skip; 5: 0.125 is not below, compute;
  // 6: 0 skip; 7: NaN (unknown) compute
  CHECK(computed(gate, {inf, 0.0625, 0.0625, 0.25, 0.1, 0.125, 0.0, not_a_number}) == std::vector<int>{1, 1, 0, 1, 0, 1, 0, 1});
  CHECK(gate.state().skips == 3);
  CHECK(gate.state().consecutive_skips == 0);
  CHECK(gate.state().accumulated == 0.0);  // nothing is accumulated without `accumulate`
  // no accumulation: a run of small changes keeps skipping
  gate.reset();
  CHECK(gate.state().skips == 0);
  CHECK(computed(gate, {inf, 0.1, 0.1, 0.1, 0.1, 0.1}) == std::vector<int>{1, 1, 0, 0, 0, 0});
  CHECK(gate.state().consecutive_skips == 4);
}

TEST_CASE("gate, TeaCache-like (accumulating, last step computed): identity and FLUX rescale") {
  gate_options o;
  o.threshold = 0.375;
  o.accumulate = true;
  o.compute_last = true;
  relative_change_gate gate(o);
  // A: 0.125, 0.25 (skips), 0.375 is not below -> compute and reset; 0.0625, 0.25 (skips); last step computes.
  CHECK(computed(gate, {inf, 0.125, 0.125, 0.125, 0.0625, 0.1875, 0.01}) == std::vector<int>{1, 0, 0, 1, 0, 0, 1});
  CHECK(gate.state().accumulated == 0.0);  // reset by the computed last step

  // The accumulator in the state, step by step
  gate.reset();
  CHECK(gate.advance(0, 10, inf));
  CHECK_FALSE(gate.advance(1, 10, 0.125));
  CHECK(gate.state().accumulated == 0.125);
  CHECK_FALSE(gate.advance(2, 10, 0.0625));
  CHECK(gate.state().accumulated == 0.1875);
  CHECK(gate.state().consecutive_skips == 2);
  CHECK(gate.advance(3, 10, 0.25));  // 0.4375
  CHECK(gate.state().accumulated == 0.0);
  CHECK(gate.state().consecutive_skips == 0);
  CHECK(gate.state().skips == 2);

  // FLUX polynomial, threshold 0.6, a constant change 0.1: P(0.1) = 0.2068473761 -> A = 0.207, 0.414 (skips),
  // 0.621 -> compute; again twice; the last step (6) computes.
  relative_change_gate tea(relative_change_gate::teacache());
  CHECK(tea.settings().threshold == 0.6);
  CHECK(computed(tea, {inf, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1}) == std::vector<int>{1, 0, 0, 1, 0, 0, 1});
  // its floor (P >= 0.18 on [0, 1]) caps the skips even when nothing moves: 0.264 + 0.264 = 0.528, then 0.793
  tea.reset();
  CHECK(computed(tea, {inf, 0, 0, 0, 0, 0, 0, 0}) == std::vector<int>{1, 0, 0, 1, 0, 0, 1, 1});
}

TEST_CASE("gate: first and last steps, threshold 0 and +inf, limits on skips") {
  gate_options o;
  o.threshold = inf;  // skip whatever the change, unless something forces a computation
  relative_change_gate always(o);
  CHECK(computed(always, {0, 0, 0, 0, 0}) == std::vector<int>{1, 0, 0, 0, 0});  // only the first step computes
  o.compute_last = true;
  relative_change_gate last(o);
  CHECK(computed(last, {0, 0, 0, 0, 0}) == std::vector<int>{1, 0, 0, 0, 1});
  o.compute_last = false;
  o.max_consecutive_skips = 2;
  relative_change_gate runs(o);
  CHECK(computed(runs, {0, 0, 0, 0, 0, 0, 0, 0}) == std::vector<int>{1, 0, 0, 1, 0, 0, 1, 0});
  o.max_consecutive_skips = unlimited_skips;
  o.max_skips = 3;
  relative_change_gate budget(o);
  CHECK(computed(budget, {0, 0, 0, 0, 0, 0, 0}) == std::vector<int>{1, 0, 0, 0, 1, 1, 1});
  o.max_skips = 0;
  relative_change_gate none(o);
  CHECK(computed(none, {0, 0, 0}) == std::vector<int>{1, 1, 1});

  gate_options off;
  off.threshold = 0.0;  // caching switched off, even for a change of exactly 0
  relative_change_gate zero(off);
  CHECK(computed(zero, {0, 0, 0, 0}) == std::vector<int>{1, 1, 1, 1});
}

TEST_CASE("gate: decide is pure, advance validates the step and keeps the state on failure") {
  gate_options o;
  o.threshold = 0.5;
  o.accumulate = true;
  relative_change_gate gate(o);
  CHECK(gate.advance(0, 5, inf));
  CHECK_FALSE(gate.advance(1, 5, 0.25));
  const gate_state before = gate.state();
  const gate_decision a = gate.decide(before, 2, 5, 0.125), b = gate.decide(before, 2, 5, 0.125);
  CHECK_FALSE(a.compute);
  CHECK(a.next.accumulated == 0.375);
  CHECK(a.next.accumulated == b.next.accumulated);
  CHECK(gate.state().accumulated == before.accumulated);  // decide changed nothing
  testing::expect_error<std::invalid_argument>([&] { (void)gate.advance(5, 5, 0.0); }, {"step = 5", "[0, 5)"});
  testing::expect_error<std::invalid_argument>([&] { (void)gate.advance(-1, 5, 0.0); }, {"step = -1"});
  testing::expect_error<std::invalid_argument>([&] { (void)gate.advance(0, 0, 0.0); }, {"steps", "got 0"});
  CHECK(gate.state().accumulated == before.accumulated);
  CHECK(gate.state().skips == before.skips);
  // out-of-range input to decide (device code cannot throw) computes
  CHECK(gate.decide(before, -3, 5, 0.0).compute);
  CHECK(gate.decide(before, 2, 5, -0.5).compute);
}

TEST_CASE("gate: bad options are refused by name and value") {
  auto refuse = [](gate_options o, std::initializer_list<const char*> fragments) {
    testing::expect_error<std::invalid_argument>([&] { relative_change_gate g(o); }, fragments);
  };
  gate_options o;
  o.threshold = -0.1;
  refuse(o, {"threshold", "-0.1"});
  o.threshold = not_a_number;
  refuse(o, {"threshold", "nan"});
  o = {};
  o.warmup_steps = -1;
  refuse(o, {"warmup_steps", "-1"});
  o = {};
  o.max_consecutive_skips = -2;
  refuse(o, {"max_consecutive_skips", "-2"});
  o = {};
  o.max_skips = -7;
  refuse(o, {"max_skips", "-7"});
  o = {};
  o.rescale.c[3] = inf;
  refuse(o, {"rescale.c[3]", "inf"});
}

TEST_CASE("gate against a plain re-statement of the rule, on fresh random sequences and options") {
  auto rng = testing::rng(72);
  INFO("seed ", testing::fresh_seed());
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (int trial = 0; trial < 300; ++trial) {
    gate_options o;
    o.threshold = unit(rng) < 0.1 ? 0.0 : unit(rng);
    o.warmup_steps = static_cast<index_t>(rng() % 4);
    o.max_consecutive_skips = static_cast<index_t>(rng() % 5) - 1;
    o.max_skips = static_cast<index_t>(rng() % 8) - 1;
    o.accumulate = rng() % 2 == 0;
    o.compute_last = rng() % 2 == 0;
    if (rng() % 2) o.rescale = change_rescale{{0.05 * unit(rng), 0.5 + unit(rng), unit(rng), 0.0, 0.0}};
    const int steps = 1 + static_cast<int>(rng() % 30);
    std::vector<double> changes(static_cast<std::size_t>(steps));
    for (auto& c : changes) c = unit(rng) < 0.05 ? not_a_number : 0.3 * unit(rng);

    relative_change_gate gate(o);
    const auto got = computed(gate, changes);
    // The rule, written out as a loop over steps.
    double acc = 0;
    int run = 0, total = 0;
    std::vector<int> want;
    for (int s = 0; s < steps; ++s) {
      const double c = changes[static_cast<std::size_t>(s)];
      const bool must = s == 0 || s < o.warmup_steps || (o.compute_last && s == steps - 1) || std::isnan(c) ||
                        o.threshold == 0.0 || (o.max_consecutive_skips != -1 && run >= o.max_consecutive_skips) ||
                        (o.max_skips != -1 && total >= o.max_skips);
      const double r = (o.rescale.c[2] * c + o.rescale.c[1]) * c + o.rescale.c[0];
      const double value = o.accumulate ? acc + r : r;
      if (!must && value < o.threshold) {
        want.push_back(0);
        acc = o.accumulate ? value : 0;
        ++run;
        ++total;
      } else {
        want.push_back(1);
        acc = 0;
        run = 0;
      }
    }
    INFO("trial ", trial, " steps ", steps, " threshold ", o.threshold);
    CHECK(got == want);
  }
}
