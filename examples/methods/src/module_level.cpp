// Per-layer module caching (FORA, ToCa, TaylorSeer). On a full step every block runs and each module's
// output (before the gate) is cached per layer and stream; on the other steps the attention outputs are
// reused (FORA, ToCa) or forecast (TaylorSeer) from the library's cache store, and the MLP outputs are
// reused (FORA), forecast (TaylorSeer), or recomputed for the top tokens by attention·staleness (ToCa).
#include <algorithm>
#include <optional>
#include <utility>
#include <vector>

#include <specdiff/specdiff.hpp>

#include "methods/flops.hpp"
#include "methods/methods.hpp"

namespace methods {
namespace {

using specdiff::index_t;
// The cached modules of a block; attention2_site is MMDiT-X's image-only attention (dual-attention blocks only),
// which these methods cache and reuse with the joint attention.
constexpr int attention_site = 0, mlp_site = 1, attention2_site = 2, block_sites = 3;

// The modules whose image rows are cached, one accelerator slot each (its layer index, with one site): every
// block's attention and MLP, and the image-only attention of MMDiT-X blocks. Slots rather than (block, site)
// pairs because that attention exists in some blocks only, and the accelerator wants every (layer, site) it
// holds cached on a dense step.
struct cached_module {
  int layer, site;
};
std::vector<cached_module> cached_modules(const sd3::transformer& c) {
  std::vector<cached_module> modules;
  for (int l = 0; l < c.blocks(); ++l) {
    modules.push_back({l, attention_site});
    modules.push_back({l, mlp_site});
    if (c.sites(l).image_only_attention) modules.push_back({l, attention2_site});
  }
  return modules;
}

// Caller-side rows of one module site: [batch, stream tokens, hidden], the engine hooks' layout.
struct site_rows {
  std::vector<float> data;
  specdiff::matrix_view<float> view(int rows, int hidden) { return {data.data(), rows, hidden}; }
};

// One accelerator drives every method: a plan per step (ToCa: top-k tokens by attention·staleness; FORA
// and TaylorSeer: no token computed on partial steps), the cached image rows of every module (a slot each),
// the staleness. The engine's hooks read and write one buffer per module that persists across steps, so
// a reused row is already in place: FORA's and ToCa's partial steps copy nothing (reuse_in_place; ToCa's MLP
// rows not recomputed keep their latest value). Only TaylorSeer forecasts, from the store: its fills run on
// the engine's threads, and the context stream's rows (a few tokens, never planned) are forecast from a
// plain store beside the accelerator. `approx` is the accelerator's approximator.
template <class Accelerator>
run_result run_module(const problem& p, const module_cache_options& o, Accelerator& acc, const typename Accelerator::approximator_type& approx,
                      const progress_fn& progress) {
  using kind = module_cache_options::kind;
  sd3::transformer& net = *p.net;
  const sd3::transformer& c = net;
  const int batch = model_batch(p), ctx = p.inputs.context_tokens, hidden = c.hidden(), layers = c.blocks();
  const int tokens = image_tokens(p);
  const int image_rows = batch * tokens, context_rows = batch * ctx;
  const bool toca = o.method == kind::toca, forecast = o.method == kind::taylorseer;

  // Everything is allocated here, before the clock starts.
  const auto modules = cached_modules(c);
  std::vector<int> slot_of(static_cast<std::size_t>(layers * block_sites), -1);  // (block, site) -> accelerator slot
  for (std::size_t i = 0; i < modules.size(); ++i)
    slot_of[static_cast<std::size_t>(modules[i].layer * block_sites + modules[i].site)] = static_cast<int>(i);
  std::optional<specdiff::host_cache_store<float>> context_cache;
  if (forecast && ctx > 0) context_cache.emplace(specdiff::cache_shape{layers, 2, context_rows, hidden, Accelerator::approximator_type::depth});
  std::vector<site_rows> image(modules.size()), context(static_cast<std::size_t>(layers * 2));
  for (auto& s : image) s.data.assign(static_cast<std::size_t>(image_rows * hidden), 0.f);
  for (auto& s : context) s.data.assign(static_cast<std::size_t>(std::max(context_rows, 1) * hidden), 0.f);
  std::vector<sd3::block_hooks> hooks(static_cast<std::size_t>(layers));
  std::vector<index_t> all_context(static_cast<std::size_t>(context_rows));
  for (index_t i = 0; i < context_rows; ++i) all_context[static_cast<std::size_t>(i)] = i;
  std::vector<float> probe(toca ? static_cast<std::size_t>(image_rows) : 0);
  auto last = [&](int l) { return !c.sites(l).context_outputs; };  // SD3's last block: no context outputs to cache
  auto slot = [&](int l, int site) { return slot_of[static_cast<std::size_t>(l * block_sites + site)]; };
  auto image_view = [&](int l, int site) { return image[static_cast<std::size_t>(slot(l, site))].view(image_rows, hidden); };
  auto attention2_hook = [&](int l, sd3::module_mode mode) {
    return c.sites(l).image_only_attention ? sd3::module_hook{mode, image_view(l, attention2_site).data, {}} : sd3::module_hook{};
  };
  auto context_view = [&](int l, int site) { return context[static_cast<std::size_t>(l * 2 + site)].view(context_rows, hidden); };
  const sd3::flow_match_euler scheduler = p.schedule(p.steps);

  run_result r;
  const auto start = std::chrono::steady_clock::now();
  r.latents = sd3::sample_cfg(net, scheduler, p.inputs, p.guidance, [&](const sd3::model_call& call) {
    // TaylorSeer differentiates over step indices, as its code does: the tag falls by one per step (the
    // accelerator wants falling timesteps; its forecast is the same under this affine change of variable).
    const float tag = static_cast<float>(p.steps - call.step);
    auto step = [&] {
      stopwatch::scope s(r.overhead_seconds);
      return acc.plan_step(call.step, tag);
    }();
    sd3::forward_options options;
    options.blocks = hooks;
    if (step.dense()) {
      for (int l = 0; l < layers; ++l) {
        auto& h = hooks[static_cast<std::size_t>(l)];
        h.attention[0] = {sd3::module_mode::compute, image_view(l, attention_site).data, {}};
        h.mlp[0] = {sd3::module_mode::compute, image_view(l, mlp_site).data, {}};
        h.attention2 = attention2_hook(l, sd3::module_mode::compute);
        h.attention[1] = h.mlp[1] = {};
        if (!last(l)) {
          h.attention[1] = {sd3::module_mode::compute, context_view(l, attention_site).data, {}};
          h.mlp[1] = {sd3::module_mode::compute, context_view(l, mlp_site).data, {}};
        }
      }
      if (toca) options.attention_probe = probe;
      net.forward(*call.inputs, call.velocity, options);
      stopwatch::scope s(r.overhead_seconds);
      for (const auto& [l, site] : modules) {
        acc.cache_rows_in_place(step, slot(l, site), 0, image_view(l, site));
        if (context_cache && site != attention2_site && !last(l)) context_cache->write(l, site, tag, context_view(l, site));
      }
      if (toca) acc.complete_step(std::move(step), probe);
      else acc.complete_step(std::move(step), specdiff::attention_unchanged);
      r.flops += batch * full_forward_flops(c, tokens, ctx);
    } else {
      {
        stopwatch::scope s(r.overhead_seconds);
        if (forecast) {
          // Each (layer, site) fill reads the store and writes its own rows: one task each on the engine's team.
          net.team().run(static_cast<int>(modules.size()), [&](int i, int) {
            const auto [l, site] = modules[static_cast<std::size_t>(i)];
            acc.fill_all(step, i, 0, specdiff::level::approximate, image_view(l, site));
            if (context_cache && site != attention2_site && !last(l))
              context_cache->fill(l, site, tag, all_context, approx, context_view(l, site));
          });
        } else {
          // FORA: every row of both sites in place; ToCa: the attention rows in place, the MLP rows of tokens
          // not recomputed hold their latest value (the site is cached after the forward).
          for (const auto& [l, site] : modules)
            if (site != mlp_site || !toca) acc.reuse_in_place(step, slot(l, site), 0);
        }
        for (int l = 0; l < layers; ++l) {
          auto& h = hooks[static_cast<std::size_t>(l)];
          h.attention[0] = {sd3::module_mode::reuse, image_view(l, attention_site).data, {}};
          h.attention2 = attention2_hook(l, sd3::module_mode::reuse);
          h.mlp[0] = {toca ? sd3::module_mode::subset : sd3::module_mode::reuse, image_view(l, mlp_site).data,
                      toca ? step.compute_tokens() : std::span<const index_t>()};
          h.attention[1] = h.mlp[1] = {};
          if (!last(l)) {
            h.attention[1] = {sd3::module_mode::reuse, context_view(l, attention_site).data, {}};
            // ToCa recomputes the (few) context tokens' MLP; the others reuse it.
            h.mlp[1] = {toca ? sd3::module_mode::compute : sd3::module_mode::reuse, context_view(l, mlp_site).data, {}};
          }
        }
      }
      net.forward(*call.inputs, call.velocity, options);
      {
        stopwatch::scope s(r.overhead_seconds);
        if (toca)
          for (int l = 0; l < layers; ++l) acc.cache_rows_in_place(step, slot(l, mlp_site), 0, image_view(l, mlp_site));
        acc.complete_step(std::move(step), specdiff::attention_unchanged);  // ToCa scores with the last full step's attention
      }
      const int mlp_tokens = toca ? acc.partial_compute_count() : 0;
      r.flops += batch * forward_flops(c, tokens, ctx, tokens, [&](int) { return block_work{0, false, mlp_tokens, toca}; });
    }
    ++r.model_calls;
    if (progress) progress(r.model_calls, p.steps);
  });
  r.seconds = seconds_since(start);
  return r;
}

}  // namespace

run_result run_module_cache(const problem& p, const module_cache_options& o, const progress_fn& progress) {
  using kind = module_cache_options::kind;
  using rule = module_cache_options::forecast_rule;
  if (o.interval < 1) throw std::invalid_argument("interval: must be >= 1, got " + std::to_string(o.interval));
  if (o.method == kind::taylorseer && (o.order < 1 || o.order > 2)) throw std::invalid_argument("order: must be 1 or 2, got " + std::to_string(o.order));
  const sd3::transformer& c = *p.net;
  const int batch = model_batch(p);
  // ToCa shares one selection between the CFG halves (PixArt-ToCa's scores.py, lines 12-23: the halves'
  // maps averaged 0.5/0.5, the score repeated for both); here the accelerator scores the pair's mean attention.
  const bool share = o.method == kind::toca && o.share_cfg_plan && batch % 2 == 0 && p.guidance > 1.f;
  const specdiff::accelerator_config config{.tokens = image_tokens(p), .batch = batch, .steps = p.steps, .feature_dim = c.hidden(),
                                            .layers = static_cast<index_t>(cached_modules(c).size()), .sites = 1,
                                            .share_cfg_plan = share};
  // Full steps: the warm-up, then every `interval` steps ("dense" = full).
  const int warmup = std::max(o.warmup_steps, 1);
  const specdiff::step_schedule schedule{warmup, o.interval, 0, {}};
  switch (o.method) {
    case kind::toca: {
      specdiff::accelerator acc(config, specdiff::toca_scorer{o.starvation_scale}, specdiff::no_speculation{},
                                specdiff::top_k_classifier(o.cache_rate), schedule, specdiff::latest{});
      return run_module(p, o, acc, specdiff::latest{}, progress);
    }
    case kind::taylorseer: {
      auto with = [&](auto approximator) {
        specdiff::accelerator acc(config, specdiff::uniform_scorer{}, specdiff::no_speculation{}, specdiff::all_approximate_classifier{},
                                  schedule, approximator);
        return run_module(p, o, acc, approximator, progress);
      };
      // TaylorSeer-FLUX forms differences only on steps > first_enhance - 2 (taylor_utils/__init__.py, line
      // 19; first_enhance = the warm-up): the rows before step warmup - 2 start none. Tags are p.steps - step.
      const float oldest = static_cast<float>(p.steps - std::max(warmup - 2, 0));
      if (o.forecast == rule::polynomial) return o.order == 2 ? with(specdiff::taylor<2>{}) : with(specdiff::taylor<1>{});
      return o.order == 2 ? with(specdiff::taylorseer<2>{oldest}) : with(specdiff::taylorseer<1>{oldest});
    }
    default: {
      specdiff::accelerator acc(config, specdiff::uniform_scorer{}, specdiff::no_speculation{}, specdiff::all_reuse_classifier{}, schedule,
                                specdiff::latest{});
      return run_module(p, o, acc, specdiff::latest{}, progress);
    }
  }
}

}  // namespace methods
