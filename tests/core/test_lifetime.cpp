// Lifetimes: a step can never outlive its accelerator unnoticed. The accelerator knows its one live step and
// detaches it when it is destroyed (or reset); a detached step's calls throw a clear std::logic_error and its
// destructor does nothing. Run under the ASan preset these cases are the use-after-free checks (issue 27:
// `~step -> abandon_step` and `step.compute_count()` on a destroyed accelerator were heap-use-after-free).
#include <doctest/doctest.h>

#include <cmath>
#include <memory>
#include <optional>
#include <specdiff/specdiff.hpp>
#include <vector>

#include "../common/testing.hpp"

using namespace specdiff;

namespace {

constexpr index_t tokens = 10, batch = 2, steps = 6, dim = 3;
using acc_t = accelerator<uniform_scorer, no_speculation, top_k_classifier, step_schedule>;

float ts(index_t k) { return 1.f - 0.1f * static_cast<float>(k); }

std::unique_ptr<acc_t> make_unique_acc() {
  return std::make_unique<acc_t>(accelerator_config{tokens, batch, steps, dim}, uniform_scorer{1.f}, no_speculation{}, top_k_classifier(0.5),
                                 step_schedule{1, 0, 0, {}});
}

// Rows for a step: compact C1 rows, deterministic.
struct rows_for {
  std::vector<float> computed, output = std::vector<float>(static_cast<std::size_t>(batch * tokens * dim), 0.f);
  template <class Step>
  matrix_view<const float> compute(const Step& s) {
    const index_t m = s.compute_count();
    computed.assign(static_cast<std::size_t>(batch * m * dim), 0.f);
    for (std::size_t i = 0; i < computed.size(); ++i) computed[i] = std::sin(0.3f * static_cast<float>(i) + s.timestep());
    return {computed.data(), batch * m, dim};
  }
  matrix_view<float> out() { return {output.data(), batch * tokens, dim}; }
};

template <class Step>
void expect_orphaned(const Step& s) {
  testing::expect_error<std::logic_error>([&] { (void)s.compute_count(); }, {"outlived its accelerator"});
  testing::expect_error<std::logic_error>([&] { (void)s.compute_tokens(); }, {"outlived its accelerator"});
  testing::expect_error<std::logic_error>([&] { (void)s.index(); }, {"outlived its accelerator"});
  testing::expect_error<std::logic_error>([&] { (void)s.plan(0); }, {"outlived its accelerator"});
}

}  // namespace

TEST_CASE("lifetime: a step that outlives its accelerator is refused, and its destructor is a no-op") {
  auto acc = make_unique_acc();
  auto s = acc->plan_step(0, ts(0));
  CHECK(s.compute_count() == tokens);
  acc.reset();  // the accelerator goes while the step is live
  expect_orphaned(s);
  // s's destructor runs at the end of scope: nothing to abandon (ASan: no use-after-free).
}

TEST_CASE("lifetime: an engine holding its pending step as a member declared before the accelerator") {
  struct engine {
    std::optional<acc_t::step> pending;  // destroyed after acc: the declaration order issue 27 reported
    acc_t acc{accelerator_config{tokens, batch, steps, dim}, uniform_scorer{1.f}, no_speculation{}, top_k_classifier(0.5), step_schedule{1, 0, 0, {}}};
  };
  {
    engine e;
    e.pending.emplace(e.acc.plan_step(0, ts(0)));
    CHECK(e.pending->index() == 0);
  }  // ~acc detaches the step, then ~pending does nothing
  auto e = std::make_unique<engine>();
  e->pending.emplace(e->acc.plan_step(0, ts(0)));
  rows_for r;
  const auto rows = r.compute(*e->pending);
  e->acc.complete_step(std::move(*e->pending), rows, r.out(), {});
  CHECK(e->acc.next_step() == 1);
  e->pending.emplace(e->acc.plan_step(1, ts(1)));
  e.reset();
}

TEST_CASE("lifetime: an accelerator rebuilt while a step is held") {
  std::optional<acc_t> acc;
  acc.emplace(accelerator_config{tokens, batch, steps, dim}, uniform_scorer{1.f}, no_speculation{}, top_k_classifier(0.5), step_schedule{1, 0, 0, {}});
  auto s = acc->plan_step(0, ts(0));
  acc.emplace(accelerator_config{tokens, batch, steps, dim}, uniform_scorer{1.f}, no_speculation{}, top_k_classifier(0.5), step_schedule{1, 0, 0, {}});
  expect_orphaned(s);
  rows_for r;
  const std::vector<float> rows(static_cast<std::size_t>(batch * tokens * dim), 0.5f);
  // The old step is refused by the new accelerator (it is detached, not the new one's), which is untouched.
  testing::expect_error<std::logic_error>([&] { acc->complete_step(std::move(s), {rows.data(), batch * tokens, dim}, r.out(), {}); },
                                          {"outlived its accelerator"});
  CHECK(acc->next_step() == 0);
  auto fresh = acc->plan_step(0, ts(0));
  acc->complete_step(std::move(fresh), {rows.data(), batch * tokens, dim}, r.out(), {});
  CHECK(acc->next_step() == 1);
}

TEST_CASE("lifetime: moves keep the accelerator's back-pointer current") {
  auto acc = make_unique_acc();
  rows_for r;
  for (index_t k = 0; k < steps; ++k) {
    std::vector<acc_t::step> held;
    held.reserve(1);
    held.push_back(acc->plan_step(k, ts(k)));  // moved into the vector
    std::optional<acc_t::step> moved(std::move(held.back()));
    testing::expect_error<std::logic_error>([&] { (void)held.back().compute_count(); }, {"empty"});
    const auto rows = r.compute(*moved);
    if (k == steps - 1) {
      acc.reset();  // destroyed while the step sits in an optional after two moves
      expect_orphaned(*moved);
      break;
    }
    acc->complete_step(std::move(*moved), rows, r.out(), {});
    testing::expect_error<std::logic_error>([&] { (void)moved->compute_count(); }, {"empty", "completed"});
  }
}

TEST_CASE("lifetime: move-assigning over a live step abandons it; a step of another accelerator stays refused") {
  auto a = make_unique_acc();
  auto b = make_unique_acc();
  auto sa = a->plan_step(0, ts(0));
  auto sb = b->plan_step(0, ts(0));
  sa = std::move(sb);  // a's step is abandoned (no rows cached: a is as before plan_step); sa is now b's
  auto sa2 = a->plan_step(0, ts(0));
  rows_for r;
  const auto rows = r.compute(sa2);
  testing::expect_error<std::logic_error>([&] { a->complete_step(std::move(sa), rows, r.out(), {}); }, {"belongs to another accelerator"});
  a->complete_step(std::move(sa2), rows, r.out(), {});
  b.reset();  // sa (b's step) is orphaned; a is untouched
  expect_orphaned(sa);
  CHECK(a->next_step() == 1);
}

TEST_CASE("lifetime: reset() detaches the live step: stale, and destroying it later leaves the next step alone") {
  auto acc = make_unique_acc();
  std::optional<acc_t::step> stale(acc->plan_step(0, ts(0)));
  acc->reset();
  testing::expect_error<std::logic_error>([&] { (void)stale->compute_count(); }, {"stale", "reset()"});
  auto s = acc->plan_step(0, ts(0));
  stale.reset();  // must not abandon s
  rows_for r;
  const auto rows = r.compute(s);
  acc->complete_step(std::move(s), rows, r.out(), {});
  CHECK(acc->next_step() == 1);
  auto last = acc->plan_step(1, ts(1));
  acc.reset();
  expect_orphaned(last);
}

TEST_CASE("lifetime: a step completed before its accelerator is destroyed stays empty") {
  auto acc = make_unique_acc();
  auto s = acc->plan_step(0, ts(0));
  rows_for r;
  const auto rows = r.compute(s);
  acc->complete_step(std::move(s), rows, r.out(), {});
  acc.reset();
  testing::expect_error<std::logic_error>([&] { (void)s.compute_count(); }, {"empty"});
}
