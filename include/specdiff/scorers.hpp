// Importance scorers (host). Each writes log-domain scores; see concepts.hpp for the contract.
#pragma once

#include <limits>

#include "concepts.hpp"
#include "math.hpp"

namespace specdiff {

namespace detail {

inline void expect_inputs(const score_inputs& in, signal needs, std::size_t tokens) {
  if (tokens == 0) fail("log_score: zero tokens");
  if (has(needs, signal::attention)) { expect_size("attention", in.attention.size(), tokens); expect_finite("attention", in.attention); }
  if (has(needs, signal::future)) { expect_size("future", in.future.size(), tokens); expect_finite("future", in.future); }
  if (has(needs, signal::cache_count)) { expect_size("cache_count", in.cache_count.size(), tokens); expect_finite("cache_count", in.cache_count); }
  if (has(needs, signal::metric)) { expect_size("metric", in.metric.size(), tokens); expect_finite("metric", in.metric); }
  if (has(needs, signal::feature_change)) {
    expect_size("feature_change", in.feature_change.size(), tokens);
    for (std::size_t i = 0; i < tokens; ++i)
      if (std::isnan(in.feature_change[i])) fail("feature_change[", i, "] is NaN");
  }
}

}  // namespace detail

/// SpecDiff: Score = his · fut · exp(starvation_scale · cf), ranked as its logarithm.
struct specdiff_scorer {
  static constexpr signal needs = signal::attention | signal::future | signal::cache_count;
  float starvation_scale = 1.f;

  void score(const score_inputs& in, std::span<float> out) const {
    detail::expect_inputs(in, needs, out.size());
    for (std::size_t i = 0; i < out.size(); ++i)
      out[i] = math::log_score(in.attention[i], in.future[i], in.cache_count[i], starvation_scale);
  }
};

/// ToCa-like: history only, Score = his · exp(starvation_scale · cf).
struct toca_scorer {
  static constexpr signal needs = signal::attention | signal::cache_count;
  float starvation_scale = 1.f;

  void score(const score_inputs& in, std::span<float> out) const {
    detail::expect_inputs(in, needs, out.size());
    for (std::size_t i = 0; i < out.size(); ++i)
      out[i] = math::log_score(in.attention[i], 1.f, in.cache_count[i], starvation_scale);
  }
};

/// Feature change (RAS-like): tokens whose features moved most between the last two computed steps
/// matter most. Score = ‖ΔF‖ · exp(starvation_scale · cf). A token with no two cached features yet reports
/// +inf change (unknown -> compute it); it is clamped to the largest float so masses stay finite.
struct feature_change_scorer {
  static constexpr signal needs = signal::feature_change | signal::cache_count;
  float starvation_scale = 1.f;

  void score(const score_inputs& in, std::span<float> out) const {
    detail::expect_inputs(in, needs, out.size());
    constexpr float big = std::numeric_limits<float>::max();
    for (std::size_t i = 0; i < out.size(); ++i) {
      const float change = in.feature_change[i] > big ? big : in.feature_change[i];
      out[i] = math::log_score(change, 1.f, in.cache_count[i], starvation_scale);
    }
  }
};

/// Uniform: no information. With the default starvation_scale 0 every token ties and the classifier's
/// index tie-break decides; with a positive scale it becomes a round-robin over staleness.
struct uniform_scorer {
  static constexpr signal needs = signal::cache_count;
  float starvation_scale = 0.f;

  void score(const score_inputs& in, std::span<float> out) const {
    detail::expect_inputs(in, needs, out.size());
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = starvation_scale * in.cache_count[i];
  }
};

static_assert(importance_scorer<specdiff_scorer> && importance_scorer<toca_scorer> &&
              importance_scorer<feature_change_scorer> && importance_scorer<uniform_scorer>);

}  // namespace specdiff
