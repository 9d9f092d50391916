#pragma once
// The CUDA side of specdiff._core (built with SPECDIFF_PY_CUDA=ON): specdiff::gpu::accelerator composed as the host
// methods compose it (python/src/core.cpp: make_specdiff, make_forecast), behind a plain C++ interface so that the
// nanobind module stays a host-compiled .cpp and only device.cu goes through nvcc. Pointers are device pointers
// (torch CUDA tensors' data); every call enqueues on the accelerator's stream (torch's current stream, handed over
// as an integer) and none synchronises but check_status().
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <specdiff/common.hpp>

namespace specdiff_python {

using specdiff::index_t;

class device_method {
 public:
  virtual ~device_method() = default;
  virtual void begin_speculation(std::span<const float> timesteps) = 0;          // host values
  virtual void record_speculation(index_t step, const float* attention, index_t n) = 0;
  virtual index_t plan_step(index_t k, float t) = 0;                             // the step's compute count
  virtual bool dense() const = 0;
  virtual const index_t* compute_tokens() const = 0;                             // device [batch][count]
  // compact[r] = full[the r-th planned row]: the C1 rows of an input, gpu::gather_rows over the planned step.
  virtual void gather_rows(const float* full, index_t full_rows, float* compact, index_t compact_rows, index_t cols) = 0;
  virtual void complete_step(const float* computed, index_t computed_rows, float* output, index_t output_rows, index_t cols,
                             const float* attention, index_t attention_size) = 0;
  virtual void complete_step_in_place(float* output, index_t rows, index_t cols, const float* attention, index_t attention_size) = 0;
  virtual void abandon() = 0;
  virtual void reset() = 0;
  virtual void check_status() const = 0;   // synchronises the stream: a checkpoint, not a step
  virtual void set_stream(std::uintptr_t stream) = 0;
  virtual std::uintptr_t stream() const = 0;
  virtual bool reads_attention() const = 0;
  virtual bool speculates() const = 0;
  virtual index_t next_step() const = 0;
  virtual index_t tokens() const = 0;
  virtual index_t batch() const = 0;
  virtual index_t steps() const = 0;
  virtual index_t feature_dim() const = 0;
  virtual std::size_t memory_bytes() const = 0;
  virtual int device() const = 0;  // the CUDA device current at construction, where the memory lives
};

/// The number of CUDA devices the runtime sees (0 without a driver or a device; never throws).
int device_count() noexcept;

/// SpecDiff (fixed cache rate): specdiff_scorer, gpu::self_speculation (or none when spec_steps = 0),
/// gpu::three_level_classifier, step_schedule, C3 'specdiff' / 'latest' / 'taylor'.
std::unique_ptr<device_method> make_device_specdiff(int tokens, int batch, int steps, int feature_dim, bool share_cfg_plan, double cache_rate,
                                                    int spec_steps, double reuse_mass, int warmup_steps, int refresh_interval,
                                                    const std::vector<int>& dense_steps, float starvation_scale, const std::string& c3,
                                                    std::uintptr_t stream);
/// The output forecast: uniform_scorer, no speculation, gpu::all_approximate_classifier, step_schedule{warmup, interval},
/// C3 'taylor' (order 1 or 2) / 'latest'.
std::unique_ptr<device_method> make_device_forecast(int tokens, int batch, int steps, int feature_dim, int interval, int warmup_steps,
                                                    const std::string& c3, int order, bool step_variable, std::uintptr_t stream);

}  // namespace specdiff_python
