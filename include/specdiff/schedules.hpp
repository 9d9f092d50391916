// Step schedules: which main-pass steps are dense, and the speculative pass length.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "concepts.hpp"

namespace specdiff {

/// Dense for the first `warmup_steps` steps; then every `refresh_interval` steps counted from the last
/// warm-up step (0 = never), and at each step listed in `dense_steps`; every other step is partial.
/// The default, `step_schedule{}`, is valid for any step count: dense before step 4, then partial, with a
/// speculative pass of min(2, steps) steps (`speculative = from_steps`) and no further dense steps.
///   RAS's SD3 setting (28 steps: dense before 4, "error reset" at 12 and 20): {4, 0, 2, {12, 20}}.
///   TaylorSeer's FLUX setting (first 3 full, then every 6th: 8, 14, ...): {3, 6}.
///   FORA (a full step every N from the first): {1, N}. Any {w, 1} is dense throughout.
/// Fields the user sets are checked against the run's step count (validate), and a message names the field.
struct step_schedule {
  /// `speculative`'s default: derived from the run, min(default_speculative, steps).
  static constexpr index_t from_steps = -1;
  static constexpr index_t default_speculative = 2;

  index_t warmup_steps = 4;
  index_t refresh_interval = 0;
  index_t speculative = from_steps;  ///< steps of the speculative pass (SpecDiff's S); 0 = none
  std::vector<index_t> dense_steps = {};  ///< further dense steps (RAS's "error reset" steps), each in [0, steps)

  /// Rejects negative fields, and dense steps or a speculative pass that do not fit `steps` main steps.
  void validate(index_t steps) const {
    if (steps <= 0) detail::fail("steps: must be positive, got ", steps);
    if (warmup_steps < 0) detail::fail("step_schedule.warmup_steps: must be >= 0, got ", warmup_steps);
    if (refresh_interval < 0) detail::fail("step_schedule.refresh_interval: must be >= 0 (0: never), got ", refresh_interval);
    if (speculative != from_steps && (speculative < 0 || speculative > steps))
      detail::fail("step_schedule.speculative: must lie in [0, ", steps, "] (the run's steps), got ", speculative,
                   "; lower it, or leave it at step_schedule::from_steps (min(", default_speculative, ", steps))");
    for (index_t r : dense_steps)
      if (r < 0 || r >= steps)
        detail::fail("step_schedule.dense_steps: ", r, " is out of range [0, ", steps, ") (the run's steps); drop it or raise steps");
  }
  /// This schedule for a run of `steps` main steps: validated, `from_steps` replaced by its value. The
  /// accelerator keeps this copy (accelerator::step_schedule()).
  step_schedule for_steps(index_t steps) const {
    validate(steps);
    step_schedule s = *this;
    if (s.speculative == from_steps) s.speculative = std::min(default_speculative, steps);
    return s;
  }

  bool is_dense(index_t step, index_t steps) const {
    if (step < 0 || step >= steps) detail::fail("step = ", step, " is out of range [0, ", steps, ")");
    if (step < warmup_steps) return true;
    if (refresh_interval > 0 && (step - warmup_steps + 1) % refresh_interval == 0) return true;
    return std::find(dense_steps.begin(), dense_steps.end(), step) != dense_steps.end();
  }
  /// S. A schedule left at from_steps has no value before it knows the run: ask for_steps(steps) (or the
  /// accelerator's step_schedule()).
  index_t speculative_steps() const {
    if (speculative == from_steps)
      detail::fail_logic("speculative_steps: step_schedule.speculative is from_steps (min(", default_speculative,
                         ", steps)); ask for_steps(steps).speculative_steps() or the accelerator's step_schedule()");
    return speculative;
  }
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
  step_schedule fixed = {.warmup_steps = 2, .refresh_interval = 0, .speculative = step_schedule::from_steps, .dense_steps = {}};
  float error_budget = 0.05f;
  index_t max_partial_steps = 0;

  void validate(index_t steps) const {
    if (!(error_budget >= 0.f)) detail::fail("error_budget_schedule.error_budget: must be >= 0 (infinity: only the fixed dense steps), got ", error_budget);
    if (max_partial_steps < 0) detail::fail("error_budget_schedule.max_partial_steps: must be >= 0, got ", max_partial_steps);
    fixed.validate(steps);
  }
  error_budget_schedule for_steps(index_t steps) const {
    validate(steps);
    error_budget_schedule s = *this;
    s.fixed = fixed.for_steps(steps);
    return s;
  }
  /// The steps dense whatever the feedback.
  bool is_dense(index_t step, index_t steps) const { return fixed.is_dense(step, steps); }
  bool is_dense(index_t step, index_t steps, const schedule_feedback& f) const {
    return is_dense(step, steps) || f.accumulated_error > error_budget || (max_partial_steps > 0 && f.partial_run >= max_partial_steps);
  }
  index_t speculative_steps() const { return fixed.speculative_steps(); }
};

namespace detail {
/// The schedule an accelerator keeps for a run of `steps`: validated, and resolved by for_steps(steps) where
/// the schedule has it (defaults derived from the run, e.g. step_schedule::from_steps).
template <schedule Schedule>
Schedule schedule_for_run(const Schedule& s, index_t steps) {
  if constexpr (requires { { s.for_steps(steps) } -> std::convertible_to<Schedule>; }) {
    return s.for_steps(steps);
  } else {
    s.validate(steps);
    return s;
  }
}
}  // namespace detail

static_assert(schedule<step_schedule> && schedule<dense_schedule> && feedback_schedule<error_budget_schedule>);

}  // namespace specdiff
