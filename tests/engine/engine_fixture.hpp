// A small random SD3 model and random inputs for the hook, sampler and error tests.
#pragma once

#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include "sd3/flux_model.hpp"
#include "sd3/model.hpp"
#include "sd3/transformer.hpp"

namespace test_util {

// A small FLUX model: 8 packed channels, one double-stream and two single-stream blocks, 2 heads of 16, rotary
// dims (4, 6, 6), a guidance embedding.
inline sd3::flux_config small_flux_config() {
    sd3::flux_config c;
    c.in_channels = 8;
    c.num_layers = 1;
    c.num_single_layers = 2;
    c.attention_head_dim = 16;
    c.num_attention_heads = 2;
    c.joint_attention_dim = 12;
    c.pooled_projection_dim = 10;
    c.guidance_embeds = true;
    c.axes_dims_rope = {4, 6, 6};
    return c;
}

// dual_attention_layers non-empty: an MMDiT-X (SD3.5-medium) model, those blocks with a second, image-only attention.
inline sd3::transformer_config small_config(bool qk_norm = true, std::vector<int> dual_attention_layers = {}) {
    sd3::transformer_config c;
    c.sample_size = 8;
    c.patch_size = 2;
    c.in_channels = 4;
    c.out_channels = 4;
    c.num_layers = 3;
    c.attention_head_dim = 16;
    c.num_attention_heads = 2;
    c.joint_attention_dim = 16;
    c.caption_projection_dim = 32;
    c.pooled_projection_dim = 8;
    c.pos_embed_max_size = 8;
    c.qk_norm = qk_norm;
    c.dual_attention_layers = std::move(dual_attention_layers);
    return c;
}

struct random_problem {
    sd3::model model;
    int batch = 2, height = 8, width = 12, context_tokens = 7;
    std::vector<float> latents, timesteps, context, pooled;

    random_problem(std::uint32_t seed, bool qk_norm = true, std::vector<int> dual_attention_layers = {})
        : model(sd3::model::random(small_config(qk_norm, std::move(dual_attention_layers)), seed)) {
        std::mt19937 rng(seed + 1);
        std::normal_distribution<float> normal;
        const auto& c = model.config;
        latents.resize(static_cast<std::size_t>(batch) * c.in_channels * height * width);
        context.resize(static_cast<std::size_t>(batch) * context_tokens * c.joint_attention_dim);
        pooled.resize(static_cast<std::size_t>(batch) * c.pooled_projection_dim);
        for (auto* v : {&latents, &context, &pooled})
            for (auto& x : *v) x = normal(rng);
        timesteps = {std::uniform_real_distribution<float>(0, 1000)(rng), std::uniform_real_distribution<float>(0, 1000)(rng)};
    }
    int tokens() const { return (height / model.config.patch_size) * (width / model.config.patch_size); }
    int hidden() const { return model.config.hidden(); }
    std::size_t velocity_size() const {
        return static_cast<std::size_t>(batch) * model.config.out_channels * height * width;
    }
    sd3::forward_inputs inputs() const {
        return {batch, height, width, context_tokens, latents, timesteps, context, pooled};
    }
    sd3::engine_limits limits() const { return {.max_batch = 4, .max_height = 8, .max_width = 12, .max_context_tokens = 8}; }
};

}  // namespace test_util
