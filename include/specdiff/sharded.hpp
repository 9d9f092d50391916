// sharded_accelerator: SpecDiff when the image tokens are split across ranks (sequence parallelism). Each rank
// owns a contiguous token shard (token_shard::of) and the cache store of its rows only; the collectives run on
// a caller's communicator (communicator.hpp: single_process, MPI in <specdiff/mpi/communicator.hpp>, NCCL in
// <specdiff/cuda/nccl.cuh>). Two selection policies:
//
//   global_plan     every rank derives the SAME plan one process would make over all T tokens. The engine hands
//                   over the attention its rank measured, a partial column sum over all T tokens (its queries, or
//                   its heads after a Ulysses all-to-all); the partials are summed across ranks (all_reduce_sum),
//                   and a plan-only accelerator (feature width 1) runs the scorer, predictor and classifier on the
//                   sums, identically on every rank. The shard's rows are cached, reused and approximated by a
//                   shard accelerator that follows that plan. Per step and rank: 4 * batch * T bytes sent and
//                   received (the attention sums), plus 4 * batch * (T - shard) received for signal::metric.
//   per_shard_plan  each rank plans its shard alone from its own partial attention (its shard's slice, no
//                   exchange): |C1| = compute_count(shard tokens) on every rank, no collective at all; the plan
//                   differs from the global one (docs/scale-out.md measures by how much).
//
// Protocol: as accelerator's (accelerator.hpp), called by every rank in the same order. Rows are the shard's
// ([sample][shard token], token ids local to the shard); attention arguments are batch * T partial sums. A call
// that fails on one rank (bad input, a refusal) goes to the communicator's fail(): one process rethrows, MPI
// brings every rank down with the message (a rank that threw alone would leave the others waiting forever).
//
// Not built yet (refused at compile time or construction, by name): scorers reading signal::feature_change (the
// change norms would need an all-gather), feedback schedules and multi-rate classifiers (the verification error
// would need an all-reduce of 2 * batch sums), global plans with more than one plan per call (a shard's |C1|
// then differs between samples, and an engine's subset forward needs one count).
#pragma once

#include <algorithm>
#include <optional>
#include <span>
#include <type_traits>
#include <vector>

#include "accelerator.hpp"
#include "communicator.hpp"
#include "predictors.hpp"
#include "scorers.hpp"

namespace specdiff {

/// Every rank derives the plan one process would (an exchange per step).
struct global_plan {};
/// Every rank plans its own shard: equal |C1| per rank, no exchange.
struct per_shard_plan {};

namespace detail {
/// The shard accelerator's classifier under global_plan: copies the shard's slice of the global plan, which the
/// sharded accelerator sets before each plan_step.
class follow_plan {
 public:
  follow_plan(const std::vector<level>* levels, const index_t* count) : levels_(levels), count_(count) {}
  void prepare(index_t tokens) {
    if (static_cast<std::size_t>(tokens) != levels_->size())
      fail_logic("follow_plan: prepared for ", tokens, " tokens, the shard holds ", levels_->size());
  }
  // A feedback classifier in form only (adapt does nothing): the accelerator then asks compute_count at every
  // partial step instead of once at construction, and the shard's |C1| changes from step to step.
  void adapt(const schedule_feedback&) {}
  index_t compute_count(index_t) const { return *count_; }
  void classify(std::span<const float>, token_plan& plan) {
    std::ranges::copy(*levels_, plan.mutable_levels().begin());
    plan.commit_levels();
  }

 private:
  const std::vector<level>* levels_;
  const index_t* count_;
};
static_assert(feedback_classifier<follow_plan>);
}  // namespace detail

template <importance_scorer Scorer, speculative_predictor Predictor, level_classifier Classifier, schedule Schedule,
          communicator Comm, class Policy = global_plan, approximator Approx = specdiff_weighted,
          cache_store Store = host_cache_store<float>>
class sharded_accelerator {
  static_assert(std::is_same_v<Policy, global_plan> || std::is_same_v<Policy, per_shard_plan>,
                "Policy: global_plan or per_shard_plan");
  static constexpr bool global = std::is_same_v<Policy, global_plan>;
  static_assert(!global || !has(Scorer::needs, signal::feature_change),
                "global_plan: scorers reading signal::feature_change are not supported yet (the change norms need an all-gather)");
  static_assert(!global || !feedback_schedule<Schedule>,
                "global_plan: feedback schedules are not supported yet (the verification error needs an all-reduce)");

 public:
  /// Plans over all tokens (global_plan): feature width 1, a host store.
  using planner_type = accelerator<Scorer, Predictor, Classifier, Schedule, Approx>;
  /// The shard's rows: under global_plan a follower of the planner's plan, else a whole accelerator on the shard.
  using shard_type = std::conditional_t<global, accelerator<uniform_scorer, no_speculation, detail::follow_plan, Schedule, Approx, Store>,
                                        accelerator<Scorer, Predictor, Classifier, Schedule, Approx, Store>>;

  class step {
   public:
    bool dense() const { return shard_.dense(); }
    index_t index() const { return shard_.index(); }
    float timestep() const { return shard_.timestep(); }
    /// The shard's C1 tokens per sample (global_plan: the global C1 set's tokens in this shard).
    index_t compute_count() const { return shard_.compute_count(); }
    /// Every sample's C1 token ids local to the shard ([sample][compute_count()], ascending).
    std::span<const index_t> compute_tokens() const { return shard_.compute_tokens(); }
    const token_plan& plan(index_t sample) const { return shard_.plan(sample); }
    /// global_plan: the plan over all T tokens (the same on every rank); per_shard_plan: the shard's.
    const token_plan& global_plan_of(index_t sample) const { return planned_ ? planned_->plan(sample) : shard_.plan(sample); }

   private:
    friend class sharded_accelerator;
    step(typename shard_type::step s, std::optional<typename planner_type::step> p) : shard_(std::move(s)), planned_(std::move(p)) {}
    typename shard_type::step shard_;
    std::optional<typename planner_type::step> planned_;
  };

  /// `config` describes the whole problem (config.tokens = all T tokens); this rank owns
  /// token_shard::of(T, comm.rank(), comm.size()). Every rank constructs with the same arguments.
  sharded_accelerator(Comm& comm, accelerator_config config, Scorer scorer, Predictor predictor, Classifier classifier,
                      Schedule schedule, Approx approx = {})
      : comm_(comm),
        config_((config.validate(), expect_supported(config, classifier), config)),
        shard_(token_shard::of(config.tokens, comm.rank(), comm.size())),
        levels_(static_cast<std::size_t>(shard_.count), level::compute),
        planner_(make_planner(scorer, predictor, classifier, schedule, approx)),
        accel_(make_shard(std::move(scorer), std::move(predictor), std::move(classifier), std::move(schedule), approx)),
        attention_(static_cast<std::size_t>(config_.rows())),
        local_(static_cast<std::size_t>(config_.batch) * static_cast<std::size_t>(shard_.count)),
        gathered_(global ? static_cast<std::size_t>(config_.rows()) : 0),
        metric_(global ? static_cast<std::size_t>(config_.rows()) : 0),
        planner_rows_(global ? static_cast<std::size_t>(config_.rows()) : 0),
        planner_out_(global ? static_cast<std::size_t>(config_.rows()) : 0),
        counts_(static_cast<std::size_t>(comm.size())) {
    for (int r = 0; r < comm.size(); ++r)
      counts_[static_cast<std::size_t>(r)] = config_.batch * token_shard::of(config_.tokens, r, comm.size()).count;
  }

  sharded_accelerator(const sharded_accelerator&) = delete;
  sharded_accelerator& operator=(const sharded_accelerator&) = delete;

  const token_shard& shard() const { return shard_; }
  const accelerator_config& config() const { return config_; }
  /// The shard's accelerator (its store holds this rank's rows only).
  const shard_type& shard_accelerator() const { return accel_; }

  void begin_speculation(std::span<const float> timesteps) {
    guarded([&] {
      if constexpr (global) planner_.begin_speculation(timesteps);
      else accel_.begin_speculation(timesteps);
    });
  }
  /// `attention`: batch * T, this rank's partial column sums (global_plan: summed across ranks).
  void record_speculation(index_t step_index, std::span<const float> attention) {
    guarded([&] {
      const auto sums = combine(attention);
      if constexpr (global) planner_.record_speculation(step_index, sums);
      else accel_.record_speculation(step_index, sums);
    });
  }
  /// `metric`: batch * shard tokens, the shard's per-token metric (global_plan: all-gathered).
  void set_metric(std::span<const float> metric) {
    guarded([&] {
      if constexpr (global) {
        detail::expect_size("metric", metric.size(), local_.size());
        detail::expect_finite("metric", metric);
        comm_.all_gather(metric, counts_, gathered_);
        // [rank][sample][shard token] -> [sample][token]
        std::size_t at = 0;
        for (int r = 0; r < comm_.size(); ++r) {
          const token_shard s = token_shard::of(config_.tokens, r, comm_.size());
          for (index_t b = 0; b < config_.batch; ++b, at += static_cast<std::size_t>(s.count))
            std::copy_n(gathered_.begin() + static_cast<std::ptrdiff_t>(at), s.count,
                        metric_.begin() + static_cast<std::ptrdiff_t>(b * config_.tokens + s.begin));
        }
        planner_.set_metric(metric_);
      } else {
        accel_.set_metric(metric);
      }
    });
  }

  [[nodiscard]] step plan_step(index_t step_index, float t) {
    return guarded([&] {
      if constexpr (global) {
        auto planned = planner_.plan_step(step_index, t);
        const auto levels = planned.plan(0).levels();
        std::copy_n(levels.begin() + static_cast<std::ptrdiff_t>(shard_.begin), shard_.count, levels_.begin());
        count_ = static_cast<index_t>(std::ranges::count(levels_, level::compute));
        auto mine = accel_.plan_step(step_index, t);
        if (mine.dense() != planned.dense())
          detail::fail_logic("plan_step: step ", step_index, " is dense for the planner and not for the shard (schedules differ)");
        return step(std::move(mine), std::optional<typename planner_type::step>(std::move(planned)));
      } else {
        return step(accel_.plan_step(step_index, t), std::nullopt);
      }
    });
  }

  /// Token level, compact rows of the shard (layout as accelerator::complete_step with the shard's tokens);
  /// `output`: batch * shard tokens rows. `attention`: batch * T partial sums, or empty when the scorer reads none.
  void complete_step(step&& s, matrix_view<const float> computed, matrix_view<float> output, std::span<const float> attention) {
    guarded([&] {
      const auto sums = combine(attention, true);
      if constexpr (global) {
        accel_.complete_step(std::move(s.shard_), computed, output, std::span<const float>());
        finish_planner(s, sums);
      } else {
        accel_.complete_step(std::move(s.shard_), computed, output, sums);
      }
    });
  }
  /// Module level (every (layer, site) cached or filled during the step); `attention` as above.
  void complete_step(step&& s, std::span<const float> attention) {
    guarded([&] {
      const auto sums = combine(attention, true);
      if constexpr (global) {
        accel_.complete_step(std::move(s.shard_), std::span<const float>());
        finish_planner(s, sums);
      } else {
        accel_.complete_step(std::move(s.shard_), sums);
      }
    });
  }
  void cache_rows(const step& s, index_t layer, index_t site, matrix_view<const float> computed) {
    guarded([&] { accel_.cache_rows(s.shard_, layer, site, computed); });
  }
  void fill(const step& s, index_t layer, index_t site, matrix_view<float> out) {
    guarded([&] { accel_.fill(s.shard_, layer, site, out); });
  }
  void reset() {
    if constexpr (global) planner_.reset();
    accel_.reset();
  }

 private:
  struct none {};
  using planner_member = std::conditional_t<global, planner_type, none>;

  static accelerator_config expect_supported(const accelerator_config& c, const Classifier& classifier) {
    if constexpr (global) {
      if (c.plans() != 1)
        detail::fail("batch: the global plan takes one plan per model call (batch 1, or a CFG pair with share_cfg_plan), got ",
                     c.plans(), " plans: a shard's |C1| would differ between samples; use per_shard_plan");
      if constexpr (feedback_classifier<Classifier>) {
        if constexpr (requires { classifier.buckets(); }) {
          if (classifier.buckets() != 1)
            detail::fail("classifier: the global plan takes one cache rate, got ", classifier.buckets(),
                         " (the rate's feedback, the verified error, is not exchanged yet)");
        } else {
          static_assert(!sizeof(Classifier*), "global_plan: feedback classifiers are not supported yet");
        }
      }
    }
    (void)classifier;
    return c;
  }
  planner_member make_planner(const Scorer& scorer, const Predictor& predictor, const Classifier& classifier,
                              const Schedule& schedule, Approx approx) const {
    if constexpr (global) {
      accelerator_config p = config_;
      p.feature_dim = p.layers = p.sites = 1;
      return planner_type(p, scorer, predictor, classifier, schedule, approx);
    } else {
      return none{};
    }
  }
  shard_type make_shard(Scorer scorer, Predictor predictor, Classifier classifier, Schedule schedule, Approx approx) {
    accelerator_config s = config_;
    s.tokens = shard_.count;
    if constexpr (global) return shard_type(s, uniform_scorer{}, no_speculation{}, detail::follow_plan(&levels_, &count_), std::move(schedule), approx);
    else return shard_type(s, std::move(scorer), std::move(predictor), std::move(classifier), std::move(schedule), approx);
  }

  // The attention the plan reads: global, the sums across ranks; per shard, this rank's slice. Checked first.
  std::span<const float> combine(std::span<const float> attention, bool completing = false) {
    if (attention.empty()) {
      if (completing && has(Scorer::needs, signal::attention))
        detail::fail("attention: the scorer reads attention, got none (batch * tokens = ", config_.rows(), " partial sums)");
      return {};
    }
    detail::expect_size("attention", attention.size(), attention_.size());
    detail::expect_attention_values("attention", attention);
    if constexpr (global) {
      std::ranges::copy(attention, attention_.begin());
      comm_.all_reduce_sum(attention_);
      return attention_;
    } else {
      for (index_t b = 0; b < config_.batch; ++b)
        std::copy_n(attention.begin() + static_cast<std::ptrdiff_t>(b * config_.tokens + shard_.begin), shard_.count,
                    local_.begin() + static_cast<std::ptrdiff_t>(b * shard_.count));
      return local_;
    }
  }
  void finish_planner(step& s, std::span<const float> sums) {
    if constexpr (global) {
      const index_t rows = config_.batch * s.planned_->compute_count();
      planner_.complete_step(std::move(*s.planned_), matrix_view<const float>(planner_rows_.data(), rows, 1),
                             matrix_view<float>(planner_out_.data(), config_.rows(), 1), sums);
    }
  }
  template <class F>
  decltype(auto) guarded(F&& f) {
    try {
      return f();
    } catch (...) {
      comm_.fail(std::current_exception());
      throw;  // a communicator whose fail() returns: the error still propagates
    }
  }

  Comm& comm_;
  accelerator_config config_;
  token_shard shard_;
  std::vector<level> levels_;  // global_plan: the shard's slice of the planned step's levels
  index_t count_ = 0;          // ... and its C1 count
  planner_member planner_;  // per_shard_plan: empty
  shard_type accel_;
  std::vector<float> attention_, local_, gathered_, metric_, planner_rows_, planner_out_;
  std::vector<index_t> counts_;
};

}  // namespace specdiff
