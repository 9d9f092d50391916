// Invariants of the methods on a small random SD3 model: every method at its "no caching" setting is full
// RFlow bit for bit; the speculative pass is a plain sampling from the same noise and conditioning; a
// partial forward runs only the C1 rows through the network.
#include <doctest/doctest.h>

#include <algorithm>

#include <random>
#include <specdiff/specdiff.hpp>

#include "methods/flops.hpp"
#include "methods/methods.hpp"
#include "sd3/model.hpp"

namespace {

sd3::transformer_config small_config() {
  sd3::transformer_config c;
  c.sample_size = 8;
  c.patch_size = 2;
  c.in_channels = c.out_channels = 2;
  c.num_layers = 3;
  c.attention_head_dim = 16;
  c.num_attention_heads = 2;
  c.joint_attention_dim = 12;
  c.caption_projection_dim = 32;
  c.pooled_projection_dim = 10;
  c.pos_embed_max_size = 8;
  return c;
}

// Fresh inputs each run (the seed is printed on failure).
struct fixture {
  std::uint64_t seed = std::random_device{}();
  sd3::model model = sd3::model::random(small_config(), seed);
  sd3::transformer net{model, {4, 8, 8, 3}, 1};
  std::vector<float> noise, context, negative_context, pooled, negative_pooled;

  fixture() {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> n(0.f, 1.f);
    auto fill = [&](std::vector<float>& v, std::size_t count) {
      v.resize(count);
      for (auto& x : v) x = n(rng);
    };
    fill(noise, 2 * 2 * 8 * 8);
    fill(context, 2 * 3 * 12);
    fill(negative_context, 2 * 3 * 12);
    fill(pooled, 2 * 10);
    fill(negative_pooled, 2 * 10);
  }

  methods::problem problem(int steps = 8) {
    methods::problem p;
    p.net = &net;
    p.inputs = {2, 8, 8, 3, noise, context, negative_context, pooled, negative_pooled};
    p.steps = steps;
    p.guidance = 3.f;
    p.shift = 3.0;
    return p;
  }
};

using kind = methods::module_cache_options::kind;

}  // namespace

TEST_CASE("every method at its no-caching setting reproduces full RFlow bit for bit") {
  fixture f;
  INFO("seed ", f.seed);
  const auto p = f.problem();
  const auto full = methods::run_full(p);
  REQUIRE(full.latents.size() == f.noise.size());

  methods::specdiff_options sd;
  sd.cache_rate = 0.0;
  CHECK(methods::run_specdiff(p, sd).latents == full.latents);
  methods::ras_options ras;
  ras.cache_rate = 0.0;
  CHECK(methods::run_ras(p, ras).latents == full.latents);
  for (kind k : {kind::fora, kind::toca, kind::taylorseer}) {
    methods::module_cache_options o;
    o.method = k;
    o.interval = 1;
    CHECK(methods::run_module_cache(p, o).latents == full.latents);
  }
  CHECK(methods::run_steps(p, p.steps).latents == full.latents);
}

TEST_CASE("caching changes the result, and less work is counted") {
  fixture f;
  INFO("seed ", f.seed);
  const auto p = f.problem();
  const auto full = methods::run_full(p);
  methods::specdiff_options sd;
  sd.cache_rate = 0.75;
  sd.reset_steps = {};
  const auto fast = methods::run_specdiff(p, sd);
  CHECK(fast.latents != full.latents);
  CHECK(fast.flops < full.flops);
  for (float x : fast.latents) REQUIRE(std::isfinite(x));
  for (kind k : {kind::fora, kind::toca, kind::taylorseer}) {
    methods::module_cache_options o;
    o.method = k;
    o.interval = 3;
    o.cache_rate = 0.5;
    const auto r = methods::run_module_cache(p, o);
    CHECK(r.latents != full.latents);
    CHECK(r.flops < full.flops);
  }
  // FLOP accounting: a full forward equals the sum of its parts, a subset costs less
  const auto& c = f.net.config();
  CHECK(methods::subset_forward_flops(c, 16, 3, 16) == methods::full_forward_flops(c, 16, 3));
  CHECK(methods::subset_forward_flops(c, 16, 3, 4) < methods::full_forward_flops(c, 16, 3));
}

TEST_CASE("the speculative pass samples from the same noise and conditioning") {
  fixture f;
  INFO("seed ", f.seed);
  const auto p = f.problem();
  for (int s : {1, 2, 3}) {  // the sampler's own S-step grid (0.1's choice): plain S-step sampling
    methods::specdiff_options sd;
    sd.spec_steps = s;
    sd.spec_grid = specdiff::speculative_grid::sampler;
    const auto r = methods::run_specdiff(p, sd);
    CHECK(r.speculative_latents == methods::run_steps(p, s).latents);
    CHECK(r.model_calls == p.steps + s);
  }
  // the aligned grid: the pass integrates along the library's main-grid timesteps, starting at the first
  for (int s : {1, 2, 3}) {
    methods::specdiff_options sd;
    sd.spec_steps = s;
    sd.spec_grid = specdiff::speculative_grid::aligned;
    const auto pass = methods::speculative_pass(p, sd);
    REQUIRE(pass.has_value());
    const sd3::flow_match_euler main(p.steps, static_cast<double>(p.shift));
    const auto& ts = pass->timesteps();
    REQUIRE(ts.size() == static_cast<std::size_t>(s));
    CHECK(ts[0] == main.timesteps()[0]);
    for (float t : ts) CHECK(std::find(main.timesteps().begin(), main.timesteps().end(), t) != main.timesteps().end());
    const auto r = methods::run_specdiff(p, sd);
    CHECK(r.speculative_latents == sd3::sample_cfg(f.net, *pass, p.inputs, p.guidance));
    CHECK(r.model_calls == p.steps + s);
  }
}

TEST_CASE("a partial forward runs only the C1 rows (plus context) through the network") {
  fixture f;
  INFO("seed ", f.seed);
  const auto& c = f.net.config();
  const int batch = 2, tokens = 16, features = c.patch_features();
  sd3::kv_cache kv(c, batch, tokens);
  std::vector<float> t(batch, 700.f), velocity(f.noise.size()), probe(batch * tokens);
  sd3::forward_inputs in{batch, 8, 8, 3, f.noise, t, f.context, f.pooled};
  sd3::forward_options full;
  full.kv = &kv;
  full.attention_probe = probe;
  f.net.forward(in, velocity, full);  // fills the K/V cache

  // C1 from the library's classifier on the measured attention
  specdiff::three_level_classifier classify(0.75);
  classify.prepare(tokens);
  std::vector<std::int32_t> ids;
  for (int b = 0; b < batch; ++b) {
    specdiff::token_plan plan(tokens);
    std::vector<float> log_score(tokens);
    const std::vector<float> ones(tokens, 1.f), zeros(tokens, 0.f);
    specdiff::score_tokens(specdiff::specdiff_scorer{}, {.attention = std::span<const float>(probe).subspan(b * tokens, tokens), .future = ones,
                                                         .cache_count = zeros}, log_score);
    classify.classify(log_score, plan);
    ids.insert(ids.end(), plan.compute().begin(), plan.compute().end());
  }
  const int computed = static_cast<int>(ids.size()) / batch;
  REQUIRE(computed == 4);

  auto partial = [&](std::span<const float> latents) {
    sd3::kv_cache kv_copy = kv;
    std::vector<float> rows(batch * computed * features);
    sd3::forward_options o;
    o.kv = &kv_copy;
    o.image_tokens = ids;
    sd3::forward_inputs pin = in;
    pin.latents = latents;
    f.net.forward(pin, rows, o);
    return rows;
  };
  const auto reference = partial(f.noise);
  // Perturb every pixel of every token that is not in C1: if only C1 rows run (the others' keys and values
  // coming from the cache), the C1 outputs cannot change.
  auto perturbed = f.noise;
  std::vector<char> in_c1(batch * tokens, 0);
  for (int b = 0; b < batch; ++b)
    for (int i = 0; i < computed; ++i) in_c1[b * tokens + ids[b * computed + i]] = 1;
  for (int b = 0; b < batch; ++b)
    for (int ch = 0; ch < 2; ++ch)
      for (int y = 0; y < 8; ++y)
        for (int x = 0; x < 8; ++x)
          if (!in_c1[b * tokens + (y / 2) * 4 + x / 2]) perturbed[((b * 2 + ch) * 8 + y) * 8 + x] += 5.f;
  CHECK(partial(perturbed) == reference);
  // ... while perturbing a C1 token does change them
  auto touched = f.noise;
  const int token = ids[0];
  touched[((0 * 2 + 0) * 8 + (token / 4) * 2) * 8 + (token % 4) * 2] += 5.f;
  CHECK(partial(touched) != reference);
}
