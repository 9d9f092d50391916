// Per-layer module caching (FORA, ToCa, TaylorSeer). On a full step every block runs and each module's
// output (before the gate) is cached per layer and stream; on the other steps the attention outputs are
// reused (FORA, ToCa) or forecast (TaylorSeer) from the library's cache store, and the MLP outputs are
// reused (FORA), forecast (TaylorSeer), or recomputed for the top tokens by attention·staleness (ToCa).
#include <algorithm>

#include <specdiff/specdiff.hpp>

#include "methods/flops.hpp"
#include "methods/methods.hpp"

namespace methods {
namespace {

using specdiff::index_t;
constexpr int attention_site = 0, mlp_site = 1;

// Caller-side rows of one module site: [batch, stream tokens, hidden], the engine hooks' layout.
struct site_rows {
  std::vector<float> data;
  specdiff::matrix_view<float> view(int rows, int hidden) { return {data.data(), rows, hidden}; }
};

}  // namespace

run_result run_module_cache(const problem& p, const module_cache_options& o, const progress_fn& progress) {
  using kind = module_cache_options::kind;
  if (o.interval < 1) throw std::invalid_argument("interval: must be >= 1, got " + std::to_string(o.interval));
  if (o.method == kind::taylorseer && (o.order < 1 || o.order > 2)) throw std::invalid_argument("order: must be 1 or 2, got " + std::to_string(o.order));
  const auto start = std::chrono::steady_clock::now();
  sd3::transformer& net = *p.net;
  const auto& c = net.config();
  const int batch = model_batch(p), ctx = p.inputs.context_tokens, hidden = c.hidden(), layers = c.num_layers;
  const int tokens = image_tokens(p);
  const int image_rows = batch * tokens, context_rows = batch * ctx;
  // Forecasts need as many cached steps as the Taylor order + 1; reuse needs the latest only.
  const int depth = o.method == kind::taylorseer ? o.order + 1 : 1;
  specdiff::host_cache_store<float> image_cache({layers, 2, image_rows, hidden, depth});
  specdiff::host_cache_store<float> context_cache({layers, 2, std::max(context_rows, 1), hidden, depth});
  // Full steps: the warm-up, then every `interval` steps ("dense" = full).
  const specdiff::step_schedule schedule{std::max(o.warmup_steps, 1), o.interval, 0, {}};
  schedule.validate();

  std::vector<site_rows> image(static_cast<std::size_t>(layers * 2)), context(static_cast<std::size_t>(layers * 2));
  for (auto& s : image) s.data.assign(static_cast<std::size_t>(image_rows * hidden), 0.f);
  for (auto& s : context) s.data.assign(static_cast<std::size_t>(std::max(context_rows, 1) * hidden), 0.f);
  std::vector<sd3::block_hooks> hooks(static_cast<std::size_t>(layers));
  std::vector<index_t> all_image(static_cast<std::size_t>(image_rows)), all_context(static_cast<std::size_t>(context_rows));
  for (index_t i = 0; i < image_rows; ++i) all_image[static_cast<std::size_t>(i)] = i;
  for (index_t i = 0; i < context_rows; ++i) all_context[static_cast<std::size_t>(i)] = i;
  auto last = [&](int l) { return l + 1 == layers; };  // context_pre_only: no context outputs to cache

  // ToCa's token choice: scorer + top-k classifier per sample over the attention of the last full step.
  const bool toca = o.method == kind::toca;
  specdiff::toca_scorer scorer{o.starvation_scale};
  specdiff::top_k_classifier classifier(tokens, toca ? o.cache_rate : 0.0);
  std::vector<specdiff::token_plan> plans(static_cast<std::size_t>(batch), specdiff::token_plan(tokens));
  std::vector<float> probe(static_cast<std::size_t>(image_rows)), staleness(probe.size(), 0.f), scores(static_cast<std::size_t>(tokens));
  const int fresh = specdiff::math::compute_count(toca ? o.cache_rate : 0.0, tokens);
  std::vector<std::int32_t> fresh_ids(static_cast<std::size_t>(batch * fresh));
  std::vector<index_t> fresh_rows(fresh_ids.size());

  auto forecast = [&](auto& store, int l, int site, float tag, std::span<const index_t> rows_all, specdiff::matrix_view<float> out) {
    if (o.method == kind::taylorseer && o.order == 2) store.fill(l, site, tag, rows_all, specdiff::taylor<2>{}, out);
    else if (o.method == kind::taylorseer) store.fill(l, site, tag, rows_all, specdiff::taylor<1>{}, out);
    else store.fill_latest(l, site, rows_all, out);
  };

  run_result r;
  const sd3::flow_match_euler scheduler(p.steps, p.shift);
  r.latents = sd3::sample_cfg(net, scheduler, p.inputs, p.guidance, [&](const sd3::model_call& call) {
    // TaylorSeer differentiates over step indices, as its code does; reuse ignores the tag.
    const float tag = static_cast<float>(call.step);
    const bool full = schedule.is_dense(call.step, p.steps);
    sd3::forward_options options;
    options.blocks = hooks;
    if (full) {
      for (int l = 0; l < layers; ++l) {
        auto& h = hooks[static_cast<std::size_t>(l)];
        h.attention[0] = {sd3::module_mode::compute, image[static_cast<std::size_t>(l * 2 + attention_site)].data.data(), {}};
        h.mlp[0] = {sd3::module_mode::compute, image[static_cast<std::size_t>(l * 2 + mlp_site)].data.data(), {}};
        h.attention[1] = h.mlp[1] = {};
        if (!last(l)) {
          h.attention[1] = {sd3::module_mode::compute, context[static_cast<std::size_t>(l * 2 + attention_site)].data.data(), {}};
          h.mlp[1] = {sd3::module_mode::compute, context[static_cast<std::size_t>(l * 2 + mlp_site)].data.data(), {}};
        }
      }
      if (toca) options.attention_probe = probe;
      net.forward(*call.inputs, call.velocity, options);
      stopwatch::scope s(r.overhead_seconds);
      for (int l = 0; l < layers; ++l)
        for (int site : {attention_site, mlp_site}) {
          image_cache.write(l, site, tag, image[static_cast<std::size_t>(l * 2 + site)].view(image_rows, hidden));
          if (!last(l) && ctx > 0) context_cache.write(l, site, tag, context[static_cast<std::size_t>(l * 2 + site)].view(context_rows, hidden));
        }
      std::ranges::fill(staleness, 0.f);
      r.flops += batch * full_forward_flops(c, tokens, ctx);
    } else {
      {
        stopwatch::scope s(r.overhead_seconds);
        for (int l = 0; l < layers; ++l) {
          auto& h = hooks[static_cast<std::size_t>(l)];
          for (int site : {attention_site, mlp_site}) {
            forecast(image_cache, l, site, tag, all_image, image[static_cast<std::size_t>(l * 2 + site)].view(image_rows, hidden));
            if (!last(l) && ctx > 0) forecast(context_cache, l, site, tag, all_context, context[static_cast<std::size_t>(l * 2 + site)].view(context_rows, hidden));
          }
          h.attention[0] = {sd3::module_mode::reuse, image[static_cast<std::size_t>(l * 2 + attention_site)].data.data(), {}};
          h.mlp[0] = {sd3::module_mode::reuse, image[static_cast<std::size_t>(l * 2 + mlp_site)].data.data(), {}};
          h.attention[1] = h.mlp[1] = {};
          if (!last(l)) {
            h.attention[1] = {sd3::module_mode::reuse, context[static_cast<std::size_t>(l * 2 + attention_site)].data.data(), {}};
            // ToCa recomputes the (few) context tokens' MLP; the others reuse it.
            h.mlp[1] = {toca ? sd3::module_mode::compute : sd3::module_mode::reuse, context[static_cast<std::size_t>(l * 2 + mlp_site)].data.data(), {}};
          }
        }
        if (toca) {  // the fresh tokens: top (1 - CR)·N by attention of the last full step × staleness
          for (int b = 0; b < batch; ++b) {
            const std::span<const float> his(probe.data() + b * tokens, static_cast<std::size_t>(tokens));
            const std::span<const float> cf(staleness.data() + b * tokens, static_cast<std::size_t>(tokens));
            scorer.score({.attention = his, .cache_count = cf}, scores);
            auto& plan = plans[static_cast<std::size_t>(b)];
            classifier.classify(scores, plan);
            std::ranges::copy(plan.compute(), fresh_ids.begin() + b * fresh);
            for (int i = 0; i < fresh; ++i) fresh_rows[static_cast<std::size_t>(b * fresh + i)] = b * tokens + plan.compute()[static_cast<std::size_t>(i)];
            for (int i = 0; i < tokens; ++i)
              staleness[static_cast<std::size_t>(b * tokens + i)] = plan.levels()[static_cast<std::size_t>(i)] == specdiff::level::compute ? 0.f : staleness[static_cast<std::size_t>(b * tokens + i)] + 1.f;
          }
          for (int l = 0; l < layers; ++l) {
            auto& mlp = hooks[static_cast<std::size_t>(l)].mlp[0];
            mlp.mode = sd3::module_mode::subset;
            mlp.tokens = fresh_ids;
          }
        }
      }
      net.forward(*call.inputs, call.velocity, options);
      if (toca) {
        stopwatch::scope s(r.overhead_seconds);
        for (int l = 0; l < layers; ++l) {
          image_cache.write_rows(l, mlp_site, tag, fresh_rows, image[static_cast<std::size_t>(l * 2 + mlp_site)].view(image_rows, hidden));
          if (!last(l) && ctx > 0) context_cache.write(l, mlp_site, tag, context[static_cast<std::size_t>(l * 2 + mlp_site)].view(context_rows, hidden));
        }
      }
      const int mlp_tokens = toca ? fresh : 0;
      r.flops += batch * forward_flops(c, tokens, ctx, tokens, [&](int) { return block_work{0, false, mlp_tokens, toca}; });
    }
    ++r.model_calls;
    if (progress) progress(r.model_calls, p.steps);
  });
  r.seconds = seconds_since(start);
  return r;
}

}  // namespace methods
