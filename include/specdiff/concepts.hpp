// The contracts. Every policy the library ships — and every policy a researcher writes — models one of
// these; the orchestration (accelerator.hpp) is written against them only. A contract is written once for
// host and device: what has to run in a kernel (a scorer's per-token formula, an approximator's weights) is
// a SPECDIFF_HD function, and the host loop and the CUDA kernel are both generic over it.
#pragma once

#include <array>
#include <concepts>
#include <span>
#include <string_view>

#include "common.hpp"
#include "token_plan.hpp"

namespace specdiff {

// --- scoring -----------------------------------------------------------------------------------------

/// The per-token signals a scorer may read. A scorer declares in `needs` which it reads; the others hold
/// these neutral values (log 1 = 0, no staleness, no change), so a formula may ignore them.
struct token_signals {
  float attention = 1.f;       ///< his: attention received, summed over layers, at the last step
  float future = 1.f;          ///< fut: attention received at the nearest future speculative timestep
  float cache_count = 0.f;     ///< cf: partial steps since the token was last computed
  float feature_change = 0.f;  ///< L2 change between the token's last two cached rows (+inf: unknown)
  float metric = 0.f;          ///< an engine-defined per-token metric (e.g. RAS's output norm)
};

/// Bit set of token_signals fields.
enum class signal : unsigned { none = 0, attention = 1, future = 2, cache_count = 4, feature_change = 8, metric = 16 };
constexpr signal operator|(signal a, signal b) { return static_cast<signal>(static_cast<unsigned>(a) | static_cast<unsigned>(b)); }
constexpr bool has(signal set, signal s) { return (static_cast<unsigned>(set) & static_cast<unsigned>(s)) != 0; }

inline constexpr int signal_count = 5;
/// The signals in token_signals order, and their names in messages.
inline constexpr std::array<signal, signal_count> all_signals = {signal::attention, signal::future, signal::cache_count,
                                                                  signal::feature_change, signal::metric};
inline constexpr std::array<std::string_view, signal_count> signal_names = {"attention", "future", "cache_count",
                                                                             "feature_change", "metric"};

/// Importance scorer: one log-domain score per token from that token's signals (higher = more important
/// to compute). `score` is host-and-device, so one scorer type runs in the host loop (score_tokens,
/// scorers.hpp) and in the CUDA kernel (gpu::score) alike. Scores are logarithms so that products such as
/// his·fut·exp(cf) never overflow; classifiers that need the score mass exponentiate relative to the max.
template <class S>
concept importance_scorer = std::copy_constructible<S> && requires(const S& s, const token_signals& x) {
  { S::needs } -> std::convertible_to<signal>;
  { s.score(x) } -> std::same_as<float>;
};

// --- speculation -------------------------------------------------------------------------------------

/// Speculative predictor: records per-token scores of a short speculative pass and answers, for a
/// main-pass timestep, the scores recorded at the nearest future speculative timestep.
/// Scores are laid out [sample][token]. `prepare(values)` is called once by the accelerator with
/// batch * tokens; `begin` starts a pass (may allocate); `record`/`future` do not allocate; `ready()`
/// says whether every step of the pass was recorded; `clear()` forgets the pass (a new image).
template <class P>
concept speculative_predictor = requires(P& p, const P& cp, std::span<const float> timesteps, index_t step,
                                         std::span<const float> scores, float t, index_t values) {
  p.prepare(values);
  p.begin(timesteps);
  p.record(step, scores);
  { cp.ready() } -> std::convertible_to<bool>;
  { cp.future(t) } -> std::convertible_to<std::span<const float>>;
  p.clear();
};

// --- classification ----------------------------------------------------------------------------------

/// Multi-level classifier: log-domain scores of one sample -> token levels. Deterministic: equal scores
/// are ordered by token index (lower index ranks higher). `prepare(tokens)` is called once by the
/// accelerator (may allocate); `classify` must not allocate and must put exactly `compute_count(tokens)`
/// tokens in C1 — the same count for every sample and step, so an engine's GEMM shapes are static.
template <class C>
concept level_classifier = requires(C& c, const C& cc, std::span<const float> log_score, token_plan& plan, index_t tokens) {
  c.prepare(tokens);
  { cc.compute_count(tokens) } -> std::convertible_to<index_t>;
  c.classify(log_score, plan);
};

// --- approximation -----------------------------------------------------------------------------------

/// C3 approximator: weights w over a token's cached history such that F(target) ≈ Σ_i w_i F_i, where
/// history_t[i] is the tag (timestep) of the i-th most recent cached feature. `depth` is the most entries
/// it uses; `weights` gets n = min(depth, available) tags and returns how many weights it wrote (0 = it
/// cannot approximate from these tags). Host-and-device callable so both backends share the math.
template <class A>
concept approximator = requires(const A& a, const float* history_t, int n, float target, float* w) {
  { A::depth } -> std::convertible_to<int>;
  { a.weights(history_t, n, target, w) } -> std::convertible_to<int>;
};

// --- schedules ---------------------------------------------------------------------------------------

/// Step schedule: which main-pass steps are dense (every token computed) and how long the speculative pass
/// is. `validate(steps)` is called once by the accelerator with the step count and rejects settings that
/// do not fit it.
template <class S>
concept schedule = requires(const S& s, index_t step, index_t steps) {
  s.validate(steps);
  { s.is_dense(step, steps) } -> std::convertible_to<bool>;
  { s.speculative_steps() } -> std::convertible_to<index_t>;
};

/// What an adaptive schedule may read when it decides a step: the free verification of the steps since the
/// last dense one (accelerator::verified_error). The accelerator keeps it; the schedule stays a pure function.
struct schedule_feedback {
  float last_error = 0.f;         ///< verified error of the last completed step (0 after a dense step)
  float accumulated_error = 0.f;  ///< sum of the verified errors of the partial steps since the last dense step
  index_t partial_run = 0;        ///< partial steps since the last dense step
};

/// A classifier that also reads the verification: before each partial step the accelerator calls
/// `adapt(feedback)`, after which `compute_count(tokens)` is that step's C1 count — one of a few fixed counts, so an
/// engine prepares a GEMM shape per count rather than per step. `adapt` must not allocate.
template <class C>
concept feedback_classifier = level_classifier<C> && requires(C& c, const schedule_feedback& f) { c.adapt(f); };

/// A schedule that also reads the verification: `is_dense(step, steps, feedback)` decides a step at run time;
/// `is_dense(step, steps)` gives the steps that are dense whatever the feedback (what the `aligned`
/// speculative grid plans around).
template <class S>
concept feedback_schedule = schedule<S> && requires(const S& s, index_t step, index_t steps, const schedule_feedback& f) {
  { s.is_dense(step, steps, f) } -> std::convertible_to<bool>;
};

// --- the cache ---------------------------------------------------------------------------------------

/// Geometry of a cache store. A batch is simply more tokens (sample b's token i is row b * tokens + i):
/// every row's history is independent, so the store need not know about samples.
struct cache_shape {
  index_t layers = 1;
  index_t sites = 1;          ///< caching sites per layer (e.g. attention and MLP outputs)
  index_t tokens = 0;         ///< rows per (layer, site): batch * tokens per sample
  index_t dim = 0;
  index_t history_depth = 3;  ///< rows kept per token; >= the deepest approximator used
  static constexpr index_t max_history = 8;

  void validate() const {
    if (layers <= 0) detail::fail("layers: must be positive, got ", layers);
    if (sites <= 0) detail::fail("sites: must be positive, got ", sites);
    if (tokens <= 0) detail::fail("tokens: must be positive, got ", tokens);
    if (dim <= 0) detail::fail("dim: must be positive, got ", dim);
    if (history_depth < 1 || history_depth > max_history)
      detail::fail("history_depth: must lie in [1, ", max_history, "], got ", history_depth);
    (void)detail::checked_product<std::size_t>("layers * sites * tokens * history_depth * dim", layers, sites, tokens,
                                                history_depth, dim);
  }
};

namespace detail {
/// An approximator type for stating contracts generic in the approximator (never called).
struct some_approximator {
  static constexpr int depth = 1;
  int weights(const float*, int, float, float*) const;
};
}  // namespace detail

/// Cache store: per (layer, site) the last `history_depth` rows of every token, each tagged with its
/// timestep. Everything the orchestration uses is here: rows are written for all tokens (dense steps),
/// scattered from compact rows, or read in place from a full matrix for listed tokens (ascending); fills
/// write the approximator's mix of a token's history (latest = C2) into the rows of a full matrix;
/// `change_norm` gives the last change per token; `prediction_error` compares the
/// approximator's mix with rows about to be cached (free verification); `clear` forgets every row. Every mutating call
/// validates all its arguments (sizes, indices, finiteness) before it writes anything.
template <class S>
concept cache_store =
    std::constructible_from<S, cache_shape> &&
    requires(S& s, const S& cs, index_t layer, index_t site, float t, std::span<const index_t> tokens,
             matrix_view<const float> rows, matrix_view<float> out, std::span<float> norms) {
      { cs.shape() } -> std::convertible_to<cache_shape>;
      s.write(layer, site, t, rows);
      s.scatter(layer, site, t, tokens, rows);
      s.write_rows(layer, site, t, tokens, rows);
      cs.fill(layer, site, t, tokens, out);  // latest (C2); fill(..., approximator, out) for C3
      cs.change_norm(layer, site, norms);
      cs.prediction_error(layer, site, t, tokens, detail::some_approximator{}, rows, tokens, norms, norms);  // for any approximator
      s.clear();
      { cs.memory_bytes() } -> std::convertible_to<std::size_t>;
    };

}  // namespace specdiff
