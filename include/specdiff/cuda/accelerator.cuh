// gpu::accelerator: the host accelerator's protocol and policies (accelerator.hpp) over device memory.
//
//   acc.begin_speculation(ts); for each speculative step s: engine runs all tokens -> acc.record_speculation(s, attn)
//   for each main step k (0, 1, ... in order, timesteps strictly falling):
//     auto step = acc.plan_step(k, t);        // enqueues score -> classify; step.compute_rows() = what to run
//     engine gathers step.compute_rows() of its input and runs them, on acc.stream()
//     acc.complete_step(std::move(step), computed_rows, output, attention);  // enqueues fills, caching, staleness
//
// The same protocol type, the same checks and messages, and the same plans as the host accelerator on the
// same inputs; what differs is where the work happens. Every call checks its arguments and the protocol on
// the host, then only enqueues stream-ordered work on the accelerator's stream: no allocation after
// construction, no synchronisation, no read of device data on the host. So a step (or a whole run, reset()
// included) captures into a CUDA graph. What the host decides stays on the host because it is host-known:
// the step index and timestep, dense or partial (the schedule), |C1| (static), which speculative record is
// the nearest future (the timesteps). What depends on device data (the C2/C3 split, and bad values that the
// host accelerator would refuse) stays on the device: counts live in the plan, bad values raise status bits
// (read_status(), which synchronises: a checkpoint's call, not a step's).
//
// Memory is the caller's, as for every device model: memory_bytes(config, classifier, schedule) says how
// much (the cache store, the plans, the classifier's workspace, the per-token signals and the speculative
// records, each 256-byte aligned), and the constructor lays everything out in it.
//
// Rows in and out (computed, output, the module-level cache_rows/fill) are of the Row type: float by
// default, or an engine's __half / __nv_bfloat16 tensors (rows.cuh), whatever the store keeps. The store
// converts each element through float; signals (attention, scores, metric) stay float.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "../accelerator.hpp"
#include "../approximators.hpp"
#include "../common.hpp"
#include "../concepts.hpp"
#include "../predictors.hpp"
#include "../schedules.hpp"
#include "cache_store.cuh"
#include "classifier.cuh"
#include "error.cuh"
#include "gather.cuh"
#include "plan.cuh"
#include "rows.cuh"
#include "scorers.cuh"
#include "status.cuh"
#include "views.cuh"

namespace specdiff::gpu {

// One vocabulary for both accelerators: the sizes and the "no attention this step" tag are the host's types.
using specdiff::accelerator_config;
using specdiff::attention_unchanged;
using specdiff::attention_unchanged_t;

// --- device policies ------------------------------------------------------------------------------------

/// A device classifier: plans for batch() samples of tokens() tokens into a device plan, `compute_count()`
/// of them in C1 for every sample (static, as the host contract requires), with a workspace of
/// workspace_bytes() (CUB's two-phase convention: classify with a null workspace sets the size).
template <class C>
concept device_level_classifier = requires(const C& c, void* workspace, std::size_t& bytes, device_span<const float> log_score,
                                           const device_plan_view& plan, cudaStream_t stream) {
  { c.tokens() } -> std::convertible_to<index_t>;
  { c.batch() } -> std::convertible_to<index_t>;
  { c.compute_count() } -> std::convertible_to<index_t>;
  { c.workspace_bytes() } -> std::convertible_to<std::size_t>;
  c.classify(workspace, bytes, log_score, plan, stream);
};

/// Every token at one level (the host's uniform_level_classifier): dense-only runs, FORA's all-reuse,
/// TaylorSeer's all-approximate. Scores are not read; no workspace.
template <level Level>
class uniform_level_classifier {
 public:
  uniform_level_classifier(index_t tokens, index_t batch) : tokens_(tokens), batch_(batch) {
    if (tokens <= 0) detail::fail("tokens: must be positive, got ", tokens);
    if (batch <= 0) detail::fail("batch: must be positive, got ", batch);
  }
  index_t tokens() const { return tokens_; }
  index_t batch() const { return batch_; }
  index_t compute_count() const { return Level == level::compute ? tokens_ : 0; }
  std::size_t workspace_bytes() const { return 0; }
  void classify(void* workspace, std::size_t& workspace_bytes, device_span<const float>, const device_plan_view& plan, cudaStream_t stream) const {
    if (workspace == nullptr) {
      workspace_bytes = 0;
      return;
    }
    if (plan.batch != batch_ || plan.tokens != tokens_)
      detail::fail("plan: built for ", plan.batch, " x ", plan.tokens, " tokens, classifier for ", batch_, " x ", tokens_);
    fill_plan(plan, Level, stream);
  }

 private:
  index_t tokens_;
  index_t batch_;
};

using all_compute_classifier = uniform_level_classifier<level::compute>;
using all_reuse_classifier = uniform_level_classifier<level::reuse>;
using all_approximate_classifier = uniform_level_classifier<level::approximate>;

static_assert(device_level_classifier<three_level_classifier<>> && device_level_classifier<all_reuse_classifier>);

/// A device speculative predictor. The accelerator sizes it (`memory_bytes(values, capacity)`: `values` =
/// batch * tokens scores per record, at most `capacity` records = the schedule's speculative_steps()) and
/// hands it its share of the memory (`attach`, at construction). `record` copies a device record on the
/// stream; `future(t)` picks a record on the host and returns where it lives, so nothing synchronises.
template <class P>
concept device_speculative_predictor = requires(P& p, const P& cp, void* memory, index_t n, std::span<const float> timesteps,
                                                device_span<const float> scores, float t, cudaStream_t stream) {
  { P::memory_bytes(n, n) } -> std::convertible_to<std::size_t>;
  p.attach(memory, n, n, stream);
  p.begin(timesteps);
  p.record(n, scores, stream);
  { cp.ready() } -> std::convertible_to<bool>;
  { cp.future(t) } -> std::convertible_to<device_span<const float>>;
  p.clear();
};

namespace detail {

template <int BlockThreads>
__global__ void __launch_bounds__(BlockThreads) fill_value_kernel(float* out, index_t n, float value) {
  for (index_t i = blockIdx.x * BlockThreads + threadIdx.x; i < n; i += gridDim.x * BlockThreads) out[i] = value;
}

inline void fill_value(float* out, index_t n, float value, cudaStream_t stream) {
  if (n <= 0) return;
  fill_value_kernel<256><<<blocks_for(static_cast<std::size_t>(n), 256), 256, 0, stream>>>(out, n, value);
  SPECDIFF_CUDA_CHECK_LAUNCH("fill_value_kernel");
}

}  // namespace detail

/// Self-speculation on the device: the records ([record][sample][token] floats) in device memory, the
/// timesteps and the bookkeeping on the host, and the host predictor's rules (the same timestep checks, the
/// same nearest-future record: specdiff::detail::nearest_future_record).
class self_speculation {
 public:
  static std::size_t memory_bytes(index_t values, index_t capacity) {
    return specdiff::detail::checked_product<std::size_t>("values * capacity * sizeof(float)", values, capacity, sizeof(float));
  }

  /// Called by the accelerator at construction: records for `capacity` steps of `values` scores at `memory`.
  /// Reserves the host bookkeeping, so begin() does not allocate.
  void attach(void* memory, index_t values, index_t capacity, cudaStream_t) {
    if (values <= 0) detail::fail("values: must be positive, got ", values);
    if (capacity < 0) detail::fail("capacity: must be >= 0, got ", capacity);
    records_ = static_cast<float*>(memory);
    values_ = values;
    capacity_ = capacity;
    timesteps_.reserve(static_cast<std::size_t>(capacity));
    recorded_.assign(static_cast<std::size_t>(capacity), 0);
    clear();
  }

  /// Starts a pass over `timesteps` (strictly falling, at most the capacity). Records of an earlier pass are dropped.
  void begin(std::span<const float> timesteps) {
    if (values_ == 0) specdiff::detail::fail_logic("begin: the predictor was not prepared (the accelerator prepares it)");
    specdiff::detail::expect_speculative_timesteps(timesteps);
    if (timesteps.size() > static_cast<std::size_t>(capacity_))
      detail::fail("timesteps: ", timesteps.size(), " speculative steps, the device records were sized for ", capacity_,
                   " (the schedule's speculative_steps())");
    timesteps_.assign(timesteps.begin(), timesteps.end());  // within the reserved capacity: no allocation
    std::fill(recorded_.begin(), recorded_.end(), char{0});
  }

  /// Copies `scores` (device, batch * tokens values) into record `step`, on `stream`.
  void record(index_t step, device_span<const float> scores, cudaStream_t stream) {
    if (timesteps_.empty()) specdiff::detail::fail_logic("record: the speculative pass was not begun (call begin_speculation(timesteps) first)");
    specdiff::detail::expect_index("step", step, static_cast<index_t>(timesteps_.size()));
    if (recorded_[static_cast<std::size_t>(step)]) specdiff::detail::fail_logic("record: speculative step ", step, " was already recorded");
    detail::expect_span("scores", scores, values_);
    SPECDIFF_CUDA_CHECK(cudaMemcpyAsync(records_ + static_cast<std::ptrdiff_t>(step) * values_, scores.data,
                                        static_cast<std::size_t>(values_) * sizeof(float), cudaMemcpyDeviceToDevice, stream));
    recorded_[static_cast<std::size_t>(step)] = 1;
  }

  bool ready() const {
    if (timesteps_.empty()) return false;
    return std::all_of(recorded_.begin(), recorded_.begin() + static_cast<std::ptrdiff_t>(timesteps_.size()), [](char r) { return r != 0; });
  }

  /// Index of the record future(t) answers with (host-known: no device read).
  index_t nearest_future(float t) const {
    if (timesteps_.empty()) specdiff::detail::fail_logic("future: the speculative pass was not begun");
    return specdiff::detail::nearest_future_record(timesteps_, t);
  }

  device_span<const float> future(float t) const {
    const index_t i = nearest_future(t);
    if (!recorded_[static_cast<std::size_t>(i)])
      specdiff::detail::fail_logic("future: speculative step ", i, " (t = ", timesteps_[static_cast<std::size_t>(i)], ") was never recorded");
    return {records_ + static_cast<std::ptrdiff_t>(i) * values_, values_};
  }

  std::span<const float> timesteps() const { return timesteps_; }
  index_t capacity() const { return capacity_; }

  /// Forgets the pass (a new image); keeps the memory.
  void clear() {
    timesteps_.clear();
    std::fill(recorded_.begin(), recorded_.end(), char{0});
  }

 private:
  float* records_ = nullptr;
  index_t values_ = 0;
  index_t capacity_ = 0;
  std::vector<float> timesteps_;
  std::vector<char> recorded_;
};

/// No speculation: every future score is 1 (log 1 = 0), a device array of ones written at construction.
class no_speculation {
 public:
  static std::size_t memory_bytes(index_t values, index_t) {
    return specdiff::detail::checked_product<std::size_t>("values * sizeof(float)", values, sizeof(float));
  }
  void attach(void* memory, index_t values, index_t, cudaStream_t stream) {
    if (values <= 0) detail::fail("values: must be positive, got ", values);
    ones_ = static_cast<float*>(memory);
    values_ = values;
    detail::fill_value(ones_, values_, 1.f, stream);
  }
  void begin(std::span<const float>) {}
  void record(index_t, device_span<const float>, cudaStream_t) {}
  bool ready() const { return true; }
  device_span<const float> future(float) const { return {ones_, values_}; }
  void clear() {}

 private:
  float* ones_ = nullptr;
  index_t values_ = 0;
};

static_assert(device_speculative_predictor<self_speculation> && device_speculative_predictor<no_speculation>);

// --- row sets of the accelerator's plans ------------------------------------------------------------------

/// One level of the accelerator's plans, over every sample of the batch: sample b reads plan b % plans (with
/// share_cfg_plan, samples b and b + batch / 2 share one), and its token i is row b * tokens + i of a full
/// matrix. The count is read on the device; `cap` bounds it (C1: the step's compute count; C2/C3: tokens).
struct batch_plan_rows {
  device_plan_view plan;  ///< plans x tokens
  level lvl = level::compute;
  index_t cap = 0;
  index_t batch = 0;

  index_t samples() const { return batch; }
  index_t capacity() const { return cap; }
  index_t extent() const { return batch * plan.tokens; }
  void validate() const {
    if (plan.order == nullptr || plan.counts == nullptr) detail::fail("plan: null order or counts");
    if (plan.batch <= 0 || plan.tokens <= 0) detail::fail("plan: empty plan (", plan.batch, " x ", plan.tokens, ")");
    if (batch <= 0 || batch % plan.batch != 0) detail::fail("batch: ", batch, " samples cannot share ", plan.batch, " plans");
    if (cap < 0 || cap > plan.tokens) detail::fail("capacity: must lie in [0, ", plan.tokens, "], got ", cap);
    if (static_cast<unsigned>(lvl) >= static_cast<unsigned>(level_count)) detail::fail("level: ", static_cast<unsigned>(lvl), " is not a level");
  }
#if defined(__CUDACC__)
  __device__ index_t size(index_t b) const { return plan.count(b % plan.batch, lvl); }
  __device__ index_t row(index_t b, index_t r) const {
    const index_t p = b % plan.batch;
    const index_t at = plan.begin(p, lvl) + r;
    if (at < 0 || at >= plan.tokens) return -1;  // corrupt counts: report, never read past the segment
    return b * plan.tokens + plan.order[static_cast<std::ptrdiff_t>(p) * plan.tokens + at];
  }
#endif
};

namespace detail {

/// Per-sample values (batch * tokens) -> per-plan values (plans * tokens): a copy, or with a shared CFG plan
/// the pair's mean, rounded as the host's 0.5f * (a + b) (no contraction: the product is of the sum).
template <int BlockThreads>
__global__ void __launch_bounds__(BlockThreads) merge_kernel(const float* per_sample, float* per_plan, index_t n, bool share) {
  for (index_t i = blockIdx.x * BlockThreads + threadIdx.x; i < n; i += gridDim.x * BlockThreads)
    per_plan[i] = share ? __fmul_rn(0.5f, __fadd_rn(per_sample[i], per_sample[i + n])) : per_sample[i];
}

/// The step's C1 lists from the plans: every sample's token ids [sample][count] and its rows of the full
/// matrix. C1 is the first segment of a plan, so sample b's r-th C1 token is order[p][r] (p = b % plans).
/// A classifier that put another count in C1 than it promised raises status_count_over_capacity (the host
/// accelerator throws logic_error there).
template <int BlockThreads>
__global__ void __launch_bounds__(BlockThreads)
    compute_lists_kernel(device_plan_view plan, index_t batch, index_t count, index_t* tokens_out, index_t* rows_out) {
  const index_t stride = gridDim.x * BlockThreads, first = blockIdx.x * BlockThreads + threadIdx.x;
  for (index_t q = first; q < plan.batch; q += stride)
    if (plan.counts[q * level_count] != count) raise_status(plan.status, status_count_over_capacity);
  const index_t total = batch * count;
  for (index_t i = first; i < total; i += stride) {
    const index_t b = i / count, r = i - b * count, p = b % plan.batch;
    const index_t token = plan.order[static_cast<std::ptrdiff_t>(p) * plan.tokens + r];
    tokens_out[i] = token;
    rows_out[i] = b * plan.tokens + token;
  }
}

}  // namespace detail

// --- the accelerator --------------------------------------------------------------------------------------

template <importance_scorer Scorer, device_speculative_predictor Predictor, device_level_classifier Classifier, schedule Schedule,
          approximator Approx = specdiff_weighted, class Store = device_cache_store<float>, row_element Row = float>
class accelerator {
 public:
  using row_type = Row;
  using scorer_type = Scorer;
  using predictor_type = Predictor;
  using classifier_type = Classifier;
  using schedule_type = Schedule;
  using approximator_type = Approx;
  using store_type = Store;

  /// A planned main step: what the engine must compute, until complete_step consumes it. Move-only; one
  /// exists at a time per accelerator. Destroying it unconsumed abandons the step: the accelerator is as
  /// before plan_step if no rows were cached in it, and needs reset() otherwise. (The host accelerator's
  /// step, with device views for observers.)
  class step : public specdiff::detail::planned_step<accelerator> {
   public:
    /// Tokens computed per sample: the same for every sample (tokens on dense steps). Host-known.
    index_t compute_count() const { return this->live().compute_count_; }
    /// The device plan of sample b (one sample: counts, levels, C1 | C2 | C3 lists; CFG pairs share one).
    device_plan_view plan(index_t sample) const { return this->live().plan_of(sample); }
    /// Every sample's C1 token ids, [sample][compute_count()], each sample's ascending (device memory).
    device_span<const index_t> compute_tokens() const {
      const auto& a = this->live();
      return {a.compute_tokens_, a.config_.batch * a.compute_count_};
    }
    /// The same tokens as rows of a full batch*tokens matrix: the row set a token-subset forward gathers
    /// (gpu::gather_rows(x, step.compute_rows(), x_c1, acc.stream())), compact row r being the r-th listed.
    index_list compute_rows() const { return this->live().compute_list(); }
    /// One level's rows in every sample, for an engine's own kernels (counts on the device).
    batch_plan_rows rows(level l) const { return this->live().level_rows(l); }

   private:
    friend class accelerator;
    step(accelerator* owner, std::uint64_t generation, index_t index, float t, bool dense) noexcept
        : specdiff::detail::planned_step<accelerator>(owner, generation, index, t, dense) {}
  };
  friend class specdiff::detail::planned_step<accelerator>;  // checks its steps against this accelerator
  using step_base = specdiff::detail::planned_step<accelerator>;

  /// Device memory an accelerator of this configuration needs (256-byte aligned, as cudaMalloc returns).
  /// Checks everything the constructor checks about the sizes and policies; makes no CUDA call.
  static std::size_t memory_bytes(const accelerator_config& config, const Classifier& classifier, const Schedule& schedule) {
    expect_setup(config, classifier, schedule);
    return layout(config, classifier, schedule).total;
  }

  /// Lays the accelerator out in `memory` (memory_bytes(config, classifier, schedule) bytes, caller-owned,
  /// outliving the accelerator) and enqueues its initialisation on `stream`, the stream every later call
  /// enqueues on. All checks come first: an argument error throws before any CUDA call.
  accelerator(accelerator_config config, Scorer scorer, Predictor predictor, Classifier classifier, Schedule schedule, void* memory,
              std::size_t bytes, cudaStream_t stream, Approx approx = {})
      : config_((expect_setup(config, classifier, schedule), config)),
        scorer_(std::move(scorer)),
        predictor_(std::move(predictor)),
        classifier_(std::move(classifier)),
        schedule_(specdiff::detail::schedule_for_run(schedule, config_.steps)),
        approx_(approx),
        stream_(stream),
        offsets_(carve_checked(memory, bytes)),
        store_(store_shape(config_), at<void>(memory, offsets_.store), Store::memory_bytes(store_shape(config_)), stream),
        plans_(device_plan_view::carve(at<void>(memory, offsets_.plans), device_plan_view::bytes(config_.plans(), config_.tokens),
                                       config_.plans(), config_.tokens)),
        workspace_(at<void>(memory, offsets_.workspace)),
        his_(at<float>(memory, offsets_.his)),
        fut_(at<float>(memory, offsets_.fut)),
        cf_(at<float>(memory, offsets_.cf)),
        change_(at<float>(memory, offsets_.change)),
        metric_(at<float>(memory, offsets_.metric)),
        change_all_(at<float>(memory, offsets_.change_all)),
        scores_(at<float>(memory, offsets_.scores)),
        compute_tokens_(at<index_t>(memory, offsets_.compute_tokens)),
        compute_rows_(at<index_t>(memory, offsets_.compute_rows)),
        site_done_(static_cast<std::size_t>(config_.layers) * static_cast<std::size_t>(config_.sites), 0) {
    partial_count_ = classifier_.compute_count();
    predictor_.attach(at<void>(memory, offsets_.predictor), config_.rows(), speculative_capacity(config_, schedule_), stream_);
    clear_signals();
  }

  // Steps point back at their accelerator, so it stays where it was built.
  accelerator(const accelerator&) = delete;
  accelerator& operator=(const accelerator&) = delete;
  /// A live step is detached: its later calls throw, its destructor does nothing (no CUDA call).
  ~accelerator() { step_base::detach(live_step_, step_base::state::orphaned); }

  /// The stream every call enqueues on; the engine's forward between plan_step and complete_step must be
  /// ordered with it (run on it, or wait on an event recorded on it).
  cudaStream_t stream() const { return stream_; }
  /// Moves later work to another stream, between steps only (work already enqueued stays ordered on the
  /// old one: the caller orders the two streams, e.g. with an event).
  void set_stream(cudaStream_t stream) {
    if (planned_) specdiff::detail::fail_logic("set_stream: step ", next_step_, " is planned and not completed; complete_step it first");
    stream_ = stream;
  }

  // --- speculative pass -------------------------------------------------------------------------
  /// Starts the speculative pass of a new image, before main step 0 (see aligned_speculative_timesteps).
  /// At most the schedule's speculative_steps() timesteps; the first must be the main pass's first (checked at
  /// plan_step(0, t)). The host accelerator's checks and messages (specdiff::detail).
  void begin_speculation(std::span<const float> timesteps) {
    specdiff::detail::expect_before_main_pass("begin_speculation", next_step_, planned_);
    specdiff::detail::expect_speculative_count(timesteps.size(), schedule_.speculative_steps());
    predictor_.begin(timesteps);
  }
  /// `attention`: batch * tokens device values, the attention each image token received summed over layers.
  /// Before main step 0 only.
  void record_speculation(index_t step_index, device_span<const float> attention) {
    specdiff::detail::expect_before_main_pass("record_speculation", next_step_, planned_);
    predictor_.record(step_index, attention, stream_);
  }

  // --- main pass --------------------------------------------------------------------------------
  /// Plans main step `step_index` at timestep t: steps run 0, 1, ... in order with strictly falling
  /// timesteps. Enqueues scoring and classification (partial steps) or an all-C1 plan (dense steps), and
  /// the step's C1 lists. Returns the step to hand to complete_step.
  [[nodiscard]] step plan_step(index_t step_index, float t) {
    if (needs_reset_) specdiff::detail::fail_logic("plan_step: step ", next_step_, " was abandoned after rows were cached; reset() first");
    if (planned_) specdiff::detail::fail_logic("plan_step: step ", next_step_, " is planned and not completed; complete_step it first");
    specdiff::detail::expect_index("step", step_index, config_.steps);
    if (step_index != next_step_)
      specdiff::detail::fail_logic("plan_step: expected step ", next_step_, ", got ", step_index, " (steps run in order; reset() starts a new image)");
    if (!std::isfinite(t)) detail::fail("t: timestep is not finite (", t, ")");
    if (next_step_ > 0 && !(t < last_t_))
      detail::fail("t: timesteps must fall from step to step; step ", next_step_ - 1, " had t = ", last_t_, ", step ", step_index, " has t = ", t);
    if (next_step_ == 0) {
      if constexpr (requires { predictor_.timesteps(); }) specdiff::detail::expect_speculation_matches(predictor_.timesteps(), t);
    }
    const bool dense = next_step_ == 0 || schedule_.is_dense(step_index, config_.steps);
    if (dense) {
      fill_plan(plans_, level::compute, stream_);
    } else {
      classify_all(t);  // checks first, then enqueues; writes only scratch and plans
    }
    compute_count_ = dense ? config_.tokens : partial_count_;
    const index_t listed = config_.batch * compute_count_;
    detail::compute_lists_kernel<256><<<detail::blocks_for(static_cast<std::size_t>(std::max(listed, config_.plans())), 256), 256, 0, stream_>>>(
        plans_, config_.batch, compute_count_, compute_tokens_, compute_rows_);
    SPECDIFF_CUDA_CHECK_LAUNCH("compute_lists_kernel");
    std::ranges::fill(site_done_, char{0});
    rows_cached_ = false;
    planned_ = true;
    return step(this, ++generation_, step_index, t, dense);
  }

  /// Token level, compact rows: `computed` holds step.compute_count() rows per sample, sample b's i-th row
  /// being token step.compute_tokens()[b * compute_count + i] (what a token-subset forward returns; all
  /// tokens in order on dense steps). They are cached and copied into `output` (batch*tokens x feature_dim,
  /// sample b's token i at row b*tokens + i), whose C2 rows get their latest cached value and C3 rows the
  /// approximator's mix. `attention` (batch*tokens; may be empty when the scorer does not read it) becomes
  /// the next step's his.
  void complete_step(step&& s, device_matrix<const Row> computed, device_matrix<Row> output, device_span<const float> attention) {
    expect_own(s);
    expect_sites_done("complete_step", /*first_slot_pending=*/true);
    detail::expect_matrix("computed", computed,
                          specdiff::detail::checked_product<index_t>("batch * compute_count", config_.batch, compute_count_), config_.feature_dim);
    detail::expect_matrix("output", output, config_.rows(), config_.feature_dim);
    expect_attention(attention);
    const auto attention_extent = specdiff::detail::extent_of(attention.data, static_cast<std::size_t>(attention.size));
    specdiff::detail::expect_disjoint("computed", specdiff::detail::extent_of(computed), "output", specdiff::detail::extent_of(output));
    specdiff::detail::expect_disjoint("computed", specdiff::detail::extent_of(computed), "attention", attention_extent);
    specdiff::detail::expect_disjoint("output", specdiff::detail::extent_of(output), "attention", attention_extent);
    // Checked: from here on, only enqueues.
    fill_validated(s, 0, 0, output);
    scatter_rows(computed, compute_list(), output, stream_, plans_.status);
    cache_validated(s, 0, 0, computed);
    finish(s, attention);
  }

  /// Token level, rows in place: the engine wrote the C1 rows of every sample into `output` itself.
  void complete_step(step&& s, device_matrix<Row> output, device_span<const float> attention) {
    expect_own(s);
    expect_sites_done("complete_step", /*first_slot_pending=*/true);
    detail::expect_matrix("output", output, config_.rows(), config_.feature_dim);
    expect_attention(attention);
    specdiff::detail::expect_disjoint("output", specdiff::detail::extent_of(output), "attention",
                                      specdiff::detail::extent_of(attention.data, static_cast<std::size_t>(attention.size)));
    fill_validated(s, 0, 0, output);
    cache_in_place_validated(s, 0, 0, device_matrix<const Row>(output));
    finish(s, attention);
  }

  /// Module level: every (layer, site) was cached (or filled whole) during the step; takes the attention.
  void complete_step(step&& s, device_span<const float> attention) {
    expect_own(s);
    expect_sites_done("complete_step");
    expect_attention(attention);
    finish(s, attention);
  }
  /// Module level, with no attention measured this step: the scorer keeps the last step's.
  void complete_step(step&& s, attention_unchanged_t) {
    expect_own(s);
    expect_sites_done("complete_step");
    if (has(Scorer::needs, signal::attention) && !has_his_)
      specdiff::detail::fail_logic("complete_step: the scorer reads attention and none was ever given (attention_unchanged on the first step)");
    finish(s, {});
  }

  /// Caches the C1 rows of one (layer, site) from compact rows (layout as in complete_step).
  void cache_rows(const step& s, index_t layer, index_t site, device_matrix<const Row> computed) {
    expect_own(s);
    expect_site_open(layer, site);
    detail::expect_matrix("computed", computed, config_.batch * compute_count_, config_.feature_dim);
    cache_validated(s, layer, site, computed);
  }
  /// Caches the C1 rows of one (layer, site), read in place from a full batch*tokens matrix.
  void cache_rows_in_place(const step& s, index_t layer, index_t site, device_matrix<const Row> all) {
    expect_own(s);
    expect_site_open(layer, site);
    detail::expect_matrix("all", all, config_.rows(), config_.feature_dim);
    cache_in_place_validated(s, layer, site, all);
  }

  /// Fills the C2 rows (latest cached) and C3 rows (approximator) of one (layer, site) into a full
  /// batch*tokens matrix; C1 rows are left as they are. Nothing to do on dense steps.
  void fill(const step& s, index_t layer, index_t site, device_matrix<Row> out) {
    expect_own(s);
    specdiff::detail::expect_index("layer", layer, config_.layers);
    specdiff::detail::expect_index("site", site, config_.sites);
    detail::expect_matrix("out", out, config_.rows(), config_.feature_dim);
    fill_validated(s, layer, site, out);
  }

  /// Module level: on a partial step, a site computed for no token — every row comes from the cache, as
  /// level `as` (reuse: latest; approximate: the approximator). The site counts as done for the step.
  void fill_all(const step& s, index_t layer, index_t site, level as, device_matrix<Row> out) {
    expect_own(s);
    if (s.dense_) specdiff::detail::fail_logic("fill_all: step ", s.index_, " is dense; every site is computed and cached");
    expect_site_open(layer, site);
    detail::expect_matrix("out", out, config_.rows(), config_.feature_dim);
    if (as == level::compute) detail::fail("as: fill_all takes level::reuse or level::approximate, got compute");
    if (as == level::reuse) store_.fill(layer, site, s.t_, all_rows{config_.rows()}, out, stream_);
    else store_.fill(layer, site, s.t_, all_rows{config_.rows()}, approx_, out, stream_);
    site_done_[slot(layer, site)] = 1;
  }

  /// Module level: on a partial step, a site computed for no token whose rows the engine still holds as
  /// they were cached: nothing is copied. The site counts as done for the step.
  void reuse_in_place(const step& s, index_t layer, index_t site) {
    expect_own(s);
    if (s.dense_) specdiff::detail::fail_logic("reuse_in_place: step ", s.index_, " is dense; every site is computed and cached");
    expect_site_open(layer, site);
    site_done_[slot(layer, site)] = 1;
  }

  /// Sets the engine-defined per-token metric (batch*tokens device values) the next plan_step scores with.
  void set_metric(device_span<const float> metric) {
    detail::expect_span("metric", metric, config_.rows());
    merge(metric, metric_);
    has_metric_ = true;
  }

  /// Forgets everything (a new image): cached rows, staleness, attention and metric history, the
  /// speculative records, the step count, the status words; an outstanding step object becomes empty.
  /// Keeps the memory; enqueued, so it may be captured with the steps that follow.
  void reset() {
    store_.clear(stream_);
    clear_signals();
    predictor_.clear();
    has_his_ = has_metric_ = planned_ = rows_cached_ = needs_reset_ = false;
    next_step_ = 0;
    last_t_ = std::numeric_limits<float>::infinity();
    ++generation_;
    step_base::detach(live_step_, step_base::state::stale);
  }

  // --- observers ----------------------------------------------------------------------------------
  const accelerator_config& config() const { return config_; }
  index_t next_step() const { return next_step_; }
  float last_timestep() const { return last_t_; }
  /// |C1| per sample on partial steps (the classifier's count).
  index_t partial_compute_count() const { return partial_count_; }
  std::size_t memory_bytes() const { return offsets_.total; }
  const store_type& store() const { return store_; }
  /// Per plan, device values: cf and the attention history (his) the next partial step scores with.
  device_span<const float> cache_counts(index_t plan) const { return slice(cf_, plan); }
  device_span<const float> attention_history(index_t plan) const { return slice(his_, plan); }
  const Scorer& scorer() const { return scorer_; }
  const Predictor& predictor() const { return predictor_; }
  const Classifier& classifier() const { return classifier_; }
  const Schedule& step_schedule() const { return schedule_; }

  /// The status bits the classifier and the store raised since construction or reset() (status.cuh):
  /// where the host accelerator throws on bad data. Waits for the stream: for checkpoints, not steps.
  std::uint32_t read_status() const { return gpu::read_status(plans_.status, stream_) | store_.read_status(stream_); }
  /// Throws std::runtime_error naming the raised bits, if any (synchronises).
  void check_status() const { throw_if_status(read_status(), "gpu::accelerator"); }

 private:
  struct offsets {
    std::size_t store, plans, workspace, his, fut, cf, change, metric, change_all, scores, compute_tokens, compute_rows, predictor, total;
  };

  template <class T>
  static T* at(void* memory, std::size_t offset) {
    return detail::workspace_layout::at<T>(memory, offset);
  }

  static cache_shape store_shape(const accelerator_config& c) {
    return cache_shape{c.layers, c.sites, c.rows(), c.feature_dim, std::max<index_t>(Approx::depth, 2)};
  }
  // Records the predictor holds: the run's speculative steps (a schedule's defaults resolved for config.steps).
  static index_t speculative_capacity(const accelerator_config& config, const Schedule& schedule) {
    return static_cast<index_t>(specdiff::detail::schedule_for_run(schedule, config.steps).speculative_steps());
  }

  // The host accelerator's construction checks, and the device classifier matching the configuration.
  static void expect_setup(const accelerator_config& config, const Classifier& classifier, const Schedule& schedule) {
    config.validate();
    schedule.validate(config.steps);
    store_shape(config).validate();
    (void)device_plan_view::bytes(config.plans(), config.tokens);  // its own size limits
    if (classifier.tokens() != config.tokens || classifier.batch() != config.plans())
      detail::fail("classifier: built for ", classifier.batch(), " x ", classifier.tokens(), " tokens, the accelerator plans ", config.plans(),
                   " x ", config.tokens, config.share_cfg_plan ? " (batch / 2: CFG pairs share a plan)" : "");
    const index_t c1 = classifier.compute_count();
    if (c1 < 0 || c1 > config.tokens)
      detail::fail("classifier: compute_count() = ", c1, " is out of range [0, ", config.tokens, "]");
    if (speculative_capacity(config, schedule) < 0) detail::fail("speculative_steps: must be >= 0, got ", speculative_capacity(config, schedule));
    const Schedule run = specdiff::detail::schedule_for_run(schedule, config.steps);
    bool partial = false;
    for (index_t k = 1; k < config.steps && !partial; ++k) partial = !run.is_dense(k, config.steps);
    bool needs_records = true;  // a predictor that is ready before any pass (no_speculation) needs none
    if constexpr (std::is_default_constructible_v<Predictor>) needs_records = !Predictor{}.ready();
    specdiff::detail::expect_runnable(has(Scorer::needs, signal::future), run.speculative_steps(), !needs_records, partial);
  }

  static offsets layout(const accelerator_config& c, const Classifier& classifier, const Schedule& schedule) {
    const std::size_t per_plan = static_cast<std::size_t>(c.plans()) * static_cast<std::size_t>(c.tokens) * sizeof(float);
    const std::size_t rows = static_cast<std::size_t>(c.rows());
    detail::workspace_layout l;
    offsets o{};
    o.store = l.add(Store::memory_bytes(store_shape(c)));
    o.plans = l.add(device_plan_view::bytes(c.plans(), c.tokens));
    o.workspace = l.add(classifier.workspace_bytes());
    o.his = l.add(per_plan);
    o.fut = l.add(per_plan);
    o.cf = l.add(per_plan);
    o.change = l.add(per_plan);
    o.metric = l.add(per_plan);
    o.change_all = l.add(rows * sizeof(float));
    o.scores = l.add(per_plan);
    o.compute_tokens = l.add(rows * sizeof(index_t));
    o.compute_rows = l.add(rows * sizeof(index_t));
    o.predictor = l.add(Predictor::memory_bytes(c.rows(), speculative_capacity(c, schedule)));
    o.total = l.bytes();
    return o;
  }

  // The memory check, made in the initialiser list before any member touches the memory or the device.
  offsets carve_checked(void* memory, std::size_t bytes) const {
    const offsets o = layout(config_, classifier_, schedule_);
    detail::expect_memory("memory", memory, bytes, o.total);
    return o;
  }

  // Zero staleness, attention and metric history, and the plans' status word.
  void clear_signals() {
    const std::size_t per_plan = static_cast<std::size_t>(config_.plans()) * static_cast<std::size_t>(config_.tokens) * sizeof(float);
    SPECDIFF_CUDA_CHECK(cudaMemsetAsync(cf_, 0, per_plan, stream_));
    SPECDIFF_CUDA_CHECK(cudaMemsetAsync(his_, 0, per_plan, stream_));
    SPECDIFF_CUDA_CHECK(cudaMemsetAsync(metric_, 0, per_plan, stream_));
    SPECDIFF_CUDA_CHECK(cudaMemsetAsync(plans_.status, 0, sizeof(std::uint32_t), stream_));
  }

  index_t per_plan_values() const { return config_.plans() * config_.tokens; }
  index_t plan_index(index_t sample) const { return config_.share_cfg_plan ? sample % config_.plans() : sample; }
  device_plan_view plan_of(index_t sample) const {
    specdiff::detail::expect_index("sample", sample, config_.batch);
    const index_t p = plan_index(sample);
    device_plan_view v = plans_;
    v.order += static_cast<std::ptrdiff_t>(p) * config_.tokens;
    v.levels += static_cast<std::ptrdiff_t>(p) * config_.tokens;
    v.counts += static_cast<std::ptrdiff_t>(p) * level_count;
    v.batch = 1;
    return v;
  }
  device_span<const float> slice(const float* values, index_t plan) const {
    specdiff::detail::expect_index("plan", plan, config_.plans());
    return {values + static_cast<std::ptrdiff_t>(plan) * config_.tokens, config_.tokens};
  }
  std::size_t slot(index_t layer, index_t site) const {
    return static_cast<std::size_t>(layer) * static_cast<std::size_t>(config_.sites) + static_cast<std::size_t>(site);
  }
  index_list compute_list() const { return {compute_rows_, config_.batch * compute_count_, config_.rows()}; }
  batch_plan_rows level_rows(level l) const { return {plans_, l, l == level::compute ? compute_count_ : config_.tokens, config_.batch}; }

  // Per-sample values (batch*tokens) -> per-plan values; a shared CFG plan sees the pair's mean.
  void merge(device_span<const float> per_sample, float* per_plan) const {
    const index_t n = per_plan_values();
    detail::merge_kernel<256><<<detail::blocks_for(static_cast<std::size_t>(n), 256), 256, 0, stream_>>>(per_sample.data, per_plan, n,
                                                                                                        config_.share_cfg_plan);
    SPECDIFF_CUDA_CHECK_LAUNCH("merge_kernel");
  }

  void classify_all(float t) {
    // Every check before the first enqueue.
    device_span<const float> future;
    if constexpr (has(Scorer::needs, signal::future)) {
      if (!predictor_.ready()) specdiff::detail::fail_logic("plan_step: the scorer reads the speculative future and the speculative pass is not complete");
      future = predictor_.future(t);  // the host's choice of record: no device read
      detail::expect_span("future", future, config_.rows());
    }
    if constexpr (has(Scorer::needs, signal::metric))
      if (!has_metric_) specdiff::detail::fail_logic("plan_step: the scorer reads signal::metric and set_metric was not called");
    if constexpr (has(Scorer::needs, signal::future)) merge(future, fut_);
    if constexpr (has(Scorer::needs, signal::feature_change)) {  // the first slot's rows
      store_.change_norm(0, 0, {change_all_, config_.rows()}, stream_);
      merge({change_all_, config_.rows()}, change_);
    }
    const index_t n = per_plan_values();
    const device_score_inputs in{{his_, n}, {fut_, n}, {cf_, n}, {change_, n}, {metric_, n}};
    score(scorer_, in, {scores_, n}, stream_, plans_.status);  // a negative signal: status_negative_attention
    std::size_t bytes = classifier_.workspace_bytes();
    classifier_.classify(workspace_, bytes, {scores_, n}, plans_, stream_);
  }

  void expect_own(const step& s) const { s.expect_owned_by(this); }
  void expect_current(const specdiff::detail::planned_step<accelerator>& s) const {
    if (!planned_ || s.generation_ != generation_) specdiff::detail::fail_logic("step: step ", s.index_, " is stale (reset() was called since it was planned)");
  }
  void expect_attention(device_span<const float> attention) const {
    if (has(Scorer::needs, signal::attention) || attention.size != 0) detail::expect_span("attention", attention, config_.rows());
  }
  void expect_site_open(index_t layer, index_t site) const {
    specdiff::detail::expect_index("layer", layer, config_.layers);
    specdiff::detail::expect_index("site", site, config_.sites);
    if (site_done_[slot(layer, site)]) specdiff::detail::fail_logic("layer ", layer, " site ", site, ": already cached in step ", next_step_);
  }
  // Every (layer, site) cached or filled whole in this step — except slot (0, 0) when the token-level
  // complete_step is about to do it itself (it must then still be open).
  void expect_sites_done(const char* what, bool first_slot_pending = false) const {
    if (first_slot_pending && site_done_[0]) specdiff::detail::fail_logic(what, ": layer 0 site 0 was already cached in step ", next_step_);
    for (index_t l = 0; l < config_.layers; ++l)
      for (index_t s = 0; s < config_.sites; ++s)
        if (!site_done_[slot(l, s)] && !(first_slot_pending && l == 0 && s == 0))
          specdiff::detail::fail_logic(what, ": layer ", l, " site ", s, " was neither cached nor filled whole in step ", next_step_);
  }

  // Checked by the callers: these only enqueue.
  void fill_validated(const step& s, index_t layer, index_t site, device_matrix<Row> out) {
    if (s.dense_) return;
    store_.fill(layer, site, s.t_, level_rows(level::reuse), out, stream_);
    store_.fill(layer, site, s.t_, level_rows(level::approximate), approx_, out, stream_);
  }
  void cache_validated(const step& s, index_t layer, index_t site, device_matrix<const Row> computed) {
    if (s.dense_) store_.write(layer, site, s.t_, computed, stream_);  // every row, in order
    else store_.scatter(layer, site, s.t_, compute_list(), computed, stream_);
    site_done_[slot(layer, site)] = 1;
    rows_cached_ = true;
  }
  void cache_in_place_validated(const step& s, index_t layer, index_t site, device_matrix<const Row> all) {
    if (s.dense_) store_.write(layer, site, s.t_, all, stream_);
    else store_.write_rows(layer, site, s.t_, compute_list(), all, stream_);
    site_done_[slot(layer, site)] = 1;
    rows_cached_ = true;
  }
  void finish(step& s, device_span<const float> attention) {
    if (attention.size != 0) {
      merge(attention, his_);
      has_his_ = true;
    }
    advance_cache_counts(plans_, {cf_, per_plan_values()}, stream_);
    last_t_ = s.t_;
    ++next_step_;
    planned_ = false;
    (void)s;  // the live step (checked by the caller): detached, empty
    step_base::detach(live_step_, step_base::state::empty);
  }
  void abandon_step(std::uint64_t generation) noexcept {
    if (!planned_ || generation != generation_) return;
    planned_ = false;
    if (rows_cached_) needs_reset_ = true;
  }

  accelerator_config config_;
  Scorer scorer_;
  Predictor predictor_;
  Classifier classifier_;
  Schedule schedule_;
  Approx approx_;
  cudaStream_t stream_;
  offsets offsets_;
  store_type store_;
  device_plan_view plans_;                 // [plan][token]
  void* workspace_;                        // the classifier's
  float *his_, *fut_, *cf_, *change_, *metric_;  // [plan][token]
  float* change_all_;                      // [sample][token]
  float* scores_;                          // [plan][token]
  index_t* compute_tokens_;                // [sample][C1 token]: token ids
  index_t* compute_rows_;                  // the same as rows of the full matrix
  std::vector<char> site_done_;            // [layer][site] in the planned step
  index_t partial_count_ = 0, compute_count_ = 0;
  index_t next_step_ = 0;
  float last_t_ = std::numeric_limits<float>::infinity();
  std::uint64_t generation_ = 0;
  bool planned_ = false, rows_cached_ = false, needs_reset_ = false;
  bool has_his_ = false, has_metric_ = false;
  step_base* live_step_ = nullptr;  // the one step object that points here (planned_step keeps it current)
};

}  // namespace specdiff::gpu
