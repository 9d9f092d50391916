// gpu::accelerator suites. `accelerator`: the device accelerator against the host accelerator, plan for plan,
// on the same fresh random inputs over whole runs (dense and partial steps, batches, shared CFG plans, compact
// and in-place rows, module-level slots): C1/C2/C3 lists and levels, C1 token lists, staleness and attention
// history exactly, filled rows exactly (C1, C2) or within float rounding of the weights (C3).
// `accelerator_graph`: a whole run, reset() included, captured into a CUDA graph and replayed, bit-identical
// to direct launches. `accelerator_errors`: the protocol's refusals and bad arguments on a live accelerator,
// each naming the parameter and value, and the status bits where the host would throw on bad data. Checks
// made before any CUDA call are in the `host` suite at the end (they run on machines without a GPU).
#include "support.cuh"

#include <specdiff/cuda/accelerator.cuh>
#include <specdiff/cuda/probe.cuh>

#include <cmath>
#include <memory>
#include <type_traits>

namespace gpu = specdiff::gpu;
using namespace cudatest;
using specdiff::index_t;
using specdiff::level;

namespace {

// Scores whose arithmetic is exact in float on both backends (sums of multiples of 1/128 below 2^16), so the
// host and the device rank identical values: plan-for-plan equality then tests the orchestration, not libm.
// Values come from a small set, so ties are common and the index tie-break is exercised too.
struct dyadic_scorer {
  static constexpr specdiff::signal needs = specdiff::signal::attention | specdiff::signal::future | specdiff::signal::cache_count;
  SPECDIFF_HD float score(const specdiff::token_signals& x) const { return x.attention + x.future + 0.25f * x.cache_count; }
};

std::vector<float> dyadic_values(std::mt19937_64& g, std::size_t n) {
  std::uniform_int_distribution<int> k(0, 1023);
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(k(g)) / 64.f;
  return v;
}

// For the SpecDiff scorer itself (logf on both sides, an ulp or two apart): his = 2^-a, fut = 3^-c, cf whole.
// Distinct (a, c, cf) give log scores at least |m ln 2 + n ln 3 + k| >= 0.008 apart for |m| <= 6, |n| <= 4,
// far beyond the ulps; equal ones are equal on each side. So both sides rank alike. (With a shared CFG plan
// the pair means break this, so that case runs with the dyadic scorer.)
std::vector<float> powers(std::mt19937_64& g, std::size_t n, float base, int most) {
  std::uniform_int_distribution<int> e(0, most);
  std::vector<float> v(n);
  for (auto& x : v) x = std::pow(base, -static_cast<float>(e(g)));
  return v;
}

std::vector<float> normal_rows(std::mt19937_64& g, std::size_t n) {
  std::normal_distribution<float> d(0.f, 1.f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

template <class T>
std::vector<std::remove_const_t<T>> to_host(gpu::device_span<T> s) {
  std::vector<std::remove_const_t<T>> v(static_cast<std::size_t>(s.size));
  SPECDIFF_CUDA_CHECK(cudaDeviceSynchronize());
  if (!v.empty()) SPECDIFF_CUDA_CHECK(cudaMemcpy(v.data(), s.data, v.size() * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

std::vector<float> main_timesteps(index_t steps) {
  std::vector<float> t(static_cast<std::size_t>(steps));
  for (index_t k = 0; k < steps; ++k) t[static_cast<std::size_t>(k)] = 1000.f - 1000.f * static_cast<float>(k) / static_cast<float>(steps);
  return t;
}

struct run_case {
  index_t tokens = 256;
  index_t batch = 1;
  index_t dim = 64;
  index_t steps = 10;
  bool share_cfg = false;
  double cache_rate = 0.7;
  double reuse_mass = 0.1;
  bool in_place = false;
  specdiff::step_schedule schedule{2, 0, 2, {6}};
};

enum class inputs_kind { dyadic, powers };

/// Device plan of every plan slot against the host's, after plan_step.
template <class HostStep, class DeviceStep>
void compare_plans(const HostStep& hs, const DeviceStep& ds, index_t plans) {
  for (index_t p = 0; p < plans; ++p) {
    INFO("plan ", p);
    const auto got = download(ds.plan(p));
    const auto& want = hs.plan(p);
    std::vector<index_t> order;
    for (int l = 0; l < specdiff::level_count; ++l) {
      REQUIRE(got.counts[static_cast<std::size_t>(l)] == want.count(static_cast<level>(l)));
      const auto list = want.indices(static_cast<level>(l));
      order.insert(order.end(), list.begin(), list.end());
    }
    REQUIRE(got.order == order);
    REQUIRE(std::equal(want.levels().begin(), want.levels().end(), got.levels.begin()));
  }
  const auto host_ids = hs.compute_tokens();
  const auto device_ids = to_host(ds.compute_tokens());
  REQUIRE(std::equal(host_ids.begin(), host_ids.end(), device_ids.begin(), device_ids.end()));
}

/// Filled rows: C1 and C2 exact (copies), C3 within float rounding of the device's weights (expf, an ulp from
/// glibc's): the weights sum to 1 over rows of magnitude <= `scale`.
void compare_output(const std::vector<float>& got, const std::vector<float>& want, const std::vector<level>& row_level, index_t dim, float scale) {
  int bad = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const level l = row_level[i / static_cast<std::size_t>(dim)];
    const bool ok = l == level::approximate ? std::abs(got[i] - want[i]) <= 1e-5f * scale : got[i] == want[i];
    if (!ok && bad++ < 5) FAIL_CHECK("row ", i / static_cast<std::size_t>(dim), " (level ", static_cast<int>(l), ") col ", i % static_cast<std::size_t>(dim), ": device ", got[i], ", host ", want[i]);
  }
  CHECK(bad == 0);
}

template <class Scorer>
void run_against_host(const run_case& c, const Scorer& scorer, inputs_kind kind, std::uint64_t salt) {
  INFO("tokens ", c.tokens, ", batch ", c.batch, ", dim ", c.dim, ", share_cfg ", c.share_cfg, ", cache_rate ", c.cache_rate, ", in_place ", c.in_place);
  auto g = rng(salt);
  const stream s;
  const specdiff::accelerator_config cfg{c.tokens, c.batch, c.steps, c.dim, 1, 1, c.share_cfg};
  const index_t rows = cfg.rows(), plans = cfg.plans();
  const auto n = static_cast<std::size_t>(rows);

  specdiff::accelerator host(cfg, scorer, specdiff::self_speculation{}, specdiff::three_level_classifier(c.cache_rate, c.reuse_mass), c.schedule);
  using device_type = gpu::accelerator<Scorer, gpu::self_speculation, gpu::three_level_classifier<>, specdiff::step_schedule>;
  const gpu::three_level_classifier<> classifier(c.tokens, plans, c.cache_rate, c.reuse_mass);
  buffer<unsigned char> memory(device_type::memory_bytes(cfg, classifier, c.schedule));
  device_type dev(cfg, scorer, gpu::self_speculation{}, classifier, c.schedule, memory.get(), memory.size(), s);
  CHECK(dev.partial_compute_count() == host.partial_compute_count());

  auto signal = [&](float base) { return kind == inputs_kind::dyadic ? dyadic_values(g, n) : powers(g, n, base, base == 2.f ? 6 : 4); };
  const auto t = main_timesteps(c.steps);
  const auto spec_t = specdiff::aligned_speculative_timesteps(t, c.schedule.speculative_steps(), c.schedule);
  host.begin_speculation(spec_t);
  dev.begin_speculation(spec_t);
  std::vector<buffer<float>> records;
  for (std::size_t k = 0; k < spec_t.size(); ++k) {
    const auto record = signal(3.f);
    host.record_speculation(static_cast<index_t>(k), record);
    records.emplace_back(record);
    dev.record_speculation(static_cast<index_t>(k), records.back().cspan());
  }

  std::vector<float> output(n * static_cast<std::size_t>(c.dim), 0.f);
  buffer<float> d_output(output);
  const specdiff::matrix_view<float> out_view(output.data(), rows, c.dim);
  const gpu::device_matrix<float> d_out_view(d_output.get(), rows, c.dim);
  int partial_steps = 0;
  for (index_t k = 0; k < c.steps; ++k) {
    INFO("step ", k);
    auto hs = host.plan_step(k, t[static_cast<std::size_t>(k)]);
    auto ds = dev.plan_step(k, t[static_cast<std::size_t>(k)]);
    REQUIRE(ds.dense() == hs.dense());
    REQUIRE(ds.compute_count() == hs.compute_count());
    partial_steps += hs.dense() ? 0 : 1;
    compare_plans(hs, ds, plans);

    std::vector<level> row_level(n);
    for (index_t b = 0; b < c.batch; ++b) {
      const auto levels = hs.plan(b).levels();
      std::copy(levels.begin(), levels.end(), row_level.begin() + static_cast<std::ptrdiff_t>(b) * c.tokens);
    }
    const index_t computed_rows = c.batch * hs.compute_count();
    const auto computed = normal_rows(g, static_cast<std::size_t>(computed_rows) * static_cast<std::size_t>(c.dim));
    const auto attention = signal(2.f);
    buffer<float> d_attention(attention);
    if (c.in_place) {
      // The engine wrote its C1 rows into the full matrix; both sides start from the same matrix.
      const auto ids = hs.compute_tokens();
      for (index_t r = 0; r < computed_rows; ++r) {
        const index_t row = r / hs.compute_count() * c.tokens + ids[static_cast<std::size_t>(r)];
        std::copy_n(computed.begin() + static_cast<std::ptrdiff_t>(r) * c.dim, c.dim, output.begin() + static_cast<std::ptrdiff_t>(row) * c.dim);
      }
      d_output.upload(output);
      host.complete_step(std::move(hs), out_view, attention);
      dev.complete_step(std::move(ds), d_out_view, d_attention.cspan());
    } else {
      buffer<float> d_computed(computed);
      host.complete_step(std::move(hs), specdiff::matrix_view<const float>(computed.data(), computed_rows, c.dim), out_view, attention);
      dev.complete_step(std::move(ds), gpu::device_matrix<const float>(d_computed.get(), computed_rows, c.dim), d_out_view, d_attention.cspan());
      s.sync();  // d_computed goes out of scope
    }
    compare_output(d_output.download(), output, row_level, c.dim, 6.f);
    for (index_t p = 0; p < plans; ++p) {
      const auto cf = host.cache_counts(p), his = host.attention_history(p);
      const auto d_cf = to_host(dev.cache_counts(p)), d_his = to_host(dev.attention_history(p));
      REQUIRE(std::equal(cf.begin(), cf.end(), d_cf.begin(), d_cf.end()));
      REQUIRE(std::equal(his.begin(), his.end(), d_his.begin(), d_his.end()));
    }
    CHECK(dev.next_step() == host.next_step());
    CHECK(dev.last_timestep() == host.last_timestep());
  }
  CHECK(partial_steps > 0);
  CHECK(dev.read_status() == 0);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
TEST_SUITE("accelerator") {
  TEST_CASE("the device accelerator plans, fills and counts as the host accelerator does (dyadic scores)") {
    std::uint64_t salt = 100;
    for (index_t tokens : {1, 31, 256, 4096})
      for (index_t batch : {1, 4})
        for (bool share : {false, true}) {
          if (share && batch % 2 != 0) continue;  // a shared CFG plan needs uncond + cond halves
          run_case c;
          c.tokens = tokens;
          c.batch = batch;
          c.share_cfg = share;
          c.in_place = salt % 2 == 0;  // compact and in-place rows, alternately
          c.dim = tokens == 31 ? 33 : 64;  // an odd width takes the element-wise row path
          c.cache_rate = tokens == 4096 ? 0.9 : 0.7;
          run_against_host(c, dyadic_scorer{}, inputs_kind::dyadic, ++salt);
        }
  }

  TEST_CASE("the device accelerator plans as the host accelerator does with the SpecDiff scorer") {
    std::uint64_t salt = 200;
    for (index_t tokens : {31, 256, 1024})
      for (index_t batch : {1, 2}) {
        run_case c;
        c.tokens = tokens;
        c.batch = batch;
        c.cache_rate = 0.8;
        c.reuse_mass = 0.2;
        c.steps = 12;
        c.schedule = specdiff::step_schedule{3, 0, 3, {8}};
        run_against_host(c, specdiff::specdiff_scorer{}, inputs_kind::powers, ++salt);
      }
  }

  TEST_CASE("module level: per-slot fills, compact and in-place caching, whole-slot fills, as on the host") {
    auto g = rng(300);
    const stream s;
    const index_t tokens = 256, batch = 2, dim = 32, steps = 8;
    const specdiff::accelerator_config cfg{tokens, batch, steps, dim, 2, 2, false};
    const specdiff::step_schedule schedule{2, 0, 2, {}};
    const index_t rows = cfg.rows();
    const auto n = static_cast<std::size_t>(rows), cells = n * static_cast<std::size_t>(dim);
    specdiff::accelerator host(cfg, dyadic_scorer{}, specdiff::self_speculation{}, specdiff::three_level_classifier(0.75), schedule);
    using device_type = gpu::accelerator<dyadic_scorer, gpu::self_speculation, gpu::three_level_classifier<>, specdiff::step_schedule>;
    const gpu::three_level_classifier<> classifier(tokens, batch, 0.75);
    buffer<unsigned char> memory(device_type::memory_bytes(cfg, classifier, schedule));
    device_type dev(cfg, dyadic_scorer{}, gpu::self_speculation{}, classifier, schedule, memory.get(), memory.size(), s);

    const auto t = main_timesteps(steps);
    const auto spec_t = specdiff::aligned_speculative_timesteps(t, 2, schedule);
    host.begin_speculation(spec_t);
    dev.begin_speculation(spec_t);
    std::vector<buffer<float>> records;
    for (std::size_t k = 0; k < spec_t.size(); ++k) {
      const auto record = dyadic_values(g, n);
      host.record_speculation(static_cast<index_t>(k), record);
      records.emplace_back(record);
      dev.record_speculation(static_cast<index_t>(k), records.back().cspan());
    }
    // One full matrix per slot, on each side.
    std::vector<std::vector<float>> out(4, std::vector<float>(cells, 0.f));
    std::vector<buffer<float>> d_out;
    for (const auto& o : out) d_out.emplace_back(o);
    for (index_t k = 0; k < steps; ++k) {
      INFO("step ", k);
      auto hs = host.plan_step(k, t[static_cast<std::size_t>(k)]);
      auto ds = dev.plan_step(k, t[static_cast<std::size_t>(k)]);
      REQUIRE(ds.dense() == hs.dense());
      compare_plans(hs, ds, batch);
      std::vector<level> row_level(n);
      for (index_t b = 0; b < batch; ++b) std::ranges::copy(hs.plan(b).levels(), row_level.begin() + static_cast<std::ptrdiff_t>(b) * tokens);
      const index_t computed_rows = batch * hs.compute_count();
      const auto ids = hs.compute_tokens();
      for (index_t slot = 0; slot < 4; ++slot) {
        const index_t layer = slot / 2, site = slot % 2;
        auto& o = out[static_cast<std::size_t>(slot)];
        const specdiff::matrix_view<float> view(o.data(), rows, dim);
        const gpu::device_matrix<float> d_view(d_out[static_cast<std::size_t>(slot)].get(), rows, dim);
        if (!hs.dense() && layer == 1) {  // computed for no token: every row from the cache
          const level as = site == 0 ? level::reuse : level::approximate;
          host.fill_all(hs, layer, site, as, view);
          dev.fill_all(ds, layer, site, as, d_view);
          compare_output(d_out[static_cast<std::size_t>(slot)].download(), o, std::vector<level>(n, as), dim, 6.f);
          continue;
        }
        host.fill(hs, layer, site, view);
        dev.fill(ds, layer, site, d_view);
        const auto computed = normal_rows(g, static_cast<std::size_t>(computed_rows) * static_cast<std::size_t>(dim));
        if (site == 0) {
          buffer<float> d_computed(computed);
          host.cache_rows(hs, layer, site, specdiff::matrix_view<const float>(computed.data(), computed_rows, dim));
          dev.cache_rows(ds, layer, site, gpu::device_matrix<const float>(d_computed.get(), computed_rows, dim));
          s.sync();
          // Caching compact rows leaves the matrix's C1 rows as earlier fills wrote them: within rounding.
          auto stale = row_level;
          std::ranges::replace(stale, level::compute, level::approximate);
          compare_output(d_out[static_cast<std::size_t>(slot)].download(), o, stale, dim, 6.f);
          continue;
        } else {
          for (index_t r = 0; r < computed_rows; ++r) {
            const index_t row = r / hs.compute_count() * tokens + ids[static_cast<std::size_t>(r)];
            std::copy_n(computed.begin() + static_cast<std::ptrdiff_t>(r) * dim, dim, o.begin() + static_cast<std::ptrdiff_t>(row) * dim);
          }
          // Same C1 rows on the device, the rest as the device's fill left them.
          auto d_o = d_out[static_cast<std::size_t>(slot)].download();
          for (std::size_t i = 0; i < cells; ++i)
            if (row_level[i / static_cast<std::size_t>(dim)] == level::compute) d_o[i] = o[i];
          d_out[static_cast<std::size_t>(slot)].upload(d_o);
          host.cache_rows_in_place(hs, layer, site, specdiff::matrix_view<const float>(o.data(), rows, dim));
          dev.cache_rows_in_place(ds, layer, site, gpu::device_matrix<const float>(d_view));
        }
        compare_output(d_out[static_cast<std::size_t>(slot)].download(), o, row_level, dim, 6.f);
      }
      const auto attention = dyadic_values(g, n);
      buffer<float> d_attention(attention);
      if (k % 3 == 2) {
        host.complete_step(std::move(hs), specdiff::attention_unchanged);
        dev.complete_step(std::move(ds), gpu::attention_unchanged);
      } else {
        host.complete_step(std::move(hs), attention);
        dev.complete_step(std::move(ds), d_attention.cspan());
      }
      for (index_t p = 0; p < batch; ++p) {
        const auto cf = host.cache_counts(p), his = host.attention_history(p);
        const auto d_cf = to_host(dev.cache_counts(p)), d_his = to_host(dev.attention_history(p));
        REQUIRE(std::equal(cf.begin(), cf.end(), d_cf.begin(), d_cf.end()));
        REQUIRE(std::equal(his.begin(), his.end(), d_his.begin(), d_his.end()));
      }
    }
    CHECK(dev.read_status() == 0);
  }

  TEST_CASE("all-reuse plans (FORA) with no speculation match the host's") {
    auto g = rng(400);
    const stream s;
    const index_t tokens = 64, batch = 2, dim = 16, steps = 6;
    const specdiff::accelerator_config cfg{tokens, batch, steps, dim};
    const specdiff::step_schedule schedule{1, 3, 0, {}};  // FORA: a full step every 3 from the first
    specdiff::accelerator host(cfg, specdiff::uniform_scorer{}, specdiff::no_speculation{}, specdiff::all_reuse_classifier{}, schedule);
    using device_type = gpu::accelerator<specdiff::uniform_scorer, gpu::no_speculation, gpu::all_reuse_classifier, specdiff::step_schedule>;
    const gpu::all_reuse_classifier classifier(tokens, batch);
    buffer<unsigned char> memory(device_type::memory_bytes(cfg, classifier, schedule));
    device_type dev(cfg, {}, {}, classifier, schedule, memory.get(), memory.size(), s);
    std::vector<float> output(static_cast<std::size_t>(cfg.rows() * dim), 0.f);
    buffer<float> d_output(output);
    const auto t = main_timesteps(steps);
    for (index_t k = 0; k < steps; ++k) {
      INFO("step ", k);
      auto hs = host.plan_step(k, t[static_cast<std::size_t>(k)]);
      auto ds = dev.plan_step(k, t[static_cast<std::size_t>(k)]);
      REQUIRE(ds.dense() == hs.dense());
      REQUIRE(ds.compute_count() == hs.compute_count());
      compare_plans(hs, ds, batch);
      const index_t computed_rows = batch * hs.compute_count();
      const auto computed = normal_rows(g, static_cast<std::size_t>(computed_rows) * static_cast<std::size_t>(dim));
      buffer<float> d_computed(computed);
      host.complete_step(std::move(hs), specdiff::matrix_view<const float>(computed.data(), computed_rows, dim),
                         specdiff::matrix_view<float>(output.data(), cfg.rows(), dim), {});
      dev.complete_step(std::move(ds), gpu::device_matrix<const float>(d_computed.get(), computed_rows, dim),
                        gpu::device_matrix<float>(d_output.get(), cfg.rows(), dim), {});
      CHECK(d_output.download() == output);  // C1 and C2 rows only: copies
    }
    CHECK(dev.read_status() == 0);
  }
}

// ---------------------------------------------------------------------------------------------------------
TEST_SUITE("accelerator_graph") {
  TEST_CASE("a whole run, reset included, captures into a CUDA graph and replays bit-identically") {
    auto g = rng(500);
    const stream s;
    const index_t tokens = 4096, batch = 2, dim = 64, steps = 8;
    const specdiff::accelerator_config cfg{tokens, batch, steps, dim};
    const specdiff::step_schedule schedule{2, 0, 2, {5}};
    using device_type = gpu::accelerator<specdiff::specdiff_scorer, gpu::self_speculation, gpu::three_level_classifier<>, specdiff::step_schedule>;
    const gpu::three_level_classifier<> classifier(tokens, batch, 0.9);
    buffer<unsigned char> memory(device_type::memory_bytes(cfg, classifier, schedule));
    device_type acc(cfg, {}, {}, classifier, schedule, memory.get(), memory.size(), s);

    const auto n = static_cast<std::size_t>(cfg.rows());
    const auto t = main_timesteps(steps);
    const auto spec_t = specdiff::aligned_speculative_timesteps(t, 2, schedule);
    // Every input on the device before the run: a captured run reads them where they are at replay.
    std::vector<buffer<float>> records, attention, computed;
    for (std::size_t k = 0; k < spec_t.size(); ++k) records.emplace_back(lognormal(g, n, 0.01));
    for (index_t k = 0; k < steps; ++k) {
      const bool dense = k == 0 || schedule.is_dense(k, steps);
      const index_t count = dense ? tokens : acc.partial_compute_count();
      attention.emplace_back(lognormal(g, n, 0.01));
      computed.emplace_back(normal_rows(g, static_cast<std::size_t>(batch * count) * static_cast<std::size_t>(dim)));
    }
    buffer<float> output(n * static_cast<std::size_t>(dim));
    std::vector<gpu::device_plan_view> last_plans;

    auto run = [&] {
      acc.reset();
      acc.begin_speculation(spec_t);
      for (std::size_t k = 0; k < spec_t.size(); ++k) acc.record_speculation(static_cast<index_t>(k), records[k].cspan());
      for (index_t k = 0; k < steps; ++k) {
        auto step = acc.plan_step(k, t[static_cast<std::size_t>(k)]);
        last_plans = {step.plan(0), step.plan(1)};
        const index_t count = batch * step.compute_count();
        acc.complete_step(std::move(step), gpu::device_matrix<const float>(computed[static_cast<std::size_t>(k)].get(), count, dim),
                          gpu::device_matrix<float>(output.get(), cfg.rows(), dim), attention[static_cast<std::size_t>(k)].cspan());
      }
    };
    struct snapshot {
      std::vector<float> output, cf, his, filled;
      std::vector<plan_copy> plans;
      bool operator==(const snapshot& o) const {
        auto same = [](const plan_copy& a, const plan_copy& b) { return a.order == b.order && a.counts == b.counts && a.levels == b.levels; };
        return output == o.output && cf == o.cf && his == o.his && filled == o.filled && plans.size() == o.plans.size() &&
               std::equal(plans.begin(), plans.end(), o.plans.begin(), same);
      }
    };
    buffer<float> filled(n * static_cast<std::size_t>(dim));
    auto take = [&] {
      // The store, observed through a fill of every row from its whole history.
      acc.store().fill(0, 0, 1.f, gpu::all_rows{cfg.rows()}, specdiff::specdiff_weighted{}, gpu::device_matrix<float>(filled.get(), cfg.rows(), dim), s);
      snapshot x{output.download(), to_host(acc.cache_counts(0)), to_host(acc.attention_history(1)), filled.download(), {}};
      for (const auto& p : last_plans) x.plans.push_back(download(p));
      return x;
    };

    run();
    s.sync();
    const snapshot eager = take();
    CHECK(acc.read_status() == 0);
    run();  // again, directly: runs are deterministic
    s.sync();
    CHECK(take() == eager);

    SPECDIFF_CUDA_CHECK(cudaMemsetAsync(output.get(), 0, output.bytes(), s));
    s.sync();
    cudaGraph_t graph = nullptr;
    SPECDIFF_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));  // a sync or malloc inside fails the capture
    run();
    SPECDIFF_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
    cudaGraphExec_t exec = nullptr;
    SPECDIFF_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    for (int replay = 0; replay < 2; ++replay) {
      INFO("replay ", replay);
      SPECDIFF_CUDA_CHECK(cudaGraphLaunch(exec, s));
      s.sync();
      CHECK(take() == eager);
    }
    CHECK(acc.read_status() == 0);
    SPECDIFF_CUDA_CHECK(cudaGraphExecDestroy(exec));
    SPECDIFF_CUDA_CHECK(cudaGraphDestroy(graph));
  }
}

// ---------------------------------------------------------------------------------------------------------
TEST_SUITE("accelerator_errors") {
  using device_type = gpu::accelerator<specdiff::specdiff_scorer, gpu::self_speculation, gpu::three_level_classifier<>, specdiff::step_schedule>;

  // The protocol is a type: a step cannot be copied, nor completed from an lvalue.
  static_assert(!std::is_copy_constructible_v<device_type::step> && !std::is_copy_assignable_v<device_type::step>);
  static_assert(std::is_nothrow_move_constructible_v<device_type::step>);
  template <class A>
  concept completes_from_lvalue = requires(A& a, typename A::step& s, gpu::device_span<const float> att) { a.complete_step(s, att); };
  template <class A>
  concept completes_from_rvalue = requires(A& a, typename A::step&& s, gpu::device_span<const float> att) { a.complete_step(std::move(s), att); };
  static_assert(!completes_from_lvalue<device_type> && completes_from_rvalue<device_type>);
  static_assert(!std::is_copy_constructible_v<device_type> && !std::is_move_constructible_v<device_type>);

  struct fixture {
    static constexpr index_t tokens = 64, batch = 2, dim = 8, steps = 8;
    specdiff::accelerator_config cfg{tokens, batch, steps, dim};
    specdiff::step_schedule schedule{2, 0, 2, {}};
    stream s;
    gpu::three_level_classifier<> classifier{tokens, batch, 0.75};
    buffer<unsigned char> memory{device_type::memory_bytes(cfg, classifier, schedule)};
    buffer<float> attention{static_cast<std::size_t>(tokens * batch)}, output{static_cast<std::size_t>(tokens * batch * dim)},
        computed{static_cast<std::size_t>(tokens * batch * dim)};
    device_type acc{cfg, {}, {}, classifier, schedule, memory.get(), memory.size(), s};
    std::vector<float> t = main_timesteps(steps);

    fixture() {
      attention.upload(std::vector<float>(static_cast<std::size_t>(tokens * batch), 0.5f));
      computed.upload(std::vector<float>(static_cast<std::size_t>(tokens * batch * dim), 1.f));
    }
    gpu::device_matrix<float> out() const { return {output.get(), tokens * batch, dim}; }
    gpu::device_matrix<const float> rows(index_t n) const { return {computed.get(), n, dim}; }
    void speculate() {
      const auto spec_t = specdiff::aligned_speculative_timesteps(t, 2, schedule);
      acc.begin_speculation(spec_t);
      for (index_t k = 0; k < 2; ++k) acc.record_speculation(k, attention.cspan());
    }
    void complete(device_type::step&& st) {
      const index_t n = batch * st.compute_count();
      acc.complete_step(std::move(st), rows(n), out(), attention.cspan());
    }
  };

  TEST_CASE("protocol misuse throws at once and leaves the accelerator usable") {
    fixture f;
    auto& acc = f.acc;
    expect_error<std::invalid_argument>([&] { (void)acc.plan_step(-7, 1000.f); }, {"step = -7", "[0, 8)"});
    expect_error<std::invalid_argument>([&] { (void)acc.plan_step(12345, 1000.f); }, {"step = 12345"});
    expect_error<std::logic_error>([&] { (void)acc.plan_step(1, 1000.f); }, {"expected step 0, got 1"});
    expect_error<std::invalid_argument>([&] { (void)acc.plan_step(0, NAN); }, {"t", "not finite"});
    f.speculate();
    auto s0 = acc.plan_step(0, f.t[0]);
    expect_error<std::logic_error>([&] { (void)acc.plan_step(1, f.t[1]); }, {"step 0 is planned and not completed"});
    expect_error<std::logic_error>([&] { f.acc.set_stream(nullptr); }, {"set_stream", "step 0"});
    // Bad arguments to complete_step: refused, the step still live.
    expect_error<std::invalid_argument>([&] { acc.complete_step(std::move(s0), f.rows(3), f.out(), f.attention.cspan()); },
                                        {"computed", "128x8", "3x8"});
    expect_error<std::invalid_argument>([&] { acc.complete_step(std::move(s0), f.rows(128), f.out(), {f.attention.get(), 3}); },
                                        {"attention", "expected 128 values, got 3"});
    expect_error<std::invalid_argument>(
        [&] { acc.complete_step(std::move(s0), f.rows(128), gpu::device_matrix<float>(f.output.get(), 128, 7), f.attention.cspan()); },
        {"output", "128x8", "128x7"});
    CHECK(s0.index() == 0);
    f.complete(std::move(s0));
    expect_error<std::logic_error>([&] { (void)s0.dense(); }, {"empty"});
    expect_error<std::logic_error>([&] { f.complete(std::move(s0)); }, {"empty"});
    expect_error<std::invalid_argument>([&] { (void)acc.plan_step(1, 1001.f); }, {"t: timesteps must fall", "1000", "1001"});

    // A step of another accelerator, and a stale one.
    fixture other;
    other.speculate();
    auto foreign = other.acc.plan_step(0, other.t[0]);
    expect_error<std::logic_error>([&] { acc.complete_step(std::move(foreign), f.rows(128), f.out(), f.attention.cspan()); },
                                   {"belongs to another accelerator"});
    auto s1 = acc.plan_step(1, f.t[1]);
    acc.reset();
    expect_error<std::logic_error>([&] { f.complete(std::move(s1)); }, {"stale"});

    // After reset: the speculative pass must be complete before a partial step.
    f.complete(acc.plan_step(0, f.t[0]));
    f.complete(acc.plan_step(1, f.t[1]));
    expect_error<std::logic_error>([&] { (void)acc.plan_step(2, f.t[2]); }, {"speculative pass is not complete"});
    CHECK(acc.next_step() == 2);
  }

  TEST_CASE("speculation, module-level slots and abandoned steps are refused as on the host") {
    fixture f;
    auto& acc = f.acc;
    expect_error<std::logic_error>([&] { acc.record_speculation(0, f.attention.cspan()); }, {"not begun"});
    expect_error<std::invalid_argument>([&] { acc.begin_speculation(std::vector<float>{900.f, 950.f}); }, {"timesteps", "strictly decrease", "950"});
    expect_error<std::invalid_argument>([&] { acc.begin_speculation(std::vector<float>{900.f, 800.f, 700.f}); }, {"timesteps", "3 speculative steps", "sized for 2"});
    acc.begin_speculation(std::vector<float>{1000.f, 500.f});
    expect_error<std::invalid_argument>([&] { acc.record_speculation(2, f.attention.cspan()); }, {"step = 2", "[0, 2)"});
    expect_error<std::invalid_argument>([&] { acc.record_speculation(0, {f.attention.get(), 5}); }, {"scores", "expected 128 values, got 5"});
    acc.record_speculation(0, f.attention.cspan());
    expect_error<std::logic_error>([&] { acc.record_speculation(0, f.attention.cspan()); }, {"already recorded"});
    acc.record_speculation(1, f.attention.cspan());
    expect_error<std::invalid_argument>([&] { acc.set_metric({f.attention.get(), 7}); }, {"metric", "expected 128 values, got 7"});

    {
      auto s0 = acc.plan_step(0, f.t[0]);
      expect_error<std::invalid_argument>([&] { acc.fill(s0, 1, 0, f.out()); }, {"layer = 1", "[0, 1)"});
      expect_error<std::invalid_argument>([&] { acc.cache_rows(s0, 0, 3, f.rows(128)); }, {"site = 3", "[0, 1)"});
      expect_error<std::logic_error>([&] { acc.fill_all(s0, 0, 0, level::reuse, f.out()); }, {"fill_all", "dense"});
      acc.cache_rows(s0, 0, 0, f.rows(128));
      expect_error<std::logic_error>([&] { acc.cache_rows(s0, 0, 0, f.rows(128)); }, {"layer 0 site 0", "already cached"});
      expect_error<std::logic_error>([&] { f.complete(std::move(s0)); }, {"layer 0 site 0 was already cached"});
      // s0 is destroyed unconsumed with rows cached: the accelerator needs reset().
    }
    expect_error<std::logic_error>([&] { (void)acc.plan_step(0, f.t[0]); }, {"abandoned", "reset()"});
    acc.reset();
    {
      auto s0 = acc.plan_step(0, f.t[0]);  // abandoned before caching anything: no reset needed
    }
    auto s0 = acc.plan_step(0, f.t[0]);
    expect_error<std::logic_error>([&] { acc.complete_step(std::move(s0), f.attention.cspan()); }, {"layer 0 site 0", "neither cached nor filled"});
    f.complete(std::move(s0));
    CHECK(acc.read_status() == 0);
  }

  TEST_CASE("API 0.3: overlapping views, late records, a pass in another unit and an orphaned step, refused as on the host") {
    {
      fixture f;
      f.speculate();
      auto st = f.acc.plan_step(0, f.t[0]);
      const gpu::device_matrix<const float> inside_output(f.output.get(), 128, fixture::dim);
      expect_error<std::invalid_argument>([&] { f.acc.complete_step(std::move(st), inside_output, f.out(), f.attention.cspan()); },
                                          {"computed and output overlap"});
      expect_error<std::invalid_argument>([&] { f.acc.complete_step(std::move(st), f.rows(128), f.out(), {f.output.get(), 128}); },
                                          {"output and attention overlap"});
      expect_error<std::invalid_argument>([&] { f.acc.complete_step(std::move(st), f.out(), {f.output.get() + 8, 128}); },
                                          {"output and attention overlap"});
      expect_error<std::logic_error>([&] { f.acc.record_speculation(0, f.attention.cspan()); }, {"record_speculation", "main pass has started"});
      f.complete(std::move(st));
      CHECK(f.acc.next_step() == 1);
    }
    {
      fixture f;
      f.acc.begin_speculation(std::vector<float>{1.f, 0.5f});  // t runs 1000 .. 125
      for (index_t k = 0; k < 2; ++k) f.acc.record_speculation(k, f.attention.cspan());
      expect_error<std::invalid_argument>([&] { (void)f.acc.plan_step(0, f.t[0]); }, {"speculative pass starts at", "same unit"});
      CHECK(f.acc.next_step() == 0);
    }
    {
      auto f = std::make_unique<fixture>();
      f->speculate();
      auto st = f->acc.plan_step(0, f->t[0]);
      f.reset();  // the accelerator goes first: the step is detached, its destructor a no-op
      expect_error<std::logic_error>([&] { (void)st.compute_count(); }, {"outlived its accelerator"});
    }
  }

  TEST_CASE("bad data raises status bits where the host throws, and check_status names them") {
    fixture f;
    f.speculate();
    std::vector<float> rows(static_cast<std::size_t>(128 * f.dim), 1.f);
    rows[5] = NAN;
    f.computed.upload(rows);
    f.complete(f.acc.plan_step(0, f.t[0]));
    CHECK((f.acc.read_status() & gpu::status_nonfinite_feature) != 0);
    expect_error<std::runtime_error>([&] { f.acc.check_status(); }, {"gpu::accelerator", "non-finite feature"});
    f.acc.reset();
    CHECK(f.acc.read_status() == 0);
    // A NaN attention reaches the scores: the classifier's bit.
    f.computed.upload(std::vector<float>(rows.size(), 1.f));
    f.speculate();
    std::vector<float> attention(128, 0.5f);
    attention[17] = NAN;
    buffer<float> bad(attention);
    f.complete(f.acc.plan_step(0, f.t[0]));
    auto s1 = f.acc.plan_step(1, f.t[1]);
    f.acc.complete_step(std::move(s1), f.rows(128), f.out(), bad.cspan());
    f.complete(f.acc.plan_step(2, f.t[2]));
    CHECK((f.acc.read_status() & gpu::status_nonfinite_score) != 0);
  }

  TEST_CASE("construction checks sizes, memory and the classifier against the configuration") {
    const stream s;
    const specdiff::step_schedule schedule{2, 0, 2, {}};
    const gpu::three_level_classifier<> classifier(64, 2, 0.75);
    const specdiff::accelerator_config cfg{64, 2, 8, 8};
    buffer<unsigned char> memory(device_type::memory_bytes(cfg, classifier, schedule) + 256);
    expect_error<std::invalid_argument>([&] { device_type a(cfg, {}, {}, classifier, schedule, memory.get(), 1000, s); },
                                        {"memory_bytes: 1000 bytes supplied", "needed"});
    expect_error<std::invalid_argument>([&] { device_type a(cfg, {}, {}, classifier, schedule, memory.get() + 16, memory.size() - 16, s); },
                                        {"memory", "256-byte aligned"});
    expect_error<std::invalid_argument>([&] { device_type a({64, 2, 8, 8, 1, 1, true}, {}, {}, classifier, schedule, memory.get(), memory.size(), s); },
                                        {"classifier: built for 2 x 64", "plans 1 x 64", "CFG"});
    expect_error<std::invalid_argument>([&] { device_type a({32, 2, 8, 8}, {}, {}, classifier, schedule, memory.get(), memory.size(), s); },
                                        {"classifier: built for 2 x 64", "2 x 32"});
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host-only: everything the device accelerator checks before its first CUDA call, with a stand-in classifier
// that models the device contract without touching a device.
TEST_SUITE("host") {
  struct stand_in_classifier {
    index_t n = 64, b = 2, c1 = 16;
    index_t tokens() const { return n; }
    index_t batch() const { return b; }
    index_t compute_count() const { return c1; }
    std::size_t workspace_bytes() const { return 1000; }
    void classify(void*, std::size_t&, gpu::device_span<const float>, const gpu::device_plan_view&, cudaStream_t) const {}
  };
  static_assert(gpu::device_level_classifier<stand_in_classifier>);
  using host_checked = gpu::accelerator<specdiff::specdiff_scorer, gpu::self_speculation, stand_in_classifier, specdiff::step_schedule>;

  TEST_CASE("device accelerator: sizes, schedule and classifier are checked before any CUDA call") {
    const specdiff::step_schedule schedule{2, 0, 2, {}};
    const specdiff::accelerator_config cfg{64, 2, 8, 16};
    const std::size_t bytes = host_checked::memory_bytes(cfg, {}, schedule);
    // The store, the plans, the classifier's workspace (1000 -> 1024), five per-plan signals, the change
    // norms, the scores, two C1 lists (128 values each: 512 bytes) and two speculative records (1024 bytes).
    CHECK(bytes == gpu::device_cache_store<float>::memory_bytes({1, 1, 128, 16, 3}) + gpu::device_plan_view::bytes(2, 64) + 1024 + 5 * 512 +
                       4 * 512 + 1024);
    expect_error<std::invalid_argument>([&] { (void)host_checked::memory_bytes({0, 2, 8, 16}, {}, schedule); }, {"tokens: must be positive, got 0"});
    expect_error<std::invalid_argument>([&] { (void)host_checked::memory_bytes({64, 3, 8, 16, 1, 1, true}, {}, schedule); },
                                        {"batch", "share_cfg_plan", "3"});
    expect_error<std::invalid_argument>([&] { (void)host_checked::memory_bytes({64, 2, 8, 0}, {}, schedule); }, {"feature_dim", "0"});
    expect_error<std::invalid_argument>([&] { (void)host_checked::memory_bytes(cfg, {}, specdiff::step_schedule{2, 0, 2, {12}}); },
                                        {"dense_steps", "12", "[0, 8)"});
    expect_error<std::invalid_argument>([&] { (void)host_checked::memory_bytes(cfg, {64, 2, 65}, schedule); },
                                        {"classifier: compute_count() = 65", "[0, 64]"});
    expect_error<std::invalid_argument>([&] { (void)host_checked::memory_bytes(cfg, {100, 2, 10}, schedule); },
                                        {"classifier: built for 2 x 100", "plans 2 x 64"});
    expect_error<std::invalid_argument>([&] { (void)host_checked::memory_bytes({1 << 16, 1 << 15, 8, 4}, {}, schedule); }, {"batch * tokens"});

    alignas(256) static unsigned char fake[512];
    expect_error<std::invalid_argument>([&] { host_checked a(cfg, {}, {}, {}, schedule, fake, sizeof fake, nullptr); },
                                        {"memory_bytes: 512 bytes supplied", std::to_string(bytes).c_str()});
    expect_error<std::invalid_argument>([&] { host_checked a(cfg, {}, {}, {}, schedule, nullptr, bytes, nullptr); }, {"memory: null pointer"});
    expect_error<std::invalid_argument>([&] { host_checked a(cfg, {}, {}, {}, schedule, fake + 8, bytes, nullptr); }, {"256-byte aligned"});
  }

  TEST_CASE("API 0.3 on the host side of the device API: refusals at construction, the probe's sizes, one bfloat16") {
    const specdiff::accelerator_config cfg{64, 2, 8, 16};
    // speculative = 0 with a scorer reading the future from a recording predictor: refused before any CUDA call.
    expect_error<std::invalid_argument>([&] { (void)host_checked::memory_bytes(cfg, {}, specdiff::step_schedule{2, 0, 0, {}}); },
                                        {"step_schedule.speculative", "0 speculative steps", "signal::future"});
    // The default schedule is valid for any step count; its speculative pass is min(2, steps) records.
    for (index_t steps : {1, 8, 20, 50}) {
      const specdiff::accelerator_config c{64, 2, steps, 16};
      CHECK(host_checked::memory_bytes(c, {}, specdiff::step_schedule{}) > 0);
    }
    CHECK(host_checked::memory_bytes({64, 2, 1, 16}, {}, specdiff::step_schedule{}) + 512 == host_checked::memory_bytes({64, 2, 8, 16}, {}, specdiff::step_schedule{}));

    // The probe: sizes and argument checks without a CUDA call.
    const gpu::probe_shape shape{.batch = 2, .heads = 4, .head_dim = 16, .keys = 64, .max_queries = 64};
    const std::size_t bytes = gpu::attention_probe<specdiff::bfloat16>::memory_bytes(shape);
    CHECK(bytes >= 2 * 64 * sizeof(float));
    CHECK(gpu::attention_probe<__nv_bfloat16>::memory_bytes(shape) == bytes);  // one bfloat16
    expect_error<std::invalid_argument>([&] { (void)gpu::attention_probe<float>::memory_bytes({.batch = 2, .heads = 4, .head_dim = 0, .keys = 64, .max_queries = 8}); },
                                        {"probe_shape.head_dim", "0"});
    static std::vector<unsigned char> fake(bytes + 256);
    void* aligned = fake.data() + (256 - reinterpret_cast<std::uintptr_t>(fake.data()) % 256) % 256;
    gpu::attention_probe<specdiff::bfloat16> probe(shape, aligned, bytes);
    expect_error<std::logic_error>([&] { (void)probe.his(); }, {"no layer was added since begin()"});
    expect_error<std::invalid_argument>([&] { probe.add_layer(nullptr, 65, nullptr, nullptr, nullptr); }, {"queries", "[1, 64]", "65"});
    expect_error<std::invalid_argument>([&] { gpu::attention_probe<float> p(shape, aligned, bytes / 2); }, {"memory_bytes", "needed"});

    static_assert(gpu::row_element<specdiff::bfloat16> && gpu::row_element<__nv_bfloat16> && !gpu::row_element<double>);
    static_assert(gpu::view_element<specdiff::bfloat16> && gpu::view_element<__nv_bfloat16> && !gpu::view_element<__half>);
    static_assert(specdiff::storage_type<__nv_bfloat16> && specdiff::storage_type<specdiff::bfloat16>);

    // gpu::three_level_classifier sizes CUB's workspace: without a device, a message that says so.
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
      (void)cudaGetLastError();
      expect_error<std::runtime_error>([] { gpu::three_level_classifier<> c(64, 2, 0.75); }, {"needs a CUDA device"});
    }
  }

  TEST_CASE("device self-speculation keeps the host predictor's rules") {
    alignas(256) static float records[4];
    gpu::self_speculation dev;
    expect_error<std::logic_error>([&] { dev.begin(std::vector<float>{1.f}); }, {"not prepared"});
    dev.attach(records, 2, 2, nullptr);  // no CUDA call: the records are only addressed
    expect_error<std::logic_error>([&] { (void)dev.future(500.f); }, {"not begun"});
    expect_error<std::logic_error>([&] { dev.record(0, {records, 2}, nullptr); }, {"not begun"});
    expect_error<std::invalid_argument>([&] { dev.begin(std::vector<float>{}); }, {"timesteps", "at least one step"});
    expect_error<std::invalid_argument>([&] { dev.begin(std::vector<float>{900.f, NAN}); }, {"timesteps[1]", "not finite"});
    expect_error<std::invalid_argument>([&] { dev.begin(std::vector<float>{900.f, 900.f}); }, {"strictly decrease", "900"});
    expect_error<std::invalid_argument>([&] { dev.begin(std::vector<float>{900.f, 600.f, 300.f}); }, {"3 speculative steps", "sized for 2"});
    dev.begin(std::vector<float>{1000.f, 600.f});
    CHECK(!dev.ready());
    expect_error<std::invalid_argument>([&] { dev.record(2, {records, 2}, nullptr); }, {"step = 2", "[0, 2)"});
    expect_error<std::invalid_argument>([&] { dev.record(0, {records, 3}, nullptr); }, {"scores", "expected 2 values, got 3"});
    expect_error<std::logic_error>([&] { (void)dev.future(800.f); }, {"speculative step 1", "never recorded"});

    // The nearest-future record is the host predictor's, for any t.
    specdiff::self_speculation host;
    host.prepare(2);
    for (const auto& ts : {std::vector<float>{1000.f, 600.f}, std::vector<float>{700.f}}) {
      host.begin(ts);
      dev.begin(ts);
      for (float t : {1200.f, 1000.f, 999.f, 700.f, 600.f, 599.f, 1.f, -5.f}) CHECK(dev.nearest_future(t) == host.nearest_future(t));
      expect_error<std::invalid_argument>([&] { (void)dev.nearest_future(INFINITY); }, {"t: not finite"});
    }
  }
}
