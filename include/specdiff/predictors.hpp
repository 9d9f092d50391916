// Speculative predictors (host): what the short speculative pass says about each token's future, and where
// that pass evaluates the model.
#pragma once

#include <algorithm>
#include <vector>

#include "concepts.hpp"

namespace specdiff {

namespace detail {

/// A speculative pass's timesteps: at least one, finite, strictly falling. The host and device predictors'
/// one check (gpu::self_speculation keeps its records in device memory but its timesteps on the host).
inline void expect_speculative_timesteps(std::span<const float> timesteps) {
  if (timesteps.empty()) fail("timesteps: the speculative pass needs at least one step");
  expect_finite("timesteps", timesteps);
  for (std::size_t i = 1; i < timesteps.size(); ++i)
    if (!(timesteps[i] < timesteps[i - 1])) fail("timesteps: must strictly decrease, got ", timesteps[i - 1], " then ", timesteps[i], " at ", i);
}

/// The record that answers future(t) among a pass's (falling) timesteps: the largest timestep <= t, or the
/// last when none lies ahead. One rule for both predictors, so host and device plans read the same record.
inline index_t nearest_future_record(std::span<const float> timesteps, float t) {
  if (!std::isfinite(t)) fail("t: not finite (", t, ")");
  for (std::size_t i = 0; i < timesteps.size(); ++i)
    if (timesteps[i] <= t) return static_cast<index_t>(i);
  return static_cast<index_t>(timesteps.size() - 1);
}

}  // namespace detail

/// Self-speculation: records the per-token scores (attention received, summed over layers) at each step
/// of an S-step speculative pass, and answers future(t) with the record at the nearest future timestep:
/// timesteps fall as sampling proceeds, so that is the largest recorded timestep <= t. When no record lies
/// ahead (t below the last speculative timestep) the last record — the nearest in the past — is used.
class self_speculation {
 public:
  /// Sized by the accelerator: `values` = batch * tokens scores per record.
  void prepare(index_t values) {
    if (values <= 0) detail::fail("values: must be positive, got ", values);
    values_ = values;
    clear();
  }

  /// Starts a pass over `timesteps` (strictly falling). Records of an earlier pass are dropped.
  void begin(std::span<const float> timesteps) {
    if (values_ == 0) detail::fail_logic("begin: the predictor was not prepared (the accelerator prepares it)");
    detail::expect_speculative_timesteps(timesteps);
    const std::size_t n = detail::checked_product<std::size_t>("speculative steps * values", timesteps.size(), values_);
    timesteps_.assign(timesteps.begin(), timesteps.end());
    records_.assign(n, 0.f);
    recorded_.assign(timesteps.size(), false);
  }

  void record(index_t step, std::span<const float> scores) {
    if (timesteps_.empty()) detail::fail_logic("record: the speculative pass was not begun (call begin_speculation(timesteps) first)");
    detail::expect_index("step", step, static_cast<index_t>(timesteps_.size()));
    if (recorded_[static_cast<std::size_t>(step)]) detail::fail_logic("record: speculative step ", step, " was already recorded");
    detail::expect_size("scores", scores.size(), static_cast<std::size_t>(values_));
    detail::expect_finite("scores", scores);
    std::copy(scores.begin(), scores.end(), records_.begin() + static_cast<std::ptrdiff_t>(step) * values_);
    recorded_[static_cast<std::size_t>(step)] = true;
  }

  /// Every step of the begun pass recorded.
  bool ready() const { return !timesteps_.empty() && std::all_of(recorded_.begin(), recorded_.end(), [](bool r) { return r; }); }
  index_t recorded_steps() const { return static_cast<index_t>(std::count(recorded_.begin(), recorded_.end(), true)); }

  /// Index of the record future(t) answers with.
  index_t nearest_future(float t) const {
    if (timesteps_.empty()) detail::fail_logic("future: the speculative pass was not begun");
    return detail::nearest_future_record(timesteps_, t);
  }

  std::span<const float> future(float t) const {
    const index_t i = nearest_future(t);
    if (!recorded_[static_cast<std::size_t>(i)])
      detail::fail_logic("future: speculative step ", i, " (t = ", timesteps_[static_cast<std::size_t>(i)], ") was never recorded");
    return {records_.data() + static_cast<std::ptrdiff_t>(i) * values_, static_cast<std::size_t>(values_)};
  }

  std::span<const float> timesteps() const { return timesteps_; }

  /// Forgets the pass (a new image); keeps the memory.
  void clear() {
    timesteps_.clear();
    recorded_.clear();
  }

 private:
  index_t values_ = 0;
  std::vector<float> timesteps_;
  std::vector<float> records_;  // [record][sample][token]
  std::vector<bool> recorded_;
};

/// No speculation: every token's future score is 1, which leaves log-domain scores unchanged.
class no_speculation {
 public:
  void prepare(index_t values) {
    if (values <= 0) detail::fail("values: must be positive, got ", values);
    ones_.assign(static_cast<std::size_t>(values), 1.f);
  }
  void begin(std::span<const float>) {}
  void record(index_t, std::span<const float>) {}
  bool ready() const { return true; }
  std::span<const float> future(float) const { return ones_; }
  void clear() {}

 private:
  std::vector<float> ones_;
};

static_assert(speculative_predictor<self_speculation> && speculative_predictor<no_speculation>);

// --- the speculative pass, specified ------------------------------------------------------------------
//
// The pass runs the model itself on every token at S timesteps tau_1 > ... > tau_S, from the same noise
// and conditioning as the main pass, and records the attention each image token receives (image queries
// only, summed over layers — what the main pass's `his` measures). The latent is integrated: it starts as
// the noise at tau_1 and takes an Euler step (the main sampler's update) from each tau_j to tau_{j+1}, and
// from tau_S to 0, so each record is taken on a latent at its own noise level. Where the S timesteps lie
// decides which record each main step reads (the largest tau_j <= t, see self_speculation):

/// Where the speculative pass evaluates the model.
enum class speculative_grid {
  /// The first main timestep (the noise is exact there), then S - 1 main timesteps at the middles of
  /// S - 1 equal runs of the partial steps: each record is read by the partial steps around it (as their
  /// nearest future up to it, as the nearest past after the last one), not by the whole pass. The
  /// methods' default (docs/results.md measures both).
  aligned,
  /// The sampler's own S-step schedule (0.1's choice): the engine computes it (for rectified flow,
  /// FlowMatchEuler(S, shift)), so this library function does not; with S = 2 it gives t = [1000, ~9]
  /// and every partial step reads the same record.
  sampler,
};

/// The `aligned` grid: S speculative timesteps taken from the main grid `main_timesteps` (falling), given
/// which steps the schedule makes dense. S = 0 gives none; S must not exceed the number of steps.
template <schedule Schedule>
std::vector<float> aligned_speculative_timesteps(std::span<const float> main_timesteps, index_t speculative_steps,
                                                 const Schedule& sched) {
  const auto steps = static_cast<index_t>(main_timesteps.size());
  if (steps <= 0) detail::fail("main_timesteps: empty");
  detail::expect_finite("main_timesteps", main_timesteps);
  for (std::size_t i = 1; i < main_timesteps.size(); ++i)
    if (!(main_timesteps[i] < main_timesteps[i - 1]))
      detail::fail("main_timesteps: must strictly decrease, got ", main_timesteps[i - 1], " then ", main_timesteps[i], " at ", i);
  if (speculative_steps < 0 || speculative_steps > steps)
    detail::fail("speculative_steps: must lie in [0, ", steps, "] (the main steps), got ", speculative_steps);
  sched.validate(steps);
  std::vector<float> out;
  if (speculative_steps == 0) return out;
  out.push_back(main_timesteps[0]);
  // Candidates: the partial steps; when there are fewer than the runs, every step after the first.
  std::vector<index_t> candidates;
  const auto runs = static_cast<std::size_t>(speculative_steps - 1);
  for (index_t k = 1; k < steps; ++k)
    if (!sched.is_dense(k, steps)) candidates.push_back(k);
  if (candidates.size() < runs) {
    candidates.clear();
    for (index_t k = 1; k < steps; ++k) candidates.push_back(k);
  }
  // Run j's record sits at its middle, candidate floor((2j - 1) |C| / (2 runs)): consecutive positions
  // differ by |C| / runs >= 1, so they strictly increase.
  for (std::size_t j = 1; j <= runs; ++j)
    out.push_back(main_timesteps[static_cast<std::size_t>(candidates[(2 * j - 1) * candidates.size() / (2 * runs)])]);
  return out;
}

}  // namespace specdiff
