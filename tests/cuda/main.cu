// Test runner and the host-only suite. `--gpu` marks a run of device suites: without a usable CUDA device it
// exits with 77 (CTest's SKIP_RETURN_CODE for these tests), so a machine without a GPU reports them skipped.
#define DOCTEST_CONFIG_IMPLEMENT
#include "support.cuh"
#include "../common/gpu_main.hpp"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <numeric>
#include <string_view>

namespace gpu = specdiff::gpu;
using cudatest::expect_error;
using specdiff::index_t;
using specdiff::level;

int main(int argc, char** argv) { return testing::gpu_test_main(argc, argv); }

// ---------------------------------------------------------------------------------------------------------
// Host-only: the pure functions the kernels rely on, and argument validation that happens before any CUDA
// call. Nothing here touches a device.

TEST_SUITE("host") {
  TEST_CASE("descending_bits orders floats as the host ranking does, folding -0 onto +0") {
    auto g = cudatest::rng(1);
    std::vector<float> values = {0.f, -0.f, 1.f, -1.f, std::numeric_limits<float>::denorm_min(), -std::numeric_limits<float>::denorm_min(),
                                 std::numeric_limits<float>::max(), std::numeric_limits<float>::lowest(), INFINITY, -INFINITY, 1e-30f, -69.07755f};
    std::normal_distribution<float> d(0.f, 30.f);
    for (int i = 0; i < 2000; ++i) values.push_back(d(g));
    for (int i = 0; i < 200; ++i) values.push_back(std::round(d(g)));  // ties
    for (float a : values) {
      CHECK(gpu::detail::from_descending_bits(gpu::detail::descending_bits(a)) == a);  // == treats -0 as +0
      for (int k = 0; k < 8; ++k) {
        const float b = values[std::uniform_int_distribution<std::size_t>(0, values.size() - 1)(g)];
        const auto ka = gpu::detail::descending_bits(a), kb = gpu::detail::descending_bits(b);
        CHECK((a > b) == (ka < kb));
        CHECK((a == b) == (ka == kb));
      }
    }
    CHECK(gpu::detail::descending_bits(-0.f) == gpu::detail::descending_bits(0.f));
    CHECK(gpu::detail::descending_bits(NAN) == gpu::detail::descending_bits(-INFINITY));
  }

  TEST_CASE("rank keys order samples first, then scores descending") {
    CHECK(gpu::detail::rank_key(0, -1000.f) < gpu::detail::rank_key(1, 1000.f));
    CHECK(gpu::detail::rank_key(2, 5.f) < gpu::detail::rank_key(2, 4.f));
    CHECK(gpu::detail::key_score(gpu::detail::rank_key(3, -2.5f)) == -2.5f);
    CHECK((gpu::detail::rank_key(3, 7.f) >> 32) == 3u);
  }

  TEST_CASE("packed level counters add per level without carries") {
    auto g = cudatest::rng(2);
    std::uniform_int_distribution<int> pick(0, 2);
    std::uint64_t packed = 0;
    index_t expect[3] = {0, 0, 0};
    for (int i = 0; i < 100000; ++i) {
      const auto l = static_cast<level>(pick(g));
      packed += gpu::detail::level_counter(l);
      ++expect[static_cast<int>(l)];
    }
    for (int l = 0; l < 3; ++l) CHECK(gpu::detail::counter_of(packed, static_cast<level>(l)) == expect[l]);
  }

  // The device classifier's pipeline run sequentially on the host: the same keys and per-element rules
  // (classify_rules), std::stable_sort standing in for the (stable) radix sort and plain loops for the
  // scans. Agreement with the host classifier here checks the algorithm on any machine; the gpu suite
  // then checks the kernels against the same host classifier.
  cudatest::plan_copy model_classify(const std::vector<float>& scores, index_t batch, index_t tokens, double cache_rate, double reuse_mass) {
    namespace d = gpu::detail;
    const index_t c1 = specdiff::math::compute_count(cache_rate, tokens);
    const d::classify_rules rules{tokens, c1, reuse_mass};
    const auto n = static_cast<std::size_t>(batch) * static_cast<std::size_t>(tokens), t = static_cast<std::size_t>(tokens);
    std::vector<std::uint64_t> keys(n), sorted(n);
    std::vector<index_t> perm(n), ranked(n), first_exceed(static_cast<std::size_t>(batch), rules.reusable());
    for (std::size_t p = 0; p < n; ++p) keys[p] = d::rank_key(static_cast<index_t>(p / t), scores[p]);
    std::iota(perm.begin(), perm.end(), 0);
    std::stable_sort(perm.begin(), perm.end(), [&](index_t a, index_t b) { return keys[static_cast<std::size_t>(a)] < keys[static_cast<std::size_t>(b)]; });
    for (std::size_t p = 0; p < n; ++p) {
      sorted[p] = keys[static_cast<std::size_t>(perm[p])];
      ranked[p] = static_cast<index_t>(static_cast<std::size_t>(perm[p]) % t);
    }
    if (rules.reusable() > 0) {
      std::vector<double> suffix(n);
      const d::reversed_share share{sorted.data(), tokens};
      for (std::size_t j = 0; j < n; ++j) suffix[j] = (j % t == 0 ? 0.0 : suffix[j - 1]) + share(static_cast<index_t>(j));
      for (std::size_t j = 0; j < n; ++j) {
        const index_t e = rules.exceedance(suffix.data(), static_cast<index_t>(j));
        if (e >= 0) first_exceed[j / t] = std::min(first_exceed[j / t], e);
      }
    }
    cudatest::plan_copy out;
    out.order.resize(n);
    out.levels.resize(n);
    out.counts.resize(static_cast<std::size_t>(batch) * 3);
    for (std::size_t p = 0; p < n; ++p)
      out.levels[(p / t) * t + static_cast<std::size_t>(ranked[p])] = rules.level_of_rank(static_cast<index_t>(p % t), first_exceed[p / t]);
    std::vector<std::uint64_t> prefix(n);
    std::uint64_t running = 0;
    for (std::size_t p = 0; p < n; ++p) {
      prefix[p] = running;
      running += d::level_counter(out.levels[p]);
    }
    for (std::size_t p = 0; p < n; ++p) {
      const std::size_t base = (p / t) * t;
      const index_t c2 = first_exceed[p / t];
      out.order[base + static_cast<std::size_t>(rules.list_position(out.levels[p], prefix[p] - prefix[base], c2))] = static_cast<index_t>(p % t);
      if (p % t == 0) out.counts[p / t * 3] = c1, out.counts[p / t * 3 + 1] = c2, out.counts[p / t * 3 + 2] = tokens - c1 - c2;
    }
    return out;
  }

  TEST_CASE("the device classifier's pipeline, run sequentially, reproduces the host classifier") {
    auto g = cudatest::rng(3);
    const double rates[] = {0.5, 0.9, 0.99, 0.0, 0.7};
    const double masses[] = {0.1, 0.0, 0.3, 0.1, 1.0};
    int k = 0;
    for (index_t tokens : {1, 2, 31, 256, 4096, 16384})
      for (index_t batch : {1, 4})
        for (auto kind : {cudatest::scores_kind::continuous, cudatest::scores_kind::ties, cudatest::scores_kind::signals,
                          cudatest::scores_kind::wide, cudatest::scores_kind::constant}) {
          const double rate = rates[k % 5], mass = masses[(k / 5) % 5];
          ++k;
          INFO("tokens ", tokens, ", batch ", batch, ", kind ", static_cast<int>(kind), ", cache_rate ", rate, ", reuse_mass ", mass);
          const auto scores = cudatest::make_scores(kind, g, static_cast<std::size_t>(tokens * batch));
          const auto got = model_classify(scores, batch, tokens, rate, mass);
          specdiff::three_level_classifier host(rate, mass);
          host.prepare(tokens);
          specdiff::token_plan want(tokens);
          for (index_t b = 0; b < batch; ++b) {
            const auto o = static_cast<std::size_t>(b * tokens);
            host.classify(std::span<const float>(scores.data() + o, static_cast<std::size_t>(tokens)), want);
            std::size_t at = o;
            for (int l = 0; l < 3; ++l) {
              REQUIRE(got.counts[static_cast<std::size_t>(b * 3 + l)] == want.count(static_cast<level>(l)));
              const auto list = want.indices(static_cast<level>(l));
              CHECK(std::equal(list.begin(), list.end(), got.order.begin() + static_cast<std::ptrdiff_t>(at)));
              at += list.size();
            }
            CHECK(std::equal(want.levels().begin(), want.levels().end(), got.levels.begin() + static_cast<std::ptrdiff_t>(o)));
          }
        }
  }

  TEST_CASE("cuda_error carries the call, the place and the runtime's words") {
    const gpu::cuda_error e(cudaErrorInvalidValue, "cudaMemcpy(dst, src, n)", "kernel.cu", 42);
    const std::string msg = e.what();
    CHECK(msg.find("cudaMemcpy(dst, src, n)") != std::string::npos);
    CHECK(msg.find("kernel.cu:42") != std::string::npos);
    CHECK(msg.find(cudaGetErrorString(cudaErrorInvalidValue)) != std::string::npos);
    CHECK(msg.find("cudaErrorInvalidValue") != std::string::npos);
    CHECK(e.code() == cudaErrorInvalidValue);
    expect_error<gpu::cuda_error>([] { SPECDIFF_CUDA_CHECK(cudaErrorMemoryAllocation); }, {"cudaErrorMemoryAllocation", "main.cu:"});
    int line = 0;
    bool thrown = false;
    try {
      line = __LINE__; SPECDIFF_CUDA_CHECK(cudaErrorLaunchFailure);
    } catch (const std::runtime_error& err) {  // a cuda_error is a runtime_error
      thrown = true;
      const auto* cuda = dynamic_cast<const gpu::cuda_error*>(&err);
      REQUIRE(cuda != nullptr);
      CHECK(cuda->line() == line);
      CHECK(cuda->code() == cudaErrorLaunchFailure);
    }
    CHECK(thrown);
    CHECK_NOTHROW(SPECDIFF_CUDA_CHECK(cudaSuccess));
  }

  TEST_CASE("status words name their bits") {
    CHECK(gpu::describe_status(0) == "ok");
    CHECK(gpu::describe_status(gpu::status_empty_history | gpu::status_index_out_of_range) ==
          "fill of a token with no cached row, row index out of range");
    CHECK(gpu::describe_status(1u << 30).find("unknown bits") != std::string::npos);
    expect_error<std::runtime_error>([] { gpu::throw_if_status(gpu::status_rejected_tags, "store"); }, {"store", "approximator refused"});
    CHECK_NOTHROW(gpu::throw_if_status(0, "store"));
  }

  TEST_CASE("classifier arguments are checked before any CUDA call") {
    using C = gpu::three_level_classifier<>;
    expect_error<std::invalid_argument>([] { C(0, 1, 0.5); }, {"tokens", "0"});
    expect_error<std::invalid_argument>([] { C(16, 0, 0.5); }, {"batch", "0"});
    expect_error<std::invalid_argument>([] { C(16, 1, 1.0); }, {"cache_rate", "[0, 1)", "1"});
    expect_error<std::invalid_argument>([] { C(16, 1, -0.25); }, {"cache_rate", "-0.25"});
    expect_error<std::invalid_argument>([] { C(16, 1, std::nan("")); }, {"cache_rate", "nan"});
    expect_error<std::invalid_argument>([] { C(16, 1, 0.5, 1.5); }, {"reuse_mass", "1.5"});
    expect_error<std::invalid_argument>([] { C(1 << 20, 4, 0.5); }, {"batch * tokens", "1048576"});
  }

  TEST_CASE("plan memory is sized and carved with checks") {
    const std::size_t bytes = gpu::device_plan_view::bytes(4, 100);
    // order (400 indices) | counts (12) | status | levels (400 bytes), each padded to 256 bytes
    CHECK(bytes == 1792 + 256 + 256 + 512);
    alignas(256) static unsigned char fake[4096];
    const auto p = gpu::device_plan_view::carve(fake, sizeof fake, 4, 100);
    CHECK(reinterpret_cast<unsigned char*>(p.order) == fake);
    CHECK(reinterpret_cast<unsigned char*>(p.counts) == fake + 1792);
    CHECK(reinterpret_cast<unsigned char*>(p.levels) == fake + 1792 + 512);
    expect_error<std::invalid_argument>([] { gpu::device_plan_view::carve(fake, 100, 4, 100); }, {"memory_bytes", "100", "2816"});
    expect_error<std::invalid_argument>([] { gpu::device_plan_view::carve(fake + 4, 4000, 1, 10); }, {"aligned"});
    expect_error<std::invalid_argument>([] { gpu::device_plan_view::bytes(0, 10); }, {"batch", "0"});
    expect_error<std::invalid_argument>([] { gpu::device_plan_view::bytes(2, -3); }, {"tokens", "-3"});
  }

  TEST_CASE("attention shapes resolve packed strides and refuse overlaps") {
    const auto s = gpu::attention_shape{2, 3, 5, 7}.resolved();
    CHECK(s.row_stride == 7);
    CHECK(s.head_stride == 35);
    CHECK(s.sample_stride == 105);
    CHECK(s.extent() == 210);
    const auto strided = gpu::attention_shape{1, 2, 4, 6, 10}.resolved();  // 6 image keys of 10
    CHECK(strided.head_stride == 40);
    CHECK(strided.extent() == 40 + 30 + 6);
    expect_error<std::invalid_argument>([] { (void)gpu::attention_shape{1, 1, 4, 8, 6}.resolved(); }, {"row_stride", "6", "keys 8"});
    expect_error<std::invalid_argument>([] { (void)gpu::attention_shape{1, 2, 4, 8, 8, 20}.resolved(); }, {"head_stride", "20"});
    expect_error<std::invalid_argument>([] { (void)gpu::attention_shape{0, 1, 1, 1}.resolved(); }, {"batch", "0"});
    expect_error<std::invalid_argument>([] { (void)gpu::attention_shape{1, 1, 0, 1}.resolved(); }, {"queries", "0"});
    // 1 sample, 24 heads x 4096 queries = 98304 rows -> 384 chunks of 256; partials are doubles
    const gpu::attention_column_sums<> sums(gpu::attention_shape{1, 24, 4096, 4096});
    CHECK(sums.workspace_bytes() == 384u * 4096u * sizeof(double));
  }

  TEST_CASE("column sums check spans and workspace before launching") {
    const gpu::attention_column_sums<> sums(gpu::attention_shape{2, 2, 3, 4});
    std::size_t bytes = 0;
    sums.reduce(nullptr, bytes, gpu::device_span<const float>{}, {}, gpu::column_mode::overwrite, nullptr);  // the query
    CHECK(bytes == sums.workspace_bytes());
    alignas(256) static unsigned char ws[4096];
    static float fake[64];
    std::size_t small = bytes - 8;
    expect_error<std::invalid_argument>([&] { sums.reduce(ws, small, gpu::device_span<const float>{fake, 48}, {fake, 8}, gpu::column_mode::overwrite, nullptr); },
                                        {"workspace_bytes"});
    expect_error<std::invalid_argument>([&] { sums.reduce(ws, bytes, gpu::device_span<const float>{fake, 47}, {fake, 8}, gpu::column_mode::overwrite, nullptr); },
                                        {"probabilities", "48", "47"});
    expect_error<std::invalid_argument>([&] { sums.reduce(ws, bytes, gpu::device_span<const float>{fake, 48}, {fake, 7}, gpu::column_mode::overwrite, nullptr); },
                                        {"out", "8", "7"});
  }

  TEST_CASE("lse column sums size their workspace and check arguments before launching, with the host twin's messages") {
    using specdiff::column_mode;
    // Size query: shapes only (null data). 2 samples x 24 heads x 4096 queries = 24 x 64 query tiles of 64,
    // 16 tiles per chunk -> 96 chunks; 4096 keys of partial doubles each.
    const gpu::device_lse_attention<float> sizes{{nullptr, 2, 24, 4096, 64}, {nullptr, 2, 24, 4096, 64}, {}, 0.125f};
    std::size_t bytes = 0;
    gpu::lse_column_sums(nullptr, bytes, sizes, gpu::device_span<float>{}, column_mode::overwrite, nullptr);
    CHECK(bytes == 2u * 96u * 4096u * sizeof(double));
    gpu::lse_column_sums_estimate(nullptr, bytes, sizes, 4, gpu::device_span<float>{}, column_mode::overwrite, nullptr);  // 1024 queries: 24 x 16 tiles
    CHECK(bytes == 2u * 24u * 4096u * sizeof(double));
    auto no_queries = sizes;
    no_queries.queries.tokens = 0;
    expect_error<std::invalid_argument>([&] { gpu::lse_column_sums(nullptr, bytes, no_queries, gpu::device_span<float>{}, column_mode::overwrite, nullptr); },
                                        {"queries.tokens", "0"});
    expect_error<std::invalid_argument>([&] { gpu::lse_column_sums_estimate(nullptr, bytes, sizes, 0, gpu::device_span<float>{}, column_mode::overwrite, nullptr); },
                                        {"query_step", "0"});

    // Calls with a workspace: every check runs before a launch (host arrays stand in for device memory).
    alignas(256) static unsigned char ws[1 << 14];
    static float q[2 * 3 * 5 * 4], k[2 * 3 * 7 * 4], lse[2 * 3 * 5], out[2 * 7];
    const gpu::device_lse_attention<float> in{{q, 2, 3, 5, 4}, {k, 2, 3, 7, 4}, {lse}, 0.5f};
    std::size_t need = 0;
    gpu::lse_column_sums(nullptr, need, in, gpu::device_span<float>{}, column_mode::overwrite, nullptr);
    CHECK(need == 2u * 1u * 7u * sizeof(double));  // 3 heads x 1 tile: one chunk
    std::size_t small = need - 8;
    expect_error<std::invalid_argument>([&] { gpu::lse_column_sums(ws, small, in, {out, 14}, column_mode::overwrite, nullptr); }, {"workspace_bytes"});
    expect_error<std::invalid_argument>([&] { gpu::lse_column_sums(ws + 8, need, in, {out, 14}, column_mode::overwrite, nullptr); }, {"workspace", "aligned"});
    expect_error<std::invalid_argument>([&] { gpu::lse_column_sums(ws, need, in, {out, 13}, column_mode::overwrite, nullptr); }, {"out", "expected 14", "got 13"});
    expect_error<std::invalid_argument>([&] { gpu::lse_column_sums(ws, need, in, {k, 14}, column_mode::overwrite, nullptr); }, {"out", "overlaps keys.data"});
    auto bad = in;
    bad.keys.head_dim = 3;
    expect_error<std::invalid_argument>([&] { gpu::lse_column_sums(ws, need, bad, {out, 14}, column_mode::overwrite, nullptr); }, {"keys.head_dim", "3", "4"});
    bad = in;
    bad.lse.query_stride = -1;
    expect_error<std::invalid_argument>([&] { gpu::lse_column_sums(ws, need, bad, {out, 14}, column_mode::overwrite, nullptr); }, {"lse.query_stride", "negative"});
    bad = in;
    bad.queries.head_stride = 16;  // 5 rows of 4 span 20
    expect_error<std::invalid_argument>([&] { gpu::lse_column_sums(ws, need, bad, {out, 14}, column_mode::overwrite, nullptr); }, {"queries.head_stride", "16", "overlaps"});
    bad = in;
    bad.scale = INFINITY;
    expect_error<std::invalid_argument>([&] { gpu::lse_column_sums(ws, need, bad, {out, 14}, column_mode::overwrite, nullptr); }, {"scale", "inf"});
    bad = in;
    bad.lse.data = nullptr;
    expect_error<std::invalid_argument>([&] { gpu::lse_column_sums(ws, need, bad, {out, 14}, column_mode::overwrite, nullptr); }, {"lse.data", "null"});
    expect_error<std::invalid_argument>([&] { gpu::lse_column_sums_estimate(ws, need, in, -2, {out, 14}, column_mode::overwrite, nullptr); }, {"query_step", "-2"});

    // The same message as the host twin for the same mistake.
    std::string host_msg, device_msg;
    const specdiff::lse_attention<float> host{{q, 2, 3, 5, 4}, {k, 2, 3, 7, 3}, {lse}, 0.5f};
    bad = in;
    bad.keys.head_dim = 3;
    try {
      specdiff::lse_column_sums(host, std::span<float>(out, 14), column_mode::overwrite);
    } catch (const std::invalid_argument& e) {
      host_msg = e.what();
    }
    try {
      gpu::lse_column_sums(ws, need, bad, {out, 14}, column_mode::overwrite, nullptr);
    } catch (const std::invalid_argument& e) {
      device_msg = e.what();
    }
    CHECK(!host_msg.empty());
    CHECK(host_msg == device_msg);
  }

  TEST_CASE("row copies check shapes before launching") {
    static float fake[1024];
    const gpu::device_matrix<const float> full(fake, 10, 8);
    const gpu::device_matrix<float> compact(fake, 4, 8);
    const index_t* idx = reinterpret_cast<const index_t*>(fake);
    expect_error<std::invalid_argument>([&] { gpu::gather_rows<gpu::copy_policy<>, float>(full, gpu::index_list{idx, 5, 10}, compact, nullptr); },
                                        {"compact", "4 rows", "5"});
    expect_error<std::invalid_argument>([&] { gpu::gather_rows<gpu::copy_policy<>, float>(full, gpu::index_list{idx, 2, 11}, compact, nullptr); },
                                        {"full", "11x8", "10x8"});
    expect_error<std::invalid_argument>([&] { gpu::gather_rows<gpu::copy_policy<>, float>(full, gpu::index_list{nullptr, 2, 10}, compact, nullptr); },
                                        {"indices", "null"});
    expect_error<std::invalid_argument>(
        [&] { gpu::scatter_rows<gpu::copy_policy<>, float>(gpu::device_matrix<const float>(fake, 4, 7), gpu::index_list{idx, 2, 10}, gpu::device_matrix<float>(fake, 10, 8), nullptr); },
        {"compact", "4x8", "4x7"});
    expect_error<std::invalid_argument>(
        [&] { gpu::gather_rows<gpu::copy_policy<>, float>(gpu::device_matrix<const float>(fake, 10, 8, 6), gpu::all_rows{10}, gpu::device_matrix<float>(fake, 10, 8), nullptr); },
        {"stride 6", "cols 8"});
    // API 0.3: full and compact sharing memory (the kernel reads one while it writes the other), refused by name.
    expect_error<std::invalid_argument>(
        [&] { gpu::gather_rows<gpu::copy_policy<>, float>(gpu::device_matrix<const float>(fake, 10, 8), gpu::index_list{idx, 2, 10}, gpu::device_matrix<float>(fake + 40, 4, 8), nullptr); },
        {"full and compact overlap"});
    expect_error<std::invalid_argument>(
        [&] { gpu::scatter_rows<gpu::copy_policy<>, float>(gpu::device_matrix<const float>(fake + 72, 4, 8), gpu::index_list{idx, 2, 10}, gpu::device_matrix<float>(fake, 10, 8), nullptr); },
        {"compact and full overlap"});
    gpu::device_plan_view plan;
    plan.order = reinterpret_cast<index_t*>(fake), plan.counts = plan.order, plan.batch = 2, plan.tokens = 5;
    expect_error<std::invalid_argument>([&] { (void)gpu::rows_of(plan, level::compute, 6).validate(); }, {"capacity", "6"});
  }

  // gpu::score takes the host scorer types; a type that is no importance_scorer does not compile.
  struct not_a_scorer {
    float score(float x) const { return x; }
  };
  template <class S>
  constexpr bool scorable = requires(const S& sc, const gpu::device_score_inputs& in) { gpu::score(sc, in, gpu::device_span<float>{}, cudaStream_t{}); };
  static_assert(scorable<specdiff::specdiff_scorer> && scorable<specdiff::toca_scorer> && scorable<specdiff::feature_change_scorer> &&
                scorable<specdiff::uniform_scorer> && !scorable<not_a_scorer>);

  TEST_CASE("scorer and accumulate spans are checked before launching, with the host loop's messages") {
    static float fake[64];
    const gpu::device_span<const float> a(fake, 16), short_span(fake, 15), null_span(nullptr, 16);
    expect_error<std::invalid_argument>([&] { gpu::score(specdiff::specdiff_scorer{}, {a, short_span, a, {}, {}}, {fake, 16}, nullptr); }, {"future", "expected 16", "got 15"});
    expect_error<std::invalid_argument>([&] { gpu::score(specdiff::toca_scorer{}, {a, {}, {}, {}, {}}, {fake, 16}, nullptr); }, {"cache_count", "16", "0"});
    expect_error<std::invalid_argument>([&] { gpu::score(specdiff::feature_change_scorer{}, {{}, {}, a, null_span, {}}, {fake, 16}, nullptr); },
                                        {"feature_change", "null data", "16"});
    expect_error<std::invalid_argument>([&] { gpu::score(specdiff::uniform_scorer{}, {a, {}, a, {}, {}}, {fake, 0}, nullptr); }, {"log_score", "zero tokens"});
    expect_error<std::invalid_argument>([&] { gpu::score(specdiff::uniform_scorer{}, {{}, {}, a, {}, {}}, {nullptr, 16}, nullptr); }, {"log_score", "null data"});
    expect_error<std::invalid_argument>([&] { gpu::score(specdiff::uniform_scorer{}, {{}, {}, {fake, -3}, {}, {}}, {fake, 16}, nullptr); }, {"cache_count", "negative", "-3"});
    // The same message from the host loop and the device check, for the same mistake.
    const std::vector<float> good(16, 1.f), short_host(15, 1.f);
    std::vector<float> out(16);
    std::string host_msg, device_msg;
    try {
      specdiff::score_tokens(specdiff::specdiff_scorer{}, {good, short_host, good, {}, {}}, out);
    } catch (const std::invalid_argument& e) {
      host_msg = e.what();
    }
    try {
      gpu::score(specdiff::specdiff_scorer{}, {a, short_span, a, {}, {}}, {fake, 16}, nullptr);
    } catch (const std::invalid_argument& e) {
      device_msg = e.what();
    }
    CHECK(!host_msg.empty());
    CHECK(host_msg == device_msg);
    expect_error<std::invalid_argument>([&] { gpu::accumulate(short_span, {fake, 16}, nullptr); }, {"layer", "16", "15"});
  }

  TEST_CASE("cache store memory is sized like the host store's and checked") {
    const specdiff::cache_shape shape{2, 3, 100, 64, 3};
    const std::size_t rows = 2 * 3 * 100, entries = rows * 3;
    auto up = [](std::size_t b) { return (b + 255) / 256 * 256; };
    CHECK(gpu::device_cache_store<float>::memory_bytes(shape) == up(entries * 64 * 4) + up(entries * 4) + 2 * up(rows) + 256);
    CHECK(gpu::device_cache_store<specdiff::bfloat16>::memory_bytes(shape) == up(entries * 64 * 2) + up(entries * 4) + 2 * up(rows) + 256);
    alignas(256) static unsigned char fake[256];
    expect_error<std::invalid_argument>([&] { gpu::device_cache_store<float>(shape, fake, sizeof fake, nullptr); }, {"memory_bytes", "256"});
    expect_error<std::invalid_argument>([&] { (void)gpu::device_cache_store<float>::memory_bytes({1, 1, 10, 0, 3}); }, {"dim", "0"});
    expect_error<std::invalid_argument>([&] { (void)gpu::device_cache_store<float>::memory_bytes({1, 1, 10, 8, 9}); }, {"history_depth", "9"});
  }
}
