// CUDA microbenchmarks for the device models. Every number is the median of --runs timed runs (CUDA
// events around one call, after warm-up), and every bandwidth is set against a device-to-device
// cudaMemcpy of the same byte count measured in the same process, so the share is comparable across cards.
//
//   specdiff_cuda_bench [--runs N] [--quick]
//
// Prints a markdown table. Exit code 77 when no CUDA device is usable (scripts/gpu-check.sh reports it).
#include <specdiff/cuda/specdiff.cuh>
#include <specdiff/specdiff.hpp>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <string_view>
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

struct timer {
  cudaStream_t stream;
  int runs;
  cudaEvent_t start{}, stop{};
  timer(cudaStream_t s, int n) : stream(s), runs(n) {
    SPECDIFF_CUDA_CHECK(cudaEventCreate(&start));
    SPECDIFF_CUDA_CHECK(cudaEventCreate(&stop));
  }
  ~timer() {
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
  }
  /// Median microseconds of one call of f (three warm-up calls first).
  double median_us(const std::function<void()>& f) const {
    for (int i = 0; i < 3; ++i) f();
    SPECDIFF_CUDA_CHECK(cudaStreamSynchronize(stream));
    std::vector<double> us;
    for (int i = 0; i < runs; ++i) {
      SPECDIFF_CUDA_CHECK(cudaEventRecord(start, stream));
      f();
      SPECDIFF_CUDA_CHECK(cudaEventRecord(stop, stream));
      SPECDIFF_CUDA_CHECK(cudaEventSynchronize(stop));
      float ms = 0.f;
      SPECDIFF_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
      us.push_back(1000.0 * ms);
    }
    std::sort(us.begin(), us.end());
    return us[us.size() / 2];
  }
};

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

struct row {
  std::string op, shape;
  double us;
  double gbps = 0.0;   // bytes read + written per second, 1e9
  double share = 0.0;  // of the same-size cudaMemcpy's rate
};

std::vector<row> table;

void print_table() {
  std::printf("| op | shape | median µs | GB/s (read+write) | share of D2D memcpy |\n|---|---|---:|---:|---:|\n");
  for (const auto& r : table) {
    if (r.gbps > 0.0)
      std::printf("| %s | %s | %.1f | %.0f | %.0f%% |\n", r.op.c_str(), r.shape.c_str(), r.us, r.gbps, 100.0 * r.share);
    else
      std::printf("| %s | %s | %.1f | | |\n", r.op.c_str(), r.shape.c_str(), r.us);
  }
}

/// Rate of a D2D cudaMemcpy moving `bytes` (read) + `bytes` (written), in 1e9 bytes/s.
double memcpy_gbps(const timer& t, std::size_t bytes) {
  device_array<unsigned char> a(bytes), b(bytes);
  SPECDIFF_CUDA_CHECK(cudaMemset(a.p, 1, bytes));
  const double us = t.median_us([&] { SPECDIFF_CUDA_CHECK(cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice, t.stream)); });
  return 2.0 * static_cast<double>(bytes) / (us * 1e3);
}

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
  table.push_back({"classify (eager)", shape, t.median_us(call)});

  // The same call replayed from a CUDA graph: what a captured step pays.
  cudaGraph_t graph{};
  cudaGraphExec_t exec{};
  SPECDIFF_CUDA_CHECK(cudaStreamBeginCapture(t.stream, cudaStreamCaptureModeGlobal));
  call();
  SPECDIFF_CUDA_CHECK(cudaStreamEndCapture(t.stream, &graph));
  SPECDIFF_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  table.push_back({"classify (graph)", shape, t.median_us([&] { SPECDIFF_CUDA_CHECK(cudaGraphLaunch(exec, t.stream)); })});
  SPECDIFF_CUDA_CHECK(cudaGraphExecDestroy(exec));
  SPECDIFF_CUDA_CHECK(cudaGraphDestroy(graph));
}

void bench_rows(const timer& t, std::mt19937_64& g, index_t tokens, index_t batch, index_t dim, double c1_share) {
  const auto plans = random_plans(g, batch, tokens, c1_share, 0.0);
  index_t cap = 0, moved = 0;
  for (const auto& p : plans) cap = std::max(cap, p.count(level::compute)), moved += p.count(level::compute);
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
  const double ref = memcpy_gbps(t, bytes);
  const std::string shape = std::to_string(moved) + " of " + std::to_string(rows) + " rows x " + std::to_string(dim) + " f32";
  const double gather = t.median_us([&] { gpu::gather_rows<gpu::copy_policy<>, float>(f, set, c, t.stream); });
  const double scatter = t.median_us([&] { gpu::scatter_rows<gpu::copy_policy<>, float>(c, set, f, t.stream); });
  const double g_gbps = 2.0 * static_cast<double>(bytes) / (gather * 1e3), s_gbps = 2.0 * static_cast<double>(bytes) / (scatter * 1e3);
  table.push_back({"memcpy D2D (reference)", std::to_string(bytes >> 20) + " MiB", 2.0 * static_cast<double>(bytes) / (ref * 1e3), ref, 1.0});
  table.push_back({"gather C1 rows", shape, gather, g_gbps, g_gbps / ref});
  table.push_back({"scatter C1 rows", shape, scatter, s_gbps, s_gbps / ref});
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
  index_t c3 = 0;
  for (const auto& p : plans) c3 += p.count(level::approximate);
  device_array<unsigned char> plan_mem(gpu::device_plan_view::bytes(batch, tokens));
  const auto plan = gpu::device_plan_view::carve(plan_mem.p, plan_mem.bytes(), batch, tokens);
  upload_plans(plans, plan);
  // Per C3 token: three cached rows read, one float row written.
  const std::size_t read = static_cast<std::size_t>(c3) * static_cast<std::size_t>(dim) * 3 * sizeof(Storage);
  const std::size_t written = static_cast<std::size_t>(c3) * static_cast<std::size_t>(dim) * sizeof(float);
  const double ref = memcpy_gbps(t, (read + written) / 2);
  const double us = t.median_us([&] { store.fill(0, 0, 700.f, gpu::rows_of(plan, level::approximate), specdiff::specdiff_weighted{}, o, t.stream); });
  const double gbps = static_cast<double>(read + written) / (us * 1e3);
  table.push_back({std::string("C3 fill, SpecDiff weights, ") + type + " store",
                   std::to_string(c3) + " of " + std::to_string(rows) + " rows x " + std::to_string(dim), us, gbps, gbps / ref});
  const double push_us = t.median_us([&] { store.write(0, 0, 700.f, o, t.stream); });
  const std::size_t push_bytes = static_cast<std::size_t>(rows) * static_cast<std::size_t>(dim) * (sizeof(float) + sizeof(Storage));
  const double push_gbps = static_cast<double>(push_bytes) / (push_us * 1e3);
  table.push_back({std::string("cache write (all rows), ") + type + " store", std::to_string(rows) + " rows x " + std::to_string(dim), push_us, push_gbps,
                   push_gbps / memcpy_gbps(t, push_bytes / 2)});
  store.check_status(t.stream);
}

}  // namespace

int main(int argc, char** argv) {
  int runs = 50;
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string_view a = argv[i];
    if (a == "--runs" && i + 1 < argc) runs = std::atoi(argv[++i]);
    else if (a == "--quick") quick = true;
    else {
      std::fprintf(stderr, "usage: %s [--runs N] [--quick]\n", argv[0]);
      return 2;
    }
  }
  if (runs < 1) {
    std::fprintf(stderr, "--runs: must be >= 1, got %d\n", runs);
    return 2;
  }
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIPPED: no usable CUDA device\n");
    return 77;
  }
  cudaDeviceProp prop{};
  SPECDIFF_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s (sm_%d%d, %d SMs), median of %d runs\n\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount, runs);

  cudaStream_t stream{};
  SPECDIFF_CUDA_CHECK(cudaStreamCreate(&stream));
  {
    const timer t(stream, runs);
    std::mt19937_64 g(12345);
    for (index_t tokens : {4096, 16384})
      for (index_t batch : {1, 4}) bench_classify(t, g, tokens, batch);
    const index_t dim = quick ? 256 : 1536;
    bench_rows(t, g, 16384, 4, dim, 0.1);
    bench_rows(t, g, 4096, 4, dim, 0.5);
    bench_fill<float>(t, g, 16384, 4, dim, "f32");
    bench_fill<specdiff::bfloat16>(t, g, 16384, 4, dim, "bf16");
  }
  SPECDIFF_CUDA_CHECK(cudaStreamDestroy(stream));
  print_table();
  return 0;
}
