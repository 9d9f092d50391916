// The sampling problem the methods tests share: fresh noise and conditioning for a CFG batch of 2 samples
// (2 x 8 x 8 latents, 3 context tokens of 12, pooled rows of 10: the suites' small model configs).
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "../engine/engine_fixture.hpp"
#include "methods/run.hpp"
#include "sd3/config.hpp"
#include "sd3/flux_model.hpp"

namespace methods_testing {

/// The model the inputs fit: 8x8 latents of 2 channels, patch 2 (16 image tokens), 2 heads of 16.
inline sd3::transformer_config small_config(int layers = 3) {
  sd3::transformer_config c;
  c.sample_size = 8;
  c.patch_size = 2;
  c.in_channels = c.out_channels = 2;
  c.num_layers = layers;
  c.attention_head_dim = 16;
  c.num_attention_heads = 2;
  c.joint_attention_dim = 12;
  c.caption_projection_dim = 32;
  c.pooled_projection_dim = 10;
  c.pos_embed_max_size = 8;
  return c;
}

/// A FLUX model the same inputs fit: the engine suites' small FLUX model (the 8x8x2 latents packed 2 x 2 into a
/// 4 x 4 grid of 8-channel tokens: 16 image tokens), without the guidance embedding (guided by CFG).
inline sd3::flux_config small_flux_config() {
  sd3::flux_config c = test_util::small_flux_config();
  c.guidance_embeds = false;
  return c;
}

struct sampling_inputs {
  std::uint64_t seed;  // printed on failure by the tests (INFO)
  std::vector<float> noise, context, negative_context, pooled, negative_pooled;

  explicit sampling_inputs(std::uint64_t seed_) : seed(seed_) {
    std::mt19937_64 rng(seed + 1);
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

  /// 8 steps by default, CFG 3, shift 3, on `net` (a FLUX engine reads the noise as its packed 4 x 4 token grid).
  methods::problem problem_on(sd3::transformer& net, int steps = 8) {
    methods::problem p;
    p.net = &net;
    const int side = net.arch() == sd3::architecture::flux ? 4 : 8;
    p.inputs = {2, side, side, 3, noise, context, negative_context, pooled, negative_pooled};
    p.steps = steps;
    p.guidance = 3.f;
    p.schedule = {.shift = 3.0, .flux_mu = {}};
    return p;
  }
};

}  // namespace methods_testing
