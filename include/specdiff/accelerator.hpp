// accelerator: the orchestration. Composes a scorer, a speculative predictor, a classifier, a schedule
// and a cache store (with its C3 approximator) into a per-step plan for the engine:
//
//   begin_speculation(ts); for each speculative step s: engine runs all tokens -> record_speculation(s, attn)
//   for each main step:  dense = plan_step(step, t)
//                        engine computes plan(b).compute() rows of every sample (all rows when dense),
//                        writing them in place into `output` and the attention received into `attention`
//                        complete_step(step, t, output, attention)   // caches C1, fills C2/C3 in place
//
// Everything is sized in the constructor; plan_step/complete_step do not allocate.
#pragma once

#include <algorithm>
#include <vector>

#include "approximators.hpp"
#include "cache_store.hpp"
#include "concepts.hpp"
#include "schedules.hpp"

namespace specdiff {

struct accelerator_config {
  index_t tokens = 0;          ///< image tokens per sample
  index_t batch = 1;           ///< samples per model call; a CFG batch counts both halves
  index_t steps = 0;           ///< main-pass steps
  index_t feature_dim = 0;     ///< width of a cached output row (the model output per token)
  bool share_cfg_plan = false; ///< samples b and b + batch/2 (diffusers' [uncond; cond] layout) share a plan

  void validate() const {
    if (tokens <= 0) detail::fail("tokens: must be positive, got ", tokens);
    if (batch <= 0) detail::fail("batch: must be positive, got ", batch);
    if (steps <= 0) detail::fail("steps: must be positive, got ", steps);
    if (feature_dim <= 0) detail::fail("feature_dim: must be positive, got ", feature_dim);
    if (share_cfg_plan && batch % 2 != 0) detail::fail("batch: share_cfg_plan needs an even batch (uncond + cond halves), got ", batch);
  }
  index_t plans() const { return share_cfg_plan ? batch / 2 : batch; }
};

template <importance_scorer Scorer, speculative_predictor Predictor, level_classifier Classifier, schedule Schedule,
          approximator Approx = specdiff_weighted, storage_type Storage = float>
class accelerator {
 public:
  using store_type = host_cache_store<Storage>;

  accelerator(accelerator_config config, Scorer scorer, Predictor predictor, Classifier classifier, Schedule schedule, Approx approx = {})
      : config_((config.validate(), config)),
        scorer_(std::move(scorer)),
        predictor_(std::move(predictor)),
        classifier_(std::move(classifier)),
        schedule_(std::move(schedule)),
        approx_(approx),
        store_(cache_shape{1, 1, config.batch * config.tokens, config.feature_dim, std::max<index_t>(Approx::depth, 2)}),
        plans_(static_cast<std::size_t>(config.plans()), token_plan(config.tokens)),
        his_(per_plan()), fut_(per_plan()), cf_(per_plan()), change_(per_plan()), metric_(per_plan()),
        change_all_(static_cast<std::size_t>(config.batch * config.tokens)),
        scores_(static_cast<std::size_t>(config.tokens)),
        global_(static_cast<std::size_t>(config.tokens)) {}

  // --- speculative pass -------------------------------------------------------------------------
  void begin_speculation(std::span<const float> timesteps) { predictor_.begin(timesteps); }
  /// `attention`: batch * tokens values, the attention each image token received summed over layers.
  void record_speculation(index_t step, std::span<const float> attention) { predictor_.record(step, attention); }

  // --- main pass --------------------------------------------------------------------------------
  /// Plans step `step` (timestep t). Returns true when the step is dense. Step 0 — or any step before the
  /// first complete_step — is dense whatever the schedule says: there is no attention history to score.
  bool plan_step(index_t step, float t) {
    if (!std::isfinite(t)) detail::fail("t: timestep is not finite (", t, ")");
    dense_ = !has_history_ || schedule_.is_dense(step, config_.steps);
    if (dense_) {
      for (auto& p : plans_) p.set_all(level::compute);
      return true;
    }
    if constexpr (has(Scorer::needs, signal::future)) merge(predictor_.future(t), fut_);
    if constexpr (has(Scorer::needs, signal::feature_change)) {
      store_.change_norm(0, 0, change_all_);
      merge(change_all_, change_);
    }
    const auto n = static_cast<std::size_t>(config_.tokens);
    for (std::size_t p = 0; p < plans_.size(); ++p) {
      const score_inputs in{slice(his_, p), slice(fut_, p), slice(cf_, p), slice(change_, p), slice(metric_, p)};
      scorer_.score(in, scores_);
      classifier_.classify(std::span<const float>(scores_.data(), n), plans_[p]);
    }
    return false;
  }

  bool dense() const { return dense_; }
  const token_plan& plan(index_t sample) const {
    detail::expect_index("sample", sample, config_.batch);
    return plans_[static_cast<std::size_t>(plan_of(sample))];
  }

  /// Caches the computed rows of `output` (batch*tokens x feature_dim, sample b's token i at row
  /// b*tokens + i), fills the C2 rows with their latest cached value and the C3 rows with the
  /// approximator's mix, and takes `attention` (batch*tokens) as the next step's history. A scorer that
  /// reads signal::metric gets it from set_metric(), typically computed from the filled `output`.
  void complete_step(index_t step, float t, matrix_view<float> output, std::span<const float> attention) {
    detail::expect_index("step", step, config_.steps);
    detail::expect_matrix("output", output, config_.batch * config_.tokens, config_.feature_dim);
    detail::expect_size("attention", attention.size(), static_cast<std::size_t>(config_.batch * config_.tokens));
    detail::expect_finite("attention", attention);
    if (dense_) {
      store_.write(0, 0, t, output);
    } else {
      for (index_t b = 0; b < config_.batch; ++b) {
        const token_plan& p = plan(b);
        store_.write_rows(0, 0, t, to_global(b, p.compute()), output);
        store_.fill(0, 0, t, to_global(b, p.reuse()), latest{}, output);
        store_.fill(0, 0, t, to_global(b, p.approximate()), approx_, output);
      }
    }
    merge(attention, his_);
    for (std::size_t p = 0; p < plans_.size(); ++p) {
      const auto levels = plans_[p].levels();
      float* cf = cf_.data() + p * static_cast<std::size_t>(config_.tokens);
      for (std::size_t i = 0; i < levels.size(); ++i) cf[i] = levels[i] == level::compute ? 0.f : cf[i] + 1.f;
    }
    has_history_ = true;
  }

  /// Sets the engine-defined per-token metric (batch*tokens) the next plan_step scores with.
  void set_metric(std::span<const float> metric) {
    detail::expect_finite("metric", metric);
    merge(metric, metric_);
  }

  /// Forgets all history (a new image), keeping the memory.
  void reset() {
    store_.clear();
    std::fill(cf_.begin(), cf_.end(), 0.f);
    has_history_ = false;
  }

  const accelerator_config& config() const { return config_; }
  index_t compute_count() const { return plans_[0].count(level::compute); }
  const store_type& store() const { return store_; }
  std::span<const float> cache_counts(index_t plan) const { return slice(cf_, static_cast<std::size_t>(plan)); }
  Scorer& scorer() { return scorer_; }
  Predictor& predictor() { return predictor_; }
  Classifier& classifier() { return classifier_; }
  const Schedule& step_schedule() const { return schedule_; }

 private:
  std::vector<float> per_plan() const { return std::vector<float>(static_cast<std::size_t>(config_.plans() * config_.tokens), 0.f); }
  index_t plan_of(index_t sample) const { return config_.share_cfg_plan ? sample % config_.plans() : sample; }
  std::span<const float> slice(const std::vector<float>& v, std::size_t p) const {
    const auto n = static_cast<std::size_t>(config_.tokens);
    return {v.data() + p * n, n};
  }

  // Per-sample values (batch*tokens) -> per-plan values; a shared CFG plan sees the pair's mean.
  void merge(std::span<const float> per_sample, std::vector<float>& per_plan_out) const {
    detail::expect_size("per-sample values", per_sample.size(), static_cast<std::size_t>(config_.batch * config_.tokens));
    if (!config_.share_cfg_plan) {
      std::copy(per_sample.begin(), per_sample.end(), per_plan_out.begin());
      return;
    }
    const std::size_t half = per_plan_out.size();
    for (std::size_t i = 0; i < half; ++i) per_plan_out[i] = 0.5f * (per_sample[i] + per_sample[i + half]);
  }

  std::span<const index_t> to_global(index_t sample, std::span<const index_t> local) {
    const index_t offset = sample * config_.tokens;
    for (std::size_t i = 0; i < local.size(); ++i) global_[i] = offset + local[i];
    return {global_.data(), local.size()};
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
  std::vector<float> change_all_;               // [sample][token]
  std::vector<float> scores_;
  std::vector<index_t> global_;
  bool dense_ = true;
  bool has_history_ = false;
};

}  // namespace specdiff
