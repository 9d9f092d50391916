#include <chrono>

#include "methods/flops.hpp"
#include "methods/methods.hpp"

namespace methods {

run_result run_steps(const problem& p, int steps, const progress_fn& progress) {
  if (steps < 1) throw std::invalid_argument("steps: must be >= 1, got " + std::to_string(steps));
  const sd3::flow_match_euler scheduler = p.schedule(steps);
  const auto start = std::chrono::steady_clock::now();
  const sd3::transformer& c = *p.net;
  const int tokens = image_tokens(p);
  run_result r;
  r.latents = sd3::sample_cfg(*p.net, scheduler, p.inputs, p.guidance, {}, [&](int step, float, std::span<const float>) {
    ++r.model_calls;
    if (progress) progress(step + 1, steps);
  });
  r.flops = static_cast<double>(steps) * model_batch(p) * full_forward_flops(c, tokens, p.inputs.context_tokens);
  r.seconds = seconds_since(start);
  return r;
}

run_result run_full(const problem& p, const progress_fn& progress) { return run_steps(p, p.steps, progress); }

}  // namespace methods
