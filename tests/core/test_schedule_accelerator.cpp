#include <doctest/doctest.h>

#include <atomic>
#include <cmath>
#include <new>
#include <specdiff/specdiff.hpp>

#include "../common/testing.hpp"

using namespace specdiff;

// Counts heap allocations so the tests can assert that the per-step path makes none.
namespace {
std::atomic<long> allocations{0};
}
// GCC sees free() on memory from this operator new once both are inlined; they do match.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void* operator new(std::size_t n) {
  ++allocations;
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
// The nothrow forms too (std::stable_sort's temporary buffer uses them): every form this file's deletes free
// must come from malloc, or ASan reports new/free mismatches.
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  ++allocations;
  return std::malloc(n ? n : 1);
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

TEST_CASE("step_schedule: RAS's, TaylorSeer's and FORA's settings") {
  auto dense_steps = [](const step_schedule& s, index_t steps) {
    std::vector<index_t> dense;
    for (index_t i = 0; i < steps; ++i)
      if (s.is_dense(i, steps)) dense.push_back(i);
    return dense;
  };
  const step_schedule ras{4, 0, 2, {12, 20}};  // RAS's SD3 setting: dense before 4 and at 12, 20
  CHECK(dense_steps(ras, 28) == std::vector<index_t>{0, 1, 2, 3, 12, 20});
  CHECK(ras.speculative_steps() == 2);
  // The default: dense before 4, S = min(2, steps), valid for any step count.
  for (index_t steps : {1, 2, 8, 20, 28, 50}) {
    INFO("steps ", steps);
    const step_schedule d = step_schedule{}.for_steps(steps);
    CHECK(d.speculative_steps() == std::min<index_t>(2, steps));
    std::vector<index_t> want;
    for (index_t i = 0; i < std::min<index_t>(4, steps); ++i) want.push_back(i);
    CHECK(dense_steps(d, steps) == want);
  }
  testing::expect_error<std::logic_error>([] { (void)step_schedule{}.speculative_steps(); }, {"from_steps", "for_steps"});
  CHECK(dense_steps(step_schedule{3, 6, 0, {}}, 28) == std::vector<index_t>{0, 1, 2, 8, 14, 20, 26});
  CHECK(dense_steps(step_schedule{1, 3, 0, {}}, 10) == std::vector<index_t>{0, 3, 6, 9});
  CHECK(dense_steps(step_schedule{2, 1, 0, {}}, 5) == std::vector<index_t>{0, 1, 2, 3, 4});
  CHECK(dense_steps(step_schedule{2, 0, 0, {}}, 5) == std::vector<index_t>{0, 1});
  testing::expect_error<std::invalid_argument>([&] { (void)ras.is_dense(28, 28); }, {"step = 28"});
  testing::expect_error<std::invalid_argument>([] { step_schedule{-1, 0, 0, {}}.validate(10); }, {"warmup_steps", "-1"});
  testing::expect_error<std::invalid_argument>([] { step_schedule{1, -2, 0, {}}.validate(10); }, {"refresh_interval", "-2"});
  testing::expect_error<std::invalid_argument>([] { step_schedule{1, 0, 0, {-3}}.validate(10); }, {"dense_steps", "-3"});
  testing::expect_error<std::invalid_argument>([] { step_schedule{1, 0, 0, {10}}.validate(10); }, {"dense_steps", "10", "[0, 10)"});
  testing::expect_error<std::invalid_argument>([] { step_schedule{1, 0, 11, {}}.validate(10); }, {"step_schedule.speculative", "11", "[0, 10]"});
}

namespace {

// A toy "model": a deterministic velocity per token and timestep, and an attention that favours a moving
// band of tokens. Enough to exercise every path of the orchestration without an engine.
// Not inlined: one compiled body, so -ffp-contract cannot round it differently at two call sites.
[[gnu::noinline]] float velocity(index_t sample, index_t token, index_t c, float t) {
  return std::sin(0.3f * static_cast<float>(token + 7 * sample) + 0.1f * static_cast<float>(c)) * (t / 1000.f) + 0.01f * static_cast<float>(c);
}
float attention_of(index_t sample, index_t token, float t) {
  return 1.f + std::cos(0.05f * static_cast<float>(token * (sample + 1)) + t / 200.f);
}

using specdiff_accelerator = accelerator<specdiff_scorer, self_speculation, three_level_classifier, step_schedule>;

specdiff_accelerator make(index_t tokens, index_t batch, index_t steps, index_t dim, double cr, bool share = false) {
  const accelerator_config cfg{.tokens = tokens, .batch = batch, .steps = steps, .feature_dim = dim, .share_cfg_plan = share};
  return specdiff_accelerator(cfg, specdiff_scorer{}, self_speculation{}, three_level_classifier(cr), step_schedule{2, 4, 2, {}});
}

struct run_result {
  std::vector<float> final_sum;  // sum over steps of the velocities used (a stand-in for the sampler)
  long per_step_allocations = 0;
};

run_result run(specdiff_accelerator& acc, const std::vector<float>& ts, bool check_levels) {
  const auto& cfg = acc.config();
  const index_t rows = cfg.batch * cfg.tokens, dim = cfg.feature_dim;
  std::vector<float> out(static_cast<std::size_t>(rows * dim)), attn(static_cast<std::size_t>(rows)), sum(out.size(), 0.f);
  std::vector<float> spec_ts = {ts.front(), ts[ts.size() / 2]};
  acc.begin_speculation(spec_ts);
  for (index_t s = 0; s < 2; ++s) {
    for (index_t r = 0; r < rows; ++r) attn[static_cast<std::size_t>(r)] = attention_of(r / cfg.tokens, r % cfg.tokens, spec_ts[static_cast<std::size_t>(s)]);
    acc.record_speculation(s, attn);
  }
  // keep our own copy of every token's history to check the fills independently
  std::vector<std::vector<std::pair<float, std::vector<float>>>> hist(static_cast<std::size_t>(rows));
  run_result result;
  for (index_t step = 0; step < cfg.steps; ++step) {
    const float t = ts[static_cast<std::size_t>(step)];
    const long before = allocations.load();
    auto planned = acc.plan_step(step, t);
    result.per_step_allocations += allocations.load() - before;
    const bool dense = planned.dense();
    // the plans of this step, kept beyond complete_step (which consumes the step object)
    std::vector<token_plan> plans;
    for (index_t b = 0; b < cfg.batch; ++b) plans.push_back(planned.plan(b));
    std::fill(out.begin(), out.end(), std::nanf(""));
    // compact C1 rows, as a token-subset forward returns them; step.compute_tokens() lists them
    const index_t m = planned.compute_count();
    std::vector<float> computed(static_cast<std::size_t>(cfg.batch * m * dim));
    const auto ids = planned.compute_tokens();
    REQUIRE(ids.size() == static_cast<std::size_t>(cfg.batch * m));
    for (index_t b = 0; b < cfg.batch; ++b)
      for (index_t k = 0; k < m; ++k) {
        const index_t i = ids[static_cast<std::size_t>(b * m + k)];
        CHECK(i == planned.plan(b).compute()[static_cast<std::size_t>(k)]);
        for (index_t c = 0; c < dim; ++c) computed[static_cast<std::size_t>((b * m + k) * dim + c)] = velocity(b, i, c, t);
        attn[static_cast<std::size_t>(b * cfg.tokens + i)] = attention_of(b, i, t);
      }
    const long before2 = allocations.load();
    acc.complete_step(std::move(planned), matrix_view<const float>(computed.data(), cfg.batch * m, dim), matrix_view<float>(out.data(), rows, dim), attn);
    result.per_step_allocations += allocations.load() - before2;
    for (index_t b = 0; b < cfg.batch; ++b) {
      const auto& plan = plans[static_cast<std::size_t>(b)];
      for (index_t i = 0; i < cfg.tokens; ++i) {
        const index_t r = b * cfg.tokens + i;
        auto& h = hist[static_cast<std::size_t>(r)];
        const level l = plan.levels()[static_cast<std::size_t>(i)];
        const float* row = out.data() + r * dim;
        if (check_levels && !dense) {
          if (l == level::compute) CHECK(row[0] == velocity(b, i, 0, t));
          if (l == level::reuse) CHECK(row[dim - 1] == h.back().second[static_cast<std::size_t>(dim - 1)]);
          if (l == level::approximate) {
            const std::size_t n = std::min<std::size_t>(3, h.size());
            double w[3], norm = 0;
            for (std::size_t k = 0; k < n; ++k) norm += w[k] = std::exp(-(k + 1.0)) * (h[h.size() - 1 - k].first - t);
            double want = 0;
            for (std::size_t k = 0; k < n; ++k) want += w[k] / norm * h[h.size() - 1 - k].second[1];
            CHECK(row[1] == doctest::Approx(want).epsilon(1e-5));
          }
        }
        if (dense || l == level::compute) h.emplace_back(t, std::vector<float>(row, row + dim));
        CHECK(std::isfinite(row[0]));
      }
    }
    for (std::size_t k = 0; k < sum.size(); ++k) sum[k] += out[k];
  }
  result.final_sum = sum;
  return result;
}

std::vector<float> timesteps(index_t steps) {
  std::vector<float> ts;
  for (index_t i = 0; i < steps; ++i) ts.push_back(1000.f * (1.f - static_cast<float>(i) / static_cast<float>(steps)));
  return ts;
}

}  // namespace

TEST_CASE("accelerator: C1 rows as computed, C2 latest, C3 the SpecDiff mix, no per-step allocation") {
  auto acc = make(64, 2, 12, 5, 0.75);
  const auto r = run(acc, timesteps(12), true);
  CHECK(r.per_step_allocations == 0);
  CHECK(acc.partial_compute_count() == 16);
}

TEST_CASE("accelerator: CR = 0 reproduces the full computation bit for bit") {
  auto acc = make(40, 3, 10, 4, 0.0);
  const auto cached = run(acc, timesteps(10), false);
  accelerator full(accelerator_config{40, 3, 10, 4}, specdiff_scorer{}, self_speculation{}, all_compute_classifier{}, dense_schedule{});
  std::vector<float> out(120 * 4), sum(out.size(), 0.f), attn(120, 1.f);
  const auto ts = timesteps(10);
  for (index_t step = 0; step < 10; ++step) {
    auto planned = full.plan_step(step, ts[static_cast<std::size_t>(step)]);
    CHECK(planned.dense());
    for (index_t r = 0; r < 120; ++r)
      for (index_t c = 0; c < 4; ++c) out[static_cast<std::size_t>(r * 4 + c)] = velocity(r / 40, r % 40, c, ts[static_cast<std::size_t>(step)]);
    full.complete_step(std::move(planned), matrix_view<float>(out.data(), 120, 4), attn);
    for (std::size_t k = 0; k < sum.size(); ++k) sum[k] += out[k];
  }
  CHECK(cached.final_sum == sum);
}

TEST_CASE("accelerator: starvation counts and independent plans per sample") {
  auto acc = make(50, 2, 8, 3, 0.8);
  (void)run(acc, timesteps(8), false);
  // cf counts the partial steps since a token was last computed: after the last (partial) step, the tokens
  // it computed have 0, every other token at least 1
  for (index_t p = 0; p < 2; ++p) {
    const auto cf = acc.cache_counts(p);
    index_t zeros = 0;
    for (float c : cf) zeros += c == 0.f ? 1 : 0;
    CHECK(zeros == acc.partial_compute_count());
  }
  // the toy attention differs per sample, so do the plans
  const auto a = acc.cache_counts(0), b = acc.cache_counts(1);
  CHECK_FALSE(std::equal(a.begin(), a.end(), b.begin(), b.end()));
}

TEST_CASE("accelerator: a CFG pair can share one plan") {
  auto acc = make(30, 4, 6, 2, 0.5, true);
  (void)run(acc, timesteps(6), true);
  // replay to the first partial step (warm-up 2) and look at the plans
  acc.reset();
  const auto ts = timesteps(6);
  const std::vector<float> spec = {ts[0], ts[3]};
  std::vector<float> attn(120), out(120 * 2, 0.5f);
  acc.begin_speculation(spec);
  for (index_t s = 0; s < 2; ++s) {
    for (index_t r = 0; r < 120; ++r) attn[static_cast<std::size_t>(r)] = attention_of(r / 30, r % 30, spec[static_cast<std::size_t>(s)]);
    acc.record_speculation(s, attn);
  }
  for (index_t k = 0; k < 2; ++k) {
    for (index_t r = 0; r < 120; ++r) attn[static_cast<std::size_t>(r)] = attention_of(r / 30, r % 30, ts[static_cast<std::size_t>(k)]);
    acc.complete_step(acc.plan_step(k, ts[static_cast<std::size_t>(k)]), matrix_view<float>(out.data(), 120, 2), attn);
  }
  const auto partial = acc.plan_step(2, ts[2]);
  REQUIRE_FALSE(partial.dense());
  for (index_t b = 0; b < 2; ++b) CHECK(&partial.plan(b) == &partial.plan(b + 2));
  const auto ids = partial.compute_tokens();
  CHECK(std::equal(ids.begin(), ids.begin() + 15, ids.begin() + 30));  // sample 0 and sample 2 compute the same tokens
  testing::expect_error<std::invalid_argument>([] { (void)make(30, 3, 6, 2, 0.5, true); }, {"batch", "even", "3"});
}
