// How the demo and the Pareto benchmark time a method against full RFlow, so that the order of the runs favours
// neither: one untimed warm-up run of each, then `repeats` timed pairs whose order alternates (full first, then
// the method first, ...), reported as medians with their spread.
#pragma once

#include <functional>
#include <span>
#include <string>
#include <vector>

#include "demo/support.hpp"

namespace demo {

/// Smallest and largest of a set of values.
struct spread {
  double min = 0, max = 0;
};

/// Median (the mean of the middle two for an even count). Throws std::invalid_argument for no values.
double median(std::span<const double> values);
/// Throws std::invalid_argument for no values.
spread spread_of(std::span<const double> values);

/// Timed runs of full RFlow and of one method on the same problem.
struct timed_comparison {
  /// The last run of each. Sampling is deterministic: every run of a method gives the same images.
  methods::run_result full, method;
  /// Wall times of the timed runs; pair k is (full_seconds[k], method_seconds[k]), run back to back.
  std::vector<double> full_seconds, method_seconds;
  /// overhead_seconds / seconds and speculative_seconds / seconds (SpecDiff's speculative pass; 0 for the other
  /// methods) of each timed run of the method.
  std::vector<double> method_overhead_shares, method_speculative_shares;

  [[nodiscard]] double seconds_full() const { return median(full_seconds); }
  [[nodiscard]] double seconds_method() const { return median(method_seconds); }
  [[nodiscard]] spread seconds_full_spread() const { return spread_of(full_seconds); }
  [[nodiscard]] spread seconds_method_spread() const { return spread_of(method_seconds); }
  /// median(full) / median(method).
  [[nodiscard]] double speedup() const { return seconds_full() / seconds_method(); }
  /// Spread of the per-pair ratios full_seconds[k] / method_seconds[k].
  [[nodiscard]] spread speedup_spread() const;
  [[nodiscard]] double overhead_share() const { return median(method_overhead_shares); }
  [[nodiscard]] double speculative_share() const { return median(method_speculative_shares); }
};

/// Runs a method on a problem (demo::run_method, or the sequence-parallel runner of --sequence-parallel).
using method_runner = std::function<methods::run_result(const methods::problem&, const method_spec&, const methods::progress_fn&)>;

struct timing_options {
  int repeats = 3;           ///< timed pairs, >= 1
  bool warm_up_full = true;  ///< false where this process has already run full RFlow on this problem
  method_runner run = {};    ///< empty = run_method
};

/// A progress display for one run, given its label ("full RFlow 2/3"); empty = none.
using progress_factory = std::function<methods::progress_fn(const std::string& label)>;

/// Times `method` against full RFlow on `p` (see the top of this file). Throws std::invalid_argument for
/// repeats < 1, and whatever the runs throw.
timed_comparison time_against_full(const methods::problem& p, const method_spec& method, const timing_options& options = {},
                                   const progress_factory& progress = {});

}  // namespace demo
