#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <specdiff/classifiers.hpp>

#include "../common/testing.hpp"

using namespace specdiff;

namespace {

std::vector<float> logs(std::initializer_list<float> scores) {
  std::vector<float> v;
  for (float s : scores) v.push_back(std::log(s));
  return v;
}

std::vector<index_t> as_vector(std::span<const index_t> s) { return {s.begin(), s.end()}; }

// "a ranks above b": higher score, ties to the lower index.
bool above(const std::vector<float>& s, index_t a, index_t b) { return s[a] > s[b] || (s[a] == s[b] && a < b); }

void check_partition(const token_plan& plan) {
  std::vector<int> seen(static_cast<std::size_t>(plan.tokens()), 0);
  for (int l = 0; l < level_count; ++l) {
    const auto idx = plan.indices(static_cast<level>(l));
    CHECK(std::is_sorted(idx.begin(), idx.end()));
    CHECK(std::adjacent_find(idx.begin(), idx.end()) == idx.end());
    for (index_t i : idx) {
      ++seen[static_cast<std::size_t>(i)];
      CHECK(plan.levels()[static_cast<std::size_t>(i)] == static_cast<level>(l));
    }
  }
  for (int c : seen) CHECK(c == 1);
}

}  // namespace

TEST_CASE("three levels, hand computed") {
  // scores 10, 1, 5, 0.5, 3, 0.5 (total 20); CR 0.5 -> C1 = top 3 = {0, 2, 4}.
  // From the bottom: token 5 (share .025, tie with 3 broken by index), token 3 (.05 cumulative) fit in
  // reuse_mass .08; token 1 would make .10 -> C3.
  three_level_classifier c(0.5, 0.08);
  c.prepare(6);
  token_plan plan(6);
  c.classify(logs({10, 1, 5, 0.5, 3, 0.5}), plan);
  CHECK(as_vector(plan.compute()) == std::vector<index_t>{0, 2, 4});
  CHECK(as_vector(plan.reuse()) == std::vector<index_t>{3, 5});
  CHECK(as_vector(plan.approximate()) == std::vector<index_t>{1});
  check_partition(plan);
}

TEST_CASE("ties are broken by token index") {
  three_level_classifier c(0.6, 0.0);
  c.prepare(5);  // C1 = 2 tokens
  token_plan plan(5);
  c.classify(std::vector<float>(5, 1.f), plan);
  CHECK(as_vector(plan.compute()) == std::vector<index_t>{0, 1});
  CHECK(plan.reuse().empty());
  top_k_classifier k(0.6);
  k.prepare(5);
  k.classify(std::vector<float>(5, 0.f), plan);
  CHECK(as_vector(plan.compute()) == std::vector<index_t>{0, 1});
  CHECK(as_vector(plan.reuse()) == std::vector<index_t>{2, 3, 4});
}

TEST_CASE("three levels: properties on fresh random scores") {
  std::mt19937_64 rng(testing::fresh_seed());
  INFO("seed ", testing::fresh_seed());
  for (int trial = 0; trial < 300; ++trial) {
    const index_t n = 1 + static_cast<index_t>(rng() % 600);
    const double cr = std::uniform_real_distribution<double>(0.0, 0.99)(rng);
    const double mass = std::uniform_real_distribution<double>(0.0, 0.5)(rng);
    auto s = testing::random_vector(rng, static_cast<std::size_t>(n), -8.f, 8.f);
    if (trial % 4 == 0)  // many exact ties
      for (auto& x : s) x = std::round(x);
    three_level_classifier c(cr, mass);
  c.prepare(n);
    token_plan plan(n);
    c.classify(s, plan);
    check_partition(plan);
    const index_t k = static_cast<index_t>(std::max(1.0, std::ceil((1.0 - cr) * n - 1e-9 * n)));
    CHECK(plan.count(level::compute) == k);
    // C1 outranks everything else; C3 outranks C2 (compare each level's weakest with the next one's best)
    auto weakest = [&](std::span<const index_t> l) { index_t w = l[0]; for (index_t i : l) if (above(s, w, i)) w = i; return w; };
    auto best = [&](std::span<const index_t> l) { index_t w = l[0]; for (index_t i : l) if (above(s, i, w)) w = i; return w; };
    if (!plan.reuse().empty()) CHECK(above(s, weakest(plan.compute()), best(plan.reuse())));
    if (!plan.approximate().empty()) {
      CHECK(above(s, weakest(plan.compute()), best(plan.approximate())));
      if (!plan.reuse().empty()) CHECK(above(s, weakest(plan.approximate()), best(plan.reuse())));
    }
    // C2's share of the total score is within reuse_mass, and maximal
    const float top = *std::max_element(s.begin(), s.end());
    double total = 0, c2 = 0;
    for (float x : s) total += std::exp(double(x) - top);
    for (index_t i : plan.reuse()) c2 += std::exp(double(s[i]) - top) / total;
    CHECK(c2 <= mass + 1e-12);
    if (plan.count(level::approximate) > 0) {
      const index_t lowest = weakest(plan.approximate());
      CHECK(c2 + std::exp(double(s[lowest]) - top) / total > mass - 1e-12);
    }
    // deterministic
    token_plan again(n);
    c.classify(s, again);
    CHECK(as_vector(again.compute()) == as_vector(plan.compute()));
    CHECK(as_vector(again.reuse()) == as_vector(plan.reuse()));
  }
}

TEST_CASE("CR = 0 computes every token, all-compute and all-reuse") {
  std::mt19937_64 rng(testing::fresh_seed());
  const auto s = testing::random_vector(rng, 77, -3.f, 3.f);
  token_plan plan(77);
  three_level_classifier c0(0.0);
  c0.prepare(77);
  c0.classify(s, plan);
  CHECK(plan.count(level::compute) == 77);
  top_k_classifier k0(0.0);
  k0.prepare(77);
  k0.classify(s, plan);
  CHECK(plan.count(level::compute) == 77);
  all_reuse_classifier{}.classify(s, plan);
  CHECK(plan.count(level::reuse) == 77);
  all_compute_classifier{}.classify(s, plan);
  CHECK(plan.count(level::compute) == 77);
  check_partition(plan);
}

TEST_CASE("classifiers reject bad input, naming the parameter") {
  testing::expect_error<std::invalid_argument>([] { three_level_classifier(1.0); }, {"cache_rate", "[0, 1)", "1"});
  testing::expect_error<std::invalid_argument>([] { three_level_classifier(-0.1); }, {"cache_rate", "-0.1"});
  testing::expect_error<std::invalid_argument>([] { three_level_classifier(std::nan("")); }, {"cache_rate"});
  testing::expect_error<std::invalid_argument>([] { top_k_classifier(1.5); }, {"cache_rate", "1.5"});
  testing::expect_error<std::invalid_argument>([] { three_level_classifier(0.5, 1.5); }, {"reuse_mass", "1.5"});
  testing::expect_error<std::invalid_argument>([] { three_level_classifier(0.5).prepare(0); }, {"tokens", "0"});
  {
    three_level_classifier unprepared(0.5);
    token_plan p4(4);
    const std::vector<float> four(4, 0.f);
    testing::expect_error<std::invalid_argument>([&] { unprepared.classify(four, p4); }, {"prepared for 0"});
  }
  three_level_classifier c(0.5);
  c.prepare(4);
  token_plan plan(4);
  testing::expect_error<std::invalid_argument>([&] { c.classify(std::vector<float>(3, 0.f), plan); }, {"log_score", "expected 4", "got 3"});
  testing::expect_error<std::invalid_argument>([&] { c.classify(std::vector<float>{0.f, 1.f, INFINITY, 0.f}, plan); }, {"log_score[2]", "not finite"});
  testing::expect_error<std::invalid_argument>([&] { c.classify(std::vector<float>{}, plan); }, {"zero tokens"});
  token_plan big(5);
  testing::expect_error<std::invalid_argument>([&] { c.classify(std::vector<float>(5, 0.f), big); }, {"prepared for 4"});
  testing::expect_error<std::invalid_argument>([] { token_plan p(0); }, {"tokens"});
}
