#include "demo/timing.hpp"

#include <algorithm>
#include <stdexcept>

#include "sd3/errors.hpp"

namespace demo {

double median(std::span<const double> values) {
  if (values.empty()) throw std::invalid_argument("median: no values");
  std::vector<double> v(values.begin(), values.end());
  std::sort(v.begin(), v.end());
  const std::size_t mid = v.size() / 2;
  return v.size() % 2 ? v[mid] : 0.5 * (v[mid - 1] + v[mid]);
}

spread spread_of(std::span<const double> values) {
  if (values.empty()) throw std::invalid_argument("spread_of: no values");
  const auto [lo, hi] = std::minmax_element(values.begin(), values.end());
  return {*lo, *hi};
}

spread timed_comparison::speedup_spread() const {
  std::vector<double> ratios;
  for (std::size_t k = 0; k < full_seconds.size() && k < method_seconds.size(); ++k) ratios.push_back(full_seconds[k] / method_seconds[k]);
  return spread_of(ratios);
}

timed_comparison time_against_full(const methods::problem& p, const method_spec& method, const timing_options& options,
                                   const progress_factory& progress) {
  if (options.repeats < 1) throw std::invalid_argument(sd3::message("repeats: must be >= 1, got ", options.repeats));
  const method_spec full_spec{.name = "full"};
  const std::string full_label = "full RFlow", method_label = method.describe();
  const auto bar = [&](const std::string& label) { return progress ? progress(label) : methods::progress_fn{}; };
  const auto run_one = [&](const methods::problem& problem, const method_spec& spec, const methods::progress_fn& bar_fn) {
    return options.run ? options.run(problem, spec, bar_fn) : demo::run_method(problem, spec, bar_fn);
  };

  // Warm-up, untimed: the first run in a process pays for what later runs find ready (heap and stack pages
  // first touched, cold caches and branch predictors), and a method's first run may pay for its own buffers'
  // first touch; it would otherwise land on whichever of the two is timed first.
  timed_comparison c;
  if (options.warm_up_full) c.full = run_one(p, full_spec, bar(full_label + " (warm-up)"));
  c.method = run_one(p, method, bar(method_label + " (warm-up)"));

  // Timed pairs, alternating which runs first: F M, M F, F M, ... Each pair runs back to back, so its ratio
  // compares the two under the same machine state; over every two pairs (F M M F) both have the same mean
  // position, so a steady drift of the machine's speed (another job starting, the clock ramping) cancels in
  // the medians, and neither always runs right after the other (and after its cache footprint). With an odd
  // count full runs first once more often than the method: the warm-up has already absorbed first-run costs.
  const auto repeats = static_cast<std::size_t>(options.repeats);
  const auto label = [&](const std::string& name, std::size_t k) { return sd3::message(name, " ", k + 1, "/", repeats); };
  for (std::size_t k = 0; k < repeats; ++k) {
    const auto time_full = [&] {
      c.full = run_one(p, full_spec, bar(label(full_label, k)));
      c.full_seconds.push_back(c.full.seconds);
    };
    const auto time_method = [&] {
      c.method = run_one(p, method, bar(label(method_label, k)));
      c.method_seconds.push_back(c.method.seconds);
      c.method_overhead_shares.push_back(c.method.overhead_seconds / c.method.seconds);
      c.method_speculative_shares.push_back(c.method.speculative_seconds / c.method.seconds);
    };
    if (k % 2 == 0) {
      time_full();
      time_method();
    } else {
      time_method();
      time_full();
    }
  }
  return c;
}

}  // namespace demo
