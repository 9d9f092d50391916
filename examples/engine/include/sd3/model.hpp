// SD3 transformer weights, named and shaped as diffusers' SD3Transformer2DModel stores them.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "sd3/config.hpp"

namespace sd3 {

class safetensors_file;

// A torch nn.Linear: weight [out, in] row-major (torch layout), bias [out].
struct linear {
    int in = 0;
    int out = 0;
    std::vector<float> weight;
    std::vector<float> bias;
};

struct block_weights {
    bool context_pre_only = false;  // the last block: context stream only feeds keys/values
    bool dual_attention = false;    // MMDiT-X: a second, image-only attention (attn2) after the joint one
    // AdaLayerNormZero: D -> 6D (shift, scale, gate)_msa, (shift, scale, gate)_mlp; with dual attention
    // SD35AdaLayerNormZeroX: D -> 9D, the same six then (shift, scale, gate)_msa2.
    linear norm1;
    linear norm1_context;           // AdaLayerNormZero (6D) or, if context_pre_only, AdaLayerNormContinuous (2D: scale, shift)
    linear to_qkv;                  // attn.to_q | to_k | to_v fused: D -> 3D (rows of q, then k, then v)
    linear add_qkv;                 // attn.add_q_proj | add_k_proj | add_v_proj fused: D -> 3D
    linear to_out;                  // attn.to_out.0
    linear to_add_out;              // attn.to_add_out (absent when context_pre_only)
    std::vector<float> norm_q, norm_k, norm_added_q, norm_added_k;  // RMSNorm weights [head_dim] (qk_norm only)
    linear attn2_qkv;               // dual attention only: attn2.to_q | to_k | to_v fused, D -> 3D
    linear attn2_out;               // dual attention only: attn2.to_out.0
    std::vector<float> attn2_norm_q, attn2_norm_k;  // dual attention with qk_norm: attn2.norm_q / norm_k [head_dim]
    linear ff1, ff2;                // ff.net.0.proj (D -> 4D), ff.net.2 (4D -> D)
    linear ff_context1, ff_context2;  // absent when context_pre_only
};

struct model {
    transformer_config config;
    linear patch_embed;              // pos_embed.proj conv as a linear over (c, u, v)-ordered patch pixels
    std::vector<float> pos_table;    // pos_embed.pos_embed [M*M, D]
    linear time_linear1, time_linear2;  // time_text_embed.timestep_embedder.linear_1/2
    linear text_linear1, text_linear2;  // time_text_embed.text_embedder.linear_1/2
    linear context_embedder;
    std::vector<block_weights> blocks;
    linear norm_out;                 // AdaLayerNormContinuous: D -> 2D (scale, shift)
    linear proj_out;                 // D -> p*p*out_channels, features ordered (p, q, c)

    // Reads every tensor by its diffusers name, checking shapes against the config; errors name the tensor.
    static model from_safetensors(const transformer_config& config, const safetensors_file& file);
    // A folder holding config.json and diffusion_pytorch_model.safetensors (diffusers' save_pretrained layout).
    static model load(const std::filesystem::path& folder);
    // Every weight drawn from N(0, scale^2 / fan_in) (norm weights around 1); for tests and benchmarks.
    static model random(const transformer_config& config, std::uint64_t seed, float scale = 1.0f);

    std::size_t parameter_count() const;
    // Every weight's size against the config and the per-block flags (context_pre_only on the last block only,
    // dual_attention on the config's layers); std::invalid_argument naming the tensor. A hand-built model cannot
    // make an engine read out of bounds: the engines call it before using one.
    void validate() const;
};

}  // namespace sd3
