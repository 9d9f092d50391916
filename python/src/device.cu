// specdiff._core's device accelerators (python/src/device.hpp): specdiff::gpu::accelerator over caller (torch) device
// memory, composed as the host methods are (python/src/core.cpp), on the caller's stream. Compiled by nvcc only when
// the package is built with SPECDIFF_PY_CUDA=ON.
#include "device.hpp"
#include "dense_steps.hpp"

#include <cuda_runtime.h>

#include <optional>
#include <stdexcept>
#include <utility>

#include <specdiff/cuda/specdiff.cuh>
#include <specdiff/specdiff.hpp>

namespace specdiff_python {
namespace {

namespace gpu = specdiff::gpu;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// The accelerator's memory: one cudaMalloc at construction (the library never allocates), freed at destruction.
struct device_memory {
  explicit device_memory(std::size_t bytes) : bytes(bytes) { check(cudaMalloc(&data, bytes == 0 ? 1 : bytes), "cudaMalloc (the accelerator's memory)"); }
  ~device_memory() { cudaFree(data); }
  device_memory(const device_memory&) = delete;
  device_memory& operator=(const device_memory&) = delete;
  void* data = nullptr;
  std::size_t bytes = 0;
};

int current_device() {
  int d = 0;
  check(cudaGetDevice(&d), "cudaGetDevice");
  return d;
}

template <class Acc>
class method_of final : public device_method {
 public:
  template <class Classifier, class Scorer, class Predictor, class Schedule, class Approx>
  method_of(bool step_tags, const specdiff::accelerator_config& config, Scorer scorer, Predictor predictor, Classifier classifier, Schedule schedule,
            Approx approx, std::uintptr_t stream)
      : device_(current_device()),
        memory_(Acc::memory_bytes(config, classifier, schedule)),
        acc_(config, std::move(scorer), std::move(predictor), std::move(classifier), std::move(schedule), memory_.data, memory_.bytes,
             reinterpret_cast<cudaStream_t>(stream), approx),
        step_tags_(step_tags) {}

  void begin_speculation(std::span<const float> timesteps) override { acc_.begin_speculation(timesteps); }
  void record_speculation(index_t step, const float* attention, index_t n) override {
    if constexpr (requires { acc_.record_speculation(step, gpu::device_span<const float>(attention, n)); })
      acc_.record_speculation(step, gpu::device_span<const float>(attention, n));
    else
      throw std::logic_error("record_speculation: this method has no speculative pass");
  }
  index_t plan_step(index_t k, float t) override {
    if (step_) throw std::logic_error("plan_step: step " + std::to_string(step_->index()) + " is planned and not completed; complete_step it first");
    step_.emplace(acc_.plan_step(k, step_tags_ ? static_cast<float>(acc_.config().steps - k) : t));
    return step_->compute_count();
  }
  bool dense() const override { return live().dense(); }
  const index_t* compute_tokens() const override { return live().compute_tokens().data; }
  void gather_rows(const float* full, index_t full_rows, float* compact, index_t compact_rows, index_t cols) override {
    gpu::gather_rows(gpu::device_matrix<const float>(full, full_rows, cols), live().compute_rows(), gpu::device_matrix<float>(compact, compact_rows, cols),
                     acc_.stream());
  }
  void complete_step(const float* computed, index_t computed_rows, float* output, index_t output_rows, index_t cols, const float* attention,
                     index_t attention_size) override {
    live();
    acc_.complete_step(std::move(*step_), gpu::device_matrix<const float>(computed, computed_rows, cols), gpu::device_matrix<float>(output, output_rows, cols),
                       gpu::device_span<const float>(attention, attention_size));
    step_.reset();
  }
  void complete_step_in_place(float* output, index_t rows, index_t cols, const float* attention, index_t attention_size) override {
    live();
    acc_.complete_step(std::move(*step_), gpu::device_matrix<float>(output, rows, cols), gpu::device_span<const float>(attention, attention_size));
    step_.reset();
  }
  void abandon() override { step_.reset(); }
  void reset() override {
    step_.reset();
    acc_.reset();
  }
  void check_status() const override { acc_.check_status(); }
  void set_stream(std::uintptr_t stream) override { acc_.set_stream(reinterpret_cast<cudaStream_t>(stream)); }
  std::uintptr_t stream() const override { return reinterpret_cast<std::uintptr_t>(acc_.stream()); }
  bool reads_attention() const override { return specdiff::has(Acc::scorer_type::needs, specdiff::signal::attention); }
  bool speculates() const override { return !std::is_same_v<typename Acc::predictor_type, gpu::no_speculation>; }
  index_t next_step() const override { return acc_.next_step(); }
  index_t tokens() const override { return acc_.config().tokens; }
  index_t batch() const override { return acc_.config().batch; }
  index_t steps() const override { return acc_.config().steps; }
  index_t feature_dim() const override { return acc_.config().feature_dim; }
  std::size_t memory_bytes() const override { return memory_.bytes; }
  int device() const override { return device_; }

 private:
  const typename Acc::step& live() const {
    if (!step_) throw std::logic_error("no step is planned: call plan_step first");
    return *step_;
  }
  int device_;
  device_memory memory_;
  Acc acc_;
  std::optional<typename Acc::step> step_;
  bool step_tags_;
};

template <class Scorer, class Predictor, class Classifier, class Schedule, class Approx>
std::unique_ptr<device_method> make(bool step_tags, const specdiff::accelerator_config& c, Scorer s, Predictor p, Classifier cl, Schedule sch, Approx a,
                                    std::uintptr_t stream) {
  using acc = gpu::accelerator<Scorer, Predictor, Classifier, Schedule, Approx>;
  return std::make_unique<method_of<acc>>(step_tags, c, std::move(s), std::move(p), std::move(cl), std::move(sch), a, stream);
}

template <class Run>
std::unique_ptr<device_method> with_c3(const std::string& c3, Run&& run) {
  if (c3 == "specdiff") return run(specdiff::specdiff_weighted{});
  if (c3 == "latest") return run(specdiff::latest{});
  if (c3 == "taylor" || c3 == "linear") return run(specdiff::linear{});
  throw std::invalid_argument("c3: '" + c3 + "' is not a C3 rule of the device build; allowed: specdiff, latest, taylor (learned weights: CPU only)");
}

}  // namespace

int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver / no device" error
    return 0;
  }
  return n;
}

std::unique_ptr<device_method> make_device_specdiff(int tokens, int batch, int steps, int feature_dim, bool share_cfg_plan, double cache_rate,
                                                    int spec_steps, double reuse_mass, int warmup_steps, int refresh_interval,
                                                    const std::vector<int>& dense_steps, float starvation_scale, const std::string& c3,
                                                    std::uintptr_t stream) {
  const specdiff::accelerator_config config{.tokens = tokens, .batch = batch, .steps = steps, .feature_dim = feature_dim, .share_cfg_plan = share_cfg_plan};
  const specdiff::step_schedule schedule{warmup_steps, refresh_interval, spec_steps, within(dense_steps, steps)};
  gpu::three_level_classifier<> classifier(tokens, config.plans(), cache_rate, reuse_mass);  // sizes CUB's workspace: needs a device
  return with_c3(c3, [&](auto approx) {
    if (spec_steps <= 0)
      return make(false, config, specdiff::specdiff_scorer{starvation_scale}, gpu::no_speculation{}, classifier, schedule, approx, stream);
    return make(false, config, specdiff::specdiff_scorer{starvation_scale}, gpu::self_speculation{}, classifier, schedule, approx, stream);
  });
}

std::unique_ptr<device_method> make_device_forecast(int tokens, int batch, int steps, int feature_dim, int interval, int warmup_steps,
                                                    const std::string& c3, int order, bool step_variable, std::uintptr_t stream) {
  if (interval < 1) throw std::invalid_argument("interval: must be >= 1, got " + std::to_string(interval));
  if (warmup_steps < 1) throw std::invalid_argument("warmup_steps: must be >= 1, got " + std::to_string(warmup_steps));
  if (order < 1 || order > 2) throw std::invalid_argument("order: must be 1 or 2, got " + std::to_string(order));
  const specdiff::accelerator_config config{.tokens = tokens, .batch = batch, .steps = steps, .feature_dim = feature_dim};
  const specdiff::step_schedule schedule{warmup_steps, interval, 0, {}};
  const bool linear = c3 == "taylor" || c3 == "linear";
  const gpu::all_approximate_classifier classifier(tokens, config.plans());
  if (linear && order == 2)
    return make(step_variable, config, specdiff::uniform_scorer{}, gpu::no_speculation{}, classifier, schedule, specdiff::taylorseer<2>{}, stream);
  if (c3 != "taylor" && c3 != "linear" && c3 != "latest")
    throw std::invalid_argument("c3: '" + c3 + "' is not a forecast rule of the device build; allowed: taylor, latest (learned weights: CPU only)");
  return with_c3(c3, [&](auto approx) {
    return make(linear && step_variable, config, specdiff::uniform_scorer{}, gpu::no_speculation{}, classifier, schedule, approx, stream);
  });
}

}  // namespace specdiff_python
