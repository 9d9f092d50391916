// Importance scorers: per-token, host-and-device formulas (see concepts.hpp), and the host loop over them.
// The CUDA kernel over the same scorer types is gpu::score (<specdiff/cuda/scorers.cuh>).
#pragma once

#include <cfloat>

#include "concepts.hpp"
#include "math.hpp"

namespace specdiff {

/// SpecDiff: Score = his · fut · exp(starvation_scale · cf), ranked as its logarithm.
struct specdiff_scorer {
  static constexpr signal needs = signal::attention | signal::future | signal::cache_count;
  float starvation_scale = 1.f;
  SPECDIFF_HD float score(const token_signals& x) const { return math::log_score(x.attention, x.future, x.cache_count, starvation_scale); }
};

/// ToCa-like: history only, Score = his · exp(starvation_scale · cf).
struct toca_scorer {
  static constexpr signal needs = signal::attention | signal::cache_count;
  float starvation_scale = 1.f;
  SPECDIFF_HD float score(const token_signals& x) const { return math::log_score(x.attention, 1.f, x.cache_count, starvation_scale); }
};

/// Feature change (RAS-like): tokens whose features moved most between the last two computed steps
/// matter most. Score = ‖ΔF‖ · exp(starvation_scale · cf). A token with no two cached features yet reports
/// +inf change (unknown -> compute it); it is clamped to the largest float so masses stay finite.
struct feature_change_scorer {
  static constexpr signal needs = signal::feature_change | signal::cache_count;
  float starvation_scale = 1.f;
  SPECDIFF_HD float score(const token_signals& x) const {
    return math::log_score(x.feature_change > FLT_MAX ? FLT_MAX : x.feature_change, 1.f, x.cache_count, starvation_scale);
  }
};

/// Uniform: no information. With the default starvation_scale 0 every token ties and the classifier's
/// index tie-break decides; with a positive scale it becomes a round-robin over staleness.
struct uniform_scorer {
  static constexpr signal needs = signal::cache_count;
  float starvation_scale = 0.f;
  SPECDIFF_HD float score(const token_signals& x) const { return starvation_scale * x.cache_count; }
};

static_assert(importance_scorer<specdiff_scorer> && importance_scorer<toca_scorer> &&
              importance_scorer<feature_change_scorer> && importance_scorer<uniform_scorer>);

/// What a scorer may read for a batch of tokens, one span per signal (token_signals order). A scorer
/// declares in `needs` which it reads; the others may stay empty. Host memory; the device twin is
/// gpu::device_score_inputs.
struct score_inputs {
  std::span<const float> attention{};
  std::span<const float> future{};
  std::span<const float> cache_count{};
  std::span<const float> feature_change{};
  std::span<const float> metric{};
};

namespace detail {

/// The sizes check both backends make before scoring: every signal the scorer needs holds `tokens`
/// values (and memory behind them). `sizes`/`present` are in token_signals order.
inline void expect_signals(signal needs, std::size_t tokens, const std::array<std::size_t, signal_count>& sizes,
                           const std::array<bool, signal_count>& present) {
  if (tokens == 0) fail("log_score: zero tokens");
  for (std::size_t k = 0; k < static_cast<std::size_t>(signal_count); ++k) {
    if (!has(needs, all_signals[k])) continue;
    if (sizes[k] != tokens) fail(signal_names[k], ": expected ", tokens, " values, got ", sizes[k]);
    if (!present[k]) fail(signal_names[k], ": null data for ", tokens, " values");
  }
}

}  // namespace detail

/// Host loop: log_score[i] = scorer.score(signals of token i). Checks sizes and finiteness of what the
/// scorer reads (feature_change may be +inf: unknown change) before writing anything.
template <importance_scorer Scorer>
void score_tokens(const Scorer& scorer, const score_inputs& in, std::span<float> log_score) {
  const std::array<std::span<const float>, signal_count> spans = {in.attention, in.future, in.cache_count, in.feature_change, in.metric};
  std::array<std::size_t, signal_count> sizes{};
  std::array<bool, signal_count> present{};
  for (std::size_t k = 0; k < spans.size(); ++k) {
    sizes[k] = spans[k].size();
    present[k] = spans[k].data() != nullptr || spans[k].empty();
  }
  detail::expect_signals(Scorer::needs, log_score.size(), sizes, present);
  for (std::size_t k = 0; k < spans.size(); ++k) {
    if (!has(Scorer::needs, all_signals[k])) continue;
    const bool may_be_inf = all_signals[k] == signal::feature_change;
    for (std::size_t i = 0; i < spans[k].size(); ++i) {
      const float v = spans[k][i];
      if (std::isnan(v) || (!may_be_inf && std::isinf(v))) detail::fail(signal_names[k], "[", i, "] is not finite (", v, ")");
    }
  }
  constexpr bool attention = has(Scorer::needs, signal::attention), future = has(Scorer::needs, signal::future),
                 cache_count = has(Scorer::needs, signal::cache_count), change = has(Scorer::needs, signal::feature_change),
                 metric = has(Scorer::needs, signal::metric);
  for (std::size_t i = 0; i < log_score.size(); ++i) {
    token_signals x;
    if constexpr (attention) x.attention = in.attention[i];
    if constexpr (future) x.future = in.future[i];
    if constexpr (cache_count) x.cache_count = in.cache_count[i];
    if constexpr (change) x.feature_change = in.feature_change[i];
    if constexpr (metric) x.metric = in.metric[i];
    log_score[i] = scorer.score(x);
  }
}

}  // namespace specdiff
