// A CUDA consumer of the installed package: one cached step of a small engine, written with the device
// models (<specdiff/cuda/specdiff.cuh>): attention column sums, the SpecDiff scorer, the three-level
// classifier, C1 gather/scatter, a bfloat16 cache store with C2 and C3 fills, staleness; then a whole run
// through the device accelerator (specdiff::gpu::accelerator with __nv_bfloat16 rows, as a bf16 engine
// holds its activations, and a bfloat16 store), the loop docs/cuda.md shows. package/cuda_consumer configures and builds it in CI wherever nvcc exists; it is not
// run there (no GPU).
#include <specdiff/cuda/specdiff.cuh>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <type_traits>
#include <vector>

namespace gpu = specdiff::gpu;
using specdiff::index_t;
using specdiff::level;

void print_versions();  // host_side.cpp

namespace {

// The engine's own kernel, beside the library's: a uniform attention matrix (every key gets 1 / keys).
__global__ void fill_uniform(float* values, std::size_t count, float value) {
  for (std::size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += std::size_t{gridDim.x} * blockDim.x) values[i] = value;
}

// cudaMalloc'd memory freed on scope exit, so an exception thrown by a library check leaks nothing.
class device_memory {
 public:
  explicit device_memory(std::size_t bytes) : bytes_(bytes) { SPECDIFF_CUDA_CHECK(cudaMalloc(&data_, bytes)); }
  ~device_memory() { cudaFree(data_); }
  device_memory(const device_memory&) = delete;
  device_memory& operator=(const device_memory&) = delete;
  template <class T>
  T* as() const { return static_cast<T*>(data_); }
  std::size_t bytes() const { return bytes_; }

 private:
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
};

struct engine_shape {
  index_t tokens = 256;  // image tokens per sample
  index_t batch = 2;     // samples per model call (both CFG halves)
  index_t heads = 4;
  index_t dim = 64;      // values per token's output row
  double cache_rate = 0.9;
};

// Dense steps at t = 1000 and 900 fill the cache; the partial step at t = 800 runs only the C1 tokens.
int run(const engine_shape& e) {
  const index_t rows = e.batch * e.tokens;
  cudaStream_t stream = nullptr;
  SPECDIFF_CUDA_CHECK(cudaStreamCreate(&stream));

  // Setup: every size known on the host, all memory allocated once.
  const gpu::attention_column_sums<> column_sums({.batch = e.batch, .heads = e.heads, .queries = e.tokens, .keys = e.tokens});
  const gpu::three_level_classifier<> classifier(e.tokens, e.batch, e.cache_rate);
  const index_t c1 = classifier.compute_count();
  const specdiff::cache_shape shape{.layers = 1, .sites = 1, .tokens = rows, .dim = e.dim, .history_depth = 3};
  using store_type = gpu::device_cache_store<specdiff::bfloat16>;

  const std::size_t probability_count = column_sums.shape().extent();
  device_memory probabilities(probability_count * sizeof(float));
  device_memory column_workspace(column_sums.workspace_bytes());
  device_memory classify_workspace(classifier.workspace_bytes());
  device_memory plan_memory(gpu::device_plan_view::bytes(e.batch, e.tokens));
  device_memory store_memory(store_type::memory_bytes(shape));
  device_memory his(sizeof(float) * static_cast<std::size_t>(rows)), fut(sizeof(float) * static_cast<std::size_t>(rows)),
      cf(sizeof(float) * static_cast<std::size_t>(rows)), scores(sizeof(float) * static_cast<std::size_t>(rows));
  device_memory output(sizeof(float) * static_cast<std::size_t>(rows) * static_cast<std::size_t>(e.dim));
  device_memory c1_rows(sizeof(float) * static_cast<std::size_t>(e.batch) * static_cast<std::size_t>(c1) * static_cast<std::size_t>(e.dim));

  const auto plan = gpu::device_plan_view::carve(plan_memory.as<void>(), plan_memory.bytes(), e.batch, e.tokens);
  SPECDIFF_CUDA_CHECK(cudaMemsetAsync(store_memory.as<void>(), 0, store_memory.bytes(), stream));
  store_type store(shape, store_memory.as<void>(), store_memory.bytes(), stream);
  const gpu::device_matrix<float> all_rows(output.as<float>(), rows, e.dim);
  const gpu::device_matrix<float> compact(c1_rows.as<float>(), e.batch * c1, e.dim);
  const gpu::device_span<float> attention(his.as<float>(), rows), future(fut.as<float>(), rows), cache_count(cf.as<float>(), rows),
      log_scores(scores.as<float>(), rows);
  SPECDIFF_CUDA_CHECK(cudaMemsetAsync(cf.as<void>(), 0, cf.bytes(), stream));
  SPECDIFF_CUDA_CHECK(cudaMemsetAsync(output.as<void>(), 0, output.bytes(), stream));

  // The speculative pass's attention, reduced to per-token column sums (his), and a future record (fut).
  fill_uniform<<<64, 256, 0, stream>>>(probabilities.as<float>(), probability_count, 1.f / static_cast<float>(e.tokens));
  SPECDIFF_CUDA_CHECK_LAUNCH("fill_uniform");
  std::size_t column_bytes = column_workspace.bytes();
  column_sums.reduce(column_workspace.as<void>(), column_bytes, gpu::device_span<const float>(probabilities.as<float>(), static_cast<index_t>(probability_count)),
                     attention, gpu::column_mode::overwrite, stream);
  SPECDIFF_CUDA_CHECK(cudaMemcpyAsync(fut.as<void>(), his.as<void>(), his.bytes(), cudaMemcpyDeviceToDevice, stream));

  // Dense steps: the network ran every token (output stands in for its rows); cache them all.
  store.write(0, 0, 1000.f, all_rows, stream);
  store.write(0, 0, 900.f, all_rows, stream);

  // A partial step: score, classify, gather C1 for the network, cache its rows, fill C2 and C3, staleness.
  const float t = 800.f;
  gpu::score(specdiff::specdiff_scorer{}, {attention, future, cache_count, {}, {}}, log_scores, stream);
  std::size_t classify_bytes = classify_workspace.bytes();
  classifier.classify(classify_workspace.as<void>(), classify_bytes, log_scores, plan, stream);
  const auto compute_rows = gpu::rows_of(plan, level::compute, c1);
  gpu::gather_rows<gpu::copy_policy<>, float>(all_rows, compute_rows, compact, stream);
  // ... the engine's network runs on `compact` (batch * c1 rows) here ...
  store.scatter(0, 0, t, compute_rows, compact, stream);
  gpu::scatter_rows<gpu::copy_policy<>, float>(compact, compute_rows, all_rows, stream);
  store.fill(0, 0, t, gpu::rows_of(plan, level::reuse), all_rows, stream);
  store.fill(0, 0, t, gpu::rows_of(plan, level::approximate), specdiff::specdiff_weighted{}, all_rows, stream);
  gpu::advance_cache_counts(plan, cache_count, stream);

  // A checkpoint, not the per-step path: reading status words synchronises.
  store.check_status(stream);
  gpu::throw_if_status(gpu::read_status(plan.status, stream), "classifier");
  SPECDIFF_CUDA_CHECK(cudaStreamDestroy(stream));
  std::printf("one cached step: %d of %d tokens per sample computed\n", static_cast<int>(c1), static_cast<int>(e.tokens));
  return EXIT_SUCCESS;
}

// The same engine through the device accelerator: the host accelerator's protocol, every call enqueued on
// one stream, nothing synchronised until the checkpoint at the end. Dense steps 0, 1 and 5, partial steps
// between them scored with the speculative pass's attention. The engine's rows are __nv_bfloat16 (the
// accelerator's last template argument); attention and the other signals stay float.
int run_accelerated(const engine_shape& e) {
  using row = __nv_bfloat16;
  using accelerator = gpu::accelerator<specdiff::specdiff_scorer, gpu::self_speculation, gpu::three_level_classifier<>, specdiff::step_schedule,
                                       specdiff::specdiff_weighted, gpu::device_cache_store<specdiff::bfloat16>, row>;
  static_assert(std::is_same_v<accelerator::row_type, __nv_bfloat16>);
  const index_t steps = 8, rows = e.batch * e.tokens;
  const specdiff::accelerator_config config{.tokens = e.tokens, .batch = e.batch, .steps = steps, .feature_dim = e.dim};
  const specdiff::step_schedule schedule{.warmup_steps = 2, .refresh_interval = 0, .speculative = 2, .dense_steps = {5}};
  const gpu::three_level_classifier<> classifier(e.tokens, config.plans(), e.cache_rate);
  cudaStream_t stream = nullptr;
  SPECDIFF_CUDA_CHECK(cudaStreamCreate(&stream));

  // Setup: the accelerator's memory, sized once, and the engine's own buffers.
  device_memory memory(accelerator::memory_bytes(config, classifier, schedule));
  accelerator acc(config, {}, {}, classifier, schedule, memory.as<void>(), memory.bytes(), stream);
  const std::size_t cells = static_cast<std::size_t>(rows) * static_cast<std::size_t>(e.dim);
  device_memory x(sizeof(row) * cells), x_c1(sizeof(row) * cells), y_c1(sizeof(row) * cells), y(sizeof(row) * cells),
      attention(sizeof(float) * static_cast<std::size_t>(rows));
  SPECDIFF_CUDA_CHECK(cudaMemsetAsync(x.as<void>(), 0, x.bytes(), stream));
  const gpu::device_span<const float> received(attention.as<float>(), rows);

  std::vector<float> t(static_cast<std::size_t>(steps));
  for (index_t k = 0; k < steps; ++k) t[static_cast<std::size_t>(k)] = 1000.f - 125.f * static_cast<float>(k);
  const auto speculative_t = specdiff::aligned_speculative_timesteps(t, schedule.speculative_steps(), schedule);
  acc.begin_speculation(speculative_t);
  for (std::size_t s = 0; s < speculative_t.size(); ++s) {
    // ... the engine runs every token at speculative_t[s] and sums the attention each token received ...
    fill_uniform<<<64, 256, 0, acc.stream()>>>(attention.as<float>(), static_cast<std::size_t>(rows), 1.f);
    SPECDIFF_CUDA_CHECK_LAUNCH("fill_uniform");
    acc.record_speculation(static_cast<index_t>(s), received);
  }
  for (index_t k = 0; k < steps; ++k) {
    auto step = acc.plan_step(k, t[static_cast<std::size_t>(k)]);
    const index_t n = e.batch * step.compute_count();  // host-known: static GEMM shapes
    gpu::gather_rows(gpu::device_matrix<const row>(x.as<row>(), rows, e.dim), step.compute_rows(),
                     gpu::device_matrix<row>(x_c1.as<row>(), n, e.dim), acc.stream());
    // ... the engine's network maps x_c1 to y_c1 (n rows) on acc.stream() and writes the attention ...
    SPECDIFF_CUDA_CHECK(cudaMemcpyAsync(y_c1.as<void>(), x_c1.as<void>(), sizeof(row) * static_cast<std::size_t>(n) * static_cast<std::size_t>(e.dim),
                                        cudaMemcpyDeviceToDevice, acc.stream()));
    acc.complete_step(std::move(step), gpu::device_matrix<const row>(y_c1.as<row>(), n, e.dim),
                      gpu::device_matrix<row>(y.as<row>(), rows, e.dim), received);
  }
  acc.check_status();  // a checkpoint: synchronises
  SPECDIFF_CUDA_CHECK(cudaStreamDestroy(stream));
  std::printf("accelerated run: %d steps, %d of %d tokens per sample on partial steps\n", static_cast<int>(steps),
              static_cast<int>(acc.partial_compute_count()), static_cast<int>(e.tokens));
  return EXIT_SUCCESS;
}

}  // namespace

int main() {
  print_versions();
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::puts("no CUDA device: nothing to run");
    return EXIT_SUCCESS;
  }
  try {
    const int status = run(engine_shape{});
    return status == EXIT_SUCCESS ? run_accelerated(engine_shape{}) : status;
  } catch (const std::exception& error) {
    std::fprintf(stderr, "%s\n", error.what());
    return EXIT_FAILURE;
  }
}
