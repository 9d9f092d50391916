// Device scorers: the host scorers' per-token formulas (math::log_score), one thread per token over a batch
// of samples laid out [sample][token]. Inputs a scorer does not need (see `needs`) may be empty spans.
// A scorer of your own is a struct with `needs` and an HD token(his, fut, cf, change, metric) -> log score.
#pragma once

#include <cuda_runtime.h>

#include <cfloat>

#include "../concepts.hpp"
#include "../math.hpp"
#include "error.cuh"
#include "plan.cuh"
#include "views.cuh"

namespace specdiff::gpu {

/// score_inputs over device memory: each span holds one value per token of every sample.
struct device_score_inputs {
  device_span<const float> attention;       ///< his
  device_span<const float> future;          ///< fut
  device_span<const float> cache_count;     ///< cf
  device_span<const float> feature_change;  ///< L2 change of the last two cached rows
  device_span<const float> metric;          ///< an engine-defined per-token metric (signal::metric)
};

/// SpecDiff: log his + log fut + scale * cf.
struct specdiff_scorer {
  static constexpr signal needs = signal::attention | signal::future | signal::cache_count;
  float starvation_scale = 1.f;
  SPECDIFF_HD float token(float his, float fut, float cf, float, float) const { return math::log_score(his, fut, cf, starvation_scale); }
};

/// ToCa-like: history only.
struct toca_scorer {
  static constexpr signal needs = signal::attention | signal::cache_count;
  float starvation_scale = 1.f;
  SPECDIFF_HD float token(float his, float, float cf, float, float) const { return math::log_score(his, 1.f, cf, starvation_scale); }
};

/// RAS-like feature change; +inf change (fewer than two cached rows) is clamped to the largest float.
struct feature_change_scorer {
  static constexpr signal needs = signal::feature_change | signal::cache_count;
  float starvation_scale = 1.f;
  SPECDIFF_HD float token(float, float, float cf, float change, float) const {
    return math::log_score(change > FLT_MAX ? FLT_MAX : change, 1.f, cf, starvation_scale);
  }
};

/// No information: staleness only.
struct uniform_scorer {
  static constexpr signal needs = signal::cache_count;
  float starvation_scale = 0.f;
  SPECDIFF_HD float token(float, float, float cf, float, float) const { return starvation_scale * cf; }
};

namespace detail {

/// Which inputs a scorer reads, as constants device code may use (has() itself is host-only constexpr).
template <class Scorer>
struct reads {
  static constexpr bool attention = has(Scorer::needs, signal::attention);
  static constexpr bool future = has(Scorer::needs, signal::future);
  static constexpr bool cache_count = has(Scorer::needs, signal::cache_count);
  static constexpr bool feature_change = has(Scorer::needs, signal::feature_change);
  static constexpr bool metric = has(Scorer::needs, signal::metric);
};

template <int BlockThreads, class Scorer>
__global__ void __launch_bounds__(BlockThreads) score_kernel(Scorer scorer, device_score_inputs in, device_span<float> out) {
  using r = reads<Scorer>;
  for (index_t i = blockIdx.x * BlockThreads + threadIdx.x; i < out.size; i += gridDim.x * BlockThreads)
    out[i] = scorer.token(r::attention ? in.attention[i] : 1.f, r::future ? in.future[i] : 1.f, r::cache_count ? in.cache_count[i] : 0.f,
                          r::feature_change ? in.feature_change[i] : 0.f, r::metric ? in.metric[i] : 0.f);
}

template <int BlockThreads>
__global__ void __launch_bounds__(BlockThreads) advance_counts_kernel(const level* levels, float* cache_count, index_t n) {
  for (index_t i = blockIdx.x * BlockThreads + threadIdx.x; i < n; i += gridDim.x * BlockThreads)
    cache_count[i] = levels[i] == level::compute ? 0.f : cache_count[i] + 1.f;
}

inline void expect_needed(std::string_view name, bool needed, const device_span<const float>& s, index_t n) {
  if (needed) expect_span(name, s, n);
}

}  // namespace detail

/// Writes one log-domain score per token into `log_score` (batch * tokens values). Stream-ordered.
template <class Scorer>
void score(const Scorer& scorer, const device_score_inputs& in, device_span<float> log_score, cudaStream_t stream) {
  const index_t n = log_score.size;
  if (n <= 0) detail::fail("log_score: zero tokens");
  detail::expect_span("log_score", log_score, n);
  detail::expect_needed("attention", has(Scorer::needs, signal::attention), in.attention, n);
  detail::expect_needed("future", has(Scorer::needs, signal::future), in.future, n);
  detail::expect_needed("cache_count", has(Scorer::needs, signal::cache_count), in.cache_count, n);
  detail::expect_needed("feature_change", has(Scorer::needs, signal::feature_change), in.feature_change, n);
  detail::expect_needed("metric", has(Scorer::needs, signal::metric), in.metric, n);
  detail::score_kernel<256><<<detail::blocks_for(static_cast<std::size_t>(n), 256), 256, 0, stream>>>(scorer, in, log_score);
  SPECDIFF_CUDA_CHECK_LAUNCH("score_kernel");
}

/// cf <- 0 for computed tokens, cf + 1 for the others (the accelerator's staleness update), over every
/// sample of `plan`; `cache_count` is [batch][tokens].
inline void advance_cache_counts(const device_plan_view& plan, device_span<float> cache_count, cudaStream_t stream) {
  if (plan.levels == nullptr) detail::fail("plan: null levels");
  detail::expect_span("cache_count", cache_count, plan.batch * plan.tokens);
  detail::advance_counts_kernel<256><<<detail::blocks_for(static_cast<std::size_t>(cache_count.size), 256), 256, 0, stream>>>(
      plan.levels, cache_count.data, cache_count.size);
  SPECDIFF_CUDA_CHECK_LAUNCH("advance_counts_kernel");
}

}  // namespace specdiff::gpu
