// Step schedules: which main-pass steps are dense, and the speculative pass length.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "concepts.hpp"

namespace specdiff {

/// Dense for the first `warmup_steps` steps; then every `refresh_interval` steps counted from the last
/// warm-up step (0 = never), and at each step listed in `reset_steps`; every other step is partial.
///   RAS's SD3 setting (dense before 4, "error reset" at 12 and 20): {4, 0, 2, {12, 20}} — the default.
///   TaylorSeer's FLUX setting (first 3 full, then every 6th: 8, 14, ...): {3, 6}.
///   FORA (a full step every N from the first): {1, N}. Any {w, 1} is dense throughout.
struct step_schedule {
  index_t warmup_steps = 4;
  index_t refresh_interval = 0;
  index_t speculative = 2;  ///< steps of the speculative pass (SpecDiff's S); 0 = none
  std::vector<index_t> reset_steps = {12, 20};

  /// Rejects negative fields, and reset steps or a speculative pass that do not fit `steps` main steps.
  void validate(index_t steps) const {
    if (steps <= 0) detail::fail("steps: must be positive, got ", steps);
    if (warmup_steps < 0) detail::fail("warmup_steps: must be >= 0, got ", warmup_steps);
    if (refresh_interval < 0) detail::fail("refresh_interval: must be >= 0, got ", refresh_interval);
    if (speculative < 0 || speculative > steps)
      detail::fail("speculative_steps: must lie in [0, ", steps, "] (the main steps), got ", speculative);
    for (index_t r : reset_steps)
      if (r < 0 || r >= steps) detail::fail("reset_steps: ", r, " is out of range [0, ", steps, ")");
  }

  bool is_dense(index_t step, index_t steps) const {
    if (step < 0 || step >= steps) detail::fail("step = ", step, " is out of range [0, ", steps, ")");
    if (step < warmup_steps) return true;
    if (refresh_interval > 0 && (step - warmup_steps + 1) % refresh_interval == 0) return true;
    return std::find(reset_steps.begin(), reset_steps.end(), step) != reset_steps.end();
  }
  index_t speculative_steps() const { return speculative; }
};

/// Every step dense: the full model (and the "no caching" setting every method must reproduce).
struct dense_schedule {
  void validate(index_t steps) const {
    if (steps <= 0) detail::fail("steps: must be positive, got ", steps);
  }
  bool is_dense(index_t, index_t) const { return true; }
  index_t speculative_steps() const { return 0; }
};

/// SpecDiff-adaptive's schedule: the dense steps of a step_schedule (`fixed`: warm-up, resets, a refresh
/// interval), and a dense step whenever the error verified since the last dense step
/// (schedule_feedback::accumulated_error: the sum of the per-step relative L2 errors of the approximator on the
/// rows computed anyway) exceeds `error_budget`, or after `max_partial_steps` partial steps in a row (0 = no
/// limit). One knob: a larger budget, fewer dense steps; an infinite one makes it the step_schedule `fixed`.
struct error_budget_schedule {
  step_schedule fixed = {.warmup_steps = 2, .refresh_interval = 0, .speculative = 2, .reset_steps = {}};
  float error_budget = 0.05f;
  index_t max_partial_steps = 0;

  void validate(index_t steps) const {
    if (!(error_budget >= 0.f)) detail::fail("error_budget: must be >= 0 (infinity: only the fixed dense steps), got ", error_budget);
    if (max_partial_steps < 0) detail::fail("max_partial_steps: must be >= 0, got ", max_partial_steps);
    fixed.validate(steps);
  }
  /// The steps dense whatever the feedback.
  bool is_dense(index_t step, index_t steps) const { return fixed.is_dense(step, steps); }
  bool is_dense(index_t step, index_t steps, const schedule_feedback& f) const {
    return is_dense(step, steps) || f.accumulated_error > error_budget || (max_partial_steps > 0 && f.partial_run >= max_partial_steps);
  }
  index_t speculative_steps() const { return fixed.speculative_steps(); }
};

static_assert(schedule<step_schedule> && schedule<dense_schedule> && feedback_schedule<error_budget_schedule>);

}  // namespace specdiff
