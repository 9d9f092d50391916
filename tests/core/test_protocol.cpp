// The step protocol: every misuse is refused at once with the right exception, and a refused call leaves
// the accelerator exactly as it was (compared through a snapshot of everything observable).
#include <doctest/doctest.h>

#include <cmath>
#include <specdiff/specdiff.hpp>

#include "../common/testing.hpp"

using namespace specdiff;

namespace {

constexpr index_t tokens = 12, batch = 2, steps = 8, dim = 3;

using test_accelerator = accelerator<specdiff_scorer, self_speculation, three_level_classifier, step_schedule>;

// Everything a caller can observe: step count, last timestep, staleness, attention history, predictor
// readiness, and every cached row with its tag.
struct snapshot {
  index_t next_step;
  float last_t;
  bool predictor_ready;
  std::vector<float> values;
  bool operator==(const snapshot&) const = default;
};

template <class Acc>
snapshot take(const Acc& acc) {
  snapshot s{acc.next_step(), acc.last_timestep(), acc.predictor().ready(), {}};
  const auto& c = acc.config();
  for (index_t p = 0; p < c.plans(); ++p) {
    for (float v : acc.cache_counts(p)) s.values.push_back(v);
    for (float v : acc.attention_history(p)) s.values.push_back(v);
  }
  const auto& store = acc.store();
  for (index_t l = 0; l < c.layers; ++l)
    for (index_t site = 0; site < c.sites; ++site)
      for (index_t r = 0; r < c.batch * c.tokens; ++r) {
        const int n = store.entries(l, site, r);
        s.values.push_back(static_cast<float>(n));
        for (int k = 0; k < n; ++k) {
          s.values.push_back(store.history_tag(l, site, r, k));
          for (float v : store.history(l, site, r, k)) s.values.push_back(v);
        }
      }
  return s;
}

float ts(index_t k) { return 1000.f - 100.f * static_cast<float>(k); }

test_accelerator make() {
  return test_accelerator({tokens, batch, steps, dim}, specdiff_scorer{}, self_speculation{}, three_level_classifier(0.5),
                          step_schedule{2, 0, 2, {}});
}

struct engine {  // a toy model: rows and attention from (sample, token, step)
  std::vector<float> attention = std::vector<float>(batch * tokens);
  std::vector<float> output = std::vector<float>(batch * tokens * dim, 0.f);
  std::vector<float> computed;

  template <class Acc>
  void speculate(Acc& acc) {
    const std::vector<float> spec = {ts(0), ts(4)};
    acc.begin_speculation(spec);
    for (index_t s = 0; s < 2; ++s) {
      fill_attention(s + 10);
      acc.record_speculation(s, attention);
    }
  }
  void fill_attention(index_t salt) {
    for (index_t r = 0; r < batch * tokens; ++r) attention[static_cast<std::size_t>(r)] = 1.f + std::sin(0.7f * static_cast<float>(r * salt));
  }
  template <class Step>
  matrix_view<const float> compute(const Step& s) {
    const index_t m = s.compute_count();
    computed.assign(static_cast<std::size_t>(batch * m * dim), 0.f);
    for (std::size_t i = 0; i < computed.size(); ++i) computed[i] = std::cos(0.1f * static_cast<float>(i) + s.timestep());
    fill_attention(s.index() + 1);
    return {computed.data(), batch * m, dim};
  }
  matrix_view<float> out() { return {output.data(), batch * tokens, dim}; }
  // runs steps [0, n)
  void run(test_accelerator& acc, index_t n) {
    for (index_t k = 0; k < n; ++k) {
      auto s = acc.plan_step(k, ts(k));
      const auto rows = compute(s);
      acc.complete_step(std::move(s), rows, out(), attention);
    }
  }
};

// An accelerator with its speculative pass recorded and the first `done` main steps run.
struct fixture {
  test_accelerator acc = make();
  engine e;
  explicit fixture(index_t done) {
    e.speculate(acc);
    e.run(acc, done);
  }
};

// The call must throw E and leave the accelerator as it was.
template <class E, class Acc, class F>
void refused(Acc& acc, F&& f, std::initializer_list<const char*> fragments) {
  const snapshot before = take(acc);
  testing::expect_error<E>(std::forward<F>(f), fragments);
  CHECK(take(acc) == before);
}

}  // namespace

TEST_CASE("protocol: steps must run 0, 1, 2, ... in range") {
  fixture f(0);
  auto& acc = f.acc;
  auto& e = f.e;
  refused<std::invalid_argument>(acc, [&] { (void)acc.plan_step(-7, ts(0)); }, {"step = -7", "[0, 8)"});
  refused<std::invalid_argument>(acc, [&] { (void)acc.plan_step(12345, ts(0)); }, {"step = 12345"});
  refused<std::logic_error>(acc, [&] { (void)acc.plan_step(5, ts(5)); }, {"expected step 0", "got 5"});
  e.run(acc, 3);
  refused<std::logic_error>(acc, [&] { (void)acc.plan_step(2, ts(2)); }, {"expected step 3", "got 2"});
  refused<std::logic_error>(acc, [&] { (void)acc.plan_step(7, ts(7)); }, {"expected step 3", "got 7"});
}

TEST_CASE("protocol: a second plan_step before complete_step is refused") {
  fixture f(2);
  auto& acc = f.acc;
  auto& e = f.e;
  auto s = acc.plan_step(2, ts(2));
  refused<std::logic_error>(acc, [&] { (void)acc.plan_step(2, ts(2)); }, {"step 2 is planned and not completed"});
  refused<std::logic_error>(acc, [&] { (void)acc.plan_step(3, ts(3)); }, {"step 2 is planned"});
  const auto rows = e.compute(s);
  acc.complete_step(std::move(s), rows, e.out(), e.attention);
  CHECK(acc.next_step() == 3);
}

TEST_CASE("protocol: a step object completes once") {
  fixture f(0);
  auto& acc = f.acc;
  auto& e = f.e;
  auto s = acc.plan_step(0, ts(0));
  const auto rows = e.compute(s);
  acc.complete_step(std::move(s), rows, e.out(), e.attention);
  // s is now empty: completing it again is refused at once, not one step later
  refused<std::logic_error>(acc, [&] { acc.complete_step(std::move(s), rows, e.out(), e.attention); }, {"empty", "already completed"});  // NOLINT(bugprone-use-after-move)
  refused<std::logic_error>(acc, [&] { (void)s.dense(); }, {"empty"});  // NOLINT(bugprone-use-after-move)
}

TEST_CASE("protocol: a moved-from step is empty, the moved-to one completes") {
  fixture f(0);
  auto& acc = f.acc;
  auto& e = f.e;
  auto s = acc.plan_step(0, ts(0));
  auto t = std::move(s);
  const auto rows = e.compute(t);
  refused<std::logic_error>(acc, [&] { acc.complete_step(std::move(s), rows, e.out(), e.attention); }, {"empty", "moved from"});  // NOLINT(bugprone-use-after-move)
  acc.complete_step(std::move(t), rows, e.out(), e.attention);
  CHECK(acc.next_step() == 1);
}

TEST_CASE("protocol: a step of another accelerator is refused") {
  auto a = make();
  auto b = make();
  engine e;
  e.speculate(a);
  e.speculate(b);
  auto sa = a.plan_step(0, ts(0));
  auto sb = b.plan_step(0, ts(0));
  const auto rows = e.compute(sa);
  refused<std::logic_error>(b, [&] { b.complete_step(std::move(sa), rows, e.out(), e.attention); }, {"another accelerator"});
  b.complete_step(std::move(sb), rows, e.out(), e.attention);
  a.complete_step(std::move(sa), rows, e.out(), e.attention);
  CHECK(a.next_step() == 1);
  CHECK(b.next_step() == 1);
}

TEST_CASE("protocol: rising or repeated timesteps are refused") {
  fixture f(0);
  auto& acc = f.acc;
  auto& e = f.e;
  e.run(acc, 2);  // t = 1000, 900 cached
  refused<std::invalid_argument>(acc, [&] { (void)acc.plan_step(2, 934.f); }, {"timesteps must fall", "900", "934"});
  refused<std::invalid_argument>(acc, [&] { (void)acc.plan_step(2, 900.f); }, {"timesteps must fall"});
  refused<std::invalid_argument>(acc, [&] { (void)acc.plan_step(2, NAN); }, {"t:", "not finite"});
  auto s = acc.plan_step(2, 634.f);
  CHECK_FALSE(s.dense());
}

TEST_CASE("protocol: the speculative pass must be begun, complete, and before the main pass") {
  auto acc = make();
  engine e;
  refused<std::logic_error>(acc, [&] { acc.record_speculation(0, e.attention); }, {"not begun", "begin_speculation"});
  const std::vector<float> spec = {ts(0), ts(4)};
  acc.begin_speculation(spec);
  acc.record_speculation(0, e.attention);
  refused<std::logic_error>(acc, [&] { acc.record_speculation(0, e.attention); }, {"already recorded"});
  e.run(acc, 2);  // dense steps need no future
  // step 2 is partial and the scorer reads the future: the pass is incomplete
  refused<std::logic_error>(acc, [&] { (void)acc.plan_step(2, ts(2)); }, {"speculative pass is not complete"});
  // A late record (API 0.3): refused, as the next plan would read it; the pass stays incomplete.
  refused<std::logic_error>(acc, [&] { acc.record_speculation(1, e.attention); }, {"record_speculation", "main pass has started"});
  refused<std::logic_error>(acc, [&] { acc.begin_speculation(spec); }, {"main pass has started"});
  refused<std::logic_error>(acc, [&] { (void)acc.plan_step(2, ts(2)); }, {"speculative pass is not complete"});
  acc.reset();
  e.speculate(acc);
  e.run(acc, 2);
  auto s = acc.plan_step(2, ts(2));
  CHECK_FALSE(s.dense());
}

TEST_CASE("protocol: bad rows or attention in complete_step change nothing (strong guarantee)") {
  fixture f(2);
  auto& acc = f.acc;
  auto& e = f.e;
  auto s = acc.plan_step(2, ts(2));
  auto rows = e.compute(s);
  // a NaN in the last computed row: no row of this step may be cached, no staleness advanced
  e.computed[e.computed.size() - 1] = std::nanf("");
  refused<std::invalid_argument>(acc, [&] { acc.complete_step(std::move(s), rows, e.out(), e.attention); }, {"computed[", "not finite"});
  e.computed[e.computed.size() - 1] = 0.5f;
  e.attention[7] = INFINITY;
  refused<std::invalid_argument>(acc, [&] { acc.complete_step(std::move(s), rows, e.out(), e.attention); }, {"attention[7]"});
  e.fill_attention(3);
  refused<std::invalid_argument>(acc, [&] { acc.complete_step(std::move(s), rows, matrix_view<float>(e.output.data(), 5, dim), e.attention); }, {"output", "24x3", "5x3"});
  refused<std::invalid_argument>(acc, [&] { acc.complete_step(std::move(s), matrix_view<const float>(e.computed.data(), 3, dim), e.out(), e.attention); }, {"computed", "12x3", "3x3"});
  // the step survived the failures and completes
  acc.complete_step(std::move(s), rows, e.out(), e.attention);
  CHECK(acc.next_step() == 3);
}

namespace {
// An approximator that refuses every history: the fill fails after the step was validated.
struct refusing {
  static constexpr int depth = 2;
  SPECDIFF_HD int weights(const float*, int, float, float*) const { return 0; }
};
}  // namespace

TEST_CASE("protocol: an approximator refusing its tags in the fill changes nothing") {
  accelerator<specdiff_scorer, self_speculation, three_level_classifier, step_schedule, refusing> acc(
      {tokens, batch, steps, dim}, specdiff_scorer{}, self_speculation{}, three_level_classifier(0.5, 0.0), step_schedule{2, 0, 2, {}});
  engine e;
  const std::vector<float> spec = {ts(0), ts(4)};
  acc.begin_speculation(spec);
  acc.record_speculation(0, e.attention);
  acc.record_speculation(1, e.attention);
  for (index_t k = 0; k < 2; ++k) {
    auto s = acc.plan_step(k, ts(k));
    const auto rows = e.compute(s);
    acc.complete_step(std::move(s), rows, e.out(), e.attention);
  }
  const snapshot before = take(acc);
  auto s = acc.plan_step(2, ts(2));
  std::vector<float> rows(static_cast<std::size_t>(batch * s.compute_count() * dim), 1.f);
  testing::expect_error<std::logic_error>([&] {
    acc.complete_step(std::move(s), matrix_view<const float>(rows.data(), batch * s.compute_count(), dim), e.out(), e.attention);
  }, {"do not allow this approximator"});
  CHECK(take(acc) == before);
  CHECK(acc.store().entries(0, 0, 0) == 2);
}

TEST_CASE("protocol: reset() forgets everything, including the speculative records and a live step") {
  fixture f(3);
  auto& acc = f.acc;
  auto& e = f.e;
  auto s = acc.plan_step(3, ts(3));
  acc.reset();
  const auto fresh = take(make());
  CHECK(take(acc) == fresh);
  CHECK_FALSE(acc.predictor().ready());
  refused<std::logic_error>(acc, [&] { (void)s.compute_count(); }, {"stale", "reset()"});
  // the old step cannot complete into the new image
  std::vector<float> rows(static_cast<std::size_t>(batch * tokens * dim), 1.f);
  refused<std::logic_error>(acc, [&] { acc.complete_step(std::move(s), matrix_view<float>(e.output.data(), batch * tokens, dim), e.attention); }, {"stale"});
  // the new image starts at step 0 and needs a new speculative pass for its partial steps
  e.run(acc, 2);
  refused<std::logic_error>(acc, [&] { (void)acc.plan_step(2, ts(2)); }, {"speculative pass is not complete"});
}

TEST_CASE("protocol: an abandoned step leaves the accelerator as before plan_step") {
  fixture f(2);
  auto& acc = f.acc;
  auto& e = f.e;
  const snapshot before = take(acc);
  {
    auto s = acc.plan_step(2, ts(2));
    (void)s;  // the engine's forward threw: the step object is destroyed unconsumed
  }
  CHECK(take(acc) == before);
  e.run(acc, 0);
  auto s = acc.plan_step(2, ts(2));  // the same step can be planned again
  const auto rows = e.compute(s);
  acc.complete_step(std::move(s), rows, e.out(), e.attention);
  CHECK(acc.next_step() == 3);
}

TEST_CASE("protocol: module level — every site cached once per step, abandoned after caching needs reset") {
  using module_accelerator = accelerator<toca_scorer, no_speculation, top_k_classifier, step_schedule, latest>;
  module_accelerator acc({tokens, batch, steps, dim, /*layers=*/2, /*sites=*/2}, toca_scorer{}, no_speculation{},
                         top_k_classifier(0.75), step_schedule{1, 0, 0, {}});
  engine e;
  std::vector<float> all(static_cast<std::size_t>(batch * tokens * dim), 0.25f);
  const matrix_view<const float> all_view(all.data(), batch * tokens, dim);
  auto s = acc.plan_step(0, ts(0));
  acc.cache_rows_in_place(s, 0, 0, all_view);
  testing::expect_error<std::logic_error>([&] { acc.cache_rows_in_place(s, 0, 0, all_view); }, {"layer 0 site 0", "already cached"});
  testing::expect_error<std::logic_error>([&] { acc.complete_step(std::move(s), e.attention); }, {"layer 0 site 1", "neither cached"});
  acc.cache_rows_in_place(s, 0, 1, all_view);
  acc.cache_rows_in_place(s, 1, 0, all_view);
  acc.cache_rows_in_place(s, 1, 1, all_view);
  testing::expect_error<std::logic_error>([&] { (void)acc.fill_all(s, 0, 0, level::reuse, matrix_view<float>(all.data(), batch * tokens, dim)); }, {"dense"});
  acc.complete_step(std::move(s), e.attention);
  // partial step: site (0, 0) reused whole, the rest cached for C1; attention unchanged
  auto p = acc.plan_step(1, ts(1));
  CHECK(p.compute_count() == 3);
  acc.fill_all(p, 0, 0, level::reuse, matrix_view<float>(all.data(), batch * tokens, dim));
  acc.fill(p, 0, 1, matrix_view<float>(all.data(), batch * tokens, dim));
  std::vector<float> compact(static_cast<std::size_t>(batch * 3 * dim), 0.5f);
  acc.cache_rows(p, 0, 1, matrix_view<const float>(compact.data(), batch * 3, dim));
  {
    auto q = std::move(p);  // abandoned after caching: the image is inconsistent now
  }
  testing::expect_error<std::logic_error>([&] { (void)acc.plan_step(1, ts(1)); }, {"abandoned", "reset()"});
  acc.reset();
  auto again = acc.plan_step(0, ts(0));
  CHECK(again.dense());
  testing::expect_error<std::logic_error>([&] { acc.complete_step(std::move(again), attention_unchanged); }, {"neither cached"});
}

TEST_CASE("protocol: reuse_in_place marks a site done on a partial step without touching rows or the store") {
  using module_accelerator = accelerator<uniform_scorer, no_speculation, all_reuse_classifier, step_schedule, latest>;
  module_accelerator acc({tokens, batch, steps, dim, /*layers=*/1, /*sites=*/2}, uniform_scorer{}, no_speculation{}, all_reuse_classifier{},
                         step_schedule{1, 0, 0, {}});
  auto rng = testing::rng(7);
  auto rows = testing::random_vector(rng, static_cast<std::size_t>(batch * tokens * dim), -1.f, 1.f);
  const matrix_view<const float> view(rows.data(), batch * tokens, dim);
  auto s = acc.plan_step(0, ts(0));
  testing::expect_error<std::logic_error>([&] { acc.reuse_in_place(s, 0, 0); }, {"reuse_in_place", "dense"});
  acc.cache_rows_in_place(s, 0, 0, view);
  acc.cache_rows_in_place(s, 0, 1, view);
  acc.complete_step(std::move(s), attention_unchanged);
  auto stored = [&] {  // every cached row and tag
    std::vector<float> v;
    for (index_t site = 0; site < 2; ++site)
      for (index_t r = 0; r < batch * tokens; ++r)
        for (int k = 0; k < acc.store().entries(0, site, r); ++k) {
          v.push_back(acc.store().history_tag(0, site, r, k));
          for (float x : acc.store().history(0, site, r, k)) v.push_back(x);
        }
    return v;
  };
  const auto before = stored();
  const auto kept = rows;
  auto p = acc.plan_step(1, ts(1));
  acc.reuse_in_place(p, 0, 0);
  testing::expect_error<std::logic_error>([&] { acc.reuse_in_place(p, 0, 0); }, {"layer 0 site 0", "already cached"});
  testing::expect_error<std::invalid_argument>([&] { acc.reuse_in_place(p, 0, 2); }, {"site"});
  testing::expect_error<std::logic_error>([&] { acc.complete_step(std::move(p), attention_unchanged); }, {"layer 0 site 1", "neither cached"});
  acc.reuse_in_place(p, 0, 1);
  acc.complete_step(std::move(p), attention_unchanged);
  CHECK(rows == kept);
  CHECK(stored() == before);  // nothing cached or copied; the step is complete
  CHECK(acc.next_step() == 2);
}

TEST_CASE("protocol: sizes are given once, checked at construction, products too") {
  using A = test_accelerator;
  testing::expect_error<std::invalid_argument>([] { A a({1 << 16, 1 << 16, 8, 4}, {}, {}, three_level_classifier(0.5), step_schedule{}); },
                                               {"batch * tokens", "65536 * 65536", "overflows"});
  testing::expect_error<std::invalid_argument>([] { A a({16, 2, 8, 4}, {}, {}, three_level_classifier(0.5), step_schedule{2, 0, 2, {12}}); },
                                               {"dense_steps", "12", "[0, 8)"});
  testing::expect_error<std::invalid_argument>([] { A a({16, 2, 8, 4}, {}, {}, three_level_classifier(0.5), step_schedule{-1, 0, 2, {}}); },
                                               {"warmup_steps", "-1"});
  testing::expect_error<std::invalid_argument>([] { A a({16, 2, 0, 4}, {}, {}, three_level_classifier(0.5), step_schedule{}); }, {"steps", "0"});
  testing::expect_error<std::invalid_argument>([] { A a({16, 2, 8, 4, 0}, {}, {}, three_level_classifier(0.5), step_schedule{}); }, {"layers", "0"});
  // the policies are sized by the accelerator, not by the caller
  A a({16, 2, 8, 4}, {}, {}, three_level_classifier(0.75), step_schedule{2, 0, 2, {}});
  CHECK(a.partial_compute_count() == 4);
}

TEST_CASE("protocol: attention only when the scorer reads it") {
  using A = accelerator<uniform_scorer, no_speculation, top_k_classifier, step_schedule, latest>;
  A acc({tokens, batch, steps, dim}, uniform_scorer{1.f}, no_speculation{}, top_k_classifier(0.5), step_schedule{1, 0, 0, {}});
  engine e;
  for (index_t k = 0; k < 3; ++k) {
    auto s = acc.plan_step(k, ts(k));
    std::vector<float> rows(static_cast<std::size_t>(batch * s.compute_count() * dim), 1.f);
    acc.complete_step(std::move(s), matrix_view<const float>(rows.data(), batch * s.compute_count(), dim), e.out(), {});
  }
  CHECK(acc.next_step() == 3);
  // the SpecDiff scorer reads attention: an empty span is refused
  auto sd = make();
  e.speculate(sd);
  auto s = sd.plan_step(0, ts(0));
  const auto rows = e.compute(s);
  refused<std::invalid_argument>(sd, [&] { sd.complete_step(std::move(s), rows, e.out(), {}); }, {"attention", "expected 24", "got 0"});
}
