// API 0.3's protocol holes (issue 27, items 1-5), each refused at the first call that can see it. Every refusal
// is checked twice: the exception and its message, and the state it leaves: the rest of the run (every output
// row of every later step) is bit-identical to a run that never saw the refused call. Inputs are fresh random
// values each run (seed logged; SPECDIFF_TEST_SEED=<n> repeats one) as well as fixed cases.
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <memory>
#include <random>
#include <specdiff/specdiff.hpp>
#include <vector>

#include "../common/testing.hpp"

using namespace specdiff;

namespace {

constexpr index_t tokens = 16, batch = 2, steps = 10, dim = 3;

template <class Classifier>
using spec_acc = accelerator<specdiff_scorer, self_speculation, Classifier, step_schedule>;

float ts(index_t k) { return 1.f - 0.09f * static_cast<float>(k); }  // main grid in [0, 1]

// A seeded toy model: rows and attention from (seed, step, token).
struct toy {
  explicit toy(std::uint64_t s) : seed(s) {}
  std::uint64_t seed;
  std::vector<float> attention = std::vector<float>(batch * tokens);
  std::vector<float> computed, output = std::vector<float>(static_cast<std::size_t>(batch * tokens * dim), 0.f);
  void fill_attention(index_t salt) {
    std::mt19937_64 g(seed ^ (static_cast<std::uint64_t>(salt) * 7919u));
    std::uniform_real_distribution<float> u(0.01f, 2.f);
    for (auto& a : attention) a = u(g);
  }
  template <class Step>
  matrix_view<const float> compute(const Step& s) {
    const index_t m = s.compute_count();
    computed.assign(static_cast<std::size_t>(batch * m * dim), 0.f);
    std::mt19937_64 g(seed + static_cast<std::uint64_t>(s.index()));
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (auto& v : computed) v = u(g);
    fill_attention(s.index() + 100);
    return {computed.data(), batch * m, dim};
  }
  matrix_view<float> out() { return {output.data(), batch * tokens, dim}; }
};

// The hook runs before main step k is planned (and may call anything on the accelerator, expecting refusals).
using hook = std::function<void(index_t k)>;

template <class Acc>
void speculate(Acc& acc, toy& m, std::span<const float> spec_t) {
  acc.begin_speculation(spec_t);
  for (std::size_t s = 0; s < spec_t.size(); ++s) {
    m.fill_attention(static_cast<index_t>(s) + 50);
    acc.record_speculation(static_cast<index_t>(s), m.attention);
  }
}

// Runs a whole image; returns every step's output rows, concatenated.
template <class Acc>
std::vector<float> run(Acc& acc, std::uint64_t seed, const hook& before_step = {}) {
  toy m{seed};
  const std::vector<float> spec_t = {ts(0), ts(5)};
  speculate(acc, m, spec_t);
  std::vector<float> all;
  for (index_t k = 0; k < steps; ++k) {
    if (before_step) before_step(k);
    auto s = acc.plan_step(k, ts(k));
    const auto rows = m.compute(s);
    acc.complete_step(std::move(s), rows, m.out(), m.attention);
    all.insert(all.end(), m.output.begin(), m.output.end());
  }
  return all;
}

std::unique_ptr<spec_acc<three_level_classifier>> make_acc(three_level_classifier c = three_level_classifier(0.75)) {
  return std::make_unique<spec_acc<three_level_classifier>>(accelerator_config{tokens, batch, steps, dim}, specdiff_scorer{}, self_speculation{},
                                                           std::move(c), step_schedule{2, 0, 2, {6}});
}

// The run with `refused` injected before step `at` equals the plain run, bit for bit.
void same_run_after(std::uint64_t seed, index_t at, const std::function<void(spec_acc<three_level_classifier>&)>& refused) {
  auto plain = make_acc();
  const auto want = run(*plain, seed);
  auto probed = make_acc();
  const auto got = run(*probed, seed, [&](index_t k) {
    if (k == at) refused(*probed);
  });
  CHECK(got == want);
}

}  // namespace

TEST_CASE("protocol (issue 27 item 1): a step outliving its accelerator is refused by name, not read after free") {
  auto acc = make_acc();
  toy m{1};
  const std::vector<float> spec_t = {ts(0), ts(5)};
  speculate(*acc, m, spec_t);
  auto s = acc->plan_step(0, ts(0));
  acc.reset();
  testing::expect_error<std::logic_error>([&] { (void)s.compute_count(); }, {"step 0", "outlived its accelerator"});
}

TEST_CASE("protocol (issue 27 item 2): views that overlap are refused by name, and the run goes on unchanged") {
  auto g = testing::rng(2701);
  const std::uint64_t seed = g();
  for (index_t at : {0, 3, 7}) {  // a dense step, a partial step, the step after a dense one
    INFO("at step ", at);
    same_run_after(seed, at, [&](auto& acc) {
      toy m{seed};
      auto s = acc.plan_step(at, ts(at));
      const index_t n = s.compute_count();
      // Compact rows aliasing output's first rows: the fill of C2/C3 would overwrite them before the copy.
      std::vector<float> buffer(static_cast<std::size_t>(batch * tokens * dim), 0.25f);
      const matrix_view<float> out{buffer.data(), batch * tokens, dim};
      const matrix_view<const float> computed{buffer.data(), batch * n, dim};
      testing::expect_error<std::invalid_argument>([&] { acc.complete_step(std::move(s), computed, out, m.attention); },
                                                   {"computed and output overlap"});
      // A partial overlap: compact rows starting inside output's last row.
      std::vector<float> tail(static_cast<std::size_t>(batch * tokens * dim + batch * n * dim), 0.5f);
      const matrix_view<float> out2{tail.data(), batch * tokens, dim};
      const matrix_view<const float> computed2{tail.data() + (batch * tokens * dim - 1), batch * n, dim};
      testing::expect_error<std::invalid_argument>([&] { acc.complete_step(std::move(s), computed2, out2, m.attention); },
                                                   {"computed and output overlap"});
      // Attention inside output, and inside computed.
      std::vector<float> rows(static_cast<std::size_t>(batch * n * dim), 0.5f), output(static_cast<std::size_t>(batch * tokens * dim + batch * tokens), 1.f);
      const std::span<const float> attention_in_output(output.data() + 1, static_cast<std::size_t>(batch * tokens));
      testing::expect_error<std::invalid_argument>(
          [&] { acc.complete_step(std::move(s), {rows.data(), batch * n, dim}, {output.data(), batch * tokens, dim}, attention_in_output); },
          {"output and attention overlap"});
      testing::expect_error<std::invalid_argument>([&] { acc.complete_step(std::move(s), {output.data(), batch * tokens, dim}, attention_in_output); },
                                                   {"output and attention overlap"});
      // Adjacent, not overlapping: accepted (checked by the plain run's own buffers; here only the refusals).
      // The step is still live: dropping it unconsumed, with no rows cached, leaves the accelerator as before.
    });
  }
  // Adjacent buffers in one allocation are not an overlap.
  auto acc = make_acc();
  toy m{seed};
  const std::vector<float> spec_t = {ts(0), ts(5)};
  speculate(*acc, m, spec_t);
  auto s = acc->plan_step(0, ts(0));
  std::vector<float> one(static_cast<std::size_t>(2 * batch * tokens * dim + batch * tokens), 0.5f);
  acc->complete_step(std::move(s), {one.data(), batch * tokens, dim}, {one.data() + batch * tokens * dim, batch * tokens, dim},
                     std::span<const float>(one.data() + 2 * batch * tokens * dim, static_cast<std::size_t>(batch * tokens)));
  CHECK(acc->next_step() == 1);
}

TEST_CASE("protocol (issue 27 item 3): silent acceptances are refused at the first call that can see them") {
  auto g = testing::rng(2702);
  const std::uint64_t seed = g();
  std::uniform_int_distribution<index_t> pick(0, batch * tokens - 1);

  SUBCASE("negative attention, in complete_step and in record_speculation") {
    const index_t bad = pick(g);
    INFO("negative at ", bad);
    same_run_after(seed, 4, [&](auto& acc) {
      toy m{seed};
      auto s = acc.plan_step(4, ts(4));
      const auto rows = m.compute(s);
      m.attention[static_cast<std::size_t>(bad)] = -0.25f;
      testing::expect_error<std::invalid_argument>([&] { acc.complete_step(std::move(s), rows, m.out(), m.attention); },
                                                   {"attention[", "is negative", "-0.25"});
    });
    auto acc = make_acc();
    toy m{seed};
    acc->begin_speculation(std::vector<float>{ts(0), ts(5)});
    m.fill_attention(1);
    m.attention[static_cast<std::size_t>(bad)] = -1e-3f;
    testing::expect_error<std::invalid_argument>([&] { acc->record_speculation(0, m.attention); }, {"is negative"});
    CHECK(acc->predictor().recorded_steps() == 0);
  }

  SUBCASE("a speculative pass in another unit than the main pass: refused at plan_step(0)") {
    for (const std::vector<float>& spec : {std::vector<float>{1000.f, 500.f}, std::vector<float>{0.5f, 0.2f}}) {
      auto acc = make_acc();
      toy m{seed};
      speculate(*acc, m, spec);
      testing::expect_error<std::invalid_argument>([&] { (void)acc->plan_step(0, ts(0)); }, {"speculative pass starts at", "same unit"});
      CHECK(acc->next_step() == 0);
      // Begun again on the main grid, the run is the plain run.
      acc->reset();
      auto plain = make_acc();
      CHECK(run(*acc, seed) == run(*plain, seed));
    }
  }

  SUBCASE("record_speculation during the main pass") {
    same_run_after(seed, 5, [&](auto& acc) {
      toy m{seed};
      m.fill_attention(9);
      testing::expect_error<std::logic_error>([&] { acc.record_speculation(1, m.attention); }, {"record_speculation", "main pass has started"});
      auto s = acc.plan_step(5, ts(5));
      testing::expect_error<std::logic_error>([&] { acc.record_speculation(0, m.attention); }, {"record_speculation", "main pass has started"});
    });
  }

  SUBCASE("more speculative timesteps than the schedule's") {
    auto acc = make_acc();
    testing::expect_error<std::invalid_argument>([&] { acc->begin_speculation(std::vector<float>{ts(0), ts(3), ts(6)}); },
                                                 {"timesteps", "3 speculative steps", "schedule's 2", "sized for 2"});
    CHECK_FALSE(acc->predictor().ready());
    auto plain = make_acc();
    CHECK(run(*acc, seed) == run(*plain, seed));
  }

  SUBCASE("speculative = 0 with a scorer that reads the future: refused at construction") {
    using A = spec_acc<three_level_classifier>;
    testing::expect_error<std::invalid_argument>(
        [] { A a({tokens, batch, steps, dim}, specdiff_scorer{}, self_speculation{}, three_level_classifier(0.5), step_schedule{2, 0, 0, {}}); },
        {"step_schedule.speculative", "0 speculative steps", "signal::future"});
    // Fine where it can run: no_speculation answers every future with 1, and a schedule without partial steps.
    accelerator<specdiff_scorer, no_speculation, three_level_classifier, step_schedule> ok({tokens, batch, steps, dim}, specdiff_scorer{}, no_speculation{},
                                                                                          three_level_classifier(0.5), step_schedule{2, 0, 0, {}});
    A dense_only({tokens, batch, steps, dim}, specdiff_scorer{}, self_speculation{}, three_level_classifier(0.5), step_schedule{1, 1, 0, {}});
    CHECK(ok.next_step() == 0);
    CHECK(dense_only.next_step() == 0);
  }
}

TEST_CASE("protocol (issue 27 item 4): the default step_schedule runs for any step count; errors name the field") {
  for (index_t n : {1, 2, 8, 20, 50}) {
    INFO("steps ", n);
    accelerator acc({.tokens = tokens, .batch = batch, .steps = n, .feature_dim = dim}, specdiff_scorer{}, self_speculation{},
                    three_level_classifier(0.9), step_schedule{});
    std::vector<float> t;
    for (index_t k = 0; k < n; ++k) t.push_back(1000.f * (1.f - static_cast<float>(k) / static_cast<float>(n)));
    const auto spec_t = aligned_speculative_timesteps(t, acc.step_schedule().speculative_steps(), acc.step_schedule());
    CHECK(static_cast<index_t>(spec_t.size()) == std::min<index_t>(2, n));
    toy m{static_cast<std::uint64_t>(n)};
    speculate(acc, m, spec_t);
    for (index_t k = 0; k < n; ++k) {
      auto s = acc.plan_step(k, t[static_cast<std::size_t>(k)]);
      CHECK(s.dense() == (k < 4));
      const auto rows = m.compute(s);
      acc.complete_step(std::move(s), rows, m.out(), m.attention);
    }
    CHECK(acc.next_step() == n);
  }
  using A = spec_acc<three_level_classifier>;
  testing::expect_error<std::invalid_argument>(
      [] { A a({tokens, batch, 20, dim}, specdiff_scorer{}, self_speculation{}, three_level_classifier(0.5), step_schedule{4, 0, 2, {12, 20}}); },
      {"step_schedule.dense_steps", "20", "[0, 20)"});
  testing::expect_error<std::invalid_argument>(
      [] { A a({tokens, batch, 1, dim}, specdiff_scorer{}, self_speculation{}, three_level_classifier(0.5), step_schedule{4, 0, 2, {}}); },
      {"step_schedule.speculative", "[0, 1]", "got 2"});
}

namespace {
// A feedback classifier that refuses to classify on demand, after adapt() has run.
struct flaky_classifier {
  three_level_classifier inner;
  bool* refuse;
  void prepare(index_t n) { inner.prepare(n); }
  void adapt(const schedule_feedback& f) { inner.adapt(f); }
  index_t compute_count(index_t n) const { return inner.compute_count(n); }
  void classify(std::span<const float> s, token_plan& p) {
    if (*refuse) detail::fail("flaky_classifier: refused");
    inner.classify(s, p);
  }
};
}  // namespace

TEST_CASE("protocol (issue 27 item 5): a refused plan_step leaves a feedback classifier as it was") {
  const std::vector<double> rates = {0.9, 0.5};
  auto make_feedback = [&] { return make_acc(three_level_classifier(rates, 1e-9f)); };  // any verified error: the lower rate
  auto g = testing::rng(2705);
  const std::uint64_t seed = g();
  // The speculative pass incomplete: plan_step of a partial step is refused before adapt().
  {
    auto acc = make_feedback();
    toy m{seed};
    acc->begin_speculation(std::vector<float>{ts(0), ts(5)});
    m.fill_attention(50);
    acc->record_speculation(0, m.attention);
    for (index_t k = 0; k < 3; ++k) {
      if (k == 2) {
        const double rate = acc->classifier().cache_rate();
        testing::expect_error<std::logic_error>([&] { (void)acc->plan_step(2, ts(2)); }, {"speculative pass is not complete"});
        CHECK(acc->classifier().cache_rate() == rate);
        break;
      }
      auto s = acc->plan_step(k, ts(k));
      const auto rows = m.compute(s);
      acc->complete_step(std::move(s), rows, m.out(), m.attention);
    }
  }
  // A classifier refusing after adapt(): restored, and the rest of the run is the plain run's.
  bool refuse = false;
  auto make_flaky = [&] {
    return std::make_unique<spec_acc<flaky_classifier>>(accelerator_config{tokens, batch, steps, dim}, specdiff_scorer{}, self_speculation{},
                                                       flaky_classifier{three_level_classifier(rates, 1e-9f), &refuse}, step_schedule{2, 0, 2, {6}});
  };
  for (index_t at : {3, 4, 8}) {  // partial steps: after a dense step (rate 0.9) and after partial ones (0.5)
    INFO("at step ", at);
    auto plain = make_flaky();
    const auto want = run(*plain, seed);
    auto probed = make_flaky();
    const auto got = run(*probed, seed, [&](index_t k) {
      if (k != at) return;
      const double rate = probed->classifier().inner.cache_rate();
      const index_t count = probed->partial_compute_count();
      refuse = true;
      testing::expect_error<std::invalid_argument>([&] { (void)probed->plan_step(k, ts(k)); }, {"flaky_classifier: refused"});
      refuse = false;
      CHECK(probed->classifier().inner.cache_rate() == rate);
      CHECK(probed->partial_compute_count() == count);
    });
    CHECK(got == want);
  }
}
