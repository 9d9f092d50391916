// Step schedules: which main-pass steps are dense, and the speculative pass length.
#pragma once

#include "concepts.hpp"

namespace specdiff {

/// Dense for the first `warmup_steps` steps, then every `refresh_interval` steps after warm-up (0 = never);
/// everything else is a partial (cached) step. RAS's SD3 setting — dense before step 4 and at 12 and 20 —
/// is {warmup_steps = 4, refresh_interval = 8}.
struct step_schedule {
  index_t warmup_steps = 4;
  index_t refresh_interval = 8;
  index_t speculative = 2;  ///< steps of the speculative pass (SpecDiff's S); 0 = none

  void validate() const {
    if (warmup_steps < 0) detail::fail("warmup_steps: must be >= 0, got ", warmup_steps);
    if (refresh_interval < 0) detail::fail("refresh_interval: must be >= 0, got ", refresh_interval);
    if (speculative < 0) detail::fail("speculative_steps: must be >= 0, got ", speculative);
  }

  bool is_dense(index_t step, index_t steps) const {
    if (step < 0 || step >= steps) detail::fail("step = ", step, " is out of range [0, ", steps, ")");
    if (step < warmup_steps) return true;
    const index_t since = step - warmup_steps;
    return refresh_interval > 0 && since > 0 && since % refresh_interval == 0;
  }
  index_t speculative_steps() const { return speculative; }
};

/// Every step dense: the full model (and the "no caching" setting every method must reproduce).
struct dense_schedule {
  bool is_dense(index_t, index_t) const { return true; }
  index_t speculative_steps() const { return 0; }
};

static_assert(schedule<step_schedule> && schedule<dense_schedule>);

}  // namespace specdiff
