// FLUX transformer weights and hyper-parameters, named and shaped as diffusers' FluxTransformer2DModel stores
// them (config.json + diffusion_pytorch_model.safetensors). The forward is not written yet (issue: FLUX in the
// reference engine); this is the model it will run.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string_view>
#include <vector>

#include "sd3/model.hpp"

namespace sd3 {

struct flux_config {
    int patch_size = 1;
    int in_channels = 64;          // packed latents: 4 x the VAE's channels (2 x 2 patches packed by the pipeline)
    int num_layers = 19;           // double-stream blocks (FluxTransformerBlock)
    int num_single_layers = 38;    // single-stream blocks (FluxSingleTransformerBlock)
    int attention_head_dim = 128;
    int num_attention_heads = 24;
    int joint_attention_dim = 4096;
    int pooled_projection_dim = 768;
    bool guidance_embeds = false;  // FLUX.1-dev: true (guidance distilled into a third embedding)
    std::array<int, 3> axes_dims_rope = {16, 56, 56};  // rotary dims over the (text, row, column) ids

    int hidden() const noexcept { return transformer_config::clamped_product(num_attention_heads, attention_head_dim); }
    int out_channels() const noexcept { return in_channels; }  // diffusers: out_channels = in_channels
    int patch_features() const noexcept { return transformer_config::clamped_product(patch_size, patch_size, in_channels); }
    int timestep_channels() const noexcept { return 256; }
    // Throws std::invalid_argument naming the field and value: sizes out of range, products over the limits,
    // rotary dims that are odd or do not add up to attention_head_dim.
    void validate() const;
};

// Parses a diffusers FluxTransformer2DModel config.json text (unknown keys ignored; `source` names the file).
flux_config parse_flux_config(std::string_view json_text, std::string_view source = "config.json");
flux_config load_flux_config(const std::filesystem::path& config_json);

// FLUX's double-stream block (FluxTransformerBlock) has SD3's joint block's weights, names and shapes, with
// qk-norm and never context_pre_only; the differences are in the forward (rotary embedding, [context; image]
// order).
using flux_double_block = block_weights;

struct flux_single_block {
    linear norm;                            // AdaLayerNormZeroSingle, D -> 3D (shift, scale, gate)
    linear to_qkv;                          // attn.to_q|to_k|to_v, D -> 3D (no output projection: pre_only)
    std::vector<float> norm_q, norm_k;      // RMSNorm weights [head_dim]
    linear proj_mlp;                        // D -> 4D, GELU-tanh
    linear proj_out;                        // [attention | mlp] 5D -> D
};

struct flux_model {
    flux_config config;
    linear x_embedder;                      // in_channels -> D
    linear time_linear1, time_linear2;      // time_text_embed.timestep_embedder.linear_1/2
    linear guidance_linear1, guidance_linear2;  // time_text_embed.guidance_embedder.linear_1/2 (guidance_embeds only)
    linear text_linear1, text_linear2;      // time_text_embed.text_embedder.linear_1/2
    linear context_embedder;                // joint_attention_dim -> D
    std::vector<flux_double_block> double_blocks;   // context_pre_only and dual_attention false
    std::vector<flux_single_block> single_blocks;
    linear norm_out;                        // AdaLayerNormContinuous, D -> 2D (scale, shift)
    linear proj_out;                        // D -> patch_size^2 * in_channels

    // Reads every tensor by its diffusers name, checking shapes against the config; errors name the tensor.
    static flux_model from_safetensors(const flux_config& config, const safetensors_file& file);
    // A folder holding config.json and diffusion_pytorch_model.safetensors (diffusers' save_pretrained layout).
    static flux_model load(const std::filesystem::path& folder);
    // Every weight drawn from N(0, scale^2 / fan_in) (norm weights around 1); for tests and benchmarks.
    static flux_model random(const flux_config& config, std::uint64_t seed, float scale = 1.0f);

    std::size_t parameter_count() const;
};

// FluxPipeline's latent packing: [batch, channels, height, width] <-> [batch, (height/2) * (width/2), channels * 4],
// each token a 2 x 2 patch, features ordered (channel, dy, dx). Throws std::invalid_argument naming the sizes when
// they are not positive, height or width is odd, or a span does not hold the count.
void flux_pack_latents(int batch, int channels, int height, int width, std::span<const float> image, std::span<float> packed);
void flux_unpack_latents(int batch, int channels, int height, int width, std::span<const float> packed, std::span<float> image);

}  // namespace sd3
