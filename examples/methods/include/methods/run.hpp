// A sampling problem (the same noise and conditioning for every method) and what a run reports.
#pragma once

#include <chrono>
#include <functional>
#include <span>
#include <vector>

#include "sd3/sampler.hpp"
#include "sd3/transformer.hpp"

namespace methods {

/// One batch of class-conditional samples: the engine, the noise and conditioning (diffusers' names), the
/// sampler settings. Every method run on the same problem starts from the same latents.
struct problem {
  sd3::transformer* net = nullptr;
  sd3::cfg_inputs inputs;
  int steps = 28;
  float guidance = 4.f;
  sd3::schedule_rule schedule;  ///< the model's (scheduler_config.json)
};

/// What a run reports. `seconds` is the wall time of sampling (a speculative pass included; the caches are
/// allocated before the clock starts); `flops` the model FLOPs executed (2 per multiply-add);
/// `overhead_seconds` the time spent in scoring, classifying and cache operations (stores, fills, gathers)
/// — what a method adds on top of the network it runs.
struct run_result {
  std::vector<float> latents;  ///< final latents [samples, channels, height, width]
  double seconds = 0;
  double speculative_seconds = 0;  ///< SpecDiff: wall time of its speculative pass, inside `seconds` (0 for the others)
  double flops = 0;
  double overhead_seconds = 0;
  int model_calls = 0;
  std::vector<float> speculative_latents;  ///< SpecDiff: where its speculative pass ended (for checks)
  /// Token-level methods: the free verification of each partial step that computed rows (the batch's mean
  /// relative error of the C3 rule on them, specdiff::accelerator::verified_error), and the dense steps of the
  /// main pass.
  std::vector<float> verified_errors;
  int dense_steps = 0;
};

/// Observes progress: (model calls done, model calls planned).
using progress_fn = std::function<void(int done, int total)>;

/// Accumulates wall time of scoped regions.
class stopwatch {
 public:
  class scope {
   public:
    explicit scope(double& total) : total_(total), start_(std::chrono::steady_clock::now()) {}
    ~scope() { total_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count(); }
    scope(const scope&) = delete;
    scope& operator=(const scope&) = delete;

   private:
    double& total_;
    std::chrono::steady_clock::time_point start_;
  };
};

inline double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

/// Image tokens per sample: the latent's patch grid.
inline int image_tokens(const problem& p) { return p.net->image_tokens(p.inputs.height, p.inputs.width); }

/// The model batch of a problem: [uncond; cond] when guidance > 1.
inline int model_batch(const problem& p) { return p.guidance > 1.f ? 2 * p.inputs.batch : p.inputs.batch; }

}  // namespace methods
