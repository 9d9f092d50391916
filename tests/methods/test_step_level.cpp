// Step-level caching methods (First-Block cache / DBCache, TeaCache) on small random SD3 models: threshold 0 is
// full RFlow bit for bit; an infinite threshold computes only the forced steps and counts the FLOPs of what ran;
// on a model whose blocks add a constant the cached residual makes skipping exact (up to rounding) — which it
// can only be if the right residual is added at the right place; bad options are refused by name.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include "../common/testing.hpp"
#include "methods/flops.hpp"
#include "methods/methods.hpp"
#include "sampling_inputs.hpp"
#include "sd3/model.hpp"

namespace {

constexpr double inf = std::numeric_limits<double>::infinity();


// Every block adds a constant to the image stream: its modulation is its bias (norm1 weight 0, so the gates do not
// depend on the timestep) and its attention and MLP outputs are their biases (to_out and ff.net.2 weights 0).
// Hidden after block l = hidden after the embedding + c_1 + ... + c_l, whatever the step.
void make_blocks_constant(sd3::model& m) {
  for (auto& b : m.blocks) {
    std::fill(b.norm1.weight.begin(), b.norm1.weight.end(), 0.f);
    std::fill(b.to_out.weight.begin(), b.to_out.weight.end(), 0.f);
    std::fill(b.ff2.weight.begin(), b.ff2.weight.end(), 0.f);
  }
}

// Fresh inputs each run (the seed is printed on failure).
struct fixture : methods_testing::sampling_inputs {
  sd3::model model;
  sd3::transformer net;

  explicit fixture(int layers = 4, bool constant_blocks = false)
      : sampling_inputs(testing::fresh_seed()), model(prepared(layers, constant_blocks, seed)), net(model, {4, 8, 8, 3}, 1) {}
  static sd3::model prepared(int layers, bool constant_blocks, std::uint64_t seed) {
    sd3::model m = sd3::model::random(methods_testing::small_config(layers), seed);
    if (constant_blocks) make_blocks_constant(m);
    return m;
  }

  methods::problem problem(int steps = 8) { return problem_on(net, steps); }
};

methods::fbcache_options fbcache(double threshold, int front = 1, int back = 0) {
  methods::fbcache_options o;
  o.threshold = threshold;
  o.front_blocks = front;
  o.back_blocks = back;
  return o;
}

methods::teacache_options teacache(double threshold, methods::teacache_options::rescale_kind rescale) {
  methods::teacache_options o;
  o.threshold = threshold;
  o.rescale = rescale;
  return o;
}

using rescale = methods::teacache_options::rescale_kind;

double max_relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0;
  for (std::size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::fabs(static_cast<double>(a[i]) - b[i]) / (1.0 + std::fabs(b[i])));
  return worst;
}

}  // namespace

TEST_CASE("step-level caches at threshold 0 compute every step: full RFlow bit for bit") {
  fixture f;
  INFO("seed ", f.seed);
  const auto p = f.problem();
  const auto full = methods::run_full(p);
  for (const auto& o : {fbcache(0.0), fbcache(0.0, 2, 1), fbcache(0.0, 1, 2)}) {
    INFO("Fn ", o.front_blocks, " Bn ", o.back_blocks);
    const auto r = methods::run_fbcache(p, o);
    CHECK(r.latents == full.latents);
    CHECK(r.model_calls == p.steps);
    CHECK(r.flops == full.flops);
  }
  for (rescale k : {rescale::flux, rescale::identity}) {
    const auto r = methods::run_teacache(p, teacache(0.0, k));
    CHECK(r.latents == full.latents);
    CHECK(r.model_calls == p.steps);
    CHECK(r.flops == full.flops);
  }
}

TEST_CASE("an infinite threshold computes only the forced steps, and the FLOPs count what ran") {
  fixture f;
  INFO("seed ", f.seed);
  const auto p = f.problem();
  const auto full = methods::run_full(p);
  const auto& c = f.net.config();
  const int batch = 4, tokens = 16, ctx = 3;
  const double full_step = batch * methods::full_forward_flops(c, tokens, ctx);
  auto block = [&](int l, bool whole) {
    return methods::block_flops(c, tokens, ctx, l, whole ? methods::block_work{tokens, true, tokens, true} : methods::block_work{0, false, 0, false});
  };
  auto finite = [](const std::vector<float>& v) { return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); }); };

  // FBCache: only step 0 computes; a skipped step runs the outer layers, block 0 and block 1's modulation.
  const auto fb = methods::run_fbcache(p, fbcache(inf));
  CHECK(fb.model_calls == 1);
  CHECK(finite(fb.latents));
  CHECK(fb.latents != full.latents);
  const double fb_skip = batch * (methods::outer_flops(c, ctx, tokens) + block(0, true) + block(1, false));
  CHECK(fb.flops == doctest::Approx(full_step + (p.steps - 1) * fb_skip).epsilon(1e-12));
  // ... with warm-up, the first steps too
  auto warm = fbcache(inf);
  warm.warmup_steps = 3;
  CHECK(methods::run_fbcache(p, warm).model_calls == 3);
  // DBCache F1 B1: a skipped step runs blocks 0 and 3 and block 1's modulation
  const auto db = methods::run_fbcache(p, fbcache(inf, 1, 1));
  CHECK(db.model_calls == 1);
  CHECK(finite(db.latents));
  const double db_skip = fb_skip + batch * block(3, true);
  CHECK(db.flops == doctest::Approx(full_step + (p.steps - 1) * db_skip).epsilon(1e-12));
  // max_consecutive_skips 1: every other step computes
  auto alternate = fbcache(inf);
  alternate.max_consecutive_skips = 1;
  CHECK(methods::run_fbcache(p, alternate).model_calls == p.steps / 2);

  // TeaCache: the first and the last step compute; a skipped step runs the outer layers and block 0's modulation.
  for (rescale k : {rescale::flux, rescale::identity}) {
    const auto tc = methods::run_teacache(p, teacache(inf, k));
    CHECK(tc.model_calls == 2);
    CHECK(finite(tc.latents));
    const double tc_skip = batch * (methods::outer_flops(c, ctx, tokens) + block(0, false));
    CHECK(tc.flops == doctest::Approx(2 * full_step + (p.steps - 2) * tc_skip).epsilon(1e-12));
    CHECK(tc.flops < fb.flops);
  }
  auto tc_alternate = teacache(inf, rescale::identity);
  tc_alternate.max_consecutive_skips = 1;
  CHECK(methods::run_teacache(p, tc_alternate).model_calls == 5);  // steps 0, 2, 4, 6 and the last, 7
}

TEST_CASE("when blocks add a constant, skipping with the cached residual is exact up to rounding") {
  // Hidden after block l is x0 + c_1 + ... + c_l at every step, so the residuals FBCache (out_last - out_0) and
  // TeaCache (out_last - x0) cache are the same at every step: a skipped step must give the full step's velocity.
  // Leaving the residual out, adding it at the wrong block, or caching the wrong difference breaks this.
  fixture f(4, /*constant_blocks=*/true);
  INFO("seed ", f.seed);
  const auto p = f.problem();
  const auto full = methods::run_full(p);
  for (const auto& o : {fbcache(inf), fbcache(inf, 1, 1), fbcache(inf, 2, 1)}) {
    INFO("Fn ", o.front_blocks, " Bn ", o.back_blocks);
    const auto r = methods::run_fbcache(p, o);
    CHECK(r.model_calls == 1);
    CHECK(max_relative_error(r.latents, full.latents) < 1e-5);
  }
  const auto tc = methods::run_teacache(p, teacache(inf, rescale::identity));
  CHECK(tc.model_calls == 2);
  CHECK(max_relative_error(tc.latents, full.latents) < 1e-5);

  // The check can fail: with the blocks' constants not reused, the result moves far away.
  fixture plain(4, /*constant_blocks=*/false);
  const auto q = plain.problem();
  CHECK(max_relative_error(methods::run_fbcache(q, fbcache(inf)).latents, methods::run_full(q).latents) > 1e-3);
}

TEST_CASE("step-level caches refuse bad options by name") {
  fixture f;
  const auto p = f.problem();
  auto fb = [&](methods::fbcache_options o, std::initializer_list<const char*> fragments) {
    testing::expect_error<std::invalid_argument>([&] { (void)methods::run_fbcache(p, o); }, fragments);
  };
  fb(fbcache(-0.5), {"threshold", "-0.5"});
  fb(fbcache(std::nan("")), {"threshold", "nan"});
  fb(fbcache(0.1, 0), {"front_blocks", "got 0"});
  fb(fbcache(0.1, 1, -1), {"back_blocks", "got -1"});
  fb(fbcache(0.1, 2, 2), {"front_blocks + back_blocks", "num_layers = 4", "2 + 2"});
  auto warm = fbcache(0.1);
  warm.warmup_steps = -2;
  fb(warm, {"warmup_steps", "-2"});
  auto runs = fbcache(0.1);
  runs.max_consecutive_skips = -3;
  fb(runs, {"max_consecutive_skips", "-3"});
  auto budget = fbcache(0.1);
  budget.max_skips = -4;
  fb(budget, {"max_skips", "-4"});
  testing::expect_error<std::invalid_argument>([&] { (void)methods::run_teacache(p, teacache(-1.0, rescale::flux)); }, {"threshold", "-1"});
  auto tc = teacache(0.5, rescale::identity);
  tc.max_consecutive_skips = -9;
  testing::expect_error<std::invalid_argument>([&] { (void)methods::run_teacache(p, tc); }, {"max_consecutive_skips", "-9"});
}
