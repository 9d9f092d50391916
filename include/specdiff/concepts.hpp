// The contracts. Every policy the library ships — and every policy a researcher writes — models one of
// these; the orchestration (accelerator.hpp) is written against them only.
#pragma once

#include <concepts>
#include <span>

#include "common.hpp"
#include "token_plan.hpp"

namespace specdiff {

/// What a scorer may read for one sample at one step. Spans have one value per token; a scorer declares
/// in `needs` which of them it reads, and the orchestration fills only those.
struct score_inputs {
  std::span<const float> attention{};        ///< his: attention received, summed over layers, last step
  std::span<const float> future{};           ///< fut: speculative score at the nearest future timestep
  std::span<const float> cache_count{};      ///< cf: times cached since last computed
  std::span<const float> feature_change{};   ///< L2 change between the last two computed features
  std::span<const float> metric{};           ///< an engine-defined per-token metric (e.g. RAS's output norm)
};

/// Bit set of score_inputs fields.
enum class signal : unsigned { none = 0, attention = 1, future = 2, cache_count = 4, feature_change = 8, metric = 16 };
constexpr signal operator|(signal a, signal b) { return static_cast<signal>(static_cast<unsigned>(a) | static_cast<unsigned>(b)); }
constexpr bool has(signal set, signal s) { return (static_cast<unsigned>(set) & static_cast<unsigned>(s)) != 0; }

/// Importance scorer: writes one log-domain score per token (higher = more important to compute).
/// Scores are logarithms so that products such as his·fut·exp(cf) never overflow; classifiers that need
/// the score mass exponentiate relative to the maximum.
template <class S>
concept importance_scorer = requires(const S& s, const score_inputs& in, std::span<float> log_score) {
  { S::needs } -> std::convertible_to<signal>;
  s.score(in, log_score);
};

/// Speculative predictor: records per-token scores of a short speculative pass and answers, for a
/// main-pass timestep, the scores recorded at the nearest future speculative timestep.
/// Scores are laid out [sample][token]; `begin` is setup (may allocate), `record`/`future` do not.
template <class P>
concept speculative_predictor =
    requires(P& p, const P& cp, std::span<const float> timesteps, index_t step, std::span<const float> scores, float t) {
      p.begin(timesteps);
      p.record(step, scores);
      { cp.future(t) } -> std::convertible_to<std::span<const float>>;
    };

/// Multi-level classifier: log-domain scores of one sample -> token levels. Deterministic: equal scores
/// are ordered by token index (lower index ranks higher). Must not allocate in classify.
template <class C>
concept level_classifier = requires(C& c, std::span<const float> log_score, token_plan& plan) {
  c.classify(log_score, plan);
};

/// C3 approximator: weights w over a token's cached history such that F(target) ≈ Σ_i w_i F_i, where
/// history_t[i] is the tag (timestep) of the i-th most recent cached feature. `depth` is the most entries
/// it uses; `weights` gets n = min(depth, available) tags and returns how many weights it wrote (0 = it
/// cannot approximate from these tags). Host-and-device callable so both backends share the math.
template <class A>
concept approximator = requires(const A& a, const float* history_t, int n, float target, float* w) {
  { A::depth } -> std::convertible_to<int>;
  { a.weights(history_t, n, target, w) } -> std::convertible_to<int>;
};

/// Step schedule: which main-pass steps are dense (every token computed), and how long the speculative
/// pass is.
template <class S>
concept schedule = requires(const S& s, index_t step, index_t steps) {
  { s.is_dense(step, steps) } -> std::convertible_to<bool>;
  { s.speculative_steps() } -> std::convertible_to<index_t>;
};

/// Cache store: per (layer, site) the last few rows of every token, each tagged with its timestep.
/// Rows are written for all tokens (dense steps) or scattered for the computed ones, and read back as
/// fills (latest row or an approximator's mix) into the rows of the tokens not computed.
template <class S>
concept cache_store = requires(S& s, const S& cs, index_t layer, index_t site, float t, std::span<const index_t> tokens,
                               matrix_view<const float> rows, matrix_view<float> out) {
  s.write(layer, site, t, rows);
  s.scatter(layer, site, t, tokens, rows);
  cs.fill_latest(layer, site, tokens, out);
  { cs.memory_bytes() } -> std::convertible_to<std::size_t>;
};

}  // namespace specdiff
