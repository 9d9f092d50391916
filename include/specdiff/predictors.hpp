// Speculative predictors (host): what the short speculative pass says about each token's future.
#pragma once

#include <algorithm>
#include <vector>

#include "concepts.hpp"

namespace specdiff {

/// Self-speculation: records the per-token scores (attention received, summed over layers) at each step
/// of an S-step speculative pass, and answers future(t) with the record at the nearest future timestep:
/// timesteps fall as sampling proceeds, so that is the largest recorded timestep <= t. When no record lies
/// ahead (t below the last speculative timestep) the last record — the nearest in the past — is used.
class self_speculation {
 public:
  /// `values` = scores per record: batch * tokens.
  explicit self_speculation(index_t values) : values_(values) {
    if (values <= 0) detail::fail("values: must be positive, got ", values);
  }

  void begin(std::span<const float> timesteps) {
    if (timesteps.empty()) detail::fail("timesteps: the speculative pass needs at least one step");
    detail::expect_finite("timesteps", timesteps);
    for (std::size_t i = 1; i < timesteps.size(); ++i)
      if (!(timesteps[i] < timesteps[i - 1]))
        detail::fail("timesteps: must strictly decrease, got ", timesteps[i - 1], " then ", timesteps[i], " at ", i);
    timesteps_.assign(timesteps.begin(), timesteps.end());
    records_.assign(timesteps.size() * static_cast<std::size_t>(values_), 0.f);
    recorded_.assign(timesteps.size(), false);
  }

  void record(index_t step, std::span<const float> scores) {
    detail::expect_index("step", step, static_cast<index_t>(timesteps_.size()));
    detail::expect_size("scores", scores.size(), static_cast<std::size_t>(values_));
    detail::expect_finite("scores", scores);
    std::copy(scores.begin(), scores.end(), records_.begin() + static_cast<std::ptrdiff_t>(step) * values_);
    recorded_[static_cast<std::size_t>(step)] = true;
  }

  /// Index of the record future(t) answers with.
  index_t nearest_future(float t) const {
    if (timesteps_.empty()) detail::fail_logic("future: begin() was not called");
    if (!std::isfinite(t)) detail::fail("t: not finite (", t, ")");
    for (std::size_t i = 0; i < timesteps_.size(); ++i)
      if (timesteps_[i] <= t) return static_cast<index_t>(i);
    return static_cast<index_t>(timesteps_.size() - 1);
  }

  std::span<const float> future(float t) const {
    const index_t i = nearest_future(t);
    if (!recorded_[static_cast<std::size_t>(i)])
      detail::fail_logic("future: speculative step ", i, " (t = ", timesteps_[static_cast<std::size_t>(i)], ") was never recorded");
    return {records_.data() + static_cast<std::ptrdiff_t>(i) * values_, static_cast<std::size_t>(values_)};
  }

  std::span<const float> timesteps() const { return timesteps_; }

 private:
  index_t values_;
  std::vector<float> timesteps_;
  std::vector<float> records_;  // [record][sample][token]
  std::vector<bool> recorded_;
};

/// No speculation: every token's future score is 1, which leaves log-domain scores unchanged.
class no_speculation {
 public:
  explicit no_speculation(index_t values) : ones_(static_cast<std::size_t>(values), 1.f) {
    if (values <= 0) detail::fail("values: must be positive, got ", values);
  }
  void begin(std::span<const float>) {}
  void record(index_t, std::span<const float>) {}
  std::span<const float> future(float) const { return ones_; }

 private:
  std::vector<float> ones_;
};

static_assert(speculative_predictor<self_speculation> && speculative_predictor<no_speculation>);

}  // namespace specdiff
