// The device accelerator's module-level calls (cache_rows, cache_rows_in_place, fill, fill_all) with __half
// and __nv_bfloat16 engine rows, over float and bfloat16 storage.
//
// `modules_bf16` (a GPU): whole runs of two layers x two sites, every slot cached compactly or in place,
// filled per level or whole, against the host accelerator on the same inputs: the host runs on float rows
// holding the exact values of the engine's rows, and its float outputs are rounded to the row type on the
// host (the library's bfloat16 rounding; for half, the rounding below, held against __float2half_rn in the
// `host` case at the end). Plans plan for plan, staleness and attention history exactly, C2 rows bit for bit,
// C3 rows within float rounding of the weights plus one rounding of the row type, C1 rows of an output matrix
// untouched by fills and caching. Fresh random rows (the run seed) and a fixed pattern of edge values. Then
// overflow: float rows past bf16's range cached into a bfloat16 store, and a half row's 65504 (65536 once
// stored as bf16) filled back into half rows, raise status_conversion_overflow through these calls.
#include "support.cuh"

#include <specdiff/cuda/accelerator.cuh>
#include <specdiff/cuda/rows.cuh>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

namespace gpu = specdiff::gpu;
using namespace cudatest;
using specdiff::bfloat16;
using specdiff::index_t;
using specdiff::level;

namespace {

std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// float -> half -> float, round to nearest even, by arithmetic on the value (not bit manipulation): half
// keeps 11 significant bits down to 2^-14 and a fixed quantum of 2^-24 below it; from 65520 (the tie above
// 65504 whose even neighbour is 2^16) the value is infinite. Scaling by powers of two is exact in double,
// and nearbyint rounds ties to even in the default rounding mode.
float half_round(float x) {
  if (std::isnan(x)) return x;
  const double a = std::fabs(static_cast<double>(x));
  if (a >= 65520.0) return std::copysign(std::numeric_limits<float>::infinity(), x);
  int e = 0;
  (void)std::frexp(a, &e);  // a = f * 2^e, f in [0.5, 1): its binade is 2^(e-1)
  const double quantum = std::ldexp(1.0, std::max(e - 1, -14) - 10);
  return std::copysign(static_cast<float>(std::nearbyint(a / quantum) * quantum), x);
}

// Per engine row type: the host rounding of a float (as the float value it becomes), the exact value of a
// device element, an element holding an exactly representable value, and the bound of one rounding.
template <class Row>
struct row_host;

template <>
struct row_host<__nv_bfloat16> {
  static float round(float x) { return specdiff::storage_traits<bfloat16>::load(specdiff::storage_traits<bfloat16>::store(x)); }
  static float value(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __nv_bfloat16 make(float exact) { return __float2bfloat16_rn(exact); }
  static std::uint16_t bits(__nv_bfloat16 x) { return static_cast<__nv_bfloat16_raw>(x).x; }
  static constexpr double rel = 1.0 / 256;  // one rounding, relative (8 significant bits)
  static constexpr float max_finite = 3.38953139e38f;
  static constexpr const char* name = "__nv_bfloat16";
};

template <>
struct row_host<__half> {
  static float round(float x) { return half_round(x); }
  static float value(__half x) { return __half2float(x); }
  static __half make(float exact) { return __float2half_rn(exact); }
  static std::uint16_t bits(__half x) { return static_cast<__half_raw>(x).x; }
  static constexpr double rel = 1.0 / 2048;
  static constexpr float max_finite = 65504.f;
  static constexpr const char* name = "__half";
};

template <class Storage>
bool finite_in(float x) {
  return std::isfinite(specdiff::storage_traits<Storage>::load(specdiff::storage_traits<Storage>::store(x)));
}

// Row values (exactly representable in Row) for n elements: normal values over scales 2^-6 .. 2^6 with the
// type's edges planted (largest finite and its negative, the smallest denormal, a negative denormal, -0),
// each only where it stays finite in Storage (the host store refuses infinity).
template <class Row, class Storage>
std::vector<float> random_rows(std::mt19937_64& g, std::size_t n) {
  using H = row_host<Row>;
  std::normal_distribution<float> d(0.f, 1.f);
  std::uniform_int_distribution<int> scale(-6, 6), plant(0, 23);
  const float denorm = std::is_same_v<Row, __half> ? std::ldexp(1.f, -24) : std::ldexp(1.f, -133);
  const float edges[] = {H::max_finite, -H::max_finite, denorm, -5.f * denorm, -0.f};
  std::vector<float> v(n);
  for (auto& x : v) {
    x = H::round(std::ldexp(d(g), scale(g)));
    if (plant(g) == 0) {
      const float e = edges[std::uniform_int_distribution<std::size_t>(0, std::size(edges) - 1)(g)];
      if (finite_in<Storage>(e)) x = e;
    }
  }
  return v;
}

// The fixed case: a cycle of hand-picked values (ties of the float -> row rounding are not possible here:
// the rows are already Row values) laid out so that each step and slot sees them in other columns.
template <class Row, class Storage>
std::vector<float> fixed_rows(std::size_t n, std::size_t phase) {
  using H = row_host<Row>;
  const float denorm = std::is_same_v<Row, __half> ? std::ldexp(1.f, -24) : std::ldexp(1.f, -133);
  const float cycle[] = {1.f, -0.f, 0.5f, -2.75f, denorm, H::max_finite, 3.f, -H::max_finite, H::round(1e-3f), 0.f, -1.f / 64, H::round(3.14159f)};
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) {
    const float x = cycle[(i * 7 + phase * 5) % std::size(cycle)];
    v[i] = finite_in<Storage>(x) ? x : 1.f;
  }
  return v;
}

template <class Row>
std::vector<Row> to_rows(const std::vector<float>& exact) {
  std::vector<Row> v(exact.size());
  for (std::size_t i = 0; i < exact.size(); ++i) v[i] = row_host<Row>::make(exact[i]);
  return v;
}

// Plan-level signals whose scores are exact in float on both sides (multiples of 1/64 below 16, plus a
// quarter of a whole cf): the host and the device rank identical values, ties included.
struct exact_scorer {
  static constexpr specdiff::signal needs = specdiff::signal::attention | specdiff::signal::future | specdiff::signal::cache_count;
  SPECDIFF_HD float score(const specdiff::token_signals& x) const { return x.attention + x.future + 0.25f * x.cache_count; }
};

std::vector<float> exact_signal(std::mt19937_64& g, std::size_t n) {
  std::uniform_int_distribution<int> k(0, 1023);
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(k(g)) / 64.f;
  return v;
}

template <class T>
std::vector<T> download_span(gpu::device_span<const T> s) {
  std::vector<T> v(static_cast<std::size_t>(s.size));
  SPECDIFF_CUDA_CHECK(cudaDeviceSynchronize());
  if (!v.empty()) SPECDIFF_CUDA_CHECK(cudaMemcpy(v.data(), s.data, v.size() * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

template <class HostStep, class DeviceStep>
void expect_same_plans(const HostStep& hs, const DeviceStep& ds, index_t batch) {
  for (index_t b = 0; b < batch; ++b) {
    INFO("sample ", b);
    const auto got = download(ds.plan(b));
    const auto& want = hs.plan(b);
    std::vector<index_t> order;
    for (int l = 0; l < specdiff::level_count; ++l) {
      const auto idx = want.indices(static_cast<level>(l));
      REQUIRE(got.counts[static_cast<std::size_t>(l)] == static_cast<index_t>(idx.size()));
      order.insert(order.end(), idx.begin(), idx.end());
    }
    REQUIRE(got.order == order);
    REQUIRE(std::ranges::equal(want.levels(), got.levels));
  }
  const auto host_ids = hs.compute_tokens();
  const auto dev_ids = download_span(gpu::device_span<const index_t>(ds.compute_tokens()));
  REQUIRE(std::ranges::equal(host_ids, dev_ids));
}

// A device Row matrix after a fill against the host's float matrix after the same fill: rows at level
// compute must be bit for bit what they were before (fills leave C1 alone), reuse rows the host value
// rounded to Row exactly, approximate rows within float rounding of the weighted terms plus one rounding.
// Returns whether some host value rounds from finite to infinite (where the device must raise overflow).
template <class Row, class Storage>
bool expect_filled(const std::vector<Row>& got, const std::vector<Row>& before, const std::vector<float>& want, const std::vector<level>& row_level,
                   const specdiff::host_cache_store<Storage>& store, index_t layer, index_t site, float t, index_t dim) {
  using H = row_host<Row>;
  bool overflow = false;
  int bad = 0;
  const auto d = static_cast<std::size_t>(dim);
  for (std::size_t r = 0; r < row_level.size() && bad < 5; ++r) {
    const level l = row_level[r];
    double weighted[1024] = {};  // per column: sum over the history of |w_k h_k| (dim <= 1024 here)
    if (l == level::approximate) {
      float tags[specdiff::specdiff_weighted::depth], w[specdiff::specdiff_weighted::depth];
      const int held = std::min<int>(specdiff::specdiff_weighted::depth, store.entries(layer, site, static_cast<index_t>(r)));
      for (int k = 0; k < held; ++k) tags[k] = store.history_tag(layer, site, static_cast<index_t>(r), k);
      const int n = specdiff::specdiff_weighted{}.weights(tags, held, t, w);
      for (int k = 0; k < n; ++k) {
        const auto h = store.history(layer, site, static_cast<index_t>(r), k);
        for (std::size_t c = 0; c < d; ++c) weighted[c] += std::abs(static_cast<double>(w[k]) * specdiff::storage_traits<Storage>::load(h[c]));
      }
    }
    for (std::size_t c = 0; c < d; ++c) {
      const std::size_t i = r * d + c;
      if (l == level::compute) {
        if (H::bits(got[i]) == H::bits(before[i])) continue;
        FAIL_CHECK(H::name, " row ", r, " col ", c, ": a C1 row changed (bits ", H::bits(before[i]), " -> ", H::bits(got[i]), ")");
        ++bad;
        break;
      }
      const float ref = H::round(want[i]), dev = H::value(got[i]);
      overflow |= std::isfinite(want[i]) && std::isinf(ref);
      if (float_bits(ref) == float_bits(dev) || (std::isnan(ref) && std::isnan(dev))) continue;
      if (l == level::approximate) {
        const double diff = std::abs(static_cast<double>(dev) - static_cast<double>(want[i]));
        if (diff <= weighted[c] * 1e-6 + std::abs(static_cast<double>(want[i])) * H::rel + 6e-8) continue;
      }
      FAIL_CHECK(H::name, " row ", r, " (level ", static_cast<int>(l), ") col ", c, ": device ", dev, ", host ", want[i], " rounds to ", ref);
      ++bad;
      break;
    }
  }
  CHECK(bad == 0);
  return overflow;
}

template <class Row>
void expect_unchanged(const std::vector<Row>& got, const std::vector<Row>& before, const char* what) {
  std::size_t changed = 0;
  for (std::size_t i = 0; i < got.size(); ++i) changed += row_host<Row>::bits(got[i]) != row_host<Row>::bits(before[i]) ? 1 : 0;
  INFO(what);
  CHECK(changed == 0);
}

struct modules_case {
  index_t tokens = 256, batch = 2, dim = 64;
  bool fixed = false;  // the fixed value pattern and a fixed signal seed, not the run's random rows
};

// Two layers x two sites over `steps` steps. On a partial step k, layer k % 2 is filled whole (site 0 as
// reuse, site 1 as approximate); every other slot is filled per level and then cached: site 0 from compact
// rows (cache_rows), site 1 from its C1 rows written into the output matrix (cache_rows_in_place).
template <class Row, class Storage>
void run_modules(const modules_case& c, std::uint64_t salt) {
  using H = row_host<Row>;
  INFO(H::name, " rows, storage bytes ", sizeof(Storage), ", tokens ", c.tokens, ", batch ", c.batch, ", dim ", c.dim, c.fixed ? ", fixed values" : "");
  auto g = c.fixed ? std::mt19937_64(0x5eed0000u + salt) : rng(salt);
  const stream s;
  const index_t steps = 8;
  const specdiff::accelerator_config cfg{c.tokens, c.batch, steps, c.dim, 2, 2, false};
  const specdiff::step_schedule schedule{2, 0, 2, {5}};
  const index_t rows = cfg.rows();
  const auto n = static_cast<std::size_t>(rows), cells = n * static_cast<std::size_t>(c.dim);

  using host_type = specdiff::accelerator<exact_scorer, specdiff::self_speculation, specdiff::three_level_classifier, specdiff::step_schedule,
                                          specdiff::specdiff_weighted, specdiff::host_cache_store<Storage>>;
  using device_type = gpu::accelerator<exact_scorer, gpu::self_speculation, gpu::three_level_classifier<>, specdiff::step_schedule,
                                       specdiff::specdiff_weighted, gpu::device_cache_store<Storage>, Row>;
  host_type host(cfg, exact_scorer{}, specdiff::self_speculation{}, specdiff::three_level_classifier(0.7), schedule);
  const gpu::three_level_classifier<> classifier(c.tokens, c.batch, 0.7);
  buffer<unsigned char> memory(device_type::memory_bytes(cfg, classifier, schedule));
  device_type dev(cfg, exact_scorer{}, gpu::self_speculation{}, classifier, schedule, memory.get(), memory.size(), s);

  std::vector<float> t(static_cast<std::size_t>(steps));
  for (index_t k = 0; k < steps; ++k) t[static_cast<std::size_t>(k)] = 1000.f - 120.f * static_cast<float>(k);
  const auto spec_t = specdiff::aligned_speculative_timesteps(t, 2, schedule);
  host.begin_speculation(spec_t);
  dev.begin_speculation(spec_t);
  std::vector<buffer<float>> records;
  for (std::size_t k = 0; k < spec_t.size(); ++k) {
    const auto record = exact_signal(g, n);
    host.record_speculation(static_cast<index_t>(k), record);
    records.emplace_back(record);
    dev.record_speculation(static_cast<index_t>(k), records.back().cspan());
  }

  std::vector<std::vector<float>> out(4, std::vector<float>(cells, 0.f));
  std::vector<buffer<Row>> d_out;
  for (int i = 0; i < 4; ++i) d_out.emplace_back(to_rows<Row>(std::vector<float>(cells, 0.f)));
  std::size_t phase = 0;
  auto new_rows = [&](std::size_t count) { return c.fixed ? fixed_rows<Row, Storage>(count, phase++) : random_rows<Row, Storage>(g, count); };
  bool overflow = false;
  int partial = 0, whole = 0, compact = 0, in_place = 0;
  for (index_t k = 0; k < steps; ++k) {
    INFO("step ", k);
    const float tk = t[static_cast<std::size_t>(k)];
    auto hs = host.plan_step(k, tk);
    auto ds = dev.plan_step(k, tk);
    REQUIRE(ds.dense() == hs.dense());
    REQUIRE(ds.compute_count() == hs.compute_count());
    expect_same_plans(hs, ds, c.batch);
    partial += hs.dense() ? 0 : 1;
    std::vector<level> row_level(n);
    for (index_t b = 0; b < c.batch; ++b) std::ranges::copy(hs.plan(b).levels(), row_level.begin() + static_cast<std::ptrdiff_t>(b) * c.tokens);
    const index_t computed_rows = c.batch * hs.compute_count();
    const auto ids = hs.compute_tokens();

    for (index_t slot = 0; slot < 4; ++slot) {
      const index_t layer = slot / 2, site = slot % 2;
      INFO("layer ", layer, " site ", site);
      auto& o = out[static_cast<std::size_t>(slot)];
      auto& d_o = d_out[static_cast<std::size_t>(slot)];
      const specdiff::matrix_view<float> view(o.data(), rows, c.dim);
      const gpu::device_matrix<Row> d_view(d_o.get(), rows, c.dim);
      const auto before = d_o.download();
      if (!hs.dense() && layer == k % 2) {  // computed for no token: every row from the cache
        const level as = site == 0 ? level::reuse : level::approximate;
        host.fill_all(hs, layer, site, as, view);
        dev.fill_all(ds, layer, site, as, d_view);
        overflow |= expect_filled<Row, Storage>(d_o.download(), before, o, std::vector<level>(n, as), host.store(), layer, site, tk, c.dim);
        ++whole;
        continue;
      }
      host.fill(hs, layer, site, view);
      dev.fill(ds, layer, site, d_view);
      const auto filled = d_o.download();
      overflow |= expect_filled<Row, Storage>(filled, before, o, row_level, host.store(), layer, site, tk, c.dim);
      if (site == 0) {
        const auto computed = new_rows(static_cast<std::size_t>(computed_rows) * static_cast<std::size_t>(c.dim));
        buffer<Row> d_computed(to_rows<Row>(computed));
        host.cache_rows(hs, layer, site, specdiff::matrix_view<const float>(computed.data(), computed_rows, c.dim));
        dev.cache_rows(ds, layer, site, gpu::device_matrix<const Row>(d_computed.get(), computed_rows, c.dim));
        s.sync();  // d_computed goes out of scope
        expect_unchanged(d_o.download(), filled, "cache_rows leaves the output matrix alone");
        ++compact;
      } else {
        // The engine wrote its C1 rows into the full matrix: the same values on each side.
        const auto computed = new_rows(static_cast<std::size_t>(computed_rows) * static_cast<std::size_t>(c.dim));
        auto written = filled;
        for (index_t r = 0; r < computed_rows; ++r) {
          const index_t row = r / hs.compute_count() * c.tokens + ids[static_cast<std::size_t>(r)];
          for (index_t col = 0; col < c.dim; ++col) {
            const auto src = static_cast<std::size_t>(r * c.dim + col), dst = static_cast<std::size_t>(row * c.dim + col);
            o[dst] = computed[src];
            written[dst] = H::make(computed[src]);
          }
        }
        d_o.upload(written);
        host.cache_rows_in_place(hs, layer, site, specdiff::matrix_view<const float>(o.data(), rows, c.dim));
        dev.cache_rows_in_place(ds, layer, site, gpu::device_matrix<const Row>(d_view));
        expect_unchanged(d_o.download(), written, "cache_rows_in_place leaves the output matrix alone");
        ++in_place;
      }
    }
    const auto attention = exact_signal(g, n);
    buffer<float> d_attention(attention);
    if (k % 3 == 2) {
      host.complete_step(std::move(hs), specdiff::attention_unchanged);
      dev.complete_step(std::move(ds), gpu::attention_unchanged);
    } else {
      host.complete_step(std::move(hs), attention);
      dev.complete_step(std::move(ds), d_attention.cspan());
    }
    for (index_t p = 0; p < c.batch; ++p) {
      REQUIRE(std::ranges::equal(host.cache_counts(p), download_span(dev.cache_counts(p))));
      REQUIRE(std::ranges::equal(host.attention_history(p), download_span(dev.attention_history(p))));
    }
    // The status word so far: the overflow bit exactly where a host value rounds to infinity, nothing else.
    CHECK(dev.read_status() == (overflow ? gpu::status_conversion_overflow : 0u));
  }
  CHECK(partial > 0);
  CHECK(whole > 0);
  CHECK(compact > 0);
  CHECK(in_place > 0);
}

template <class Row>
void run_modules_all(std::uint64_t salt) {
  const modules_case cases[] = {{256, 2, 64, false}, {31, 3, 37, false}, {64, 2, 16, true}, {17, 1, 37, true}};
  for (const auto& c : cases) {
    run_modules<Row, float>(c, ++salt);
    run_modules<Row, bfloat16>(c, ++salt);
  }
}

// The overflow tests: an accelerator whose partial steps reuse every token (so fill and fill_all read back
// what was cached at the dense steps 0 and 1), one layer, two sites.
template <class Row>
struct overflow_fixture {
  using device_type = gpu::accelerator<exact_scorer, gpu::no_speculation, gpu::all_reuse_classifier, specdiff::step_schedule,
                                       specdiff::specdiff_weighted, gpu::device_cache_store<bfloat16>, Row>;
  static constexpr index_t tokens = 8, batch = 1, steps = 4;
  index_t dim;
  specdiff::accelerator_config cfg;
  specdiff::step_schedule schedule{2, 0, 0, {}};
  stream s;
  gpu::all_reuse_classifier classifier{tokens, batch};
  buffer<unsigned char> memory;
  buffer<float> attention{static_cast<std::size_t>(tokens * batch)};
  device_type acc;
  explicit overflow_fixture(index_t d)
      : dim(d),
        cfg{tokens, batch, steps, d, 1, 2, false},
        memory(device_type::memory_bytes(cfg, classifier, schedule)),
        acc(cfg, {}, {}, classifier, schedule, memory.get(), memory.size(), s) {
    attention.upload(std::vector<float>(static_cast<std::size_t>(tokens * batch), 0.5f));
  }
  std::size_t cells() const { return static_cast<std::size_t>(tokens * batch * dim); }
  float t(index_t k) const { return 1000.f - 100.f * static_cast<float>(k); }
};

}  // namespace

// ---------------------------------------------------------------------------------------------------------
TEST_SUITE("modules_bf16") {
  TEST_CASE("module-level calls with bf16 rows: the host accelerator's plans and rows, rounded on the host") {
    run_modules_all<__nv_bfloat16>(1300);
  }

  TEST_CASE("module-level calls with half rows: the host accelerator's plans and rows, rounded on the host") {
    run_modules_all<__half>(1400);
  }

  TEST_CASE("float rows past bf16's range, cached into a bfloat16 store, raise status_conversion_overflow") {
    for (index_t dim : {16, 9}) {  // 16-byte units and the element path
      INFO("dim ", dim);
      overflow_fixture<float> f(dim);
      auto& acc = f.acc;
      const float inf = std::numeric_limits<float>::infinity();
      const float big = 3.3e38f, largest = 3.38953139e38f, below_tie = bits_float(0x7f7f7fffu);
      // Each scenario: dense steps 0 and 1 cache both sites with ones (compactly or in place), one value
      // planted in step 1's rows of `site`; partial step 2 reads that site back with fill_all (site 0) or
      // fill (site 1): the value as the store's conversion wrote it, and the status word it left.
      struct scenario {
        float value;
        bool in_place;
        index_t site;
        std::uint32_t status;
        float read_back;
      };
      const scenario scenarios[] = {
          {big, false, 0, gpu::status_conversion_overflow, inf},               // cache_rows, read by fill_all
          {-std::numeric_limits<float>::max(), true, 1, gpu::status_conversion_overflow, -inf},  // cache_rows_in_place, read by fill
          {largest, false, 1, 0u, largest},                                   // bf16's largest finite value: no bit
          {below_tie, true, 0, 0u, largest},                                  // rounds down to it: no bit
      };
      for (const auto& sc : scenarios) {
        INFO("value ", sc.value, ", in place ", sc.in_place, ", site ", sc.site);
        acc.reset();
        CHECK(acc.read_status() == 0);
        const std::size_t planted = 2 * static_cast<std::size_t>(dim) + 3;  // row 2, column 3
        for (index_t k = 0; k < 2; ++k) {  // dense steps: every row computed
          auto st = acc.plan_step(k, f.t(k));
          REQUIRE(st.dense());
          for (index_t site = 0; site < 2; ++site) {
            std::vector<float> rows(f.cells(), 1.f);
            if (site == sc.site && k == 1) rows[planted] = sc.value;  // the latest entry of that slot
            buffer<float> d_rows(rows);
            const gpu::device_matrix<const float> m(d_rows.get(), f.tokens * f.batch, dim);
            if (sc.in_place) acc.cache_rows_in_place(st, 0, site, m);
            else acc.cache_rows(st, 0, site, m);
            f.s.sync();
          }
          acc.complete_step(std::move(st), f.attention.cspan());
          CHECK(acc.read_status() == (k == 1 ? sc.status : 0u));
        }
        auto st = acc.plan_step(2, f.t(2));
        REQUIRE(!st.dense());
        buffer<float> out(std::vector<float>(f.cells(), -7.f));
        const gpu::device_matrix<float> o(out.get(), f.tokens * f.batch, dim);
        for (index_t site = 0; site < 2; ++site) {
          if (site != sc.site) {
            acc.reuse_in_place(st, 0, site);
            continue;
          }
          if (site == 0) acc.fill_all(st, 0, site, level::reuse, o);
          else {
            acc.fill(st, 0, site, o);  // every token is C2 under all_reuse: the latest entry
            acc.reuse_in_place(st, 0, site);
          }
        }
        acc.complete_step(std::move(st), f.attention.cspan());
        const auto got = out.download();
        CHECK(got[planted] == sc.read_back);
        std::size_t others = 0;
        for (std::size_t i = 0; i < got.size(); ++i) others += i != planted && got[i] != 1.f ? 1 : 0;
        CHECK(others == 0);
        CHECK(acc.read_status() == sc.status);
      }
    }
  }

  TEST_CASE("a half row's 65504 is 65536 in a bfloat16 store: fill and fill_all into half rows overflow") {
    for (index_t dim : {16, 9}) {
      INFO("dim ", dim);
      overflow_fixture<__half> f(dim);
      auto& acc = f.acc;
      for (const float value : {65504.f, 65248.f}) {  // 65248 is a half, 65280 in bf16: stays finite in half
        for (const level as : {level::reuse, level::approximate}) {
          for (const bool whole : {true, false}) {
            if (!whole && as == level::approximate) continue;  // fill per level: all_reuse makes every row C2
            INFO("value ", value, ", level ", static_cast<int>(as), whole ? ", fill_all" : ", fill");
            acc.reset();
            const std::size_t planted = 5 * static_cast<std::size_t>(dim) + 1;
            for (index_t k = 0; k < 2; ++k) {
              auto st = acc.plan_step(k, f.t(k));
              for (index_t site = 0; site < 2; ++site) {
                std::vector<float> rows(f.cells(), 1.f);
                rows[planted] = value;  // in both dense steps: the approximator's mix of equal entries is that entry
                buffer<__half> d_rows(to_rows<__half>(rows));
                acc.cache_rows(st, 0, site, gpu::device_matrix<const __half>(d_rows.get(), f.tokens * f.batch, dim));
                f.s.sync();
              }
              acc.complete_step(std::move(st), f.attention.cspan());
            }
            CHECK(acc.read_status() == 0);  // half's whole range fits bf16 on the way in
            auto st = acc.plan_step(2, f.t(2));
            buffer<__half> out(to_rows<__half>(std::vector<float>(f.cells(), -7.f)));
            const gpu::device_matrix<__half> o(out.get(), f.tokens * f.batch, dim);
            if (whole) acc.fill_all(st, 0, 0, as, o);
            else {
              acc.fill(st, 0, 0, o);
              acc.reuse_in_place(st, 0, 0);
            }
            acc.reuse_in_place(st, 0, 1);
            acc.complete_step(std::move(st), f.attention.cspan());
            const auto got = out.download();
            const float stored = row_host<__nv_bfloat16>::round(value), want = half_round(stored);
            CHECK(__half2float(got[planted]) == want);
            CHECK(std::isinf(want) == (value == 65504.f));
            std::size_t others = 0;
            for (std::size_t i = 0; i < got.size(); ++i) others += i != planted && __half2float(got[i]) != 1.f ? 1 : 0;
            CHECK(others == 0);
            CHECK(acc.read_status() == (std::isinf(want) ? gpu::status_conversion_overflow : 0u));
          }
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
TEST_SUITE("host") {
  TEST_CASE("modules: the suite's arithmetic half rounding agrees with __float2half_rn") {
    auto g = rng(1390);
    std::uniform_int_distribution<std::uint32_t> low(0, 0xffffu);
    long long mismatched = 0;
    auto check = [&](float f) {
      const float mine = half_round(f), cuda = __half2float(__float2half_rn(f));
      if (std::isnan(f) ? !(std::isnan(mine) && std::isnan(cuda)) : float_bits(mine) != float_bits(cuda)) {
        if (mismatched++ < 5) FAIL_CHECK("float bits ", float_bits(f), ": suite ", mine, ", CUDA ", cuda);
      }
    };
    // Every 16-bit prefix with the low halves that decide rounding (13 bits are dropped for normal halves,
    // more for denormals): exact, a tie's neighbours, the tie pattern, and one random.
    for (std::uint32_t hi = 0; hi <= 0xffffu; ++hi)
      for (std::uint32_t l : {0x0000u, 0x0fffu, 0x1000u, 0x1001u, 0x8000u, 0xffffu, low(g)}) check(bits_float((hi << 16) | l));
    for (float f : {65504.f, 65519.99f, 65520.f, -65520.f, std::ldexp(1.f, -24), std::ldexp(1.f, -25), std::ldexp(3.f, -25), -0.f, 1e-3f}) check(f);
    CHECK(mismatched == 0);
    CHECK(std::isinf(half_round(65520.f)));
    CHECK(half_round(65519.99f) == 65504.f);
    CHECK(std::signbit(half_round(-0.f)));
  }
}
