// Step-level caching: First-Block cache / DBCache and TeaCache. The engine's block-boundary callback
// (sd3::forward_options::between_blocks) shows the hidden states between blocks; this file measures the
// proxy's relative change (specdiff::relative_l1), asks specdiff::relative_change_gate whether the step
// computes, and on a skipped step adds the cached residual and jumps over the blocks.
//
// Sources (commits in docs/methods.md):
//   diffusers src/diffusers/hooks/first_block_cache.py @58eb52c: head residual out0 - in0 (85-87), gate (134-142),
//     skip = out0 + tail residual (94-101), tail residual = out_last - out0 stored on computed steps (170-180).
//   cache-dit src/cache_dit/caching/cache_blocks/pattern_base.py @f86744a: Fn residual = hidden after Fn - hidden
//     before block 0 (195, 233), middle residual = out_M - in_M for both streams (414-418).
//   TeaCache TeaCache4FLUX/teacache_flux.py @7c10efc: proxy = block 0's norm1 output (106-108), previous proxy
//     kept every step (121), skip = hidden + previous residual (128), residual = final hidden - block 0's input
//     (130, 214).
#include <algorithm>
#include <cmath>
#include <limits>

#include <specdiff/step_cache.hpp>

#include "methods/flops.hpp"
#include "methods/methods.hpp"

namespace methods {
namespace {

constexpr double unknown_change = std::numeric_limits<double>::infinity();  // no reference yet: the gate computes

// FLOPs of one sample's forward that runs blocks [0, first_skipped) and [resume, layers), plus the modulation of
// block `first_skipped` (the engine computes it before the boundary callback that decides the skip).
double skipping_forward_flops(const sd3::transformer& c, int tokens, int ctx, int first_skipped, int resume) {
  double f = outer_flops(c, ctx, tokens);
  const block_work full{tokens, true, tokens, true}, modulation_only{0, false, 0, false};
  for (int l = 0; l < c.blocks(); ++l) {
    if (l < first_skipped || l >= resume) f += block_flops(c, tokens, ctx, l, full);
    else if (l == first_skipped) f += block_flops(c, tokens, ctx, l, modulation_only);
  }
  return f;
}

void add(std::span<float> x, std::span<const float> y) {
  for (std::size_t i = 0; i < x.size(); ++i) x[i] += y[i];
}
void subtract(std::span<const float> x, std::span<const float> y, std::span<float> out) {
  for (std::size_t i = 0; i < x.size(); ++i) out[i] = x[i] - y[i];
}

// SD3's norm1 for the image stream: LayerNorm without affine, eps 1e-6, then (1 + scale) and shift from the
// block's AdaLN-Zero chunks (shift_msa, scale_msa are the first two) — TeaCache's proxy.
void modulated_input(std::span<const float> x, std::span<const float> modulation, int batch, int hidden, std::span<float> out) {
  const std::size_t d = static_cast<std::size_t>(hidden), rows = x.size() / d, per_sample = rows / static_cast<std::size_t>(batch);
  const std::size_t chunks = modulation.size() / static_cast<std::size_t>(batch);  // 6D, or 9D in an MMDiT-X block
  for (std::size_t r = 0; r < rows; ++r) {
    const float* row = x.data() + r * d;
    const float* shift = modulation.data() + (r / per_sample) * chunks;
    const float* scale = shift + d;
    double mean = 0, var = 0;
    for (std::size_t i = 0; i < d; ++i) mean += row[i];
    mean /= static_cast<double>(d);
    for (std::size_t i = 0; i < d; ++i) var += (row[i] - mean) * (row[i] - mean);
    const double rstd = 1.0 / std::sqrt(var / static_cast<double>(d) + 1e-6);
    for (std::size_t i = 0; i < d; ++i)
      out[r * d + i] = static_cast<float>((row[i] - mean) * rstd) * (1.f + scale[i]) + shift[i];
  }
}

// The per-step driver both methods share: the sampler's model call sets `step`, runs one hooked forward whose
// boundary callback is `decide` (which clears `computing` on a skipped step); the step's cost is what ran.
template <class Boundary, class StepFlops>
run_result run_with_boundary(const problem& p, std::chrono::steady_clock::time_point start, int& step, bool& computing, Boundary&& decide,
                             StepFlops&& skipped_step_flops, const progress_fn& progress) {
  sd3::transformer& net = *p.net;
  const sd3::transformer& c = net;
  const int batch = model_batch(p), tokens = image_tokens(p), ctx = p.inputs.context_tokens;
  run_result r;
  sd3::forward_options options;
  options.between_blocks = [&](const sd3::block_boundary& b) {
    stopwatch::scope s(r.overhead_seconds);
    return decide(b);
  };
  const sd3::flow_match_euler scheduler = p.schedule(p.steps);
  r.latents = sd3::sample_cfg(net, scheduler, p.inputs, p.guidance, [&](const sd3::model_call& call) {
    step = call.step;
    computing = true;
    net.forward(*call.inputs, call.velocity, options);
    if (computing) {
      r.flops += batch * full_forward_flops(c, tokens, ctx);
      ++r.model_calls;
    } else {
      r.flops += batch * skipped_step_flops();
    }
    if (progress) progress(call.step + 1, p.steps);
  });
  r.seconds = seconds_since(start);
  return r;
}

}  // namespace

run_result run_fbcache(const problem& p, const fbcache_options& o, const progress_fn& progress) {
  const sd3::transformer& c = *p.net;
  const int layers = c.blocks();
  if (o.front_blocks < 1) throw std::invalid_argument("front_blocks: must be >= 1, got " + std::to_string(o.front_blocks));
  if (o.back_blocks < 0) throw std::invalid_argument("back_blocks: must be >= 0, got " + std::to_string(o.back_blocks));
  if (o.front_blocks + o.back_blocks >= layers)
    throw std::invalid_argument("front_blocks + back_blocks: must leave a middle block of num_layers = " + std::to_string(layers) +
                                ", got " + std::to_string(o.front_blocks) + " + " + std::to_string(o.back_blocks));
  specdiff::gate_options g;
  g.threshold = o.threshold;
  g.warmup_steps = o.warmup_steps;
  g.max_consecutive_skips = o.max_consecutive_skips;
  g.max_skips = o.max_skips;
  specdiff::relative_change_gate gate(g);  // checks the gate's options by name

  // Caches, sized before the clock: the hidden states before block 0, the front residual now and at the last
  // computed step, the middle blocks' input and cached residual for both streams.
  const int batch = model_batch(p), tokens = image_tokens(p), ctx = p.inputs.context_tokens, hidden = c.hidden();
  const std::size_t image_size = static_cast<std::size_t>(batch) * tokens * hidden, context_size = static_cast<std::size_t>(batch) * ctx * hidden;
  std::vector<float> block0_in(image_size), front(image_size), front_prev(image_size), middle_in(image_size), middle(image_size, 0.f);
  std::vector<float> middle_in_ctx(context_size), middle_ctx(context_size, 0.f);
  const int resume = layers - o.back_blocks;  // the first back block (layers: straight to the final layer)
  bool has_prev = false, computing = true;
  int step = 0;

  const auto start = std::chrono::steady_clock::now();
  auto decide = [&](const sd3::block_boundary& b) {
    if (b.next_layer == 0) {
      std::copy(b.image.begin(), b.image.end(), block0_in.begin());
    } else if (b.next_layer == o.front_blocks) {
      subtract(b.image, block0_in, front);
      computing = gate.advance(step, p.steps, has_prev ? specdiff::relative_l1(front, front_prev) : unknown_change);
      if (!computing) {
        add(b.image, middle);
        add(b.context, middle_ctx);
        return resume;
      }
      front.swap(front_prev);  // the reference is the last *computed* step's residual
      has_prev = true;
      std::copy(b.image.begin(), b.image.end(), middle_in.begin());
      std::copy(b.context.begin(), b.context.end(), middle_in_ctx.begin());
    } else if (b.next_layer == resume && computing) {
      subtract(b.image, middle_in, middle);
      subtract(b.context, middle_in_ctx, middle_ctx);
    }
    return b.next_layer;
  };
  return run_with_boundary(p, start, step, computing, decide,
                           [&] { return skipping_forward_flops(c, tokens, ctx, o.front_blocks, resume); }, progress);
}

run_result run_teacache(const problem& p, const teacache_options& o, const progress_fn& progress) {
  specdiff::gate_options g;
  g.threshold = o.threshold;
  g.accumulate = true;
  g.compute_last = true;
  g.max_consecutive_skips = o.max_consecutive_skips;
  g.rescale = o.rescale == teacache_options::rescale_kind::flux ? specdiff::change_rescale::teacache_flux()
                                                                 : specdiff::change_rescale::identity();
  specdiff::relative_change_gate gate(g);

  const sd3::transformer& c = *p.net;
  const int layers = c.blocks(), batch = model_batch(p), tokens = image_tokens(p), ctx = p.inputs.context_tokens, hidden = c.hidden();
  const std::size_t image_size = static_cast<std::size_t>(batch) * tokens * hidden;
  std::vector<float> proxy(image_size), proxy_prev(image_size), block0_in(image_size), residual(image_size, 0.f);
  bool has_prev = false, computing = true;
  int step = 0;

  const auto start = std::chrono::steady_clock::now();
  auto decide = [&](const sd3::block_boundary& b) {
    if (b.next_layer == 0) {
      modulated_input(b.image, b.modulation, batch, hidden, proxy);
      const double change = has_prev ? specdiff::relative_l1(proxy, proxy_prev) : unknown_change;
      proxy.swap(proxy_prev);  // the previous step's proxy, computed or skipped
      has_prev = true;
      computing = gate.advance(step, p.steps, change);
      if (!computing) {
        add(b.image, residual);
        return layers;
      }
      std::copy(b.image.begin(), b.image.end(), block0_in.begin());
    } else if (b.next_layer == layers && computing) {
      subtract(b.image, block0_in, residual);
    }
    return b.next_layer;
  };
  return run_with_boundary(p, start, step, computing, decide, [&] { return skipping_forward_flops(c, tokens, ctx, 0, layers); }, progress);
}

}  // namespace methods
