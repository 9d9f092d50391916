// Device scoring: the host scorer types themselves (scorers.hpp), run one thread per token over a batch of
// samples laid out [sample][token]. A scorer is written once — `static constexpr signal needs` and a
// SPECDIFF_HD `score(const token_signals&)` — and specdiff::score_tokens (host) and gpu::score (device)
// both run it. Inputs a scorer does not need (see `needs`) may be empty spans; it sees neutral values there.
#pragma once

#include <cuda_runtime.h>

#include <array>

#include "../math.hpp"
#include "../scorers.hpp"
#include "error.cuh"
#include "plan.cuh"
#include "status.cuh"
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

namespace detail {

/// has(Scorer::needs, s) as a constant device code may read (has() itself is a host constexpr function).
template <class Scorer, signal S>
inline constexpr bool reads = has(Scorer::needs, S);

/// The signals of token i, as the host loop (score_tokens) builds them: the needed ones read, the others
/// left at token_signals' neutral values.
template <class Scorer>
__device__ token_signals signals_of(const device_score_inputs& in, index_t i) {
  token_signals x;
  if constexpr (reads<Scorer, signal::attention>) x.attention = in.attention[i];
  if constexpr (reads<Scorer, signal::future>) x.future = in.future[i];
  if constexpr (reads<Scorer, signal::cache_count>) x.cache_count = in.cache_count[i];
  if constexpr (reads<Scorer, signal::feature_change>) x.feature_change = in.feature_change[i];
  if constexpr (reads<Scorer, signal::metric>) x.metric = in.metric[i];
  return x;
}

template <int BlockThreads, class Scorer>
__global__ void __launch_bounds__(BlockThreads) score_kernel(Scorer scorer, device_score_inputs in, device_span<float> out, std::uint32_t* status) {
  for (index_t i = blockIdx.x * BlockThreads + threadIdx.x; i < out.size; i += gridDim.x * BlockThreads) {
    const token_signals x = signals_of<Scorer>(in, i);
    if (x.attention < 0.f || x.future < 0.f) raise_status(status, status_negative_attention);
    out[i] = scorer.score(x);
  }
}

template <int BlockThreads>
__global__ void __launch_bounds__(BlockThreads) advance_counts_kernel(const level* levels, float* cache_count, index_t n) {
  for (index_t i = blockIdx.x * BlockThreads + threadIdx.x; i < n; i += gridDim.x * BlockThreads)
    cache_count[i] = math::advance_cache_count(levels[i], cache_count[i]);
}

/// The scorer's argument check, made by the host loop's own (specdiff::detail::expect_signals): every
/// needed signal holds `log_score.size` values and memory behind them.
inline void expect_score_args(signal needs, const device_score_inputs& in, device_span<float> log_score) {
  const std::array<device_span<const float>, signal_count> spans = {in.attention, in.future, in.cache_count, in.feature_change, in.metric};
  std::array<std::size_t, signal_count> sizes{};
  std::array<bool, signal_count> present{};
  if (log_score.size < 0) fail("log_score: negative size ", log_score.size);
  for (std::size_t k = 0; k < spans.size(); ++k) {
    if (has(needs, all_signals[k]) && spans[k].size < 0) fail(signal_names[k], ": negative size ", spans[k].size);
    sizes[k] = spans[k].size < 0 ? 0 : static_cast<std::size_t>(spans[k].size);
    present[k] = spans[k].data != nullptr || spans[k].size == 0;
  }
  specdiff::detail::expect_signals(needs, static_cast<std::size_t>(log_score.size), sizes, present);
  expect_span("log_score", log_score, log_score.size);  // memory behind the output
}

}  // namespace detail

/// Writes one log-domain score per token into `log_score` (batch * tokens values): scorer.score of each
/// token's signals, exactly as score_tokens does on the host. Stream-ordered; the sizes are checked on the
/// host, the values are not read there (a non-finite score raises the classifier's status bit).
/// `status` (optional, device): raises status_negative_attention where an attention or future signal the scorer
/// reads is negative (the host accelerator refuses such attention at the call; the device cannot read it there).
template <importance_scorer Scorer>
void score(const Scorer& scorer, const device_score_inputs& in, device_span<float> log_score, cudaStream_t stream,
           std::uint32_t* status = nullptr) {
  detail::expect_score_args(Scorer::needs, in, log_score);
  detail::score_kernel<256><<<detail::blocks_for(static_cast<std::size_t>(log_score.size), 256), 256, 0, stream>>>(scorer, in, log_score, status);
  SPECDIFF_CUDA_CHECK_LAUNCH("score_kernel");
}

/// The accelerator's staleness update (math::advance_cache_count: cf <- 0 for computed tokens, cf + 1 for
/// the others) over every sample of `plan`; `cache_count` is [batch][tokens].
inline void advance_cache_counts(const device_plan_view& plan, device_span<float> cache_count, cudaStream_t stream) {
  if (plan.levels == nullptr) detail::fail("plan: null levels");
  detail::expect_span("cache_count", cache_count, plan.batch * plan.tokens);
  detail::advance_counts_kernel<256><<<detail::blocks_for(static_cast<std::size_t>(cache_count.size), 256), 256, 0, stream>>>(
      plan.levels, cache_count.data, cache_count.size);
  SPECDIFF_CUDA_CHECK_LAUNCH("advance_counts_kernel");
}

}  // namespace specdiff::gpu
