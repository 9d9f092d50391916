// CUDA microbenchmarks for the device models (issue 12). Every time is taken with CUDA events around the
// timed calls, after warm-up calls, as the median (with min and max) of the timed runs; every bandwidth is
// set against a device-to-device cudaMemcpyAsync of the same byte count measured in the same process, so
// shares are comparable across cards. Nothing is allocated inside a timed region: every buffer, plan and
// workspace is set up before the first event.
//
//   specdiff_cuda_bench [--runs N] [--quick] [--json FILE] [--model-tflops X] [--attention-tflops Y]
//
// Sections:
//   1. one whole cached step through gpu::accelerator at SD3-medium's shape (4096 image tokens, hidden
//      1536, batch 2 = one CFG pair sharing a plan, CR 0.9, __nv_bfloat16 rows, bfloat16 store): score,
//      classify, C1 lists, gather of the C1 input rows, C2/C3 fills, C1 scatter and cache, staleness; set
//      against the model step it serves: the FLOPs of SD3-medium's partial forward at CR 0.9 (counted from
//      the shapes in sd3_partial_forward_flops) at --model-tflops (default 43 TFLOP/s). Goal: < 3 %.
//   2. row movers at the same shape (gather_rows, the store's push and fills, bf16 rows) and at larger
//      float shapes, as a share of a D2D memcpy of the same bytes. Goal: >= 80 %.
//   3. LSE column sums of one SD3-medium layer (lse.cuh, bf16 Q and K) against the attention they shadow,
//      estimated from its FLOPs at --attention-tflops (default 400 TFLOP/s, bf16 flash attention on an
//      H100: an estimate, not a measurement). Goal: <= 30 %.
//   plus the classifier alone (eager and replayed from a CUDA graph).
//
// Prints markdown tables and a headline table (goal, measured, met); --json FILE also writes one JSON
// object per line. Exit code 77 when no CUDA device is usable (scripts/gpu-check.sh reports it).
#include <specdiff/cuda/specdiff.cuh>
#include <specdiff/specdiff.hpp>

#include <cuda_bf16.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace gpu = specdiff::gpu;
using specdiff::index_t;
using specdiff::level;

namespace {

template <class T>
struct device_array {
  T* p = nullptr;
  std::size_t n = 0;
  explicit device_array(std::size_t count) : n(count) { SPECDIFF_CUDA_CHECK(cudaMalloc(&p, std::max<std::size_t>(1, n * sizeof(T)))); }
  device_array(const device_array&) = delete;
  device_array& operator=(const device_array&) = delete;
  ~device_array() { cudaFree(p); }
  std::size_t bytes() const { return n * sizeof(T); }
  void upload(const std::vector<T>& v) { SPECDIFF_CUDA_CHECK(cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice)); }
};

// --- device helpers: deterministic fills and a stream blocker -------------------------------------------

__device__ float hash_unit(std::uint64_t i, std::uint32_t seed) {  // splitmix64 -> [0, 1)
  std::uint64_t z = i + 0x9e3779b97f4a7c15ull * (static_cast<std::uint64_t>(seed) + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (1.f / 16777216.f);
}

template <class T>
__global__ void fill_uniform_kernel(T* p, std::size_t n, float lo, float hi, std::uint32_t seed) {
  for (std::size_t i = blockIdx.x * std::size_t{blockDim.x} + threadIdx.x; i < n; i += std::size_t{gridDim.x} * blockDim.x) {
    const float v = lo + (hi - lo) * hash_unit(i, seed);
    if constexpr (std::is_same_v<T, __nv_bfloat16>) p[i] = __float2bfloat16_rn(v);
    else p[i] = v;
  }
}

template <class T>
void fill_uniform(T* p, std::size_t n, float lo, float hi, std::uint32_t seed, cudaStream_t stream) {
  fill_uniform_kernel<T><<<1024, 256, 0, stream>>>(p, n, lo, hi, seed);
  SPECDIFF_CUDA_CHECK_LAUNCH("fill_uniform_kernel");
}

// Holds the stream for `ns` nanoseconds. Enqueued before a start event, it lets the host enqueue the timed
// calls while the device is busy, so the events measure the calls' device time back to back, without the
// host's launch gaps (which an engine hides behind its own kernels).
__global__ void spin_kernel(unsigned long long ns) {
  unsigned long long t0 = 0, t = 0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (t - t0 < ns);
}

// --- timing ---------------------------------------------------------------------------------------------

struct stats {
  double median = 0.0, min = 0.0, max = 0.0;
  int runs = 0;
};

stats summarize(std::vector<double> us) {
  std::sort(us.begin(), us.end());
  stats s;
  s.runs = static_cast<int>(us.size());
  if (us.empty()) return s;
  const std::size_t n = us.size();
  s.median = n % 2 == 1 ? us[n / 2] : 0.5 * (us[n / 2 - 1] + us[n / 2]);
  s.min = us.front();
  s.max = us.back();
  return s;
}

struct timer {
  cudaStream_t stream;
  int runs;
  cudaEvent_t start{}, stop{};
  timer(cudaStream_t s, int n) : stream(s), runs(n) {
    SPECDIFF_CUDA_CHECK(cudaEventCreate(&start));
    SPECDIFF_CUDA_CHECK(cudaEventCreate(&stop));
  }
  timer(const timer&) = delete;
  timer& operator=(const timer&) = delete;
  ~timer() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
  /// Microseconds of one call of f over `runs` timed calls (three warm-up calls first). With spin_us > 0,
  /// each timed call is queued behind a spin_kernel of that length (device time, launch gaps hidden).
  stats measure(const std::function<void()>& f, double spin_us = 0.0) const {
    for (int i = 0; i < 3; ++i) f();
    SPECDIFF_CUDA_CHECK(cudaStreamSynchronize(stream));
    std::vector<double> us;
    us.reserve(static_cast<std::size_t>(runs));
    for (int i = 0; i < runs; ++i) {
      if (spin_us > 0.0) {
        spin_kernel<<<1, 1, 0, stream>>>(static_cast<unsigned long long>(spin_us * 1e3));
        SPECDIFF_CUDA_CHECK_LAUNCH("spin_kernel");
      }
      SPECDIFF_CUDA_CHECK(cudaEventRecord(start, stream));
      f();
      SPECDIFF_CUDA_CHECK(cudaEventRecord(stop, stream));
      SPECDIFF_CUDA_CHECK(cudaEventSynchronize(stop));
      float ms = 0.f;
      SPECDIFF_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
      us.push_back(1000.0 * ms);
    }
    return summarize(std::move(us));
  }
  double median_us(const std::function<void()>& f) const { return measure(f).median; }
};

// --- reporting ------------------------------------------------------------------------------------------

struct row {
  std::string op, shape;
  stats t;
  double gbps = 0.0;   // bytes read + written per second, 1e9
  double share = 0.0;  // of the same-size cudaMemcpy's rate
};

struct headline {
  std::string what, measured, goal;
  bool met = false;
};

std::vector<row> table;
std::vector<headline> headlines;
std::FILE* json = nullptr;

void json_line(const std::string& text) {
  if (json != nullptr) {
    std::fprintf(json, "%s\n", text.c_str());
    std::fflush(json);  // each result reaches the file as it is measured: a run cut short keeps what it measured
  }
}

std::string fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

std::string json_stats(const stats& s) {
  return "\"median_us\": " + fmt("%.3f", s.median) + ", \"min_us\": " + fmt("%.3f", s.min) + ", \"max_us\": " + fmt("%.3f", s.max) +
         ", \"runs\": " + std::to_string(s.runs);
}

void add_row(row r) {
  json_line("{\"bench\": \"" + r.op + "\", \"shape\": \"" + r.shape + "\", " + json_stats(r.t) +
            (r.gbps > 0.0 ? ", \"gbps\": " + fmt("%.1f", r.gbps) + ", \"share_of_memcpy\": " + fmt("%.4f", r.share) : std::string()) + "}");
  table.push_back(std::move(r));
}

void print_table() {
  std::printf("| op | shape | median µs | min–max µs | GB/s (read+write) | share of D2D memcpy |\n|---|---|---:|---:|---:|---:|\n");
  for (const auto& r : table) {
    std::printf("| %s | %s | %.1f | %.1f–%.1f |", r.op.c_str(), r.shape.c_str(), r.t.median, r.t.min, r.t.max);
    if (r.gbps > 0.0) std::printf(" %.0f | %.0f%% |\n", r.gbps, 100.0 * r.share);
    else std::printf(" | |\n");
  }
}

void print_headlines() {
  std::printf("\n## Headline (issue 12 goals)\n\n| benchmark | measured | goal | met |\n|---|---|---|---|\n");
  for (const auto& h : headlines) std::printf("| %s | %s | %s | %s |\n", h.what.c_str(), h.measured.c_str(), h.goal.c_str(), h.met ? "yes" : "NO");
}

/// Rate of a D2D cudaMemcpyAsync moving `bytes` (read) + `bytes` (written), in 1e9 bytes/s.
double memcpy_gbps(const timer& t, std::size_t bytes) {
  device_array<unsigned char> a(bytes), b(bytes);
  SPECDIFF_CUDA_CHECK(cudaMemset(a.p, 1, bytes));
  const double us = t.median_us([&] { SPECDIFF_CUDA_CHECK(cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice, t.stream)); });
  return 2.0 * static_cast<double>(bytes) / (us * 1e3);
}

// --- plans ----------------------------------------------------------------------------------------------

/// Per-sample plans with the given level shares, drawn at random (levels per token, then committed).
std::vector<specdiff::token_plan> random_plans(std::mt19937_64& g, index_t batch, index_t tokens, double c1_share, double c2_share) {
  std::vector<specdiff::token_plan> plans;
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (index_t b = 0; b < batch; ++b) {
    specdiff::token_plan p(tokens);
    for (auto& l : p.mutable_levels()) {
      const double x = u(g);
      l = x < c1_share ? level::compute : x < c1_share + c2_share ? level::reuse : level::approximate;
    }
    p.commit_levels();
    plans.push_back(std::move(p));
  }
  return plans;
}

void upload_plans(const std::vector<specdiff::token_plan>& plans, const gpu::device_plan_view& view) {
  std::vector<index_t> order, counts;
  std::vector<level> levels;
  for (const auto& p : plans) {
    for (int l = 0; l < specdiff::level_count; ++l) {
      const auto idx = p.indices(static_cast<level>(l));
      order.insert(order.end(), idx.begin(), idx.end());
      counts.push_back(static_cast<index_t>(idx.size()));
    }
    levels.insert(levels.end(), p.levels().begin(), p.levels().end());
  }
  SPECDIFF_CUDA_CHECK(cudaMemcpy(view.order, order.data(), order.size() * sizeof(index_t), cudaMemcpyHostToDevice));
  SPECDIFF_CUDA_CHECK(cudaMemcpy(view.counts, counts.data(), counts.size() * sizeof(index_t), cudaMemcpyHostToDevice));
  SPECDIFF_CUDA_CHECK(cudaMemcpy(view.levels, levels.data(), levels.size() * sizeof(level), cudaMemcpyHostToDevice));
}

index_t level_total(const std::vector<specdiff::token_plan>& plans, level l) {
  index_t n = 0;
  for (const auto& p : plans) n += p.count(l);
  return n;
}

// --- the model step: SD3-medium ---------------------------------------------------------------------------

/// SD3-medium's MMDiT (diffusers' SD3Transformer2DModel, stable-diffusion-3-medium): 24 joint blocks,
/// hidden 1536 = 24 heads x 64, MLP ratio 4, patch 2, 16 latent channels; 1024 x 1024 images give 64 x 64 =
/// 4096 image tokens; the text context is 77 CLIP + 256 T5 = 333 tokens (joint_attention_dim 4096); the
/// pooled text is 2048 wide; the last block is context_pre_only.
struct sd3_medium {
  index_t blocks = 24, hidden = 1536, heads = 24, head_dim = 64, mlp_ratio = 4;
  index_t image_tokens = 4096, context_tokens = 333, context_dim = 4096, pooled_dim = 2048, patch_values = 2 * 2 * 16, freq_dim = 256;
};

/// FLOPs of one forward of one sample that runs `n` image tokens through the blocks (n = image_tokens: the
/// full forward; n = |C1|: the partial forward of docs/engine.md, every context token computed, the listed
/// image tokens' queries attending to all N + L keys). 2 FLOPs per multiply-add of every linear layer and of
/// QK^T and PV; norms, activations, softmax and RoPE-free elementwise work are not counted (they add a few
/// percent at most), so the model step is if anything underestimated and the library's share overstated.
///   per joint block, per row of each stream: QKV 3D^2 + out proj D^2 + MLP 2 * 4D^2 = 12 D^2 MACs;
///   per block, per sample: AdaLN modulation, image D x 6D and context D x 6D (the last block's context
///   norm: D x 2D);
///   attention per block: 2 * queries * (N + L) * D MACs (QK^T and PV over all heads), queries = n + L,
///   except the last block, whose context outputs are dropped (queries = n, context stream QKV only);
///   embeddings: patch embed n x 64 x D, context_embedder L x 4096 x D, timestep MLP 256 x D + D x D,
///   pooled MLP 2048 x D + D x D; out: norm_out's AdaLN D x 2D, proj_out n x D x 64.
double sd3_forward_flops(const sd3_medium& m, index_t n) {
  const double D = static_cast<double>(m.hidden), L = static_cast<double>(m.context_tokens), N = static_cast<double>(m.image_tokens);
  const double rows = static_cast<double>(n), keys = N + L, per_row = (4.0 + 2.0 * static_cast<double>(m.mlp_ratio)) * D * D;
  double macs = 0.0;
  for (index_t b = 0; b < m.blocks; ++b) {
    const bool last = b == m.blocks - 1;
    macs += rows * per_row;                                        // image stream
    macs += last ? L * 3.0 * D * D : L * per_row;                  // context stream
    macs += 6.0 * D * D + (last ? 2.0 : 6.0) * D * D;              // AdaLN modulations
    macs += 2.0 * (last ? rows : rows + L) * keys * D;             // QK^T and PV, all heads
  }
  macs += rows * static_cast<double>(m.patch_values) * D + L * static_cast<double>(m.context_dim) * D;  // patch, context embedders
  macs += static_cast<double>(m.freq_dim) * D + D * D + static_cast<double>(m.pooled_dim) * D + D * D;  // timestep, pooled MLPs
  macs += 2.0 * D * D + rows * D * static_cast<double>(m.patch_values);                                // norm_out, proj_out
  return 2.0 * macs;
}

// --- 1. a whole cached step through gpu::accelerator -----------------------------------------------------

void bench_accelerator_step(cudaStream_t stream, int runs, double model_tflops) {
  using row_t = __nv_bfloat16;
  using accelerator = gpu::accelerator<specdiff::specdiff_scorer, gpu::self_speculation, gpu::three_level_classifier<>, specdiff::step_schedule,
                                       specdiff::specdiff_weighted, gpu::device_cache_store<specdiff::bfloat16>, row_t>;
  const sd3_medium m;
  const index_t tokens = m.image_tokens, batch = 2, dim = m.hidden, steps = 28;
  const double cache_rate = 0.9;
  const specdiff::accelerator_config config{.tokens = tokens, .batch = batch, .steps = steps, .feature_dim = dim, .share_cfg_plan = true};
  // Dense steps 0 and 1 only: 26 partial steps per run; no reset steps, no refresh.
  const specdiff::step_schedule schedule{.warmup_steps = 2, .refresh_interval = 0, .speculative = 2, .dense_steps = {}};
  const gpu::three_level_classifier<> classifier(tokens, config.plans(), cache_rate);
  const index_t rows = config.rows();
  const auto cells = static_cast<std::size_t>(rows) * static_cast<std::size_t>(dim);

  device_array<unsigned char> memory(accelerator::memory_bytes(config, classifier, schedule));
  accelerator acc(config, {}, {}, classifier, schedule, memory.p, memory.bytes(), stream);
  // The engine's buffers: input rows x, the C1 rows in and out of its network (sized for dense steps),
  // the output y, the attention it measured (one per speculative step, one for the main steps).
  device_array<row_t> x(cells), x_c1(cells), y_c1(cells), y(cells);
  device_array<float> attention(static_cast<std::size_t>(rows)), spec0(static_cast<std::size_t>(rows)), spec1(static_cast<std::size_t>(rows));
  fill_uniform(x.p, x.n, -2.f, 2.f, 1, stream);
  fill_uniform(y_c1.p, y_c1.n, -2.f, 2.f, 2, stream);
  fill_uniform(y.p, y.n, -2.f, 2.f, 3, stream);
  fill_uniform(attention.p, attention.n, 0.05f, 2.f, 4, stream);
  fill_uniform(spec0.p, spec0.n, 0.05f, 2.f, 5, stream);
  fill_uniform(spec1.p, spec1.n, 0.05f, 2.f, 6, stream);
  SPECDIFF_CUDA_CHECK(cudaStreamSynchronize(stream));

  std::vector<float> t(static_cast<std::size_t>(steps));
  for (index_t k = 0; k < steps; ++k) t[static_cast<std::size_t>(k)] = 1000.f * (1.f - static_cast<float>(k) / static_cast<float>(steps));
  const auto spec_t = specdiff::aligned_speculative_timesteps(t, schedule.speculative_steps(), schedule);
  const gpu::device_matrix<const row_t> x_all(x.p, rows, dim);
  const gpu::device_matrix<row_t> y_all(y.p, rows, dim);
  const gpu::device_span<const float> received(attention.p, rows);

  cudaEvent_t start{}, stop{};
  SPECDIFF_CUDA_CHECK(cudaEventCreate(&start));
  SPECDIFF_CUDA_CHECK(cudaEventCreate(&stop));
  constexpr double spin_us = 3000.0;  // longer than the host needs to enqueue one step (checked below)
  std::vector<double> device_us, eager_us, host_us;
  const int timed_runs = std::max(runs, 5);
  // Run 0 warms up (first launches, CUB's kernels, the caches); runs 1..timed_runs alternate between
  // queued (device time) and eager (what a lone host thread sees, launch gaps included) steps.
  for (int run = 0; run <= timed_runs; ++run) {
    acc.reset();
    acc.begin_speculation(spec_t);
    acc.record_speculation(0, {spec0.p, rows});
    acc.record_speculation(1, {spec1.p, rows});
    for (index_t k = 0; k < steps; ++k) {
      const bool timed = run > 0 && !(k == 0 || schedule.is_dense(k, steps));
      const bool queued = k % 2 == 0;
      if (timed && queued) {
        spin_kernel<<<1, 1, 0, stream>>>(static_cast<unsigned long long>(spin_us * 1e3));
        SPECDIFF_CUDA_CHECK_LAUNCH("spin_kernel");
      }
      if (timed) SPECDIFF_CUDA_CHECK(cudaEventRecord(start, stream));
      const auto h0 = std::chrono::steady_clock::now();
      auto step = acc.plan_step(k, t[static_cast<std::size_t>(k)]);
      const index_t n = batch * step.compute_count();
      gpu::gather_rows(x_all, step.compute_rows(), gpu::device_matrix<row_t>(x_c1.p, n, dim), stream);
      // (the engine's network would map x_c1 to y_c1 here, on the same stream)
      acc.complete_step(std::move(step), gpu::device_matrix<const row_t>(y_c1.p, n, dim), y_all, received);
      const auto h1 = std::chrono::steady_clock::now();
      if (!timed) continue;
      SPECDIFF_CUDA_CHECK(cudaEventRecord(stop, stream));
      SPECDIFF_CUDA_CHECK(cudaEventSynchronize(stop));
      float ms = 0.f;
      SPECDIFF_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
      (queued ? device_us : eager_us).push_back(1000.0 * ms);
      host_us.push_back(std::chrono::duration<double, std::micro>(h1 - h0).count());
    }
  }
  acc.check_status();  // a checkpoint: the inputs were valid, the fills found their history
  SPECDIFF_CUDA_CHECK(cudaEventDestroy(start));
  SPECDIFF_CUDA_CHECK(cudaEventDestroy(stop));

  const stats device = summarize(device_us), eager = summarize(eager_us), host = summarize(host_us);
  const index_t c1 = acc.partial_compute_count();
  const double flops = static_cast<double>(batch) * sd3_forward_flops(m, c1);
  const double full_flops = static_cast<double>(batch) * sd3_forward_flops(m, tokens);
  const double model_us = flops / (model_tflops * 1e12) * 1e6;
  const double share = device.median / model_us, eager_share = eager.median / model_us;
  const std::string shape = "SD3-medium: 4096 tokens x 1536, batch 2 (CFG pair, one plan), CR 0.9 (C1 " + std::to_string(c1) + "), bf16 rows + store";
  add_row({"accelerator step, device (queued)", shape, device});
  add_row({"accelerator step, eager (launch gaps)", shape, eager});
  add_row({"accelerator step, host enqueue", shape, host});
  std::printf("model step: SD3-medium partial forward at CR 0.9, batch 2: %.3g FLOPs (full forward %.3g) at %.0f TFLOP/s = %.1f µs\n", flops,
              full_flops, model_tflops, model_us);
  if (host.max > spin_us) std::printf("warning: a step took %.0f µs to enqueue, more than the %.0f µs blocker: device times include gaps\n", host.max, spin_us);
  json_line("{\"bench\": \"accelerator_step\", " + json_stats(device) + ", \"eager_median_us\": " + fmt("%.3f", eager.median) +
            ", \"host_enqueue_median_us\": " + fmt("%.3f", host.median) + ", \"model_step_flops\": " + fmt("%.6g", flops) +
            ", \"model_tflops\": " + fmt("%.1f", model_tflops) + ", \"model_step_us\": " + fmt("%.1f", model_us) + ", \"share\": " + fmt("%.5f", share) +
            ", \"eager_share\": " + fmt("%.5f", eager_share) + ", \"goal\": \"< 0.03\", \"met\": " + (share < 0.03 ? "true" : "false") + "}");
  headlines.push_back({"(1) accelerator step, SD3-medium, CR 0.9, bf16 (device time)",
                       fmt("%.1f µs", device.median) + " (" + fmt("%.1f", device.min) + "–" + fmt("%.1f", device.max) + ", " + std::to_string(device.runs) +
                           " steps) = " + fmt("%.2f %%", 100.0 * share) + " of a " + fmt("%.1f ms", model_us / 1e3) + " model step (" +
                           fmt("%.3g FLOPs", flops) + " at " + fmt("%.0f TFLOP/s", model_tflops) + "); eager " + fmt("%.1f µs", eager.median) + " = " +
                           fmt("%.2f %%", 100.0 * eager_share),
                       "< 3 %", share < 0.03});
}

// --- 2. row movers --------------------------------------------------------------------------------------

void add_bandwidth(const timer& t, const std::string& op, const std::string& shape, const stats& s, std::size_t moved_bytes, const char* headline_name) {
  const double gbps = static_cast<double>(moved_bytes) / (s.median * 1e3);
  const double ref = memcpy_gbps(t, moved_bytes / 2);
  add_row({op, shape, s, gbps, gbps / ref});
  if (headline_name != nullptr)
    headlines.push_back({headline_name, fmt("%.0f GB/s", gbps) + " = " + fmt("%.0f %%", 100.0 * gbps / ref) + " of D2D memcpy (" + fmt("%.0f GB/s", ref) +
                                            "), " + fmt("%.1f µs", s.median),
                         ">= 80 %", gbps / ref >= 0.8});
}

/// At SD3-medium's step shape: bf16 rows, a bfloat16 store, batch 2 x 4096 tokens x 1536; C1 10 %,
/// C2 30 %, C3 60 % of each sample's tokens (plans drawn at random).
void bench_movers_sd3(const timer& t, std::mt19937_64& g) {
  using row_t = __nv_bfloat16;
  using store_t = gpu::device_cache_store<specdiff::bfloat16>;
  const index_t tokens = 4096, batch = 2, dim = 1536, rows = batch * tokens;
  const auto plans = random_plans(g, batch, tokens, 0.1, 0.3);
  index_t cap = 0;
  for (const auto& p : plans) cap = std::max(cap, p.count(level::compute));
  const index_t c1 = level_total(plans, level::compute), c2 = level_total(plans, level::reuse), c3 = level_total(plans, level::approximate);
  device_array<unsigned char> plan_mem(gpu::device_plan_view::bytes(batch, tokens));
  const auto plan = gpu::device_plan_view::carve(plan_mem.p, plan_mem.bytes(), batch, tokens);
  upload_plans(plans, plan);
  const auto d = static_cast<std::size_t>(dim);
  device_array<row_t> full(static_cast<std::size_t>(rows) * d), compact(static_cast<std::size_t>(batch * cap) * d);
  fill_uniform(full.p, full.n, -2.f, 2.f, 11, t.stream);
  fill_uniform(compact.p, compact.n, -2.f, 2.f, 12, t.stream);
  const specdiff::cache_shape shape{1, 1, rows, dim, 3};
  device_array<unsigned char> mem(store_t::memory_bytes(shape));
  store_t store(shape, mem.p, mem.bytes(), t.stream);
  const gpu::device_matrix<row_t> f(full.p, rows, dim), c(compact.p, batch * cap, dim);
  for (float ts : {1000.f, 900.f, 800.f}) store.write(0, 0, ts, gpu::device_matrix<const row_t>(f), t.stream);  // three cached rows per token
  SPECDIFF_CUDA_CHECK(cudaStreamSynchronize(t.stream));
  const auto set = gpu::rows_of(plan, level::compute, cap);
  const std::string tail = " x 1536 bf16 (SD3-medium step)";
  const std::size_t rb = sizeof(row_t), sb = sizeof(specdiff::bfloat16);

  const stats gather = t.measure([&] { gpu::gather_rows(gpu::device_matrix<const row_t>(f), set, c, t.stream); }, 200.0);
  add_bandwidth(t, "gather_rows C1", std::to_string(c1) + " of " + std::to_string(rows) + " rows" + tail, gather, 2 * static_cast<std::size_t>(c1) * d * rb,
                "(2) gather_rows, C1 of SD3-medium step, bf16");
  // Fills first (they need three distinct cached timesteps), then pushes at falling timesteps.
  const stats fill2 = t.measure([&] { store.fill(0, 0, 700.f, gpu::rows_of(plan, level::reuse), f, t.stream); }, 200.0);
  add_bandwidth(t, "store fill C2 (latest)", std::to_string(c2) + " rows" + tail, fill2, static_cast<std::size_t>(c2) * d * (sb + rb),
                "(2) store fill C2 (latest), bf16");
  const stats fill3 = t.measure([&] { store.fill(0, 0, 700.f, gpu::rows_of(plan, level::approximate), specdiff::specdiff_weighted{}, f, t.stream); }, 200.0);
  add_bandwidth(t, "store fill C3 (SpecDiff weights, 3 rows)", std::to_string(c3) + " rows" + tail, fill3, static_cast<std::size_t>(c3) * d * (3 * sb + rb),
                "(2) store fill C3 (SpecDiff weights), bf16");
  float ts = 700.f;
  const stats push = t.measure([&] { store.scatter(0, 0, ts -= 1.f, set, gpu::device_matrix<const row_t>(c), t.stream); }, 200.0);
  add_bandwidth(t, "store push C1 (scatter)", std::to_string(c1) + " rows" + tail, push, static_cast<std::size_t>(c1) * d * (rb + sb),
                "(2) store push C1 (scatter), bf16");
  const stats push_all = t.measure([&] { store.write(0, 0, ts -= 1.f, gpu::device_matrix<const row_t>(f), t.stream); }, 200.0);
  add_bandwidth(t, "store push all rows (write)", std::to_string(rows) + " rows" + tail, push_all, static_cast<std::size_t>(rows) * d * (rb + sb),
                "(2) store push all rows (dense step), bf16");
  store.check_status(t.stream);
}

void bench_rows(const timer& t, std::mt19937_64& g, index_t tokens, index_t batch, index_t dim, double c1_share) {
  const auto plans = random_plans(g, batch, tokens, c1_share, 0.0);
  index_t cap = 0;
  for (const auto& p : plans) cap = std::max(cap, p.count(level::compute));
  const index_t moved = level_total(plans, level::compute);
  device_array<unsigned char> plan_mem(gpu::device_plan_view::bytes(batch, tokens));
  const auto plan = gpu::device_plan_view::carve(plan_mem.p, plan_mem.bytes(), batch, tokens);
  upload_plans(plans, plan);
  const auto rows = static_cast<std::size_t>(tokens * batch);
  device_array<float> full(rows * static_cast<std::size_t>(dim)), compact(static_cast<std::size_t>(batch * cap) * static_cast<std::size_t>(dim));
  SPECDIFF_CUDA_CHECK(cudaMemset(full.p, 0, full.bytes()));
  SPECDIFF_CUDA_CHECK(cudaMemset(compact.p, 0, compact.bytes()));
  const gpu::device_matrix<float> f(full.p, tokens * batch, dim), c(compact.p, batch * cap, dim);
  const auto set = gpu::rows_of(plan, level::compute, cap);
  const std::size_t bytes = static_cast<std::size_t>(moved) * static_cast<std::size_t>(dim) * sizeof(float);
  const std::string shape = std::to_string(moved) + " of " + std::to_string(rows) + " rows x " + std::to_string(dim) + " f32";
  const stats gather = t.measure([&] { gpu::gather_rows<gpu::copy_policy<>, float>(f, set, c, t.stream); });
  const stats scatter = t.measure([&] { gpu::scatter_rows<gpu::copy_policy<>, float>(c, set, f, t.stream); });
  add_bandwidth(t, "gather C1 rows", shape, gather, 2 * bytes, nullptr);
  add_bandwidth(t, "scatter C1 rows", shape, scatter, 2 * bytes, nullptr);
}

template <class Storage>
void bench_fill(const timer& t, std::mt19937_64& g, index_t tokens, index_t batch, index_t dim, const char* type) {
  const index_t rows = tokens * batch;
  const specdiff::cache_shape shape{1, 1, rows, dim, 3};
  device_array<unsigned char> mem(gpu::device_cache_store<Storage>::memory_bytes(shape));
  gpu::device_cache_store<Storage> store(shape, mem.p, mem.bytes(), t.stream);
  device_array<float> out(static_cast<std::size_t>(rows) * static_cast<std::size_t>(dim));
  SPECDIFF_CUDA_CHECK(cudaMemset(out.p, 0, out.bytes()));
  const gpu::device_matrix<float> o(out.p, rows, dim);
  for (float ts : {1000.f, 900.f, 800.f}) store.write(0, 0, ts, o, t.stream);  // three cached rows per token
  SPECDIFF_CUDA_CHECK(cudaStreamSynchronize(t.stream));
  const auto plans = random_plans(g, batch, tokens, 0.1, 0.1);  // C3 ~ 80% of the tokens
  const index_t c3 = level_total(plans, level::approximate);
  device_array<unsigned char> plan_mem(gpu::device_plan_view::bytes(batch, tokens));
  const auto plan = gpu::device_plan_view::carve(plan_mem.p, plan_mem.bytes(), batch, tokens);
  upload_plans(plans, plan);
  // Per C3 token: three cached rows read, one float row written.
  const std::size_t moved = static_cast<std::size_t>(c3) * static_cast<std::size_t>(dim) * (3 * sizeof(Storage) + sizeof(float));
  const stats fill = t.measure([&] { store.fill(0, 0, 700.f, gpu::rows_of(plan, level::approximate), specdiff::specdiff_weighted{}, o, t.stream); });
  add_bandwidth(t, std::string("C3 fill, SpecDiff weights, ") + type + " store",
                std::to_string(c3) + " of " + std::to_string(rows) + " rows x " + std::to_string(dim) + " f32 rows", fill, moved, nullptr);
  float ts = 700.f;
  const stats push = t.measure([&] { store.write(0, 0, ts -= 1.f, o, t.stream); });
  add_bandwidth(t, std::string("cache write (all rows), ") + type + " store", std::to_string(rows) + " rows x " + std::to_string(dim) + " f32 rows", push,
                static_cast<std::size_t>(rows) * static_cast<std::size_t>(dim) * (sizeof(float) + sizeof(Storage)), nullptr);
  store.check_status(t.stream);
}

// --- classifier alone -------------------------------------------------------------------------------------

void bench_classify(const timer& t, std::mt19937_64& g, index_t tokens, index_t batch) {
  const gpu::three_level_classifier<> c(tokens, batch, 0.9);
  const auto n = static_cast<std::size_t>(tokens * batch);
  std::normal_distribution<float> d(0.f, 3.f);
  std::vector<float> s(n);
  for (auto& x : s) x = d(g);
  device_array<float> scores(n);
  scores.upload(s);
  device_array<unsigned char> ws(c.workspace_bytes()), plan_mem(gpu::device_plan_view::bytes(batch, tokens));
  const auto plan = gpu::device_plan_view::carve(plan_mem.p, plan_mem.bytes(), batch, tokens);
  std::size_t bytes = ws.bytes();
  auto call = [&] { c.classify(ws.p, bytes, {scores.p, static_cast<index_t>(n)}, plan, t.stream); };
  const std::string shape = std::to_string(tokens) + " tokens x " + std::to_string(batch) + ", CR 0.9";
  add_row({"classify (eager)", shape, t.measure(call)});

  // The same call replayed from a CUDA graph: what a captured step pays.
  cudaGraph_t graph{};
  cudaGraphExec_t exec{};
  SPECDIFF_CUDA_CHECK(cudaStreamBeginCapture(t.stream, cudaStreamCaptureModeGlobal));
  call();
  SPECDIFF_CUDA_CHECK(cudaStreamEndCapture(t.stream, &graph));
  SPECDIFF_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  add_row({"classify (graph)", shape, t.measure([&] { SPECDIFF_CUDA_CHECK(cudaGraphLaunch(exec, t.stream)); })});
  SPECDIFF_CUDA_CHECK(cudaGraphExecDestroy(exec));
  SPECDIFF_CUDA_CHECK(cudaGraphDestroy(graph));
}

// --- 3. LSE column sums vs the attention they shadow ---------------------------------------------------------

/// One SD3-medium layer, batch 2, bf16 Q and K in an engine's [B][tokens][heads * 64] layout, the LSE
/// packed [B][heads][queries]. Dense (speculative) step: all 4096 image queries; partial step: the C1
/// queries (410). The attention shadowed is the layer's joint attention on that step, (queries + L) x (N + L)
/// with L = 333 context tokens, QK^T and PV: 4 * B * heads * (q + L) * (N + L) * 64 FLOPs, timed at
/// --attention-tflops (an estimate of bf16 flash attention, not a measurement).
void bench_lse(const timer& t, double attention_tflops) {
  using bf16 = specdiff::bfloat16;
  const sd3_medium m;
  const index_t batch = 2, heads = m.heads, d = m.head_dim, keys = m.image_tokens, width = heads * d;
  const index_t c1 = specdiff::math::compute_count(0.9, keys);
  const auto cells = static_cast<std::size_t>(batch) * static_cast<std::size_t>(keys) * static_cast<std::size_t>(width);
  device_array<__nv_bfloat16> q(cells), k(cells);
  device_array<float> lse(static_cast<std::size_t>(batch * heads * keys)), his(static_cast<std::size_t>(batch * keys));
  // Uniform in +-sqrt(3): unit variance, so scale * q.k is about N(0, 1) and the LSE about log(N + L) + 1/2.
  fill_uniform(q.p, q.n, -1.732f, 1.732f, 21, t.stream);
  fill_uniform(k.p, k.n, -1.732f, 1.732f, 22, t.stream);
  fill_uniform(lse.p, lse.n, 8.8f, 9.0f, 23, t.stream);
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  const auto layer = [&](index_t queries) {
    return gpu::device_lse_attention<bf16>{{reinterpret_cast<const bf16*>(q.p), batch, heads, queries, d, width, d, static_cast<std::ptrdiff_t>(keys) * width},
                                           {reinterpret_cast<const bf16*>(k.p), batch, heads, keys, d, width, d, static_cast<std::ptrdiff_t>(keys) * width},
                                           {lse.p},
                                           scale};
  };
  std::size_t ws_bytes = 0;
  gpu::lse_column_sums(nullptr, ws_bytes, layer(keys), {}, specdiff::column_mode::overwrite, t.stream);  // the largest case
  device_array<unsigned char> ws(ws_bytes);
  const gpu::device_span<float> out(his.p, batch * keys);
  SPECDIFF_CUDA_CHECK(cudaStreamSynchronize(t.stream));

  struct lse_case {
    const char* name;
    index_t queries, step;  // step 1: exact; s: every s-th query
  };
  for (const lse_case& c : {lse_case{"dense step, exact", keys, 1}, lse_case{"dense step, estimate s = 9", keys, 9},
                            lse_case{"partial step (C1 queries), exact", c1, 1}, lse_case{"partial step (C1 queries), estimate s = 9", c1, 9}}) {
    const auto in = layer(c.queries);
    std::size_t bytes = ws.bytes();
    const stats s = t.measure([&] {
      if (c.step == 1) gpu::lse_column_sums(ws.p, bytes, in, out, specdiff::column_mode::overwrite, t.stream);
      else gpu::lse_column_sums_estimate(ws.p, bytes, in, c.step, out, specdiff::column_mode::overwrite, t.stream);
    });
    const double L = static_cast<double>(m.context_tokens);
    const double attn_flops = 4.0 * batch * heads * (static_cast<double>(c.queries) + L) * (static_cast<double>(keys) + L) * d;
    const double attn_us = attn_flops / (attention_tflops * 1e12) * 1e6;
    const double ratio = s.median / attn_us;
    const std::string shape = "SD3-medium layer: batch 2, 24 heads x 64, " + std::to_string(c.queries) + " queries x 4096 keys, bf16";
    add_row({std::string("LSE column sums, ") + c.name, shape, s});
    json_line(std::string("{\"bench\": \"lse_column_sums\", \"case\": \"") + c.name + "\", \"queries\": " + std::to_string(c.queries) +
              ", \"query_step\": " + std::to_string(c.step) + ", " + json_stats(s) + ", \"attention_flops\": " + fmt("%.6g", attn_flops) +
              ", \"attention_tflops_assumed\": " + fmt("%.0f", attention_tflops) + ", \"attention_us_estimate\": " + fmt("%.2f", attn_us) +
              ", \"ratio\": " + fmt("%.4f", ratio) + ", \"goal\": \"<= 0.30\", \"met\": " + (ratio <= 0.3 ? "true" : "false") + "}");
    headlines.push_back({std::string("(3) LSE column sums, ") + c.name + ", one layer",
                         fmt("%.1f µs", s.median) + " (" + fmt("%.1f", s.min) + "–" + fmt("%.1f", s.max) + ") vs attention " + fmt("%.1f µs", attn_us) +
                             " (estimate: " + fmt("%.3g FLOPs", attn_flops) + " at " + fmt("%.0f TFLOP/s", attention_tflops) + ") = " +
                             fmt("%.0f %%", 100.0 * ratio),
                         "<= 30 %", ratio <= 0.3});
  }
}

}  // namespace

int main(int argc, char** argv) {
  int runs = 50;
  bool quick = false;
  const char* json_path = nullptr;
  double model_tflops = 43.0, attention_tflops = 400.0;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--runs" && i + 1 < argc) runs = std::atoi(argv[++i]);
    else if (a == "--quick") quick = true;
    else if (a == "--json" && i + 1 < argc) json_path = argv[++i];
    else if (a == "--model-tflops" && i + 1 < argc) model_tflops = std::atof(argv[++i]);
    else if (a == "--attention-tflops" && i + 1 < argc) attention_tflops = std::atof(argv[++i]);
    else {
      std::fprintf(stderr, "usage: %s [--runs N] [--quick] [--json FILE] [--model-tflops X] [--attention-tflops Y]\n", argv[0]);
      return 2;
    }
  }
  if (runs < 5) {
    std::fprintf(stderr, "--runs: must be >= 5 (median, min and max of at least five), got %d\n", runs);
    return 2;
  }
  if (!(model_tflops > 0.0) || !(attention_tflops > 0.0)) {
    std::fprintf(stderr, "--model-tflops, --attention-tflops: must be positive\n");
    return 2;
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIPPED: no usable CUDA device\n");
    return 77;
  }
  if (json_path != nullptr && (json = std::fopen(json_path, "w")) == nullptr) {
    std::fprintf(stderr, "--json: cannot write %s\n", json_path);
    return 2;
  }
  cudaDeviceProp prop{};
  SPECDIFF_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (sm_%d%d, %d SMs), median (min–max) of %d runs after 3 warm-up calls\n\n", prop.name, prop.major, prop.minor,
              prop.multiProcessorCount, runs);
  json_line(std::string("{\"bench\": \"device\", \"name\": \"") + prop.name + "\", \"sm\": " + std::to_string(prop.major * 10 + prop.minor) +
            ", \"sms\": " + std::to_string(prop.multiProcessorCount) + ", \"runs\": " + std::to_string(runs) + "}");

  cudaStream_t stream{};
  SPECDIFF_CUDA_CHECK(cudaStreamCreate(&stream));
  // Each section on its own: one that throws (a CUDA error, a status bit) is reported and the others run
  // (after a sticky CUDA error they fail too, and say so).
  int failures = 0;
  const auto section = [&](const char* name, const std::function<void()>& f) {
    try {
      f();
    } catch (const std::exception& e) {
      ++failures;
      std::printf("FAILED: %s: %s\n", name, e.what());
      json_line(std::string("{\"bench\": \"failed\", \"section\": \"") + name + "\"}");
      std::string message = e.what();
      std::replace_if(message.begin(), message.end(), [](char c) { return c == '|' || c == '\n'; }, ' ');
      headlines.push_back({std::string(name) + " (section failed)", message, "runs", false});
    }
  };
  {
    const timer t(stream, runs);
    std::mt19937_64 g(12345);
    section("accelerator step", [&] { bench_accelerator_step(stream, quick ? 5 : 10, model_tflops); });
    section("row movers, SD3-medium step", [&] { bench_movers_sd3(t, g); });
    section("LSE column sums", [&] { bench_lse(t, attention_tflops); });
    section("classify", [&] {
      for (index_t tokens : {4096, 16384})
        for (index_t batch : {1, 4}) bench_classify(t, g, tokens, batch);
    });
    const index_t dim = quick ? 256 : 1536;
    section("row movers, f32", [&] {
      bench_rows(t, g, 16384, 4, dim, 0.1);
      bench_rows(t, g, 4096, 4, dim, 0.5);
    });
    section("fills and writes, f32 rows", [&] {
      bench_fill<float>(t, g, 16384, 4, dim, "f32");
      bench_fill<specdiff::bfloat16>(t, g, 16384, 4, dim, "bf16");
    });
  }
  cudaStreamDestroy(stream);
  print_table();
  print_headlines();
  if (json != nullptr) std::fclose(json);
  return failures == 0 ? 0 : 1;
}
