// accelerator: the orchestration. Composes a scorer, a speculative predictor, a classifier, a schedule, a
// cache store and its C3 approximator into a per-step plan for the engine. The step protocol is a type:
//
//   acc.begin_speculation(ts); for each speculative step s: engine runs all tokens -> acc.record_speculation(s, attn)
//   for each main step k (0, 1, ... in order, timesteps strictly falling):
//     auto step = acc.plan_step(k, t);           // a move-only ticket: step.compute_tokens() = what to run
//     engine computes those rows (all rows when step.dense())
//     acc.complete_step(std::move(step), computed_rows, output, attention);  // caches C1, fills C2/C3
//
// Module-level engines cache several (layer, site) slots per step: acc.fill(step, layer, site, rows) before
// the forward, acc.cache_rows[_in_place](step, layer, site, rows) after it (or acc.fill_all for a site
// reused whole, acc.reuse_in_place when its rows are still in place), then
// acc.complete_step(std::move(step), attention).
//
// Misuse throws at once: std::logic_error for calls out of protocol order (a second plan_step, a step
// object completed twice or from another accelerator, steps out of order), std::invalid_argument for bad
// values (sizes, NaN, rising timesteps). Every public call validates before it mutates: a call that throws
// leaves the accelerator as it was. Everything is sized in the constructor; the per-step path does not
// allocate.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "approximators.hpp"
#include "cache_store.hpp"
#include "concepts.hpp"
#include "learned.hpp"
#include "schedules.hpp"
#include "scorers.hpp"

namespace specdiff {

/// The sizes, given once.
struct accelerator_config {
  index_t tokens = 0;          ///< image tokens per sample
  index_t batch = 1;           ///< samples per model call; a CFG batch counts both halves
  index_t steps = 0;           ///< main-pass steps
  index_t feature_dim = 0;     ///< width of a cached row (token level: the model output per token)
  index_t layers = 1;          ///< cached layers (token level: 1)
  index_t sites = 1;           ///< cached sites per layer (token level: 1, the output; module level: e.g. attention, MLP)
  bool share_cfg_plan = false; ///< samples b and b + batch/2 (diffusers' [uncond; cond] layout) share a plan

  void validate() const {
    if (tokens <= 0) detail::fail("tokens: must be positive, got ", tokens);
    if (batch <= 0) detail::fail("batch: must be positive, got ", batch);
    if (steps <= 0) detail::fail("steps: must be positive, got ", steps);
    if (feature_dim <= 0) detail::fail("feature_dim: must be positive, got ", feature_dim);
    if (layers <= 0) detail::fail("layers: must be positive, got ", layers);
    if (sites <= 0) detail::fail("sites: must be positive, got ", sites);
    if (share_cfg_plan && batch % 2 != 0) detail::fail("batch: share_cfg_plan needs an even batch (uncond + cond halves), got ", batch);
    (void)rows();
    (void)detail::checked_product<std::size_t>("layers * sites * batch * tokens * feature_dim", layers, sites, batch, tokens, feature_dim);
  }
  index_t plans() const { return share_cfg_plan ? batch / 2 : batch; }
  /// Rows of a full output matrix: batch * tokens.
  index_t rows() const { return detail::checked_product<index_t>("batch * tokens", batch, tokens); }
};

/// Passed to complete_step instead of attention: this step measured none (e.g. ToCa's partial steps run no
/// attention probe); the scorer keeps the last step's.
struct attention_unchanged_t {
  explicit constexpr attention_unchanged_t() = default;
};
inline constexpr attention_unchanged_t attention_unchanged{};

namespace detail {

/// The handle of a planned main step, shared by the host and device accelerators: move-only, one live at a time
/// per accelerator, checked on every use (moved from or completed: refused; stale after reset(): refused), and
/// destroyed unconsumed it abandons the step. The accelerator's own step type adds the observers.
///
/// Lifetime: the accelerator knows its one live step (a back-pointer the step's moves keep up to date; nothing
/// is allocated). reset() and the accelerator's destructor detach it: a detached step's calls throw
/// std::logic_error saying why, and its destructor does nothing. So a step that outlives its accelerator (an
/// engine member declared before the accelerator, an accelerator rebuilt while a step is held) is refused
/// by name instead of reading freed memory.
template <class Owner>
class planned_step {
 public:
  planned_step(planned_step&& o) noexcept
      : owner_(o.owner_), generation_(o.generation_), index_(o.index_), t_(o.t_), dense_(o.dense_), state_(o.state_) {
    if (owner_ != nullptr) owner_->live_step_ = this;
    o.owner_ = nullptr;
    o.state_ = state::empty;
  }
  planned_step& operator=(planned_step&& o) noexcept {
    if (this != &o) {
      abandon();
      owner_ = o.owner_;
      generation_ = o.generation_;
      index_ = o.index_;
      t_ = o.t_;
      dense_ = o.dense_;
      state_ = o.state_;
      if (owner_ != nullptr) owner_->live_step_ = this;
      o.owner_ = nullptr;
      o.state_ = state::empty;
    }
    return *this;
  }
  planned_step(const planned_step&) = delete;
  planned_step& operator=(const planned_step&) = delete;
  ~planned_step() { abandon(); }

  index_t index() const {
    live();
    return index_;
  }
  float timestep() const {
    live();
    return t_;
  }
  /// Every token computed (the schedule's choice, or step 0: there is no history to score).
  bool dense() const {
    live();
    return dense_;
  }

 protected:
  planned_step(Owner* owner, std::uint64_t generation, index_t index, float t, bool dense) noexcept
      : owner_(owner), generation_(generation), index_(index), t_(t), dense_(dense), state_(state::live) {
    owner_->live_step_ = this;
  }
  /// The accelerator, once this step is checked to be its current one.
  Owner& live() const {
    if (owner_ == nullptr) fail_detached();
    owner_->expect_current(*this);
    return *owner_;
  }

 private:
  friend Owner;
  enum class state : std::uint8_t { empty, live, stale, orphaned };
  [[noreturn]] void fail_detached() const {
    if (state_ == state::orphaned)
      fail_logic("step: step ", index_, " outlived its accelerator (destroyed while the step was live); a step must not outlive the accelerator that planned it");
    if (state_ == state::stale) fail_logic("step: step ", index_, " is stale (reset() was called since it was planned)");
    fail_logic("step: this step object is empty (moved from, or already completed)");
  }
  /// What every call taking a step checks first: it is live, it is `owner`'s, it is current.
  void expect_owned_by(const Owner* owner) const {
    if (owner_ == nullptr) fail_detached();
    if (owner_ != owner) fail_logic("step: step ", index_, " belongs to another accelerator");
    owner_->expect_current(*this);
  }
  void abandon() noexcept {
    if (owner_ != nullptr) {
      owner_->live_step_ = nullptr;
      owner_->abandon_step(generation_);
    }
    owner_ = nullptr;
    state_ = state::empty;
  }
  /// The accelerator lets go of its live step: consumed (empty), reset() (stale), destroyed (orphaned).
  /// Noexcept and no call back into the accelerator.
  static void detach(planned_step*& live, state why) noexcept {
    if (live == nullptr) return;
    live->owner_ = nullptr;
    live->state_ = why;
    live = nullptr;
  }
  Owner* owner_ = nullptr;
  std::uint64_t generation_ = 0;
  index_t index_ = 0;
  float t_ = 0.f;
  bool dense_ = true;
  state state_ = state::empty;
};

// --- the protocol checks both accelerators make, with the same messages --------------------------------
// (host values; device views by address only). One helper per refusal, so the backends cannot drift apart.

/// Attention received (speculative records, a step's attention): finite and >= 0, a sum of probabilities.
inline void expect_attention_values(std::string_view name, std::span<const float> values) {
  for (std::size_t i = 0; i < values.size(); ++i) {
    if (!std::isfinite(values[i])) fail(name, "[", i, "] is not finite (", values[i], ")");
    if (values[i] < 0.f) fail(name, "[", i, "] is negative (", values[i], "): attention received is a sum of probabilities, >= 0");
  }
}
/// begin_speculation: no more speculative timesteps than the schedule's speculative steps (the records are sized
/// for them).
inline void expect_speculative_count(std::size_t given, index_t schedule_steps) {
  if (given > static_cast<std::size_t>(schedule_steps))
    fail("timesteps: ", given, " speculative steps, more than the schedule's ", schedule_steps,
         " (step_schedule.speculative; the records are sized for ", schedule_steps, ")");
}
/// begin_speculation / record_speculation: only before main step 0.
inline void expect_before_main_pass(const char* what, index_t next_step, bool planned) {
  if (planned || next_step != 0)
    fail_logic(what, ": the main pass has started (next step ", next_step,
               "); the speculative pass comes before main step 0 (reset() starts a new image)");
}
/// plan_step(0, t): a begun speculative pass starts at the main pass's first timestep, in the same unit (a pass
/// in another unit, e.g. 1000 .. 500 against t in [0, 1], would answer every step with its last record).
inline void expect_speculation_matches(std::span<const float> speculative, float t0) {
  if (speculative.empty()) return;
  const float s0 = speculative[0];
  const float tolerance = 1e-3f * std::max(std::fabs(t0), std::fabs(s0));
  if (!(std::fabs(s0 - t0) <= tolerance))
    fail("t: main step 0 has t = ", t0, ", the speculative pass starts at t = ", s0,
         "; both passes start at the same timestep, in the same unit (aligned_speculative_timesteps takes them from the main grid)");
}
/// Construction: a configuration that can never run a partial step is refused.
inline void expect_runnable(bool reads_future, index_t speculative_steps, bool predictor_ready, bool has_partial_steps) {
  if (reads_future && speculative_steps == 0 && !predictor_ready && has_partial_steps)
    fail("step_schedule.speculative: 0 speculative steps, but the scorer reads signal::future from a predictor that needs a "
         "recorded pass, so every partial step would be refused; set speculative >= 1, or use no_speculation or a scorer "
         "without signal::future");
}

}  // namespace detail

template <importance_scorer Scorer, speculative_predictor Predictor, level_classifier Classifier, schedule Schedule,
          approximator Approx = specdiff_weighted, cache_store Store = host_cache_store<float>>
class accelerator {
 public:
  using scorer_type = Scorer;
  using predictor_type = Predictor;
  using classifier_type = Classifier;
  using schedule_type = Schedule;
  using approximator_type = Approx;
  using store_type = Store;

  /// A planned main step: what the engine must compute, until complete_step consumes it. Move-only; one
  /// exists at a time per accelerator. Destroying it unconsumed abandons the step: the accelerator is as
  /// before plan_step if no rows were cached in it, and needs reset() otherwise.
  class step : public detail::planned_step<accelerator> {
   public:
    /// Tokens computed per sample: the same for every sample (tokens on dense steps).
    index_t compute_count() const { return this->live().compute_count_; }
    /// The plan of sample b (CFG pairs share one when share_cfg_plan).
    const token_plan& plan(index_t sample) const { return this->live().plan_of(sample); }
    /// Every sample's C1 token ids, [sample][compute_count()], each sample's ascending: what a token-subset
    /// forward takes.
    std::span<const index_t> compute_tokens() const {
      const auto& a = this->live();
      return {a.compute_ids_.data(), static_cast<std::size_t>(a.config_.batch) * static_cast<std::size_t>(a.compute_count_)};
    }

   private:
    friend class accelerator;
    step(accelerator* owner, std::uint64_t generation, index_t index, float t, bool dense) noexcept
        : detail::planned_step<accelerator>(owner, generation, index, t, dense) {}
  };
  friend class detail::planned_step<accelerator>;  // checks its steps against this accelerator
  using step_base = detail::planned_step<accelerator>;

  accelerator(accelerator_config config, Scorer scorer, Predictor predictor, Classifier classifier, Schedule schedule, Approx approx = {})
      : config_((config.validate(), config)),
        scorer_(std::move(scorer)),
        predictor_(std::move(predictor)),
        classifier_(std::move(classifier)),
        schedule_(detail::schedule_for_run(schedule, config.steps)),
        approx_(approx),
        store_(cache_shape{config.layers, config.sites, config.rows(), config.feature_dim, std::max<index_t>(Approx::depth, 2)}),
        plans_(static_cast<std::size_t>(config.plans()), token_plan(config.tokens)),
        his_(per_plan()), fut_(per_plan()), cf_(per_plan()), change_(per_plan()), metric_(per_plan()),
        change_all_(static_cast<std::size_t>(config.rows())),
        scores_(static_cast<std::size_t>(config.tokens)),
        compute_ids_(static_cast<std::size_t>(config.rows())),
        global_ids_(static_cast<std::size_t>(config.rows())),
        all_rows_(static_cast<std::size_t>(config.rows())),
        site_done_(static_cast<std::size_t>(config.layers) * static_cast<std::size_t>(config.sites), 0),
        err2_(static_cast<std::size_t>(config.rows())), norm2_(static_cast<std::size_t>(config.rows())),
        step_err2_(static_cast<std::size_t>(config.batch)), step_norm2_(static_cast<std::size_t>(config.batch)),
        verified_(static_cast<std::size_t>(config.batch), 0.f) {
    for (std::size_t r = 0; r < all_rows_.size(); ++r) all_rows_[r] = static_cast<index_t>(r);
    predictor_.prepare(config_.rows());
    classifier_.prepare(config_.tokens);
    partial_count_ = classifier_count();
    detail::expect_runnable(has(Scorer::needs, signal::future), schedule_.speculative_steps(), predictor_.ready(), has_partial_steps());
  }

  // Steps point back at their accelerator, so it stays where it was built (neither copyable nor movable).
  accelerator(const accelerator&) = delete;
  accelerator& operator=(const accelerator&) = delete;
  /// A live step is detached: its later calls throw, its destructor does nothing.
  ~accelerator() { step_base::detach(live_step_, step_base::state::orphaned); }

  // --- speculative pass -------------------------------------------------------------------------
  /// Starts the speculative pass of a new image, before main step 0 (see aligned_speculative_timesteps).
  /// At most the schedule's speculative_steps() timesteps; the first must be the main pass's first (checked at
  /// plan_step(0, t)).
  void begin_speculation(std::span<const float> timesteps) {
    detail::expect_before_main_pass("begin_speculation", next_step_, planned_);
    detail::expect_speculative_count(timesteps.size(), schedule_.speculative_steps());
    predictor_.begin(timesteps);
  }
  /// `attention`: batch * tokens values >= 0, the attention each image token received summed over layers.
  /// Before main step 0 only.
  void record_speculation(index_t step_index, std::span<const float> attention) {
    detail::expect_before_main_pass("record_speculation", next_step_, planned_);
    detail::expect_attention_values("attention", attention);
    predictor_.record(step_index, attention);
  }

  // --- main pass --------------------------------------------------------------------------------
  /// Plans main step `step_index` at timestep t: steps run 0, 1, ... in order with strictly falling
  /// timesteps. Returns the step to hand to complete_step.
  [[nodiscard]] step plan_step(index_t step_index, float t) {
    if (needs_reset_) detail::fail_logic("plan_step: step ", next_step_, " was abandoned after rows were cached; reset() first");
    if (planned_) detail::fail_logic("plan_step: step ", next_step_, " is planned and not completed; complete_step it first");
    detail::expect_index("step", step_index, config_.steps);
    if (step_index != next_step_)
      detail::fail_logic("plan_step: expected step ", next_step_, ", got ", step_index, " (steps run in order; reset() starts a new image)");
    if (!std::isfinite(t)) detail::fail("t: timestep is not finite (", t, ")");
    if (next_step_ > 0 && !(t < last_t_))
      detail::fail("t: timesteps must fall from step to step; step ", next_step_ - 1, " had t = ", last_t_, ", step ", step_index, " has t = ", t);
    if (next_step_ == 0) {
      if constexpr (requires { predictor_.timesteps(); }) detail::expect_speculation_matches(predictor_.timesteps(), t);
    }
    const bool dense = next_step_ == 0 || dense_at(step_index);
    if (dense) {
      for (auto& p : plans_) p.set_all(level::compute);
    } else {
      expect_signals_ready(t);  // every refusal classify_all can make about the signals, before adapt() mutates
      index_t count = partial_count_;
      if constexpr (feedback_classifier<Classifier>) {  // this step's C1 count, from the verification
        classifier_.adapt(feedback_);                   // a function of the feedback: a retry picks the same
        try {
          count = classifier_count();
          classify_all(t, count);
        } catch (...) {
          classifier_.adapt(adapted_);  // validate-then-mutate: the classifier as it was (adapt is a function of its input)
          throw;
        }
        adapted_ = feedback_;
      } else {
        classify_all(t, count);  // validates first, writes only scratch and plans (visible through a step alone)
      }
      partial_count_ = count;
    }
    compute_count_ = dense ? config_.tokens : partial_count_;
    for (index_t b = 0; b < config_.batch; ++b)
      std::ranges::copy(plan_of(b).compute(), compute_ids_.begin() + static_cast<std::ptrdiff_t>(b) * compute_count_);
    std::ranges::fill(site_done_, char{0});
    std::ranges::fill(step_err2_, 0.0);
    std::ranges::fill(step_norm2_, 0.0);
    rows_cached_ = false;
    planned_ = true;
    return step(this, ++generation_, step_index, t, dense);
  }

  /// Token level, compact rows: `computed` holds step.compute_count() rows per sample, sample b's i-th row
  /// being token step.plan(b).compute()[i] (what a token-subset forward returns; all tokens in order on
  /// dense steps). They are cached and copied into `output` (batch*tokens x feature_dim, sample b's token i
  /// at row b*tokens + i), whose C2 rows get their latest cached value and C3 rows the approximator's mix.
  /// `attention` (batch*tokens; may be empty when the scorer does not read it) becomes the next step's his.
  void complete_step(step&& s, matrix_view<const float> computed, matrix_view<float> output, std::span<const float> attention) {
    expect_own(s);
    expect_sites_done("complete_step", /*first_slot_pending=*/true);
    detail::expect_matrix("computed", computed, detail::checked_product<index_t>("batch * compute_count", config_.batch, compute_count_), config_.feature_dim);
    detail::expect_matrix("output", output, config_.rows(), config_.feature_dim);
    expect_attention(attention);
    detail::expect_disjoint("computed", detail::extent_of(computed), "output", detail::extent_of(output));
    detail::expect_disjoint("computed", detail::extent_of(computed), "attention", detail::extent_of(attention));
    detail::expect_disjoint("output", detail::extent_of(output), "attention", detail::extent_of(attention));
    for (index_t r = 0; r < computed.rows; ++r) detail::expect_finite_row("computed", computed, r);
    fill(s, 0, 0, output);  // reads the store only; may throw (an approximator refusing its tags)
    for (index_t r = 0; r < computed.rows; ++r) {
      const float* src = computed.row_ptr(r);
      std::copy(src, src + config_.feature_dim, output.row_ptr(global_row(r)));
    }
    cache_validated(s, 0, 0, computed);
    finish(s, attention);
  }

  /// Token level, rows in place: the engine wrote the C1 rows of every sample into `output` itself.
  void complete_step(step&& s, matrix_view<float> output, std::span<const float> attention) {
    expect_own(s);
    expect_sites_done("complete_step", /*first_slot_pending=*/true);
    detail::expect_matrix("output", output, config_.rows(), config_.feature_dim);
    expect_attention(attention);
    detail::expect_disjoint("output", detail::extent_of(output), "attention", detail::extent_of(attention));
    const matrix_view<const float> all(output);
    for (index_t r = 0; r < config_.batch * compute_count_; ++r) detail::expect_finite_row("output", all, global_row(r));
    fill(s, 0, 0, output);
    cache_in_place_validated(s, 0, 0, all);
    finish(s, attention);
  }

  /// Module level: every (layer, site) was cached (or filled whole) during the step; takes the attention.
  void complete_step(step&& s, std::span<const float> attention) {
    expect_own(s);
    expect_sites_done("complete_step");
    expect_attention(attention);
    finish(s, attention);
  }
  /// Module level, with no attention measured this step: the scorer keeps the last step's.
  void complete_step(step&& s, attention_unchanged_t) {
    expect_own(s);
    expect_sites_done("complete_step");
    if (has(Scorer::needs, signal::attention) && !has_his_)
      detail::fail_logic("complete_step: the scorer reads attention and none was ever given (attention_unchanged on the first step)");
    finish(s, {});
  }

  /// Caches the C1 rows of one (layer, site) from compact rows (layout as in complete_step).
  void cache_rows(const step& s, index_t layer, index_t site, matrix_view<const float> computed) {
    expect_own(s);
    expect_site_open(layer, site);
    detail::expect_matrix("computed", computed, config_.batch * compute_count_, config_.feature_dim);
    for (index_t r = 0; r < computed.rows; ++r) detail::expect_finite_row("computed", computed, r);
    cache_validated(s, layer, site, computed);
  }
  /// Caches the C1 rows of one (layer, site), read in place from a full batch*tokens matrix.
  void cache_rows_in_place(const step& s, index_t layer, index_t site, matrix_view<const float> all) {
    expect_own(s);
    expect_site_open(layer, site);
    detail::expect_matrix("all", all, config_.rows(), config_.feature_dim);
    for (index_t r = 0; r < config_.batch * compute_count_; ++r) detail::expect_finite_row("all", all, global_row(r));
    cache_in_place_validated(s, layer, site, all);
  }

  /// Fills the C2 rows (latest cached) and C3 rows (approximator) of one (layer, site) into a full
  /// batch*tokens matrix; C1 rows are left as they are. Nothing to do on dense steps.
  void fill(const step& s, index_t layer, index_t site, matrix_view<float> out) {
    expect_own(s);
    detail::expect_index("layer", layer, config_.layers);
    detail::expect_index("site", site, config_.sites);
    detail::expect_matrix("out", out, config_.rows(), config_.feature_dim);
    if (s.dense_) return;
    for (level l : {level::reuse, level::approximate}) {
      for (index_t b = 0; b < config_.batch; ++b) {
        const auto local = plan_of(b).indices(l);
        const index_t offset = b * config_.tokens;
        for (std::size_t i = 0; i < local.size(); ++i) global_ids_[i] = offset + local[i];
        const std::span<const index_t> rows(global_ids_.data(), local.size());
        if (l == level::reuse) store_.fill(layer, site, s.t_, rows, out);
        else store_.fill(layer, site, s.t_, rows, approx_, out);
      }
    }
  }

  /// Module level: on a partial step, a site computed for no token — every row comes from the cache, as
  /// level `as` (reuse: latest; approximate: the approximator). The site counts as done for the step.
  /// Calls for different (layer, site) slots of one step may run concurrently (they share no scratch).
  void fill_all(const step& s, index_t layer, index_t site, level as, matrix_view<float> out) {
    expect_own(s);
    if (s.dense_) detail::fail_logic("fill_all: step ", s.index_, " is dense; every site is computed and cached");
    expect_site_open(layer, site);
    detail::expect_matrix("out", out, config_.rows(), config_.feature_dim);
    if (as == level::compute) detail::fail("as: fill_all takes level::reuse or level::approximate, got compute");
    if (as == level::reuse) store_.fill(layer, site, s.t_, all_rows_, out);
    else store_.fill(layer, site, s.t_, all_rows_, approx_, out);
    site_done_[slot(layer, site)] = 1;
  }

  /// Module level: on a partial step, a site computed for no token whose rows the engine still holds as
  /// they were cached (it reuses one buffer in place, as FORA and ToCa reuse attention outputs): a reuse
  /// fill would copy every row onto itself, so nothing is copied. The site counts as done for the step.
  void reuse_in_place(const step& s, index_t layer, index_t site) {
    expect_own(s);
    if (s.dense_) detail::fail_logic("reuse_in_place: step ", s.index_, " is dense; every site is computed and cached");
    expect_site_open(layer, site);
    site_done_[slot(layer, site)] = 1;
  }

  /// Sets the engine-defined per-token metric (batch*tokens) the next plan_step scores with.
  void set_metric(std::span<const float> metric) {
    detail::expect_size("metric", metric.size(), static_cast<std::size_t>(config_.rows()));
    detail::expect_finite("metric", metric);
    merge(metric, metric_);
    has_metric_ = true;
  }

  /// Forgets everything (a new image): cached rows, staleness, attention and metric history, the
  /// speculative records, the step count; an outstanding step object becomes empty. Keeps the memory.
  void reset() {
    store_.clear();
    std::ranges::fill(cf_, 0.f);
    std::ranges::fill(his_, 0.f);
    std::ranges::fill(metric_, 0.f);
    predictor_.clear();
    std::ranges::fill(verified_, 0.f);
    feedback_ = {};
    has_his_ = has_metric_ = planned_ = rows_cached_ = needs_reset_ = false;
    next_step_ = 0;
    last_t_ = std::numeric_limits<float>::infinity();
    ++generation_;
    step_base::detach(live_step_, step_base::state::stale);
  }

  /// Self-calibration of a learned approximator: while `fit` is set, every partial step adds its C1 rows and
  /// their histories (as they were before the step cached them) to it, at every cached site. nullptr stops.
  /// `fit` must be for this run's step count and no deeper than the store's history.
  void calibrate(history_fit* fit) {
    if (fit != nullptr) {
      detail::expect_size("fit: timesteps", fit->timesteps().size(), static_cast<std::size_t>(config_.steps));
      if (fit->depth() > store_.shape().history_depth)
        detail::fail("fit: depth ", fit->depth(), " exceeds the store's history_depth ", store_.shape().history_depth);
    }
    calibration_ = fit;
  }

  // --- observers ----------------------------------------------------------------------------------
  /// Free verification: per sample, the relative L2 error sqrt(sum |prediction - row|^2 / sum |row|^2) the
  /// approximator would have made on the rows the last completed step computed (its C1 rows, at every site
  /// cached from computed rows), predicted from their history before it was updated. It costs no model work:
  /// those rows are computed anyway. 0 after a dense step and after a partial step that computed no rows
  /// (nothing was verified: a feedback schedule then sees no error), +inf for a sample whose computed rows are
  /// all zero and mispredicted.
  std::span<const float> verified_error() const { return verified_; }
  /// What a feedback_schedule reads at the next plan_step (the verified errors since the last dense step).
  const schedule_feedback& feedback() const { return feedback_; }
  const accelerator_config& config() const { return config_; }
  /// The next step plan_step expects, and the timestep of the last completed step (+inf before step 0).
  index_t next_step() const { return next_step_; }
  float last_timestep() const { return last_t_; }
  /// |C1| per sample on the last partial step planned (the classifier's count; a feedback_classifier's changes
  /// from step to step among its fixed counts).
  index_t partial_compute_count() const { return partial_count_; }
  const store_type& store() const { return store_; }
  std::span<const float> cache_counts(index_t plan) const { return slice(cf_, plan); }
  std::span<const float> attention_history(index_t plan) const { return slice(his_, plan); }
  const Scorer& scorer() const { return scorer_; }
  const Predictor& predictor() const { return predictor_; }
  const Classifier& classifier() const { return classifier_; }
  const Schedule& step_schedule() const { return schedule_; }

 private:
  std::vector<float> per_plan() const {
    return std::vector<float>(static_cast<std::size_t>(config_.plans()) * static_cast<std::size_t>(config_.tokens), 0.f);
  }
  index_t plan_index(index_t sample) const { return config_.share_cfg_plan ? sample % config_.plans() : sample; }
  const token_plan& plan_of(index_t sample) const {
    detail::expect_index("sample", sample, config_.batch);
    return plans_[static_cast<std::size_t>(plan_index(sample))];
  }
  std::span<const float> slice(const std::vector<float>& v, index_t plan) const {
    detail::expect_index("plan", plan, config_.plans());
    const auto n = static_cast<std::size_t>(config_.tokens);
    return {v.data() + static_cast<std::size_t>(plan) * n, n};
  }
  std::size_t slot(index_t layer, index_t site) const {
    return static_cast<std::size_t>(layer) * static_cast<std::size_t>(config_.sites) + static_cast<std::size_t>(site);
  }
  // Row of the full matrix that compact row r (sample r / |C1|, its (r % |C1|)-th C1 token) belongs to.
  index_t global_row(index_t r) const {
    const index_t b = r / compute_count_;
    return b * config_.tokens + compute_ids_[static_cast<std::size_t>(r)];
  }

  // Per-sample values (batch*tokens) -> per-plan values; a shared CFG plan sees the pair's mean.
  void merge(std::span<const float> per_sample, std::vector<float>& per_plan_out) const {
    if (!config_.share_cfg_plan) {
      std::ranges::copy(per_sample, per_plan_out.begin());
      return;
    }
    const std::size_t half = per_plan_out.size();
    for (std::size_t i = 0; i < half; ++i) per_plan_out[i] = 0.5f * (per_sample[i] + per_sample[i + half]);
  }

  index_t classifier_count() const {
    const index_t n = classifier_.compute_count(config_.tokens);
    if (n < 0 || n > config_.tokens) detail::fail("classifier: compute_count(", config_.tokens, ") = ", n, " is out of range [0, ", config_.tokens, "]");
    return n;
  }

  bool has_partial_steps() const {
    for (index_t k = 1; k < config_.steps; ++k)
      if (!schedule_.is_dense(k, config_.steps)) return true;
    return false;
  }
  // The signals a partial step scores with are there: checked before anything (the classifier's adapt()) changes.
  void expect_signals_ready(float t) const {
    if constexpr (has(Scorer::needs, signal::future)) {
      if (!predictor_.ready()) detail::fail_logic("plan_step: the scorer reads the speculative future and the speculative pass is not complete");
      detail::expect_size("future", predictor_.future(t).size(), static_cast<std::size_t>(config_.rows()));
    }
    if constexpr (has(Scorer::needs, signal::metric))
      if (!has_metric_) detail::fail_logic("plan_step: the scorer reads signal::metric and set_metric was not called");
  }
  void classify_all(float t, index_t count) {
    expect_signals_ready(t);
    if constexpr (has(Scorer::needs, signal::future)) merge(predictor_.future(t), fut_);
    if constexpr (has(Scorer::needs, signal::feature_change)) {  // the first slot's rows
      store_.change_norm(0, 0, change_all_);
      merge(change_all_, change_);
    }
    for (index_t p = 0; p < config_.plans(); ++p) {
      const score_inputs in{slice(his_, p), slice(fut_, p), slice(cf_, p), slice(change_, p), slice(metric_, p)};
      score_tokens(scorer_, in, scores_);
      auto& plan = plans_[static_cast<std::size_t>(p)];
      classifier_.classify(std::span<const float>(scores_), plan);
      if (plan.count(level::compute) != count)
        detail::fail_logic("classifier: put ", plan.count(level::compute), " tokens in C1, its compute_count promised ", count);
    }
  }

  void expect_own(const step& s) const { s.expect_owned_by(this); }
  void expect_current(const detail::planned_step<accelerator>& s) const {
    if (!planned_ || s.generation_ != generation_) detail::fail_logic("step: step ", s.index_, " is stale (reset() was called since it was planned)");
  }
  void expect_attention(std::span<const float> attention) const {
    if (has(Scorer::needs, signal::attention) || !attention.empty()) {
      detail::expect_size("attention", attention.size(), static_cast<std::size_t>(config_.rows()));
      detail::expect_attention_values("attention", attention);
    }
  }
  void expect_site_open(index_t layer, index_t site) const {
    detail::expect_index("layer", layer, config_.layers);
    detail::expect_index("site", site, config_.sites);
    if (site_done_[slot(layer, site)]) detail::fail_logic("layer ", layer, " site ", site, ": already cached in step ", next_step_);
  }
  // Every (layer, site) cached or filled whole in this step — except slot (0, 0) when the token-level
  // complete_step is about to do it itself (it must then still be open).
  void expect_sites_done(const char* what, bool first_slot_pending = false) const {
    if (first_slot_pending && site_done_[0]) detail::fail_logic(what, ": layer 0 site 0 was already cached in step ", next_step_);
    for (index_t l = 0; l < config_.layers; ++l)
      for (index_t s = 0; s < config_.sites; ++s)
        if (!site_done_[slot(l, s)] && !(first_slot_pending && l == 0 && s == 0))
          detail::fail_logic(what, ": layer ", l, " site ", s, " was neither cached nor filled whole in step ", next_step_);
  }
  // Validated: these cannot fail.
  void cache_validated(const step& s, index_t layer, index_t site, matrix_view<const float> computed) {
    if (s.dense_) {
      store_.write(layer, site, s.t_, computed);
    } else {
      const auto n = static_cast<std::size_t>(computed.rows);
      for (std::size_t r = 0; r < n; ++r) global_ids_[r] = global_row(static_cast<index_t>(r));
      const std::span<const index_t> rows(global_ids_.data(), n);
      verify(s, layer, site, rows, computed, std::span<const index_t>(all_rows_.data(), n));  // compact row r is token rows[r]
      store_.scatter(layer, site, s.t_, rows, computed);
    }
    site_done_[slot(layer, site)] = 1;
    rows_cached_ = true;
  }
  void cache_in_place_validated(const step& s, index_t layer, index_t site, matrix_view<const float> all) {
    if (s.dense_) {
      store_.write(layer, site, s.t_, all);
    } else {
      const auto n = static_cast<std::size_t>(config_.batch) * static_cast<std::size_t>(compute_count_);
      for (std::size_t r = 0; r < n; ++r) global_ids_[r] = global_row(static_cast<index_t>(r));
      const std::span<const index_t> rows(global_ids_.data(), n);
      verify(s, layer, site, rows, all, rows);  // in place: token rows[r] is row rows[r]
      store_.write_rows(layer, site, s.t_, rows, all);
    }
    site_done_[slot(layer, site)] = 1;
    rows_cached_ = true;
  }
  // Before a partial step caches computed rows (`rows`: their tokens, row truth_rows[i] of `truth`): what the
  // approximator would have predicted for them, summed per sample; and the calibration pairs. Throws only if
  // the approximator refuses the tags, before anything changes.
  void verify(const step& s, index_t layer, index_t site, std::span<const index_t> rows, matrix_view<const float> truth,
              std::span<const index_t> truth_rows) {
    const std::span<float> err2(err2_.data(), rows.size()), norm2(norm2_.data(), rows.size());
    store_.prediction_error(layer, site, s.t_, rows, approx_, truth, truth_rows, err2, norm2);
    for (std::size_t r = 0; r < rows.size(); ++r) {
      const auto b = static_cast<std::size_t>(rows[r] / config_.tokens);
      step_err2_[b] += err2[r];
      step_norm2_[b] += norm2[r];
    }
    if (calibration_ != nullptr) calibration_->add(store_, layer, site, s.index_, rows, truth, truth_rows);
  }
  bool dense_at(index_t step_index) const {
    if constexpr (feedback_schedule<Schedule>) return schedule_.is_dense(step_index, config_.steps, feedback_);
    else return schedule_.is_dense(step_index, config_.steps);
  }
  // The step's verification per sample, and the feedback the next plan_step reads.
  void update_verification(bool dense) {
    if (dense) {
      std::ranges::fill(verified_, 0.f);
      feedback_ = {};
      return;
    }
    double mean = 0.0;
    for (std::size_t b = 0; b < verified_.size(); ++b) {
      const double e = step_err2_[b], n = step_norm2_[b];
      verified_[b] = static_cast<float>(n > 0.0 ? std::sqrt(e / n) : (e > 0.0 ? std::numeric_limits<double>::infinity() : 0.0));
      mean += verified_[b];
    }
    feedback_.last_error = static_cast<float>(mean / static_cast<double>(verified_.size()));
    feedback_.accumulated_error += feedback_.last_error;
    ++feedback_.partial_run;
  }
  void finish(step& s, std::span<const float> attention) {
    update_verification(s.dense_);
    if (!attention.empty()) {
      merge(attention, his_);
      has_his_ = true;
    }
    for (std::size_t p = 0; p < plans_.size(); ++p) {
      const auto levels = plans_[p].levels();
      float* cf = cf_.data() + p * static_cast<std::size_t>(config_.tokens);
      for (std::size_t i = 0; i < levels.size(); ++i) cf[i] = math::advance_cache_count(levels[i], cf[i]);
    }
    last_t_ = s.t_;
    ++next_step_;
    planned_ = false;
    step_base::detach(live_step_, step_base::state::empty);
  }
  void abandon_step(std::uint64_t generation) noexcept {
    if (!planned_ || generation != generation_) return;
    planned_ = false;
    if (rows_cached_) needs_reset_ = true;
  }

  accelerator_config config_;
  Scorer scorer_;
  Predictor predictor_;
  Classifier classifier_;
  Schedule schedule_;
  Approx approx_;
  store_type store_;
  std::vector<token_plan> plans_;
  std::vector<float> his_, fut_, cf_, change_, metric_;  // [plan][token]
  std::vector<float> change_all_;                         // [sample][token]
  std::vector<float> scores_;
  std::vector<index_t> compute_ids_;                      // [sample][C1 token]
  std::vector<index_t> global_ids_;               // scratch: full-matrix rows of a token list
  std::vector<index_t> all_rows_;                 // 0 .. rows - 1 (fill_all)
  std::vector<char> site_done_;                           // [layer][site] in the planned step
  std::vector<float> err2_, norm2_;                       // scratch: verification per computed row of a site
  std::vector<double> step_err2_, step_norm2_;            // [sample] verification sums of the planned step
  std::vector<float> verified_;                           // [sample] of the last completed step
  schedule_feedback feedback_;
  schedule_feedback adapted_{};                           // what a feedback classifier last adapted to (initially: none)
  history_fit* calibration_ = nullptr;                    // the caller's, while self-calibrating
  index_t partial_count_ = 0, compute_count_ = 0;
  index_t next_step_ = 0;
  float last_t_ = std::numeric_limits<float>::infinity();
  std::uint64_t generation_ = 0;
  bool planned_ = false, rows_cached_ = false, needs_reset_ = false;
  bool has_his_ = false, has_metric_ = false;
  step_base* live_step_ = nullptr;  // the one step object that points here (planned_step keeps it current)
};

}  // namespace specdiff
