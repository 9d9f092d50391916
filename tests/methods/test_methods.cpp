// Invariants of the methods on a small random SD3 model: every method at its "no caching" setting is full
// RFlow bit for bit; the speculative pass is a plain sampling from the same noise and conditioning; a
// partial forward runs only the C1 rows through the network.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <specdiff/specdiff.hpp>

#include "methods/flops.hpp"
#include "methods/methods.hpp"
#include "sampling_inputs.hpp"
#include "sd3/model.hpp"

namespace {

using methods_testing::small_config;

// An MMDiT-X (SD3.5-medium) model: blocks 0 and 2 of 3 have the second, image-only attention.
sd3::transformer_config mmditx_config() {
  auto c = small_config();
  c.dual_attention_layers = {0, 2};
  return c;
}

// Fresh inputs each run (the seed is printed on failure), on a random SD3 model or (a flux_config) FLUX model.
template <class Model = sd3::model>
struct model_fixture : methods_testing::sampling_inputs {
  Model model;
  sd3::transformer net;

  template <class Config = sd3::transformer_config>
  explicit model_fixture(const Config& c = small_config())
      : sampling_inputs(std::random_device{}()), model(Model::random(c, seed)), net(model, {4, 8, 8, 3}, 1) {}
  methods::problem problem(int steps = 8) { return problem_on(net, steps); }
};
using fixture = model_fixture<>;
using flux_fixture = model_fixture<sd3::flux_model>;

using kind = methods::module_cache_options::kind;

template <class Fixture>
void check_no_caching_is_full(Fixture& f) {
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

template <class Fixture>
void check_caching_saves_work(Fixture& f) {
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
  const auto& c = f.net;
  CHECK(methods::subset_forward_flops(c, 16, 3, 16) == methods::full_forward_flops(c, 16, 3));
  CHECK(methods::subset_forward_flops(c, 16, 3, 4) < methods::full_forward_flops(c, 16, 3));
}

}  // namespace

TEST_CASE("every method at its no-caching setting reproduces full RFlow bit for bit") {
  fixture f;
  check_no_caching_is_full(f);
}
TEST_CASE("mmditx: every method at its no-caching setting reproduces full RFlow bit for bit") {
  fixture f(mmditx_config());
  check_no_caching_is_full(f);
}
TEST_CASE("flux: every method at its no-caching setting reproduces full RFlow bit for bit") {
  flux_fixture f(methods_testing::small_flux_config());
  check_no_caching_is_full(f);
}
TEST_CASE("caching changes the result, and less work is counted") {
  fixture f;
  check_caching_saves_work(f);
}
TEST_CASE("mmditx: caching changes the result, and less work is counted") {
  fixture f(mmditx_config());
  check_caching_saves_work(f);
}

TEST_CASE("flux: caching changes the result, and less work is counted") {
  flux_fixture f(methods_testing::small_flux_config());
  check_caching_saves_work(f);
}

TEST_CASE("FLOP accounting of FLUX blocks, by hand") {
  // D = 32, 4 image tokens of which 2 computed, 2 context tokens.
  const auto c = methods_testing::small_flux_config();
  const methods::block_work half{2, true, 2, true};
  // double-stream: modulation 2*2*32*192, q/k/v (2+2)*2*32*96, QK^T and PV 2*2*4*6*32, outputs 4*2*32*32,
  // MLPs (2+2)*2*2*32*128
  CHECK(methods::block_flops(c, 4, 2, 0, half) == 24576 + 24576 + 3072 + 8192 + 65536);
  // single-stream: one modulation 2*32*96, then the same token work (proj_out's halves instead of to_out and ff.net.2)
  CHECK(methods::block_flops(c, 4, 2, 1, half) == 6144 + 24576 + 3072 + 8192 + 65536);
  // outside: x_embedder 2*4*8*32, timestep MLP 2*(256*32+32*32), pooled 2*(10*32+32*32), context 2*2*12*32,
  // norm_out 2*32*64, proj_out 2*4*32*8
  CHECK(methods::outer_flops(c, 2, 4) == 2048 + 18432 + 2688 + 1536 + 4096 + 2048);
  auto guided = c;
  guided.guidance_embeds = true;
  CHECK(methods::outer_flops(guided, 2, 4) == 2048 + 2 * 18432 + 2688 + 1536 + 4096 + 2048);
}

TEST_CASE("FLOP accounting of an MMDiT-X block, by hand") {
  sd3::transformer_config c;
  c.num_layers = 2;
  c.num_attention_heads = 2;
  c.attention_head_dim = 4;  // D = 8
  c.caption_projection_dim = 8;
  c.dual_attention_layers = {0};
  const methods::block_work all{4, true, 4, true};
  // Block 0 with 4 image and 2 context tokens, 2 FLOPs per multiply-add:
  //   modulation 2*8*(9*8) + 2*8*(6*8) = 1152 + 768; joint attention: q, k, v of 6 tokens 2*6*8*24 = 2304,
  //   QK^T and PV 2*2*6*6*8 = 1152, to_out and to_add_out 2*6*8*8 = 768; image-only attention: 2*4*8*24 = 1536,
  //   2*2*4*4*8 = 512, 2*4*8*8 = 512; feed-forwards 2*2*4*8*32 = 4096 and 2*2*2*8*32 = 2048.
  CHECK(methods::block_flops(c, 4, 2, 0, all) == 1152 + 768 + 2304 + 1152 + 768 + 1536 + 512 + 512 + 4096 + 2048);
  // Block 1 (last, no second attention): modulation 2*8*48 + 2*8*16, attention as above but to_out for the image
  // rows only (2*4*8*8 = 512), the image feed-forward only.
  CHECK(methods::block_flops(c, 4, 2, 1, all) == 768 + 256 + 2304 + 1152 + 512 + 4096);
  // Reused attention modules: neither attention is counted, the modulation is.
  CHECK(methods::block_flops(c, 4, 2, 0, methods::block_work{0, false, 4, true}) == 1152 + 768 + 4096 + 2048);
}

TEST_CASE("ranking variants: his*star pays for the pass but ignores it, round-robin runs no pass") {
  fixture f;
  INFO("seed ", f.seed);
  const auto p = f.problem();
  using rank = methods::specdiff_options::ranking;
  methods::specdiff_options o;
  o.cache_rate = 0.75;
  const auto paper = methods::run_specdiff(p, o);
  o.rank = rank::no_future;
  const auto no_future = methods::run_specdiff(p, o);
  o.rank = rank::round_robin;
  const auto round_robin = methods::run_specdiff(p, o);
  auto without_pass = o;
  without_pass.rank = rank::specdiff;
  without_pass.spec_steps = 0;
  const auto no_pass = methods::run_specdiff(p, without_pass);
  // his*star with the pass ranks exactly as S = 0 (future factor 1) does, at the pass's price.
  CHECK(no_future.latents == no_pass.latents);
  CHECK(no_future.flops == paper.flops);
  CHECK(no_future.model_calls == paper.model_calls);
  CHECK(no_future.latents != paper.latents);
  // Staleness alone: no pass, so the FLOPs of S = 0, and another choice of tokens.
  CHECK(round_robin.model_calls == p.steps);
  CHECK(round_robin.flops == no_pass.flops);
  CHECK(round_robin.speculative_seconds == 0.0);
  CHECK(round_robin.latents != no_pass.latents);
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
    const sd3::flow_match_euler main = p.schedule(p.steps);
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
  sd3::forward_inputs in{.batch = batch, .height = 8, .width = 8, .context_tokens = 3, .latents = f.noise, .timesteps = t, .context = f.context, .pooled = f.pooled};
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

// --- the peers as their authors built them -------------------------------------------------------------

namespace {

double max_abs_difference(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(static_cast<double>(a[i]) - b[i]));
  return m;
}

// TaylorSeer as its authors' code runs it (TaylorSeer-FLUX: cal_type.py, taylor_utils/__init__.py), written
// independently of the library: per (layer, stream, module) a list of Taylor factors over every row, updated on
// each full step from the previous list, expanded on the other steps; the engine's hooks compute or reuse.
std::vector<float> taylorseer_twin(const methods::problem& p, int first_enhance, int interval, int max_order) {
  sd3::transformer& net = *p.net;
  const auto& c = net.config();
  const int batch = methods::model_batch(p), layers = c.num_layers, hidden = c.hidden();
  const int rows[2] = {batch * methods::image_tokens(p), batch * p.inputs.context_tokens};
  struct module {
    std::vector<float> out;                   // what the hook computes into or reuses from
    std::vector<std::vector<double>> factors;  // factors[i]: the order-i factor of every value
  };
  std::vector<module> modules(static_cast<std::size_t>(layers * 4));  // [layer][stream][attention, mlp]
  auto at = [&](int l, int stream, int site) -> module& { return modules[static_cast<std::size_t>((l * 2 + stream) * 2 + site)]; };
  for (int l = 0; l < layers; ++l)
    for (int stream : {0, 1})
      for (int site : {0, 1}) at(l, stream, site).out.assign(static_cast<std::size_t>(rows[stream] * hidden), 0.f);
  std::vector<sd3::block_hooks> hooks(static_cast<std::size_t>(layers));
  std::vector<int> activated;  // full steps so far
  int counter = 0;
  const sd3::flow_match_euler scheduler = p.schedule(p.steps);
  return sd3::sample_cfg(net, scheduler, p.inputs, p.guidance, [&](const sd3::model_call& call) {
    const int step = call.step;
    const bool full = step < first_enhance || counter == interval - 1;
    counter = full ? 0 : counter + 1;
    if (full) activated.push_back(step);
    for (int l = 0; l < layers; ++l) {
      auto& h = hooks[static_cast<std::size_t>(l)];
      const auto mode = full ? sd3::module_mode::compute : sd3::module_mode::reuse;
      for (int stream : {0, 1}) {
        if (stream == 1 && l + 1 == layers) {  // context_pre_only
          h.attention[1] = h.mlp[1] = {};
          continue;
        }
        for (int site : {0, 1}) {
          module& m = at(l, stream, site);
          if (!full) {  // taylor_formula: sum_i F_i x^i / i!, x = steps since the last full step
            const double x = step - activated.back();
            for (std::size_t v = 0; v < m.out.size(); ++v) {
              double y = 0, power = 1;
              for (std::size_t i = 0; i < m.factors.size(); ++i, power *= x / static_cast<double>(i)) y += m.factors[i][v] * power;
              m.out[v] = static_cast<float>(y);
            }
          }
          (site == 0 ? h.attention : h.mlp)[stream] = {mode, m.out.data(), {}};
        }
      }
    }
    sd3::forward_options options;
    options.blocks = hooks;
    net.forward(*call.inputs, call.velocity, options);
    if (!full) return;
    for (auto& m : modules) {  // derivative_approximation
      std::vector<std::vector<double>> updated{std::vector<double>(m.out.begin(), m.out.end())};
      for (int i = 0; i < max_order; ++i) {
        if (static_cast<int>(m.factors.size()) <= i || !(step > first_enhance - 2)) break;
        const double gap = activated.back() - activated[activated.size() - 2];
        std::vector<double> next(m.out.size());
        for (std::size_t v = 0; v < next.size(); ++v) next[v] = (updated[static_cast<std::size_t>(i)][v] - m.factors[static_cast<std::size_t>(i)][v]) / gap;
        updated.push_back(std::move(next));
      }
      m.factors = std::move(updated);
    }
  });
}

}  // namespace

TEST_CASE("TaylorSeer runs as its authors' code: finite differences over full steps, each divided by the last gap") {
  fixture f;
  INFO("seed ", f.seed);
  const auto p = f.problem(14);
  for (int order : {1, 2})
    for (int warmup : {1, 3}) {
      INFO("order ", order, " warm-up ", warmup);
      methods::module_cache_options o;
      o.method = kind::taylorseer;
      o.interval = 4;
      o.warmup_steps = warmup;
      o.order = order;
      const auto twin = taylorseer_twin(p, warmup, o.interval, order);
      const auto ours = methods::run_module_cache(p, o);
      double scale = 0;
      for (float x : twin) scale = std::max(scale, static_cast<double>(std::abs(x)));
      CHECK(max_abs_difference(ours.latents, twin) <= 1e-4 * scale);
      if (order == 2) {  // the polynomial rule (0.2's) is a different forecast
        o.forecast = methods::module_cache_options::forecast_rule::polynomial;
        CHECK(max_abs_difference(methods::run_module_cache(p, o).latents, twin) > 1e-3 * scale);
        // the forecast fills split over the engine's threads give what one thread gives
        o.forecast = methods::module_cache_options::forecast_rule::authors;
        f.net.set_threads(3);
        const auto threaded = methods::run_module_cache(p, o);
        f.net.set_threads(1);
        CHECK(max_abs_difference(threaded.latents, twin) <= 1e-4 * scale);
      }
    }
}

namespace {

// RAS as its authors' scheduler runs it (microsoft/RAS, ras_scheduling_flow_match_euler_discrete.py), written
// independently of the library: after each step the per-token metric (mean over the patch of the L2 norm across
// channels of the guided velocity, or of each half averaged) times exp(scale * drop count) is sorted; the
// lowest and highest tokens are cached (their last output reused), the rest computed next step on a
// token-subset forward; the drop count grows each time a token is cached (cumulative) or restarts when it is
// computed. Dense steps: before `warmup` and at `resets`.
std::vector<float> ras_twin(const methods::problem& p, const methods::ras_options& o) {
  sd3::transformer& net = *p.net;
  const auto& c = net.config();
  const int batch = methods::model_batch(p), pairs = batch / 2, tokens = methods::image_tokens(p), features = c.patch_features();
  const int pixels = c.patch_size * c.patch_size, channels = c.out_channels;
  const int computed = specdiff::math::compute_count(o.cache_rate, tokens), cached = tokens - computed;
  const int high = static_cast<int>(std::floor(cached * o.high_ratio));
  const bool guided = o.metric_on == methods::ras_options::metric_input::guided;
  const bool cumulative = o.drop_count == methods::ras_options::drop_count_rule::cumulative;
  sd3::kv_cache kv(c, batch, tokens);
  std::vector<float> rows(static_cast<std::size_t>(batch * tokens * features)), compact(rows.size());
  std::vector<float> drop(static_cast<std::size_t>(pairs * tokens), 0.f), score(static_cast<std::size_t>(tokens));
  std::vector<std::vector<std::int32_t>> compute_ids(static_cast<std::size_t>(pairs));
  std::vector<char> is_computed(static_cast<std::size_t>(pairs * tokens), 1);
  auto norm = [&](const float* u, const float* v, double g) {  // the patch metric of u + g (v - u)
    double sum = 0;
    for (int px = 0; px < pixels; ++px) {
      double sq = 0;
      for (int ch = 0; ch < channels; ++ch) {
        const int k = px * channels + ch;
        const double x = static_cast<float>(u[k] + static_cast<float>(g) * (v[k] - u[k]));
        sq += x * x;
      }
      sum += std::sqrt(sq);
    }
    return static_cast<float>(sum / pixels);
  };
  const sd3::flow_match_euler scheduler = p.schedule(p.steps);
  return sd3::sample_cfg(net, scheduler, p.inputs, p.guidance, [&](const sd3::model_call& call) {
    const bool dense = call.step < o.warmup_steps || std::find(o.reset_steps.begin(), o.reset_steps.end(), call.step) != o.reset_steps.end();
    sd3::forward_options options;
    options.kv = &kv;
    if (dense) {
      net.forward(*call.inputs, call.velocity, options);
      sd3::image_to_patches(c, batch, p.inputs.height, p.inputs.width, channels, {}, call.velocity, rows);
      std::fill(is_computed.begin(), is_computed.end(), char{1});
      if (!cumulative) std::fill(drop.begin(), drop.end(), 0.f);
    } else {
      std::vector<std::int32_t> ids;
      for (int b = 0; b < batch; ++b) ids.insert(ids.end(), compute_ids[static_cast<std::size_t>(b % pairs)].begin(), compute_ids[static_cast<std::size_t>(b % pairs)].end());
      options.image_tokens = ids;
      net.forward(*call.inputs, std::span<float>(compact.data(), ids.size() * static_cast<std::size_t>(features)), options);
      for (std::size_t r = 0; r < ids.size(); ++r) {  // computed rows in place; the cached ones keep their last output
        const std::size_t b = r / static_cast<std::size_t>(computed);
        std::copy_n(compact.begin() + static_cast<std::ptrdiff_t>(r * static_cast<std::size_t>(features)), features,
                    rows.begin() + static_cast<std::ptrdiff_t>((b * static_cast<std::size_t>(tokens) + static_cast<std::size_t>(ids[r])) * static_cast<std::size_t>(features)));
      }
      for (int q = 0; q < pairs; ++q)
        for (int t = 0; t < tokens; ++t) {
          float& d = drop[static_cast<std::size_t>(q * tokens + t)];
          if (!is_computed[static_cast<std::size_t>(q * tokens + t)]) d += 1.f;
          else if (!cumulative) d = 0.f;
        }
      sd3::patches_to_image(c, batch, p.inputs.height, p.inputs.width, channels, {}, rows, call.velocity);
    }
    // the selection for the next step
    for (int q = 0; q < pairs; ++q) {
      for (int t = 0; t < tokens; ++t) {
        const float* u = rows.data() + static_cast<std::size_t>((q * tokens + t) * features);
        const float* v = rows.data() + static_cast<std::size_t>(((q + pairs) * tokens + t) * features);
        const float m = guided ? norm(u, v, p.guidance) : 0.5f * (norm(u, u, 0) + norm(v, v, 0));
        score[static_cast<std::size_t>(t)] = std::log(std::max(m, 1e-30f)) + o.starvation_scale * drop[static_cast<std::size_t>(q * tokens + t)];
      }
      std::vector<int> order(static_cast<std::size_t>(tokens));
      for (int t = 0; t < tokens; ++t) order[static_cast<std::size_t>(t)] = t;
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return score[static_cast<std::size_t>(a)] > score[static_cast<std::size_t>(b)]; });
      auto& ids = compute_ids[static_cast<std::size_t>(q)];
      ids.clear();
      for (int r = 0; r < tokens; ++r) {
        const bool keep = r < high || r >= tokens - (cached - high);
        is_computed[static_cast<std::size_t>(q * tokens + order[static_cast<std::size_t>(r)])] = !keep;
        if (!keep) ids.push_back(order[static_cast<std::size_t>(r)]);
      }
      std::sort(ids.begin(), ids.end());
    }
  });
}

}  // namespace

TEST_CASE("RAS runs as its authors' scheduler: metric on the guided output, drop count never reset (and 0.2's options)") {
  fixture f;
  INFO("seed ", f.seed);
  const auto p = f.problem(10);
  using input = methods::ras_options::metric_input;
  using count = methods::ras_options::drop_count_rule;
  std::vector<std::vector<float>> results;
  for (input in : {input::guided, input::halves_mean})
    for (count dc : {count::cumulative, count::since_computed}) {
      methods::ras_options o;
      o.cache_rate = 0.5;
      o.warmup_steps = 2;
      o.reset_steps = {6};
      o.starvation_scale = 0.7f;
      o.metric_on = in;
      o.drop_count = dc;
      INFO("guided ", in == input::guided, " cumulative ", dc == count::cumulative);
      const auto ours = methods::run_ras(p, o);
      CHECK(ours.latents == ras_twin(p, o));
      results.push_back(ours.latents);
    }
  // the options change the selection: guided vs halves_mean (cumulative), cumulative vs since_computed (guided)
  CHECK(results[0] != results[2]);
  CHECK(results[0] != results[1]);
}

TEST_CASE("ToCa shares one selection between the CFG halves by default, per-half plans stay an option") {
  fixture f;
  INFO("seed ", f.seed);
  const auto p = f.problem(10);
  methods::module_cache_options o;
  o.method = kind::toca;
  o.interval = 3;
  o.warmup_steps = 2;
  o.cache_rate = 0.5;
  CHECK(o.share_cfg_plan);
  const auto shared = methods::run_module_cache(p, o);
  o.share_cfg_plan = false;
  const auto separate = methods::run_module_cache(p, o);
  CHECK(shared.latents != separate.latents);
  CHECK(shared.flops == separate.flops);  // the same number of tokens recomputed either way
  // when the two halves see the same conditioning their attention is the same, and so are both plans
  auto same = p;
  same.inputs.negative_context = same.inputs.context;
  same.inputs.negative_pooled = same.inputs.pooled;
  o.share_cfg_plan = true;
  const auto a = methods::run_module_cache(same, o);
  o.share_cfg_plan = false;
  CHECK(methods::run_module_cache(same, o).latents == a.latents);
}

TEST_CASE("timing: seconds cover sampling, speculative_seconds is SpecDiff's speculative pass inside them") {
  fixture f;
  INFO("seed ", f.seed);
  const auto p = f.problem();
  const auto sd = methods::run_specdiff(p, methods::specdiff_options{});
  CHECK(sd.speculative_seconds > 0.0);
  CHECK(sd.speculative_seconds < sd.seconds);
  methods::specdiff_options none;
  none.spec_steps = 0;
  CHECK(methods::run_specdiff(p, none).speculative_seconds == 0.0);
  CHECK(methods::run_ras(p, methods::ras_options{}).speculative_seconds == 0.0);
  CHECK(methods::run_module_cache(p, methods::module_cache_options{}).speculative_seconds == 0.0);
  CHECK(methods::run_full(p).speculative_seconds == 0.0);
}
