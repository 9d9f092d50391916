// Device suites: every device op against its host model on fresh random inputs (token counts 1..16384,
// dims 64..1536, batch 1 and 4). Index and integer outputs must match exactly; floats within 1e-6 of the
// magnitude of the terms they are made of (the host and device libm differ by an ulp or so, and a sum of
// terms of both signs can cancel, so relative-to-result would test the cancellation, not the code).
#include "support.cuh"

#include "../common/lse_inputs.hpp"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <numeric>

namespace gpu = specdiff::gpu;
using namespace cudatest;
using specdiff::bfloat16;
using specdiff::index_t;
using specdiff::level;

namespace {

constexpr index_t token_counts[] = {1, 31, 256, 4096, 16384};

template <class T>
std::vector<T> slice(const std::vector<T>& v, std::size_t begin, std::size_t n) {
  return {v.begin() + static_cast<std::ptrdiff_t>(begin), v.begin() + static_cast<std::ptrdiff_t>(begin + n)};
}

/// First index where two equally long sequences differ, or -1.
template <class A, class B>
long first_mismatch(const A& a, const B& b) {
  if (a.size() != b.size()) return 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!(a[i] == b[i])) return static_cast<long>(i);
  return -1;
}

bool close(float got, float want, double magnitude) {
  if (std::isinf(want) || std::isinf(got)) return got == want;
  return std::abs(static_cast<double>(got) - static_cast<double>(want)) <= 1e-6 * magnitude + 1e-37;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
TEST_SUITE("scorers") {
  // A scorer of one's own, written once (RAS-style, from the engine metric): the host loop and the kernel
  // both run this very type.
  struct metric_scorer {
    static constexpr specdiff::signal needs = specdiff::signal::metric | specdiff::signal::cache_count;
    float starvation_scale = 0.5f;
    SPECDIFF_HD float score(const specdiff::token_signals& x) const { return specdiff::math::log_score(x.metric, 1.f, x.cache_count, starvation_scale); }
  };

  // Reads only signals it does not need: it sees their neutral values (1 + 1 + 0 + 0 + 0), as on the host.
  struct neutral_probe {
    static constexpr specdiff::signal needs = specdiff::signal::attention;
    SPECDIFF_HD float score(const specdiff::token_signals& x) const { return 0.f * x.attention + x.future + x.cache_count + x.feature_change + x.metric + 1.f; }
  };

  /// gpu::score against specdiff::score_tokens for one scorer type, on the same inputs ([sample][token]).
  template <class Scorer>
  void compare_scorer(const Scorer& scorer, const std::vector<std::vector<float>>& in, const std::vector<buffer<float>>& d_in, const stream& s) {
    const std::size_t n = in[0].size();
    std::vector<float> want(n);
    auto all = [&](int k) { return std::span<const float>(in[static_cast<std::size_t>(k)]); };
    specdiff::score_tokens(scorer, specdiff::score_inputs{all(0), all(1), all(2), all(3), all(4)}, want);
    buffer<float> out(n);
    gpu::score(scorer, {d_in[0].cspan(), d_in[1].cspan(), d_in[2].cspan(), d_in[3].cspan(), d_in[4].cspan()}, out.span(), s);
    const auto got = out.download();
    int bad = 0;
    for (std::size_t i = 0; i < n; ++i) {
      // Magnitude of the terms the score adds up.
      double m = 0.0;
      if constexpr (requires { scorer.starvation_scale; }) {
        using specdiff::signal;
        if (has(Scorer::needs, signal::attention)) m += std::abs(specdiff::math::safe_log(in[0][i]));
        if (has(Scorer::needs, signal::future)) m += std::abs(specdiff::math::safe_log(in[1][i]));
        if (has(Scorer::needs, signal::cache_count)) m += std::abs(scorer.starvation_scale * in[2][i]);
        if (has(Scorer::needs, signal::feature_change)) m += std::abs(specdiff::math::safe_log(std::min(in[3][i], FLT_MAX)));
        if (has(Scorer::needs, signal::metric)) m += std::abs(specdiff::math::safe_log(in[4][i]));
      }
      if (!close(got[i], want[i], m) && bad++ < 5) FAIL_CHECK("token ", i, ": device ", got[i], ", host ", want[i]);
    }
    CHECK(bad == 0);
  }

  TEST_CASE("gpu::score runs the host scorer types exactly as score_tokens does") {
    auto g = rng(10);
    const stream s;
    std::uniform_real_distribution<float> scale(0.f, 2.f);
    for (index_t tokens : token_counts)
      for (index_t batch : {1, 4}) {
        INFO("tokens ", tokens, ", batch ", batch);
        const auto n = static_cast<std::size_t>(tokens * batch);
        std::vector<std::vector<float>> in = {lognormal(g, n, 0.05), lognormal(g, n, 0.05), counts(g, n, 12), lognormal(g, n, 0.02),
                                              lognormal(g, n, 0.01)};
        for (std::size_t i = 0; i < n; i += 7) in[3][i] = INFINITY;  // fewer than two cached rows
        std::vector<buffer<float>> d_in;
        for (const auto& v : in) d_in.emplace_back(v);
        compare_scorer(specdiff::specdiff_scorer{scale(g)}, in, d_in, s);
        compare_scorer(specdiff::toca_scorer{scale(g)}, in, d_in, s);
        compare_scorer(specdiff::feature_change_scorer{scale(g)}, in, d_in, s);
        compare_scorer(specdiff::uniform_scorer{scale(g)}, in, d_in, s);
        compare_scorer(specdiff::uniform_scorer{}, in, d_in, s);
        compare_scorer(metric_scorer{scale(g)}, in, d_in, s);
        compare_scorer(neutral_probe{}, in, d_in, s);
      }
  }

  TEST_CASE("a user-defined scorer reads only the signals it needs") {
    auto g = rng(12);
    const stream s;
    const auto n = static_cast<std::size_t>(4096 * 4);
    const auto metric = lognormal(g, n, 0.01), cf = counts(g, n, 9);
    buffer<float> d_metric(metric), d_cf(cf), out(n);
    // Only metric and cache_count given: the others stay empty, as on the host.
    std::vector<float> want(n);
    specdiff::score_tokens(metric_scorer{}, {.cache_count = cf, .metric = metric}, want);
    gpu::score(metric_scorer{}, {{}, {}, d_cf.cspan(), {}, d_metric.cspan()}, out.span(), s);
    const auto got = out.download();
    int bad = 0;
    for (std::size_t i = 0; i < n; ++i)
      if (!close(got[i], want[i], std::abs(specdiff::math::safe_log(metric[i])) + 0.5f * cf[i]) && bad++ < 5) FAIL_CHECK("token ", i, ": ", got[i], " vs ", want[i]);
    CHECK(bad == 0);
    expect_error<std::invalid_argument>([&] { gpu::score(metric_scorer{}, {{}, {}, d_cf.cspan(), {}, {}}, out.span(), s); }, {"metric", "16384", "0"});
  }

  TEST_CASE("staleness counts advance as the accelerator advances them") {
    auto g = rng(11);
    const stream s;
    for (index_t tokens : token_counts)
      for (index_t batch : {1, 4}) {
        std::vector<specdiff::token_plan> plans;
        for (index_t b = 0; b < batch; ++b) plans.push_back(random_plan(g, tokens));
        device_plan plan(batch, tokens);
        upload(plans, plan.view);
        std::vector<float> cf = counts(g, static_cast<std::size_t>(batch * tokens), 30);
        buffer<float> d_cf(cf);
        gpu::advance_cache_counts(plan.view, d_cf.span(), s);
        for (index_t b = 0; b < batch; ++b)
          for (index_t i = 0; i < tokens; ++i) {
            float& x = cf[static_cast<std::size_t>(b * tokens + i)];
            x = specdiff::math::advance_cache_count(plans[static_cast<std::size_t>(b)].levels()[static_cast<std::size_t>(i)], x);
          }
        CHECK(first_mismatch(d_cf.download(), cf) == -1);
      }
  }
}

// ---------------------------------------------------------------------------------------------------------
TEST_SUITE("attention") {
  struct attention_case {
    index_t batch, heads, queries, keys;
    std::ptrdiff_t row_stride = 0, key_offset = 0;
  };

  template <class T>
  void check_column_sums(const attention_case& c, std::mt19937_64& g, const stream& s) {
    INFO("batch ", c.batch, ", heads ", c.heads, ", queries ", c.queries, ", keys ", c.keys, ", row stride ", c.row_stride, ", element bytes ", sizeof(T));
    const gpu::attention_shape shape = gpu::attention_shape{c.batch, c.heads, c.queries, c.keys, c.row_stride}.resolved();
    const std::size_t extent = shape.extent() + static_cast<std::size_t>(c.key_offset);
    std::uniform_real_distribution<float> u(0.f, 1.f);
    std::vector<T> p(extent);
    for (auto& x : p) x = specdiff::storage_traits<T>::store(u(g));
    buffer<T> d_p(p);

    // Independent reference: double sums over the [b][h][q][k] definition.
    std::vector<float> want(static_cast<std::size_t>(c.batch * c.keys));
    for (index_t b = 0; b < c.batch; ++b)
      for (index_t k = 0; k < c.keys; ++k) {
        double sum = 0.0;
        for (index_t h = 0; h < c.heads; ++h)
          for (index_t q = 0; q < c.queries; ++q)
            sum += specdiff::storage_traits<T>::load(
                p[static_cast<std::size_t>(c.key_offset + b * shape.sample_stride + h * shape.head_stride + q * shape.row_stride + k)]);
        want[static_cast<std::size_t>(b * c.keys + k)] = static_cast<float>(sum / c.heads);
      }

    const gpu::attention_column_sums<> sums(shape);
    std::size_t bytes = 0;
    sums.reduce(nullptr, bytes, gpu::device_span<const T>{}, {}, gpu::column_mode::overwrite, s);
    REQUIRE(bytes == sums.workspace_bytes());
    buffer<unsigned char> ws(bytes);
    buffer<float> out(want.size());
    const gpu::device_span<const T> probs(d_p.get() + c.key_offset, static_cast<index_t>(extent) - static_cast<index_t>(c.key_offset));
    sums.reduce(ws.get(), bytes, probs, out.span(), gpu::column_mode::overwrite, s);
    auto got = out.download();
    int bad = 0;
    for (std::size_t i = 0; i < want.size(); ++i)
      if (!close(got[i], want[i], std::abs(want[i])) && bad++ < 5) FAIL_CHECK("column ", i, ": device ", got[i], ", reference ", want[i]);
    CHECK(bad == 0);

    // Accumulate mode adds onto what the output held (a running sum over layers).
    std::vector<float> before(want.size());
    for (auto& x : before) x = u(g) * 10.f;
    out.upload(before);
    sums.reduce(ws.get(), bytes, probs, out.span(), gpu::column_mode::accumulate, s);
    got = out.download();
    bad = 0;
    for (std::size_t i = 0; i < want.size(); ++i) {
      const float expect = before[i] + want[i];
      if (!close(got[i], expect, std::abs(before[i]) + std::abs(want[i])) && bad++ < 5)
        FAIL_CHECK("column ", i, ": device ", got[i], ", reference ", expect);
    }
    CHECK(bad == 0);
  }

  TEST_CASE("head-averaged column sums match a double-precision reference") {
    auto g = rng(20);
    const stream s;
    const attention_case cases[] = {
        {1, 1, 1, 1},         {1, 3, 31, 31},           {4, 2, 256, 256},   {1, 24, 64, 4096},
        {4, 4, 37, 1000, 1077, 77},  // image keys 77..1076 of joint attention rows 1077 wide
        {1, 2, 16, 16384},    {4, 1, 1, 4096},          {1, 6, 600, 64},    // several row chunks
    };
    for (const auto& c : cases) {
      check_column_sums<float>(c, g, s);
      check_column_sums<bfloat16>(c, g, s);
    }
  }

  TEST_CASE("accumulate adds a layer's column sums") {
    auto g = rng(21);
    const stream s;
    for (index_t n : token_counts) {
      std::vector<float> total = lognormal(g, static_cast<std::size_t>(n), 0.1), layer = lognormal(g, static_cast<std::size_t>(n), 0.1);
      buffer<float> d_total(total), d_layer(layer);
      gpu::accumulate(d_layer.cspan(), d_total.span(), s);
      for (std::size_t i = 0; i < total.size(); ++i) total[i] += layer[i];
      CHECK(first_mismatch(d_total.download(), total) == -1);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
TEST_SUITE("classifier") {
  void check_against_host(const std::vector<float>& scores, index_t tokens, index_t batch, double cache_rate, double reuse_mass, const stream& s) {
    INFO("tokens ", tokens, ", batch ", batch, ", cache_rate ", cache_rate, ", reuse_mass ", reuse_mass);
    const gpu::three_level_classifier<> device(tokens, batch, cache_rate, reuse_mass);
    specdiff::three_level_classifier host(cache_rate, reuse_mass);
    host.prepare(tokens);
    CHECK(device.compute_count() == host.compute_count(tokens));

    device_plan plan(batch, tokens);
    buffer<float> d_scores(scores);
    std::size_t bytes = 0;
    device.classify(nullptr, bytes, d_scores.cspan(), plan.view, s);
    REQUIRE(bytes == device.workspace_bytes());
    buffer<unsigned char> ws(bytes);
    device.classify(ws.get(), bytes, d_scores.cspan(), plan.view, s);
    const plan_copy got = download(plan.view);
    CHECK(got.status == 0);

    const auto n = static_cast<std::size_t>(tokens);
    specdiff::token_plan want(tokens);
    for (index_t b = 0; b < batch; ++b) {
      INFO("sample ", b);
      const std::size_t o = static_cast<std::size_t>(b) * n;
      host.classify(std::span<const float>(scores.data() + o, n), want);
      std::size_t at = o;
      for (int l = 0; l < specdiff::level_count; ++l) {
        const auto lv = static_cast<level>(l);
        INFO("level ", l);
        REQUIRE(got.counts[static_cast<std::size_t>(b * specdiff::level_count + l)] == want.count(lv));
        const auto expect = want.indices(lv);
        const std::vector<index_t> list(got.order.begin() + static_cast<std::ptrdiff_t>(at), got.order.begin() + static_cast<std::ptrdiff_t>(at + expect.size()));
        const long m = first_mismatch(list, std::vector<index_t>(expect.begin(), expect.end()));
        CHECK_MESSAGE(m == -1, "first difference at position ", m);
        at += expect.size();
      }
      const long m = first_mismatch(slice(got.levels, o, n), std::vector<level>(want.levels().begin(), want.levels().end()));
      CHECK_MESSAGE(m == -1, "levels differ first at token ", m);
    }
  }

  TEST_CASE("plans match the host classifier exactly") {
    auto g = rng(30);
    const stream s;
    const double rates[] = {0.5, 0.9, 0.99, 0.0};
    const double masses[] = {0.1, 0.0, 0.3, 0.1};
    int k = 0;
    for (index_t tokens : token_counts)
      for (index_t batch : {1, 4})
        for (auto kind : {scores_kind::continuous, scores_kind::ties, scores_kind::signals, scores_kind::wide, scores_kind::constant}) {
          const double rate = rates[k % 4], mass = masses[(k / 4) % 4];
          ++k;
          INFO("scores kind ", static_cast<int>(kind));
          check_against_host(make_scores(kind, g, static_cast<std::size_t>(tokens * batch)), tokens, batch, rate, mass, s);
        }
  }

  TEST_CASE("classification is deterministic and reuses its workspace") {
    auto g = rng(31);
    const stream s;
    const index_t tokens = 4096, batch = 4;
    const gpu::three_level_classifier<> device(tokens, batch, 0.9);
    buffer<float> scores(make_scores(scores_kind::ties, g, static_cast<std::size_t>(tokens * batch)));
    buffer<unsigned char> ws(device.workspace_bytes());
    device_plan a(batch, tokens), b(batch, tokens);
    std::size_t bytes = ws.size();
    device.classify(ws.get(), bytes, scores.cspan(), a.view, s);
    device.classify(ws.get(), bytes, scores.cspan(), b.view, s);
    const auto pa = download(a.view), pb = download(b.view);
    CHECK(pa.order == pb.order);
    CHECK(pa.counts == pb.counts);
    CHECK(pa.levels == pb.levels);
  }

  TEST_CASE("non-finite scores raise the status bit and still give a valid plan") {
    auto g = rng(32);
    const stream s;
    const index_t tokens = 256, batch = 4;
    auto v = make_scores(scores_kind::continuous, g, static_cast<std::size_t>(tokens * batch));
    v[3] = NAN, v[300] = INFINITY, v[700] = -INFINITY;
    const gpu::three_level_classifier<> device(tokens, batch, 0.7);
    buffer<float> scores(v);
    buffer<unsigned char> ws(device.workspace_bytes());
    device_plan plan(batch, tokens);
    std::size_t bytes = ws.size();
    device.classify(ws.get(), bytes, scores.cspan(), plan.view, s);
    const auto got = download(plan.view);
    CHECK((got.status & gpu::status_nonfinite_score) != 0);
    for (index_t b = 0; b < batch; ++b) {  // every token listed exactly once, counts adding up
      std::vector<index_t> seen(got.order.begin() + b * tokens, got.order.begin() + (b + 1) * tokens);
      std::sort(seen.begin(), seen.end());
      std::vector<index_t> all(static_cast<std::size_t>(tokens));
      std::iota(all.begin(), all.end(), 0);
      CHECK(seen == all);
      CHECK(got.counts[static_cast<std::size_t>(b * 3)] + got.counts[static_cast<std::size_t>(b * 3 + 1)] + got.counts[static_cast<std::size_t>(b * 3 + 2)] == tokens);
    }
  }

  TEST_CASE("classify checks its arguments") {
    const stream s;
    const gpu::three_level_classifier<> device(100, 2, 0.5);
    device_plan plan(2, 100), other(1, 100);
    buffer<float> scores(200);
    buffer<unsigned char> ws(device.workspace_bytes());
    std::size_t bytes = ws.size(), small = bytes - 1;
    expect_error<std::invalid_argument>([&] { device.classify(ws.get(), small, scores.cspan(), plan.view, s); }, {"workspace_bytes"});
    expect_error<std::invalid_argument>([&] { device.classify(ws.get(), bytes, {scores.get(), 199}, plan.view, s); }, {"log_score", "200", "199"});
    expect_error<std::invalid_argument>([&] { device.classify(ws.get(), bytes, scores.cspan(), other.view, s); }, {"plan", "1 x 100", "2 x 100"});
  }

  TEST_CASE("fill_plan matches token_plan::set_all") {
    const stream s;
    device_plan plan(4, 31);
    for (int l = 0; l < specdiff::level_count; ++l) {
      gpu::fill_plan(plan.view, static_cast<level>(l), s);
      specdiff::token_plan want(31);
      want.set_all(static_cast<level>(l));
      const auto got = download(plan.view);
      for (index_t b = 0; b < 4; ++b) {
        CHECK(slice(got.order, static_cast<std::size_t>(b) * 31, 31) == std::vector<index_t>(want.indices(static_cast<level>(l)).begin(), want.indices(static_cast<level>(l)).end()));
        for (int k = 0; k < 3; ++k) CHECK(got.counts[static_cast<std::size_t>(b * 3 + k)] == want.count(static_cast<level>(k)));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
TEST_SUITE("rows") {
  /// A matrix of `rows` x `dim` in device memory with the given stride and element offset from an aligned
  /// allocation (offset 1 forces the element-wise path).
  template <class T>
  struct test_matrix {
    buffer<T> memory;
    gpu::device_matrix<T> view;
    std::vector<T> host;  // the whole allocation
    test_matrix(index_t rows, index_t dim, std::ptrdiff_t stride, std::ptrdiff_t offset, std::mt19937_64& g)
        : memory(static_cast<std::size_t>(rows * stride + offset)), view(memory.get() + offset, rows, dim, stride) {
      std::uniform_real_distribution<float> u(-1.f, 1.f);
      host.resize(memory.size());
      for (auto& x : host) x = specdiff::storage_traits<T>::store(u(g));
      memory.upload(host);
    }
    const T* row(const std::vector<T>& all, index_t r) const { return all.data() + (view.data - memory.get()) + r * view.stride; }
  };

  template <class T>
  bool same_row(const T* a, const T* b, index_t dim) {
    return std::memcmp(a, b, static_cast<std::size_t>(dim) * sizeof(T)) == 0;
  }

  // Runs gather then scatter for one row set and checks both against host copies.
  template <class T, class Rows>
  void check_copies(const Rows& rows, const std::vector<std::vector<index_t>>& lists, index_t dim, bool aligned, std::mt19937_64& g, const stream& s) {
    const index_t samples = rows.samples(), cap = rows.capacity(), extent = rows.extent();
    const std::ptrdiff_t pad = aligned ? 16 / static_cast<std::ptrdiff_t>(sizeof(T)) : 1;
    const std::ptrdiff_t stride = aligned ? (dim + pad - 1) / pad * pad + pad : dim + 1;
    test_matrix<T> full(extent, dim, stride, aligned ? 0 : 1, g);
    test_matrix<T> compact(samples * cap, dim, stride, aligned ? 0 : 1, g);
    buffer<std::uint32_t> status(std::vector<std::uint32_t>{0});

    gpu::gather_rows<gpu::copy_policy<>, T>(full.view, rows, compact.view, s, status.get());
    auto got = compact.memory.download();
    for (index_t b = 0; b < samples; ++b)
      for (index_t r = 0; r < cap; ++r) {
        const auto& list = lists[static_cast<std::size_t>(b)];
        const T* want = r < static_cast<index_t>(list.size()) ? full.row(full.host, list[static_cast<std::size_t>(r)]) : compact.row(compact.host, b * cap + r);
        if (!same_row(compact.row(got, b * cap + r), want, dim)) {
          FAIL_CHECK("gather: sample ", b, " row ", r, " differs");
          return;
        }
      }
    // Scatter the (new) compact rows back into the full matrix.
    gpu::scatter_rows<gpu::copy_policy<>, T>(compact.view, rows, full.view, s, status.get());
    const auto full_got = full.memory.download();
    std::vector<T> expect = full.host;
    for (index_t b = 0; b < samples; ++b) {
      const auto& list = lists[static_cast<std::size_t>(b)];
      for (std::size_t r = 0; r < list.size(); ++r)
        std::memcpy(const_cast<T*>(full.row(expect, list[r])), compact.row(got, b * cap + static_cast<index_t>(r)), static_cast<std::size_t>(dim) * sizeof(T));
    }
    CHECK(std::memcmp(full_got.data(), expect.data(), expect.size() * sizeof(T)) == 0);
    CHECK(status.download()[0] == 0);
  }

  template <class T>
  void check_all_row_sets(std::mt19937_64& g, const stream& s) {
    // Widths per (tokens, batch): the widest rows with the fewer tokens, so the suite stays quick under
    // compute-sanitizer; 64 and 1536 take the 16-byte path, 67 and 100 (for bfloat16) the element-wise one.
    const index_t dims[] = {64, 1536, 67, 1536, 100, 1536, 64, 100};
    int k = 0;
    for (index_t tokens : {1, 31, 256, 4096})
      for (index_t batch : {1, 4}) {
        const index_t dim = dims[k++];
        for (bool aligned : {true, false}) {
          INFO("tokens ", tokens, ", batch ", batch, ", dim ", dim, ", aligned ", aligned, ", element bytes ", sizeof(T));
          // A plan's C1 and C3 rows, capacity = the largest count (a compact matrix exactly that tall).
          std::vector<specdiff::token_plan> plans;
          for (index_t b = 0; b < batch; ++b) plans.push_back(random_plan(g, tokens));
          device_plan plan(batch, tokens);
          upload(plans, plan.view);
          for (level l : {level::compute, level::approximate}) {
            std::vector<std::vector<index_t>> lists;
            index_t cap = 0;
            for (index_t b = 0; b < batch; ++b) {
              std::vector<index_t> list;
              for (index_t i : plans[static_cast<std::size_t>(b)].indices(l)) list.push_back(b * tokens + i);
              cap = std::max(cap, static_cast<index_t>(list.size()));
              lists.push_back(list);
            }
            if (cap > 0) check_copies<T>(gpu::rows_of(plan.view, l, cap), lists, dim, aligned, g, s);
          }
          // A shuffled list of distinct rows.
          std::vector<index_t> rows(static_cast<std::size_t>(batch * tokens));
          std::iota(rows.begin(), rows.end(), 0);
          std::shuffle(rows.begin(), rows.end(), g);
          rows.resize((rows.size() + 1) / 2);
          buffer<index_t> d_rows(rows);
          check_copies<T>(gpu::index_list{d_rows.get(), static_cast<index_t>(rows.size()), batch * tokens}, {rows}, dim, aligned, g, s);
          // Every row.
          std::vector<index_t> every(static_cast<std::size_t>(batch * tokens));
          std::iota(every.begin(), every.end(), 0);
          check_copies<T>(gpu::all_rows{batch * tokens}, {every}, dim, aligned, g, s);
        }
      }
  }

  TEST_CASE("gather and scatter move exactly the listed rows (float)") {
    auto g = rng(40);
    const stream s;
    check_all_row_sets<float>(g, s);
  }

  TEST_CASE("gather and scatter move exactly the listed rows (bfloat16)") {
    auto g = rng(41);
    const stream s;
    check_all_row_sets<bfloat16>(g, s);
  }

  TEST_CASE("bad indices and counts over capacity are reported, not followed") {
    auto g = rng(42);
    const stream s;
    test_matrix<float> full(10, 8, 8, 0, g), compact(4, 8, 8, 0, g);
    const std::vector<index_t> rows = {2, -1, 10, 5};
    buffer<index_t> d_rows(rows);
    buffer<std::uint32_t> status(std::vector<std::uint32_t>{0});
    gpu::gather_rows<gpu::copy_policy<>, float>(full.view, gpu::index_list{d_rows.get(), 4, 10}, compact.view, s, status.get());
    CHECK(status.download()[0] == gpu::status_index_out_of_range);
    const auto got = compact.memory.download();
    CHECK(same_row(compact.row(got, 0), full.row(full.host, 2), 8));
    CHECK(same_row(compact.row(got, 1), compact.row(compact.host, 1), 8));  // skipped: left as it was
    CHECK(same_row(compact.row(got, 3), full.row(full.host, 5), 8));

    // A plan level with more rows than the capacity asked for: the first `capacity` rows move.
    std::vector<specdiff::token_plan> plans = {specdiff::token_plan(10)};
    plans[0].set_all(level::compute);
    device_plan plan(1, 10);
    upload(plans, plan.view);
    buffer<std::uint32_t> status2(std::vector<std::uint32_t>{0});
    gpu::gather_rows<gpu::copy_policy<>, float>(full.view, gpu::rows_of(plan.view, level::compute, 4), compact.view, s, status2.get());
    CHECK(status2.download()[0] == gpu::status_count_over_capacity);
    const auto got2 = compact.memory.download();
    for (index_t r = 0; r < 4; ++r) CHECK(same_row(compact.row(got2, r), full.row(full.host, r), 8));
  }
}

// ---------------------------------------------------------------------------------------------------------
TEST_SUITE("cache_store") {
  template <class Storage>
  struct twin_stores {
    specdiff::cache_shape shape;
    specdiff::host_cache_store<Storage> host;
    buffer<unsigned char> memory;
    gpu::device_cache_store<Storage> device;
    twin_stores(specdiff::cache_shape sh, const stream& s)
        : shape(sh), host(sh), memory(gpu::device_cache_store<Storage>::memory_bytes(sh)), device(sh, memory.get(), memory.size(), s) {}
  };

  std::vector<float> random_rows(std::mt19937_64& g, index_t rows, index_t dim) {
    std::normal_distribution<float> d(0.f, 1.f);
    std::vector<float> v(static_cast<std::size_t>(rows) * static_cast<std::size_t>(dim));
    for (auto& x : v) x = d(g);
    return v;
  }

  // Host scatter from the compact layout a plan level uses (sample b's r-th row at b * cap + r).
  template <class Storage>
  void host_scatter_plan(specdiff::host_cache_store<Storage>& host, index_t layer, index_t site, float t, const std::vector<specdiff::token_plan>& plans,
                         level l, index_t cap, const std::vector<float>& compact, index_t dim) {
    const index_t tokens = plans[0].tokens();
    for (std::size_t b = 0; b < plans.size(); ++b) {
      const auto local = plans[b].indices(l);
      std::vector<index_t> global;
      for (index_t i : local) global.push_back(static_cast<index_t>(b) * tokens + i);
      host.scatter(layer, site, t, global,
                   specdiff::matrix_view<const float>(compact.data() + b * static_cast<std::size_t>(cap) * static_cast<std::size_t>(dim),
                                                      static_cast<index_t>(global.size()), dim));
    }
  }

  // Magnitude of the terms of token's fill at column c: sum_k |w_k x_k| with the host's weights.
  template <class Storage, class A>
  double fill_magnitude(const specdiff::host_cache_store<Storage>& host, index_t layer, index_t site, index_t token, const A& a, float t, index_t c) {
    const int n = std::min<int>(A::depth, host.entries(layer, site, token));
    float tags[8], w[8];
    for (int k = 0; k < n; ++k) tags[k] = host.history_tag(layer, site, token, k);
    a.weights(tags, n, t, w);
    double m = 0.0;
    for (int k = 0; k < n; ++k)
      m += std::abs(static_cast<double>(w[k]) * specdiff::storage_traits<Storage>::load(host.history(layer, site, token, k)[static_cast<std::size_t>(c)]));
    return m;
  }

  // `a` fills on the host, `on_device` on the device: the same approximator, unless its weights live in memory
  // (learned<Depth>: a view of a table, in host memory for one, device memory for the other).
  template <class Storage, class A>
  void compare_fill(twin_stores<Storage>& st, index_t layer, index_t site, float t, const std::vector<specdiff::token_plan>& plans, const device_plan& plan,
                    level l, const A& a, const A& on_device, std::mt19937_64& g, const stream& s) {
    const index_t dim = st.shape.dim, rows = st.shape.tokens, tokens = plans[0].tokens();
    const auto init = random_rows(g, rows, dim);
    std::vector<float> want = init;
    for (std::size_t b = 0; b < plans.size(); ++b) {
      std::vector<index_t> global;
      for (index_t i : plans[b].indices(l)) global.push_back(static_cast<index_t>(b) * tokens + i);
      st.host.fill(layer, site, t, global, a, specdiff::matrix_view<float>(want.data(), rows, dim));
    }
    buffer<float> out(init);
    st.device.fill(layer, site, t, gpu::rows_of(plan.view, l), on_device, gpu::device_matrix<float>(out.get(), rows, dim), s);
    const auto got = out.download();
    int bad = 0;
    for (index_t r = 0; r < rows && bad < 5; ++r)
      for (index_t c = 0; c < dim; ++c) {
        const std::size_t i = static_cast<std::size_t>(r) * static_cast<std::size_t>(dim) + static_cast<std::size_t>(c);
        if (got[i] == want[i]) continue;
        if (want[i] != init[i] && close(got[i], want[i], fill_magnitude(st.host, layer, site, r, a, t, c))) continue;
        FAIL_CHECK("row ", r, " column ", c, ": device ", got[i], ", host ", want[i]);
        ++bad;
        break;
      }
    CHECK(bad == 0);
  }
  template <class Storage, class A>
  void compare_fill(twin_stores<Storage>& st, index_t layer, index_t site, float t, const std::vector<specdiff::token_plan>& plans, const device_plan& plan,
                    level l, const A& a, std::mt19937_64& g, const stream& s) {
    compare_fill(st, layer, site, t, plans, plan, l, a, a, g, s);
  }

  template <class Storage>
  void check_store(index_t tokens, index_t batch, index_t dim, index_t depth, std::mt19937_64& g, const stream& s) {
    INFO("tokens ", tokens, ", batch ", batch, ", dim ", dim, ", depth ", depth, ", storage bytes ", sizeof(Storage));
    const index_t rows = tokens * batch;
    twin_stores<Storage> st({2, 2, rows, dim, depth}, s);
    const index_t L = 1, S = 0;  // a slot away from the start of the memory

    // t = 1000: every row (a dense step).
    auto all = random_rows(g, rows, dim);
    buffer<float> d_all(all);
    st.host.write(L, S, 1000.f, specdiff::matrix_view<const float>(all.data(), rows, dim));
    st.device.write(L, S, 1000.f, gpu::device_matrix<const float>(d_all.get(), rows, dim), s);

    // t = 950, 900, 850: partial steps scattering a plan's C1 rows from a compact matrix, plus rows written
    // in place from a full matrix (write_rows) at one of them.
    float t = 950.f;
    for (int step = 0; step < 3; ++step, t -= 50.f) {
      std::vector<specdiff::token_plan> plans;
      for (index_t b = 0; b < batch; ++b) plans.push_back(random_plan(g, tokens));
      device_plan plan(batch, tokens);
      upload(plans, plan.view);
      index_t cap = 0;
      for (const auto& p : plans) cap = std::max(cap, p.count(level::compute));
      if (cap > 0) {
        const auto compact = random_rows(g, batch * cap, dim);
        buffer<float> d_compact(compact);
        host_scatter_plan(st.host, L, S, t, plans, level::compute, cap, compact, dim);
        st.device.scatter(L, S, t, gpu::rows_of(plan.view, level::compute, cap), gpu::device_matrix<const float>(d_compact.get(), batch * cap, dim), s);
      }
      if (step == 1) {
        std::vector<index_t> list;
        for (index_t r = 0; r < rows; r += 3) list.push_back(r);
        auto full = random_rows(g, rows, dim);
        buffer<float> d_full(full);
        buffer<index_t> d_list(list);
        st.host.write_rows(L, S, t - 10.f, list, specdiff::matrix_view<const float>(full.data(), rows, dim));
        st.device.write_rows(L, S, t - 10.f, gpu::index_list{d_list.get(), static_cast<index_t>(list.size()), rows},
                             gpu::device_matrix<const float>(d_full.get(), rows, dim), s);
      }
    }

    // Fills at t = 780 of a fresh plan's C2 (latest) and C3 rows (each approximator).
    std::vector<specdiff::token_plan> plans;
    for (index_t b = 0; b < batch; ++b) plans.push_back(random_plan(g, tokens));
    device_plan plan(batch, tokens);
    upload(plans, plan.view);
    compare_fill(st, L, S, 780.f, plans, plan, level::reuse, specdiff::latest{}, g, s);
    compare_fill(st, L, S, 780.f, plans, plan, level::approximate, specdiff::specdiff_weighted{}, g, s);
    compare_fill(st, L, S, 780.f, plans, plan, level::approximate, specdiff::taylor<2>{}, g, s);
    compare_fill(st, L, S, 780.f, plans, plan, level::compute, specdiff::linear{}, g, s);
    {  // learned weights: one table, read through host pointers by the host store and device pointers by the device's
      std::vector<float> timesteps = {900.f, 780.f}, weights = random_rows(g, 2 * 3, 3);
      const specdiff::learned_table table(timesteps, 3, weights);
      buffer<float> d_timesteps(timesteps), d_weights(weights);
      const specdiff::learned<3> on_device{d_timesteps.get(), d_weights.get(), 2};
      compare_fill(st, L, S, 780.f, plans, plan, level::approximate, table.approximator<3>(timesteps), on_device, g, s);
    }

    // Feature change per token.
    std::vector<float> want(static_cast<std::size_t>(rows));
    st.host.change_norm(L, S, want);
    buffer<float> change(want.size());
    st.device.change_norm(L, S, change.span(), s);
    const auto got = change.download();
    int bad = 0;
    for (std::size_t i = 0; i < want.size(); ++i)
      if (!close(got[i], want[i], std::abs(want[i])) && bad++ < 5) FAIL_CHECK("token ", i, ": device ", got[i], ", host ", want[i]);
    CHECK(bad == 0);
    CHECK(st.device.read_status(s) == 0);
  }

  TEST_CASE("the device store matches the host store (float)") {
    auto g = rng(50);
    const stream s;
    check_store<float>(1, 1, 64, 3, g, s);
    check_store<float>(31, 4, 100, 3, g, s);
    check_store<float>(256, 1, 1536, 4, g, s);
    check_store<float>(4096, 4, 64, 3, g, s);
    check_store<float>(16384, 1, 128, 3, g, s);
    check_store<float>(1024, 4, 67, 2, g, s);  // odd width: element-wise path
  }

  TEST_CASE("the device store matches the host store (bfloat16)") {
    auto g = rng(51);
    const stream s;
    check_store<bfloat16>(1, 1, 64, 3, g, s);
    check_store<bfloat16>(31, 4, 100, 3, g, s);  // 100 is no multiple of 8: element-wise path
    check_store<bfloat16>(256, 1, 1536, 4, g, s);
    check_store<bfloat16>(4096, 4, 64, 3, g, s);
    check_store<bfloat16>(16384, 1, 128, 3, g, s);
  }

  TEST_CASE("where the host store throws, the device store raises a status bit and skips the row") {
    auto g = rng(52);
    const stream s;
    const index_t rows = 16, dim = 32;
    twin_stores<float> st({1, 2, rows, dim, 3}, s);
    auto init = random_rows(g, rows, dim);
    buffer<float> out(init);
    const gpu::device_matrix<float> o(out.get(), rows, dim);
    std::vector<index_t> list = {0, 5};
    buffer<index_t> d_list(list);
    const gpu::index_list tokens{d_list.get(), 2, rows};

    // Never written: the host throws logic_error, the device leaves the rows as they were.
    expect_error<std::logic_error>([&] { st.host.fill(0, 0, 1.f, list, specdiff::latest{}, specdiff::matrix_view<float>(init.data(), rows, dim)); }, {"no cached feature"});
    st.device.fill(0, 0, 1.f, tokens, o, s);
    CHECK(st.device.read_status(s) == gpu::status_empty_history);
    CHECK(out.download() == init);
    expect_error<std::runtime_error>([&] { st.device.check_status(s); }, {"device_cache_store", "no cached row"});

    // The same timestep twice: Taylor extrapolation cannot use the tags.
    st.device.clear(s);
    auto a = random_rows(g, rows, dim);
    buffer<float> d_a(a);
    for (int k = 0; k < 2; ++k) {
      st.host.write(0, 1, 5.f, specdiff::matrix_view<const float>(a.data(), rows, dim));
      st.device.write(0, 1, 5.f, gpu::device_matrix<const float>(d_a.get(), rows, dim), s);
    }
    expect_error<std::logic_error>([&] { st.host.fill(0, 1, 1.f, list, specdiff::linear{}, specdiff::matrix_view<float>(init.data(), rows, dim)); }, {"repeated timestep"});
    st.device.fill(0, 1, 1.f, tokens, specdiff::linear{}, o, s);
    CHECK(st.device.read_status(s) == gpu::status_rejected_tags);
    CHECK(out.download() == init);

    // Out-of-range rows and non-finite features.
    st.device.clear(s);
    std::vector<index_t> wild = {3, rows, -2};
    buffer<index_t> d_wild(wild);
    a[7] = NAN;
    d_a.upload(a);
    st.device.write_rows(0, 0, 2.f, gpu::index_list{d_wild.get(), 3, rows}, gpu::device_matrix<const float>(d_a.get(), rows, dim), s);
    CHECK(st.device.read_status(s) == gpu::status_index_out_of_range);
    st.device.write(0, 0, 2.f, gpu::device_matrix<const float>(d_a.get(), rows, dim), s);
    CHECK((st.device.read_status(s) & gpu::status_nonfinite_feature) != 0);

    // Argument checks, as the host store makes them.
    expect_error<std::invalid_argument>([&] { st.device.fill(1, 0, 1.f, tokens, o, s); }, {"layer", "1"});
    expect_error<std::invalid_argument>([&] { st.device.fill(0, 2, 1.f, tokens, o, s); }, {"site", "2"});
    expect_error<std::invalid_argument>([&] { st.device.fill(0, 0, NAN, tokens, specdiff::latest{}, o, s); }, {"t", "not finite"});
    expect_error<std::invalid_argument>([&] { st.device.fill(0, 0, 1.f, tokens, gpu::device_matrix<float>(out.get(), rows, dim - 1), s); }, {"out", "16x32", "16x31"});
    expect_error<std::invalid_argument>([&] { st.device.fill(0, 0, 1.f, gpu::index_list{d_list.get(), 2, rows + 1}, o, s); }, {"tokens", "17", "16"});
    expect_error<std::invalid_argument>(
        [&] { st.device.scatter(0, 0, 1.f, tokens, gpu::device_matrix<const float>(d_a.get(), 1, dim), s); }, {"rows", "1 rows", "2"});
  }
}

// ---------------------------------------------------------------------------------------------------------
TEST_SUITE("graph") {
  TEST_CASE("a whole cached step captures into a CUDA graph and replays exactly") {
    auto g = rng(60);
    const stream s;
    const index_t tokens = 4096, batch = 2, dim = 64, n = tokens * batch;
    const gpu::three_level_classifier<> classifier(tokens, batch, 0.9);
    const index_t c1 = classifier.compute_count();
    const specdiff::cache_shape shape{1, 1, n, dim, 3};

    buffer<unsigned char> store_memory(gpu::device_cache_store<float>::memory_bytes(shape));
    buffer<unsigned char> workspace(classifier.workspace_bytes());
    device_plan plan(batch, tokens);
    buffer<float> his(lognormal(g, static_cast<std::size_t>(n), 0.01)), fut(lognormal(g, static_cast<std::size_t>(n), 0.01));
    const auto features_init = [&] {
      std::normal_distribution<float> d(0.f, 1.f);
      std::vector<float> v(static_cast<std::size_t>(n * dim));
      for (auto& x : v) x = d(g);
      return v;
    }();
    buffer<float> cf(static_cast<std::size_t>(n)), scores(static_cast<std::size_t>(n)), features(features_init),
        compact(static_cast<std::size_t>(batch * c1 * dim));
    const gpu::device_matrix<float> out(features.get(), n, dim);
    const gpu::device_matrix<float> c1_rows(compact.get(), batch * c1, dim);

    // One partial step, as an engine would issue it: score, classify, gather C1, (the network would run
    // here), cache C1, fill C2 and C3, advance staleness.
    auto step = [&](gpu::device_cache_store<float>& store, float t) {
      gpu::score(specdiff::specdiff_scorer{}, {his.cspan(), fut.cspan(), cf.cspan(), {}, {}}, scores.span(), s);
      std::size_t bytes = workspace.size();
      classifier.classify(workspace.get(), bytes, scores.cspan(), plan.view, s);
      gpu::gather_rows<gpu::copy_policy<>, float>(out, gpu::rows_of(plan.view, level::compute, c1), c1_rows, s);
      store.scatter(0, 0, t, gpu::rows_of(plan.view, level::compute, c1), c1_rows, s);
      store.fill(0, 0, t, gpu::rows_of(plan.view, level::reuse), out, s);
      store.fill(0, 0, t, gpu::rows_of(plan.view, level::approximate), specdiff::specdiff_weighted{}, out, s);
      gpu::advance_cache_counts(plan.view, cf.span(), s);
    };
    // Fresh state: zeroed store memory and counts, the dense step's rows cached at t = 1000 and 900.
    auto reset = [&] {
      SPECDIFF_CUDA_CHECK(cudaMemset(store_memory.get(), 0, store_memory.size()));
      SPECDIFF_CUDA_CHECK(cudaMemset(cf.get(), 0, cf.bytes()));
      SPECDIFF_CUDA_CHECK(cudaDeviceSynchronize());
      features.upload(features_init);
      gpu::device_cache_store<float> store(shape, store_memory.get(), store_memory.size(), s);
      store.write(0, 0, 1000.f, out, s);
      store.write(0, 0, 900.f, out, s);
      s.sync();
      return store;
    };
    struct snapshot {
      std::vector<unsigned char> store;
      std::vector<float> features, cf;
      plan_copy plan;
    };
    auto take = [&] { return snapshot{store_memory.download(), features.download(), cf.download(), download(plan.view)}; };

    auto eager = reset();
    step(eager, 800.f);
    step(eager, 700.f);
    s.sync();
    const snapshot want = take();

    auto captured = reset();
    cudaGraph_t graph = nullptr;
    SPECDIFF_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));  // a sync or malloc inside would fail capture
    step(captured, 800.f);
    step(captured, 700.f);
    SPECDIFF_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
    cudaGraphExec_t exec = nullptr;
    SPECDIFF_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    SPECDIFF_CUDA_CHECK(cudaGraphLaunch(exec, s));
    s.sync();
    const snapshot got = take();
    CHECK(got.store == want.store);
    CHECK(got.features == want.features);
    CHECK(got.cf == want.cf);
    CHECK(got.plan.order == want.plan.order);
    CHECK(got.plan.counts == want.plan.counts);
    CHECK(got.plan.status == 0);
    CHECK(captured.read_status(s) == 0);
    SPECDIFF_CUDA_CHECK(cudaGraphExecDestroy(exec));
    SPECDIFF_CUDA_CHECK(cudaGraphDestroy(graph));
  }
}

// ---------------------------------------------------------------------------------------------------------
// LSE column sums: gpu::lse_column_sums / lse_column_sums_estimate against their host twins in attention.hpp
// (which core/lse holds against a materialised softmax). The device forms logits in float and the host in
// double, so the bound is derived, not picked: a float dot product of length d errs by at most about
// d * 2^-24 * sum_i |q_i k_i| <= d * 2^-24 * |q| |k|; an error e in the exponent scales a term by e^e; the
// float exp, the float LSE subtraction and the 4-term float sums add a few ulps. Every term is positive, so
// a column's relative error is at most its worst term's.
TEST_SUITE("lse") {
  using specdiff::column_mode;

  double lse_tolerance(const lsetest::layer& L) {
    const auto largest_norm = [&](const std::vector<float>& rows) {
      double most = 0.0;
      for (std::size_t r = 0; r < rows.size(); r += static_cast<std::size_t>(L.dim)) {
        double sq = 0.0;
        for (index_t i = 0; i < L.dim; ++i) sq += static_cast<double>(rows[r + static_cast<std::size_t>(i)]) * rows[r + static_cast<std::size_t>(i)];
        most = std::max(most, std::sqrt(sq));
      }
      return most;
    };
    double lse = 0.0;
    for (float x : L.lse) lse = std::max(lse, std::abs(static_cast<double>(x)));
    const double eps = std::ldexp(1.0, -24);
    return eps * (16.0 + 2.0 * lse + (L.dim + 4.0) * L.scale * largest_norm(L.q) * largest_norm(L.k));
  }

  void expect_within(const std::vector<float>& got, const std::vector<float>& want, double rel) {
    REQUIRE(got.size() == want.size());
    int bad = 0;
    for (std::size_t i = 0; i < got.size(); ++i)
      if (!(std::abs(static_cast<double>(got[i]) - want[i]) <= rel * std::abs(static_cast<double>(want[i])) + 1e-37) && bad++ < 5)
        FAIL_CHECK("key ", i, ": device ", got[i], ", host ", want[i], " (relative bound ", rel, ")");
    CHECK(bad == 0);
  }

  /// A layer's Q and K in element type T and its LSE on the device, as packed views.
  template <class T>
  struct device_layer {
    buffer<T> q, k;
    buffer<float> lse;
    gpu::device_lse_attention<T> view;
    explicit device_layer(const lsetest::layer& L)
        : q(lsetest::as<T>(L.q)), k(lsetest::as<T>(L.k)), lse(L.lse),
          view{{q.get(), L.batch, L.heads, L.queries, L.dim}, {k.get(), L.batch, L.heads, L.keys, L.dim}, {lse.get()}, L.scale} {}
  };

  /// Device sums (exact for step 1, the estimate otherwise) of a view, through the two-phase workspace.
  template <class T>
  std::vector<float> device_sums(const gpu::device_lse_attention<T>& view, index_t step, std::size_t n, const stream& s,
                                 column_mode mode = column_mode::overwrite, const std::vector<float>& before = {}) {
    std::size_t bytes = 0;
    gpu::lse_column_sums_estimate(nullptr, bytes, view, step, gpu::device_span<float>{}, mode, s);
    buffer<unsigned char> ws(bytes);
    buffer<float> out(before.empty() ? std::vector<float>(n, std::nanf("")) : before);
    if (step == 1) gpu::lse_column_sums(ws.get(), bytes, view, out.span(), mode, s);
    else gpu::lse_column_sums_estimate(ws.get(), bytes, view, step, out.span(), mode, s);
    return out.download();
  }

  template <class T>
  void check_layer(lsetest::layer L, const stream& s) {
    if constexpr (std::is_same_v<T, bfloat16>) lsetest::round_to_bfloat16(L);
    INFO("batch ", L.batch, ", heads ", L.heads, ", queries ", L.queries, ", keys ", L.keys, ", context ", L.context, ", dim ", L.dim, ", element bytes ", sizeof(T));
    const device_layer<T> d(L);
    const auto q = lsetest::as<T>(L.q), k = lsetest::as<T>(L.k);
    const specdiff::lse_attention<T> host{{q.data(), L.batch, L.heads, L.queries, L.dim}, {k.data(), L.batch, L.heads, L.keys, L.dim}, {L.lse.data()}, L.scale};
    std::vector<float> want(static_cast<std::size_t>(L.batch * L.keys));
    specdiff::lse_column_sums(host, want, column_mode::overwrite);
    expect_within(device_sums(d.view, 1, want.size(), s), want, lse_tolerance(L));
  }

  TEST_CASE("lse column sums on the device match the host twin (float and bfloat16)") {
    auto g = rng(70);
    const stream s;
    struct shape {
      index_t batch, heads, queries, keys, context, dim;
    };
    const shape shapes[] = {
        {1, 1, 1, 1, 0, 1},      {2, 3, 17, 29, 4, 8},   {1, 2, 100, 130, 5, 64},  // tiles cut at both edges
        {4, 2, 65, 64, 0, 40},   {1, 2, 70, 200, 3, 128},                           // head_dim not a multiple of 16; 128
        {1, 24, 300, 256, 7, 64},                                                   // 24 heads x 5 tiles: 8 chunks
        {1, 1, 4096, 4096, 77, 64},                                                 // SD3-medium's image tokens, one head
    };
    for (const auto& sh : shapes) {
      const auto L = lsetest::random_layer(g, sh.batch, sh.heads, sh.queries, sh.keys, sh.context, sh.dim);
      check_layer<float>(L, s);
      check_layer<bfloat16>(L, s);
    }
    // DiT-like structure (locality, hot keys): wider logits than Gaussian Q and K
    const auto L = lsetest::random_layer(g, 2, 4, 1024, 1024, 0, 64, {.side = 32});
    check_layer<float>(L, s);
    check_layer<bfloat16>(L, s);
  }

  // gpu::attention_probe (API 0.3): an engine's token-major Q [B][queries][H*d], K [B][N][H*d] and packed LSE per
  // layer; the first layer after begin() overwrites, the next adds: the host twin's overwrite + accumulate.
  template <class T>
  void check_probe(lsetest::layer L1, lsetest::layer L2, const stream& s) {
    if constexpr (std::is_same_v<T, bfloat16>) lsetest::round_to_bfloat16(L1), lsetest::round_to_bfloat16(L2);
    REQUIRE(L1.scale == L2.scale);
    const index_t B = L1.batch, H = L1.heads, Q = L1.queries, N = L1.keys, d = L1.dim;
    const auto token_major = [&](const lsetest::layer& L, bool keys) {
      const index_t tokens = keys ? N : Q;
      std::vector<float> out(static_cast<std::size_t>(B * tokens * H * d));
      for (index_t b = 0; b < B; ++b)
        for (index_t t = 0; t < tokens; ++t)
          for (index_t h = 0; h < H; ++h)
            for (index_t i = 0; i < d; ++i)
              out[static_cast<std::size_t>(((b * tokens + t) * H + h) * d + i)] =
                  keys ? L.k[L.k_at(b, h, t) + static_cast<std::size_t>(i)] : L.q[L.q_at(b, h, t) + static_cast<std::size_t>(i)];
      return out;
    };
    buffer<T> q1(lsetest::as<T>(token_major(L1, false))), k1(lsetest::as<T>(token_major(L1, true))), q2(lsetest::as<T>(token_major(L2, false))),
        k2(lsetest::as<T>(token_major(L2, true)));
    buffer<float> lse1(L1.lse), lse2(L2.lse);
    const gpu::probe_shape shape{.batch = B, .heads = H, .head_dim = d, .keys = N, .max_queries = Q, .scale = L1.scale};
    buffer<unsigned char> memory(gpu::attention_probe<T>::memory_bytes(shape));
    gpu::attention_probe<T> probe(shape, memory.get(), memory.size());
    std::vector<float> want(static_cast<std::size_t>(B * N));
    const auto q1h = lsetest::as<T>(L1.q), k1h = lsetest::as<T>(L1.k), q2h = lsetest::as<T>(L2.q), k2h = lsetest::as<T>(L2.k);
    specdiff::lse_column_sums(specdiff::lse_attention<T>{{q1h.data(), B, H, Q, d}, {k1h.data(), B, H, N, d}, {L1.lse.data()}, L1.scale}, want,
                              column_mode::overwrite);
    specdiff::lse_column_sums(specdiff::lse_attention<T>{{q2h.data(), B, H, Q, d}, {k2h.data(), B, H, N, d}, {L2.lse.data()}, L2.scale}, want,
                              column_mode::accumulate);
    for (int call = 0; call < 2; ++call) {  // a second call's first layer overwrites again
      probe.begin();
      probe.add_layer(q1.get(), Q, k1.get(), lse1.get(), s);
      probe.add_layer(q2.get(), Q, k2.get(), lse2.get(), s);
      const auto his = probe.his();
      std::vector<float> got(static_cast<std::size_t>(his.size));
      REQUIRE(cudaMemcpyAsync(got.data(), his.data, got.size() * sizeof(float), cudaMemcpyDeviceToHost, s) == cudaSuccess);
      REQUIRE(cudaStreamSynchronize(s) == cudaSuccess);
      expect_within(got, want, 2.0 * std::max(lse_tolerance(L1), lse_tolerance(L2)));
    }
  }

  TEST_CASE("attention_probe: two layers per call, overwrite then accumulate, as the host twin (float and bfloat16)") {
    auto g = rng(72);
    const stream s;
    const auto L1 = lsetest::random_layer(g, 2, 3, 70, 70, 0, 16), L2 = lsetest::random_layer(g, 2, 3, 70, 70, 0, 16);
    check_probe<float>(L1, L2, s);
    check_probe<bfloat16>(L1, L2, s);
  }

  TEST_CASE("lse column sums on the device read an engine's fused QKV rows through strides") {
    auto g = rng(71);
    const stream s;
    const auto L = lsetest::random_layer(g, 2, 4, 150, 150, 6, 32);
    const index_t hidden = L.heads * L.dim;
    // [batch][tokens][3 * hidden]: Q at column h * dim, K at hidden + h * dim; LSE as [batch][queries][heads]
    std::vector<float> qkv(static_cast<std::size_t>(L.batch * L.queries * 3 * hidden), 0.f), lse_bqh(L.lse.size());
    for (index_t b = 0; b < L.batch; ++b)
      for (index_t h = 0; h < L.heads; ++h)
        for (index_t t = 0; t < L.queries; ++t) {
          const std::size_t row = static_cast<std::size_t>((b * L.queries + t) * 3 * hidden + h * L.dim);
          for (index_t i = 0; i < L.dim; ++i) {
            qkv[row + static_cast<std::size_t>(i)] = L.q[L.q_at(b, h, t) + static_cast<std::size_t>(i)];
            qkv[row + static_cast<std::size_t>(hidden + i)] = L.k[L.k_at(b, h, t) + static_cast<std::size_t>(i)];
          }
          lse_bqh[static_cast<std::size_t>((b * L.queries + t) * L.heads + h)] = L.lse[L.lse_at(b, h, t)];
        }
    buffer<float> d_qkv(qkv), d_lse(lse_bqh);
    const std::ptrdiff_t row = 3 * hidden, sample = static_cast<std::ptrdiff_t>(L.queries) * row;
    const gpu::device_lse_attention<float> view{{d_qkv.get(), L.batch, L.heads, L.queries, L.dim, row, L.dim, sample},
                                                {d_qkv.get() + hidden, L.batch, L.heads, L.keys, L.dim, row, L.dim, sample},
                                                {d_lse.get(), L.heads, 1, L.queries * L.heads},
                                                L.scale};
    const device_layer<float> packed(L);
    const auto n = static_cast<std::size_t>(L.batch * L.keys);
    const auto strided = device_sums(view, 1, n, s);
    CHECK(strided == device_sums(packed.view, 1, n, s));  // the same loads in the same order
    std::vector<float> want(n);
    specdiff::lse_column_sums(L.view(), want, column_mode::overwrite);
    expect_within(strided, want, lse_tolerance(L));
  }

  TEST_CASE("lse estimate, accumulate, determinism and graph capture on the device") {
    auto g = rng(72);
    const stream s;
    const auto L = lsetest::random_layer(g, 2, 3, 333, 257, 5, 64);
    const device_layer<float> d(L);
    const auto n = static_cast<std::size_t>(L.batch * L.keys);
    const auto exact = device_sums(d.view, 1, n, s);
    CHECK(device_sums(d.view, 1, n, s) == exact);  // bit-identical from run to run
    // the estimate against its host twin, and its smaller workspace
    std::size_t exact_bytes = 0, estimate_bytes = 0;
    gpu::lse_column_sums(nullptr, exact_bytes, d.view, gpu::device_span<float>{}, column_mode::overwrite, s);
    for (index_t step : {2, 3, 17, 1000}) {
      INFO("query_step ", step);
      std::vector<float> want(n);
      specdiff::lse_column_sums_estimate(L.view(), step, want, column_mode::overwrite);
      const auto got = device_sums(d.view, step, n, s);
      expect_within(got, want, lse_tolerance(L));
      gpu::lse_column_sums_estimate(nullptr, estimate_bytes, d.view, step, gpu::device_span<float>{}, column_mode::overwrite, s);
      CHECK(estimate_bytes <= exact_bytes);
      // accumulate adds exactly what overwrite writes
      const auto before = testing::random_vector(g, n, 0.f, 10.f);
      const auto summed = device_sums(d.view, step, n, s, column_mode::accumulate, before);
      for (std::size_t i = 0; i < n; ++i) CHECK(summed[i] == before[i] + got[i]);
    }
    // a call captured into a CUDA graph (capture fails on any hidden synchronisation or allocation) replays
    // to the eager result
    buffer<unsigned char> ws(exact_bytes);
    buffer<float> out(n);
    std::size_t bytes = exact_bytes;
    cudaGraph_t graph = nullptr;
    SPECDIFF_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    gpu::lse_column_sums(ws.get(), bytes, d.view, out.span(), column_mode::overwrite, s);
    SPECDIFF_CUDA_CHECK(cudaStreamEndCapture(s, &graph));
    cudaGraphExec_t exec = nullptr;
    SPECDIFF_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    SPECDIFF_CUDA_CHECK(cudaGraphLaunch(exec, s));
    s.sync();
    CHECK(out.download() == exact);
    SPECDIFF_CUDA_CHECK(cudaGraphExecDestroy(exec));
    SPECDIFF_CUDA_CHECK(cudaGraphDestroy(graph));
  }
}
