// Exact attention column sums from Q, K and the LSE (attention.hpp), the every-s-th-query estimate and the
// rank correlation that measures it. The reference materialises each query's softmax from Q and K in
// double (lsetest::reference_column_sums), never using the LSE the library reads.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <numbers>
#include <numeric>
#include <specdiff/attention.hpp>
#include <specdiff/specdiff.hpp>
#include <string>

#include "../common/lse_inputs.hpp"
#include "../common/testing.hpp"

using namespace specdiff;
using lsetest::layer;

namespace {

/// Relative tolerance of the library's sums against the reference: the LSE is a float (an error of half an
/// ulp of |lse| in the exponent scales each term by that much), and the output a float.
double tolerance(const layer& L) {
  double most = 0.0;
  for (float x : L.lse) most = std::max(most, std::abs(static_cast<double>(x)));
  return 2.0 * std::ldexp(1.0, -24) * (most + 2.0);
}

/// Every value within `rel` of the reference (all terms are positive: no cancellation to excuse).
void check_close(const std::vector<float>& got, const std::vector<double>& want, double rel) {
  REQUIRE(got.size() == want.size());
  int bad = 0;
  for (std::size_t i = 0; i < got.size(); ++i)
    if (!(std::abs(static_cast<double>(got[i]) - want[i]) <= rel * std::abs(want[i]) + 1e-37) && bad++ < 5)
      FAIL_CHECK("column ", i, ": got ", got[i], ", reference ", want[i], " (relative tolerance ", rel, ")");
  CHECK(bad == 0);
}

/// The layer's sums through the library, element type T, packed views.
template <class T>
std::vector<float> library_sums(const layer& L, column_mode mode = column_mode::overwrite, std::vector<float> out = {}) {
  const auto q = lsetest::as<T>(L.q), k = lsetest::as<T>(L.k);
  if (out.empty()) out.assign(static_cast<std::size_t>(L.batch * L.keys), std::nanf(""));
  lse_column_sums<T>({{q.data(), L.batch, L.heads, L.queries, L.dim}, {k.data(), L.batch, L.heads, L.keys, L.dim}, {L.lse.data()}, L.scale}, out, mode);
  return out;
}

}  // namespace

TEST_CASE("lse column sums: hand-computed 2x2") {
  // q0 = (1, 0), q1 = (0, 2); k0 = (ln 3, 0), k1 = (0, ln 3); scale 1.
  // q0: logits ln 3, 0 -> P = 3/4, 1/4 (lse = ln 4); q1: logits 0, 2 ln 3 -> P = 1/10, 9/10 (lse = ln 10).
  const float ln3 = static_cast<float>(std::log(3.0));
  const std::vector<float> q = {1.f, 0.f, 0.f, 2.f}, k = {ln3, 0.f, 0.f, ln3};
  std::vector<float> lse = {static_cast<float>(std::log(4.0)), static_cast<float>(std::log(10.0))};
  const lse_attention<float> in{{q.data(), 1, 1, 2, 2}, {k.data(), 1, 1, 2, 2}, {lse.data()}, 1.f};
  std::vector<float> out(2, -1.f);
  lse_column_sums(in, out, column_mode::overwrite);
  CHECK(out[0] == doctest::Approx(0.75 + 0.1).epsilon(1e-6));
  CHECK(out[1] == doctest::Approx(0.25 + 0.9).epsilon(1e-6));

  // Joint attention: a context key (0, 0) takes part in each softmax but is not summed. q0: e^{ln 3}, 1, 1 ->
  // lse = ln 5, P = 3/5, 1/5; q1: 1, 9, 1 -> lse = ln 11, P = 1/11, 9/11. Accumulated onto (1, 2).
  lse[0] = static_cast<float>(std::log(5.0)), lse[1] = static_cast<float>(std::log(11.0));  // in place: `in` points at them
  out = {1.f, 2.f};
  lse_column_sums(in, out, column_mode::accumulate);
  CHECK(out[0] == doctest::Approx(1.0 + 0.6 + 1.0 / 11).epsilon(1e-6));
  CHECK(out[1] == doctest::Approx(2.0 + 0.2 + 9.0 / 11).epsilon(1e-6));

  // Two heads: head 1's queries are zero (uniform P = 1/2), so each column is (head 0 + 1) / 2.
  const std::vector<float> q2 = {1.f, 0.f, 0.f, 2.f, 0.f, 0.f, 0.f, 0.f}, k2 = {ln3, 0.f, 0.f, ln3, ln3, 0.f, 0.f, ln3};
  const std::vector<float> lse2 = {static_cast<float>(std::log(4.0)), static_cast<float>(std::log(10.0)), std::numbers::ln2_v<float>, std::numbers::ln2_v<float>};
  lse_column_sums<float>({{q2.data(), 1, 2, 2, 2}, {k2.data(), 1, 2, 2, 2}, {lse2.data()}, 1.f}, out, column_mode::overwrite);
  CHECK(out[0] == doctest::Approx((0.85 + 1.0) / 2).epsilon(1e-6));
  CHECK(out[1] == doctest::Approx((1.15 + 1.0) / 2).epsilon(1e-6));
}

TEST_CASE("lse column sums equal the column sums of a materialised softmax (fresh random layers)") {
  auto g = testing::rng(1201);
  INFO("seed ", testing::fresh_seed());
  std::uniform_int_distribution<int> batch(1, 3), heads(1, 4), tokens(1, 40), context(0, 8), dim(1, 24);
  for (int trial = 0; trial < 40; ++trial) {
    layer L = lsetest::random_layer(g, batch(g), heads(g), tokens(g), tokens(g), context(g), dim(g));
    INFO("batch ", L.batch, ", heads ", L.heads, ", queries ", L.queries, ", keys ", L.keys, ", context ", L.context, ", dim ", L.dim);
    check_close(library_sums<float>(L), lsetest::reference_column_sums(L), tolerance(L));
    lsetest::round_to_bfloat16(L);
    check_close(library_sums<bfloat16>(L), lsetest::reference_column_sums(L), tolerance(L));
  }
  // A DiT-like layer: locality and hot keys make some columns far heavier than others.
  const layer L = lsetest::random_layer(g, 2, 3, 64, 64, 5, 32, {.side = 8});
  check_close(library_sums<float>(L), lsetest::reference_column_sums(L), tolerance(L));
}

TEST_CASE("lse column sums read an engine's [tokens][heads*dim] layout through strides") {
  // Q from fused QKV rows [batch][queries][3 * hidden] (Q at column h * dim), K from a K/V cache
  // [batch][keys][hidden], LSE as [batch][queries][heads]; the padding between them holds NaN, which must
  // never be read. The result must equal the packed layout's bit for bit (same values, same order).
  auto g = testing::rng(1202);
  INFO("seed ", testing::fresh_seed());
  const layer L = lsetest::random_layer(g, 2, 3, 17, 29, 4, 8);
  const index_t hidden = L.heads * L.dim;
  const float nan = std::nanf("");
  std::vector<float> qkv(static_cast<std::size_t>(L.batch * L.queries * 3 * hidden), nan), cache(static_cast<std::size_t>(L.batch * L.keys * hidden), nan),
      lse_bqh(static_cast<std::size_t>(L.batch * L.queries * L.heads), nan);
  for (index_t b = 0; b < L.batch; ++b)
    for (index_t h = 0; h < L.heads; ++h) {
      for (index_t t = 0; t < L.queries; ++t) {
        for (index_t i = 0; i < L.dim; ++i) qkv[static_cast<std::size_t>((b * L.queries + t) * 3 * hidden + h * L.dim + i)] = L.q[L.q_at(b, h, t) + static_cast<std::size_t>(i)];
        lse_bqh[static_cast<std::size_t>((b * L.queries + t) * L.heads + h)] = L.lse[L.lse_at(b, h, t)];
      }
      for (index_t t = 0; t < L.keys; ++t)
        for (index_t i = 0; i < L.dim; ++i) cache[static_cast<std::size_t>((b * L.keys + t) * hidden + h * L.dim + i)] = L.k[L.k_at(b, h, t) + static_cast<std::size_t>(i)];
    }
  const lse_attention<float> engine{{qkv.data(), L.batch, L.heads, L.queries, L.dim, 3 * hidden, L.dim, L.queries * 3 * hidden},
                                    {cache.data(), L.batch, L.heads, L.keys, L.dim, hidden, L.dim, L.keys * hidden},
                                    {lse_bqh.data(), L.heads, 1, L.queries * L.heads},
                                    L.scale};
  std::vector<float> out(static_cast<std::size_t>(L.batch * L.keys));
  lse_column_sums(engine, out, column_mode::overwrite);
  CHECK(out == library_sums<float>(L));
  check_close(out, lsetest::reference_column_sums(L), tolerance(L));

  // The same layer in bfloat16 through the same strides.
  layer R = L;
  lsetest::round_to_bfloat16(R);
  auto qkv16 = lsetest::as<bfloat16>(qkv), cache16 = lsetest::as<bfloat16>(cache);
  for (index_t b = 0; b < R.batch; ++b)
    for (index_t h = 0; h < R.heads; ++h)
      for (index_t t = 0; t < R.queries; ++t) lse_bqh[static_cast<std::size_t>((b * R.queries + t) * R.heads + h)] = R.lse[R.lse_at(b, h, t)];
  lse_attention<bfloat16> engine16{{qkv16.data(), R.batch, R.heads, R.queries, R.dim, 3 * hidden, R.dim, R.queries * 3 * hidden},
                                   {cache16.data(), R.batch, R.heads, R.keys, R.dim, hidden, R.dim, R.keys * hidden},
                                   engine.lse,
                                   R.scale};
  lse_column_sums(engine16, out, column_mode::overwrite);
  CHECK(out == library_sums<bfloat16>(R));
  check_close(out, lsetest::reference_column_sums(R), tolerance(R));
}

TEST_CASE("lse column sums over a subset of the queries (the C1 rows of a partial step)") {
  auto g = testing::rng(1203);
  INFO("seed ", testing::fresh_seed());
  const layer L = lsetest::random_layer(g, 2, 2, 50, 50, 3, 12);
  // C1: a random 30% of the queries, ascending, gathered into compact rows as an engine computes them.
  std::vector<index_t> c1;
  std::bernoulli_distribution pick(0.3);
  for (index_t t = 0; t < L.queries; ++t)
    if (pick(g) || t == 7) c1.push_back(t);
  const auto n = static_cast<index_t>(c1.size());
  std::vector<float> q_c1, lse_c1;
  for (index_t b = 0; b < L.batch; ++b)
    for (index_t h = 0; h < L.heads; ++h)
      for (index_t t : c1) {
        q_c1.insert(q_c1.end(), L.q.begin() + static_cast<std::ptrdiff_t>(L.q_at(b, h, t)), L.q.begin() + static_cast<std::ptrdiff_t>(L.q_at(b, h, t + 1)));
        lse_c1.push_back(L.lse[L.lse_at(b, h, t)]);
      }
  std::vector<float> out(static_cast<std::size_t>(L.batch * L.keys));
  lse_column_sums<float>({{q_c1.data(), L.batch, L.heads, n, L.dim}, {L.k.data(), L.batch, L.heads, L.keys, L.dim}, {lse_c1.data()}, L.scale}, out,
                         column_mode::overwrite);
  const auto want = lsetest::reference_column_sums(L, c1);
  check_close(out, want, tolerance(L));
  // not the full-query sums: the restriction is real
  const auto full = lsetest::reference_column_sums(L);
  CHECK(std::abs(static_cast<double>(out[0]) - full[0]) > 1e-3 * full[0]);

  // A contiguous range of queries by pointer offset (the image queries after the context queries of a
  // joint sequence): queries 10..29 of the packed layer, strides of the full layer.
  const std::ptrdiff_t q_head = static_cast<std::ptrdiff_t>(L.queries) * L.dim, q_sample = L.heads * q_head;
  lse_column_sums<float>({{L.q.data() + 10 * L.dim, L.batch, L.heads, 20, L.dim, L.dim, q_head, q_sample},
                          {L.k.data(), L.batch, L.heads, L.keys, L.dim},
                          {L.lse.data() + 10, 1, L.queries, L.heads * L.queries},
                          L.scale},
                         out, column_mode::overwrite);
  std::vector<index_t> range(20);
  std::iota(range.begin(), range.end(), index_t{10});
  check_close(out, lsetest::reference_column_sums(L, range), tolerance(L));
}

TEST_CASE("lse column sums: overwrite replaces, accumulate adds") {
  auto g = testing::rng(1204);
  INFO("seed ", testing::fresh_seed());
  const layer L = lsetest::random_layer(g, 2, 3, 21, 33, 2, 16);
  const auto fresh = library_sums<float>(L);  // overwrite of a NaN-filled output: nothing of it survives
  for (float x : fresh) REQUIRE(std::isfinite(x));
  const auto before = testing::random_vector(g, fresh.size(), 0.f, 10.f);
  const auto summed = library_sums<float>(L, column_mode::accumulate, before);
  for (std::size_t i = 0; i < fresh.size(); ++i) CHECK(summed[i] == before[i] + fresh[i]);  // the float sum, exactly
  CHECK(library_sums<float>(L, column_mode::overwrite, before) == fresh);
  // two layers accumulated = the sum of the two references
  const layer M = lsetest::random_layer(g, 2, 3, 21, 33, 2, 16);
  auto want = lsetest::reference_column_sums(L);
  const auto second = lsetest::reference_column_sums(M);
  for (std::size_t i = 0; i < want.size(); ++i) want[i] += second[i];
  check_close(library_sums<float>(M, column_mode::accumulate, fresh), want, std::max(tolerance(L), tolerance(M)) + 1e-7);
}

TEST_CASE("lse column sums of a key do not depend on the other keys in the view") {
  // Fixed-order sums per key: a key's value is the same, bit for bit, whichever key range it is computed in.
  auto g = testing::rng(1205);
  INFO("seed ", testing::fresh_seed());
  const layer L = lsetest::random_layer(g, 1, 2, 40, 45, 0, 8);
  const auto all = library_sums<float>(L);
  CHECK(library_sums<float>(L) == all);  // and the same from call to call
  const std::ptrdiff_t k_head = static_cast<std::ptrdiff_t>(L.keys) * L.dim;
  for (index_t first : {0, 1, 15, 44})
    for (index_t count : {1, 3, 17}) {
      if (first + count > L.keys) continue;
      std::vector<float> part(static_cast<std::size_t>(count));
      lse_column_sums<float>({{L.q.data(), 1, L.heads, L.queries, L.dim}, {L.k.data() + first * L.dim, 1, L.heads, count, L.dim, L.dim, k_head}, {L.lse.data()}, L.scale},
                             part, column_mode::overwrite);
      for (index_t j = 0; j < count; ++j) CHECK(part[static_cast<std::size_t>(j)] == all[static_cast<std::size_t>(first + j)]);
    }
}

TEST_CASE("lse subset estimate: every s-th query scaled to the full count") {
  auto g = testing::rng(1206);
  INFO("seed ", testing::fresh_seed());
  const layer L = lsetest::random_layer(g, 2, 2, 37, 23, 3, 8);
  const auto view = L.view();
  std::vector<float> exact(static_cast<std::size_t>(L.batch * L.keys)), estimate(exact.size());
  lse_column_sums(view, exact, column_mode::overwrite);
  lse_column_sums_estimate(view, 1, estimate, column_mode::overwrite);
  CHECK(estimate == exact);  // step 1 is the exact sum
  for (index_t step : {2, 3, 5, 36, 37, 100}) {
    INFO("query_step ", step);
    std::vector<index_t> rows;
    for (index_t t = 0; t < L.queries; t += step) rows.push_back(t);
    auto want = lsetest::reference_column_sums(L, rows);
    const double factor = static_cast<double>(L.queries) / static_cast<double>(rows.size());
    for (auto& x : want) x *= factor;
    lse_column_sums_estimate(view, step, estimate, column_mode::overwrite);
    check_close(estimate, want, tolerance(L));
    // accumulate adds the estimate as overwrite wrote it
    auto acc = exact;
    lse_column_sums_estimate(view, step, acc, column_mode::accumulate);
    for (std::size_t i = 0; i < acc.size(); ++i) CHECK(acc[i] == exact[i] + estimate[i]);
  }
  // 5 queries, step 2: queries 0, 2, 4, scaled by 5/3 (hand count)
  const layer S = lsetest::random_layer(g, 1, 1, 5, 4, 0, 4);
  std::vector<float> five(4);
  lse_column_sums_estimate(S.view(), 2, five, column_mode::overwrite);
  auto want = lsetest::reference_column_sums(S, {0, 2, 4});
  for (auto& x : want) x *= 5.0 / 3.0;
  check_close(five, want, tolerance(S));
}

TEST_CASE("lse subset estimate: rank agreement with the exact sums on DiT-like layers") {
  // The measurement behind docs/cuda.md's table: an image of side x side tokens (SPECDIFF_LSE_SIDE, default
  // 16), 2 samples, 4 heads of 64, locality and 2% hot keys; per query step s, Spearman's correlation of
  // estimate and exact sums and the overlap of their top 10% (the C1 set at cache rate 0.9), averaged over
  // samples. Rounding aside, the estimate with s = 1 is the exact sum, so the bounds below can fail.
  auto g = testing::rng(1207);
  INFO("seed ", testing::fresh_seed());
  index_t side = 16;
  if (const char* env = std::getenv("SPECDIFF_LSE_SIDE")) side = static_cast<index_t>(std::strtol(env, nullptr, 10));
  REQUIRE(side >= 8);
  const index_t tokens = side * side;
  const layer L = lsetest::random_layer(g, 2, 4, tokens, tokens, 0, 64, {.side = side});
  const auto view = L.view();
  std::vector<float> exact(static_cast<std::size_t>(L.batch * tokens)), estimate(exact.size());
  lse_column_sums(view, exact, column_mode::overwrite);
  const auto n = static_cast<std::size_t>(tokens);
  std::string table = "side " + std::to_string(side) + " (" + std::to_string(tokens) + " tokens), seed " + std::to_string(testing::fresh_seed()) +
                      "\n  s   spearman  top-10% overlap\n";
  const auto agreement = [&](index_t step, double& spearman, double& overlap) {
    lse_column_sums_estimate(view, step, estimate, column_mode::overwrite);
    spearman = overlap = 0.0;
    for (index_t b = 0; b < L.batch; ++b) {
      const std::vector<float> e(exact.begin() + static_cast<std::ptrdiff_t>(b * tokens), exact.begin() + static_cast<std::ptrdiff_t>((b + 1) * tokens));
      const std::vector<float> s(estimate.begin() + static_cast<std::ptrdiff_t>(b * tokens), estimate.begin() + static_cast<std::ptrdiff_t>((b + 1) * tokens));
      spearman += spearman_correlation(e, s) / L.batch;
      overlap += lsetest::top_overlap(e, s, (n + 9) / 10) / L.batch;
    }
  };
  double rho = 0.0, top = 0.0;
  agreement(1, rho, top);
  CHECK(rho == doctest::Approx(1.0));
  CHECK(top == 1.0);
  for (index_t step : {2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65}) {
    if (step >= tokens / 4) break;
    agreement(step, rho, top);
    char line[64];
    std::snprintf(line, sizeof line, "%3d   %.4f    %.3f\n", step, rho, top);
    table += line;
    // Loose bounds (fresh inputs every run; side 16 measured 0.96-0.98 at s <= 3, 0.70-0.95 up to s = 9):
    // they catch a wrong subset or scale, not a drift of a few hundredths.
    if (step <= 3) CHECK_MESSAGE(rho > 0.9, "s = ", step, ": Spearman ", rho);
    if (step <= 9) CHECK_MESSAGE(rho > 0.5, "s = ", step, ": Spearman ", rho);
  }
  MESSAGE(table);
}

TEST_CASE("lse spearman correlation: hand cases and the no-tie formula") {
  const std::vector<float> a = {1.f, 2.f, 3.f, 4.f}, up = {10.f, 20.f, 30.f, 40.f}, down = {4.f, 3.f, 2.f, 1.f}, ties = {1.f, 1.f, 2.f, 2.f};
  CHECK(spearman_correlation(a, up) == doctest::Approx(1.0));
  CHECK(spearman_correlation(a, down) == doctest::Approx(-1.0));
  // ranks 0 1 2 3 against 0.5 0.5 2.5 2.5: covariance 4, variances 5 and 4
  CHECK(spearman_correlation(a, ties) == doctest::Approx(4.0 / std::sqrt(20.0)));
  CHECK(std::isnan(spearman_correlation(a, std::vector<float>(4, 2.f))));
  // Without ties, rho = 1 - 6 sum d^2 / (n (n^2 - 1)), d the rank differences.
  auto g = testing::rng(1208);
  INFO("seed ", testing::fresh_seed());
  const std::size_t n = 500;
  // The no-tie formula needs no ties: random floats collide now and then (about 1% of draws of 500), so draw again.
  const auto has_ties = [](std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return std::adjacent_find(v.begin(), v.end()) != v.end();
  };
  std::vector<float> x, y;
  do {
    x = testing::random_vector(g, n, -1.f, 1.f);
    y = x;
    std::normal_distribution<float> noise(0.f, 0.5f);
    for (auto& v : y) v += noise(g);
  } while (has_ties(x) || has_ties(y));
  const auto rank_of = [](const std::vector<float>& v) {
    std::vector<std::size_t> idx(v.size());
    std::iota(idx.begin(), idx.end(), std::size_t{0});
    std::sort(idx.begin(), idx.end(), [&](std::size_t i, std::size_t j) { return v[i] < v[j]; });
    std::vector<double> r(v.size());
    for (std::size_t i = 0; i < idx.size(); ++i) r[idx[i]] = static_cast<double>(i);
    return r;
  };
  const auto rx = rank_of(x), ry = rank_of(y);
  double d2 = 0.0;
  for (std::size_t i = 0; i < n; ++i) d2 += (rx[i] - ry[i]) * (rx[i] - ry[i]);
  const double nn = static_cast<double>(n);
  CHECK(spearman_correlation(x, y) == doctest::Approx(1.0 - 6.0 * d2 / (nn * (nn * nn - 1.0))).epsilon(1e-9));

  testing::expect_error<std::invalid_argument>([&] { spearman_correlation(a, std::vector<float>(3, 1.f)); }, {"b", "expected 4", "got 3"});
  testing::expect_error<std::invalid_argument>([&] { spearman_correlation(std::vector<float>{1.f}, std::vector<float>{1.f}); }, {"a", "at least 2", "1"});
  testing::expect_error<std::invalid_argument>([&] { spearman_correlation(a, std::vector<float>{1.f, std::nanf(""), 2.f, 3.f}); }, {"b[1]", "not finite"});
}

TEST_CASE("lse column sums refuse bad input naming the parameter, writing nothing") {
  auto g = testing::rng(1209);
  INFO("seed ", testing::fresh_seed());
  layer L = lsetest::random_layer(g, 2, 2, 3, 4, 1, 5);
  std::vector<float> out(8, 42.f);
  const auto refused = [&](auto&& mutate, std::initializer_list<const char*> fragments) {
    lse_attention<float> in = L.view();
    mutate(in);
    testing::expect_error<std::invalid_argument>([&] { lse_column_sums(in, out, column_mode::overwrite); }, fragments);
    testing::expect_error<std::invalid_argument>([&] { lse_column_sums_estimate(in, 2, out, column_mode::accumulate); }, fragments);
    for (float x : out) REQUIRE(x == 42.f);
  };
  using A = lse_attention<float>;
  // sizes
  refused([](A& in) { in.queries.tokens = 0; }, {"queries.tokens", "positive", "0"});
  refused([](A& in) { in.keys.head_dim = -1; }, {"keys.head_dim", "-1"});
  refused([](A& in) { in.queries.heads = 0; }, {"queries.heads", "0"});
  refused([](A& in) { in.keys.batch = 0; }, {"keys.batch", "0"});
  refused([](A& in) { in.keys.batch = 1; }, {"keys.batch", "1", "queries.batch 2"});
  refused([](A& in) { in.keys.heads = 1, in.keys.sample_stride = 20; }, {"keys.heads", "1", "queries.heads 2"});
  refused([](A& in) { in.keys.head_dim = 4; }, {"keys.head_dim", "4", "queries.head_dim 5"});
  // strides
  refused([](A& in) { in.queries.token_stride = 3; }, {"queries.token_stride", "3", "overlaps"});
  refused([](A& in) { in.queries.token_stride = -5; }, {"queries.token_stride", "negative", "-5"});
  refused([](A& in) { in.keys.head_stride = 10; }, {"keys.head_stride", "10", "overlaps"});
  refused([](A& in) { in.keys.sample_stride = 39; }, {"keys.sample_stride", "39", "overlaps"});
  refused([](A& in) { in.lse.head_stride = 2; }, {"lse.head_stride", "2", "overlaps"});
  refused([](A& in) { in.lse.sample_stride = -1; }, {"lse.sample_stride", "negative"});
  refused([](A& in) { in.queries.tokens = 1 << 30, in.queries.token_stride = std::ptrdiff_t{1} << 40; }, {"queries", "token_stride", "overflows"});
  // pointers and the scale
  refused([](A& in) { in.queries.data = nullptr; }, {"queries.data", "null"});
  refused([](A& in) { in.lse.data = nullptr; }, {"lse.data", "null"});
  refused([](A& in) { in.keys.data = reinterpret_cast<const float*>(reinterpret_cast<const char*>(in.keys.data) + 2); }, {"keys.data", "aligned"});
  refused([](A& in) { in.scale = 0.f; }, {"scale", "positive", "0"});
  refused([](A& in) { in.scale = -0.125f; }, {"scale", "-0.125"});
  refused([](A& in) { in.scale = std::nanf(""); }, {"scale", "nan"});
  // values
  const float good_lse = L.lse.back();
  L.lse.back() = std::nanf("");
  refused([](A&) {}, {"lse[1][1][2]", "not finite", "nan"});
  L.lse.back() = std::numeric_limits<float>::infinity();
  refused([](A&) {}, {"lse[1][1][2]", "not finite", "inf"});
  L.lse.back() = good_lse;
  L.q[L.q_at(1, 0, 2) + 4] = std::numeric_limits<float>::infinity();
  refused([](A&) {}, {"queries[1][0][2][4]", "not finite"});
  L.q[L.q_at(1, 0, 2) + 4] = 0.f;
  L.k[L.k_at(0, 1, 3)] = std::nanf("");
  refused([](A&) {}, {"keys[0][1][3][0]", "not finite"});
  L.k[L.k_at(0, 1, 3)] = 0.f;

  // the output: its size, overlap with an input, and batch * keys beyond index_t
  const A in = L.view();
  std::vector<float> short_out(7, 42.f);
  testing::expect_error<std::invalid_argument>([&] { lse_column_sums(in, short_out, column_mode::overwrite); }, {"out", "expected 8", "got 7"});
  std::vector<float> keys_copy = L.k;
  A aliased = in;
  aliased.keys.data = keys_copy.data();
  testing::expect_error<std::invalid_argument>([&] { lse_column_sums(aliased, std::span<float>(keys_copy.data() + 8, 8), column_mode::overwrite); }, {"out", "overlaps keys.data"});
  static const float one = 1.f;
  const A huge{{&one, 65536, 1, 1, 1}, {&one, 65536, 1, 65536, 1}, {&one}, 1.f};
  testing::expect_error<std::invalid_argument>([&] { lse_column_sums(huge, out, column_mode::overwrite); }, {"out", "batch * keys", "65536 * 65536", "overflows"});
  testing::expect_error<std::invalid_argument>([&] { lse_column_sums_estimate(in, 0, out, column_mode::overwrite); }, {"query_step", "0"});
  testing::expect_error<std::invalid_argument>([&] { lse_column_sums_estimate(in, -3, out, column_mode::overwrite); }, {"query_step", "-3"});
  for (float x : out) CHECK(x == 42.f);
  CHECK_NOTHROW(lse_column_sums(in, out, column_mode::overwrite));  // the untouched input is fine
}
