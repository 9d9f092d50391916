// Multi-level classifiers (host): log-domain scores -> token_plan. Scratch is sized at construction;
// classify() never allocates.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <span>
#include <vector>

#include "concepts.hpp"
#include "math.hpp"

namespace specdiff {

namespace detail {

inline void expect_scores(std::span<const float> log_score, const token_plan& plan, std::size_t capacity) {
  if (log_score.empty()) fail("log_score: zero tokens");
  expect_size("log_score", log_score.size(), static_cast<std::size_t>(plan.tokens()));
  if (log_score.size() > capacity) fail("log_score: ", log_score.size(), " tokens, the classifier was prepared for ", capacity);
  expect_finite("log_score", log_score);
}

}  // namespace detail

/// Token indices sorted by descending score, ties by ascending index: a strict total order, so the result
/// is the same on every run and every standard library. For classifiers, ours and yours; `order` must
/// have the capacity for every token (it is resized, not reallocated, on the per-step path).
inline void rank_by_score(std::span<const float> log_score, std::vector<index_t>& order) {
  order.resize(log_score.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = static_cast<index_t>(i);
  std::sort(order.begin(), order.end(), [&](index_t a, index_t b) {
    const float sa = log_score[static_cast<std::size_t>(a)], sb = log_score[static_cast<std::size_t>(b)];
    return sa > sb || (sa == sb && a < b);
  });
}

/// SpecDiff's three levels. C1 = the top ceil((1-CR)·N) tokens by score (a fixed count, so GEMM shapes
/// are static); C2 = the lowest-scored tokens, taken from the bottom while their cumulative share of the
/// total score stays <= reuse_mass; C3 = the rest. C2 never takes a C1 token.
///
/// With a list of cache rates (buckets, highest first) it is a feedback_classifier: after a step whose verified
/// error was e, the next partial step caches at rate cache_rates[min(floor(e / error_step), buckets - 1)] — the
/// less the C3 rule erred, the more is cached; after a dense step (e = 0), the highest rate. One bucket: SpecDiff's
/// fixed rate.
class three_level_classifier {
 public:
  static constexpr std::size_t max_buckets = 8;

  explicit three_level_classifier(double cache_rate, double reuse_mass = 0.10)
      : three_level_classifier(std::span<const double>(&cache_rate, 1), 1.f, reuse_mass) {}
  three_level_classifier(std::span<const double> cache_rates, float error_step, double reuse_mass = 0.10)
      : buckets_(cache_rates.size()), error_step_(error_step), reuse_mass_(reuse_mass) {
    if (buckets_ < 1 || buckets_ > max_buckets) detail::fail("cache_rates: must hold 1 to ", max_buckets, " rates, got ", buckets_);
    std::size_t i = 0;
    for (double r : cache_rates) {
      detail::expect_cache_rate(r);
      if (i > 0 && !(r < rates_[i - 1])) detail::fail("cache_rates: must fall, got ", rates_[i - 1], " then ", r, " at ", i);
      rates_[i++] = r;
    }
    if (!(error_step > 0.f && std::isfinite(error_step))) detail::fail("error_step: must be finite and > 0, got ", error_step);
    detail::expect_reuse_mass(reuse_mass);
  }

  void prepare(index_t tokens) {
    if (tokens <= 0) detail::fail("tokens: must be positive, got ", tokens);
    order_.reserve(static_cast<std::size_t>(tokens));
  }
  /// Picks the bucket of the next partial step from the error verified on the last one.
  void adapt(const schedule_feedback& f) {
    const double e = static_cast<double>(f.last_error) / static_cast<double>(error_step_);
    const auto last = static_cast<double>(buckets_ - 1);
    bucket_ = e >= 0.0 && e < last ? static_cast<std::size_t>(std::floor(e)) : buckets_ - 1;  // NaN, +inf: the lowest rate
    if (f.last_error == 0.f) bucket_ = 0;  // after a dense step, or nothing verified
  }
  index_t compute_count(index_t tokens) const { return math::compute_count(cache_rate(), tokens); }
  double cache_rate() const { return rates_[bucket_]; }
  std::size_t buckets() const { return buckets_; }
  double reuse_mass() const { return reuse_mass_; }

  void classify(std::span<const float> log_score, token_plan& plan) {
    detail::expect_scores(log_score, plan, order_.capacity());
    rank_by_score(log_score, order_);
    const index_t n = plan.tokens();
    const index_t c1 = compute_count(n);
    // Shares relative to the maximum: exp(s - max) is in (0, 1], so the sum cannot overflow.
    const float top = log_score[static_cast<std::size_t>(order_[0])];
    double total = 0.0;
    for (float s : log_score) total += std::exp(static_cast<double>(s - top));
    auto levels = plan.mutable_levels();
    for (index_t r = 0; r < n; ++r) levels[static_cast<std::size_t>(order_[static_cast<std::size_t>(r)])] = r < c1 ? level::compute : level::approximate;
    double mass = 0.0;
    for (index_t r = n - 1; r >= c1; --r) {
      const index_t token = order_[static_cast<std::size_t>(r)];
      mass += std::exp(static_cast<double>(log_score[static_cast<std::size_t>(token)] - top)) / total;
      if (mass > reuse_mass_) break;
      levels[static_cast<std::size_t>(token)] = level::reuse;
    }
    plan.commit_levels();
  }

 private:
  std::array<double, max_buckets> rates_{};
  std::size_t buckets_ = 1, bucket_ = 0;
  float error_step_ = 1.f;
  double reuse_mass_;
  std::vector<index_t> order_;
};

/// Two levels (ToCa): the top ceil((1-CR)·N) tokens are computed, every other token reuses its cache.
class top_k_classifier {
 public:
  explicit top_k_classifier(double cache_rate) : cache_rate_(cache_rate) { detail::expect_cache_rate(cache_rate); }

  void prepare(index_t tokens) {
    if (tokens <= 0) detail::fail("tokens: must be positive, got ", tokens);
    order_.reserve(static_cast<std::size_t>(tokens));
  }
  index_t compute_count(index_t tokens) const { return math::compute_count(cache_rate_, tokens); }

  void classify(std::span<const float> log_score, token_plan& plan) {
    detail::expect_scores(log_score, plan, order_.capacity());
    rank_by_score(log_score, order_);
    const index_t c1 = math::compute_count(cache_rate_, plan.tokens());
    auto levels = plan.mutable_levels();
    for (index_t r = 0; r < plan.tokens(); ++r) levels[static_cast<std::size_t>(order_[static_cast<std::size_t>(r)])] = r < c1 ? level::compute : level::reuse;
    plan.commit_levels();
  }

 private:
  double cache_rate_;
  std::vector<index_t> order_;
};

/// Every token at one level: the building block of the three below.
template <level Level>
struct uniform_level_classifier {
  void prepare(index_t tokens) const {
    if (tokens <= 0) detail::fail("tokens: must be positive, got ", tokens);
  }
  index_t compute_count(index_t tokens) const { return Level == level::compute ? tokens : 0; }
  void classify(std::span<const float> log_score, token_plan& plan) const {
    detail::expect_scores(log_score, plan, log_score.size());
    plan.set_all(Level);
  }
};

/// Every token computed: the full model, and what a dense step uses.
using all_compute_classifier = uniform_level_classifier<level::compute>;
/// Every token reused on partial steps (FORA between refreshes).
using all_reuse_classifier = uniform_level_classifier<level::reuse>;
/// Every token approximated on partial steps (TaylorSeer's forecasts between refreshes).
using all_approximate_classifier = uniform_level_classifier<level::approximate>;

static_assert(feedback_classifier<three_level_classifier> && level_classifier<top_k_classifier> &&
              level_classifier<all_compute_classifier> && level_classifier<all_reuse_classifier> &&
              level_classifier<all_approximate_classifier>);

}  // namespace specdiff
