// The SD3 transformer's hyper-parameters, read from a diffusers `config.json` (SD3Transformer2DModel).
#pragma once

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

namespace sd3 {

// Bounds validate() enforces on the config's fields and on the products the engine forms from them, so
// every size it derives fits in int and a hostile config is refused by name instead of overflowing.
inline constexpr int max_config_field = 1 << 24;      // any single size field
inline constexpr int max_hidden = 1 << 16;             // num_attention_heads * attention_head_dim
inline constexpr int max_patch_features = 1 << 20;     // patch_size^2 * in_channels and * out_channels
inline constexpr int max_pos_embed_size = 1 << 12;     // pos_embed_max_size (the table has its square of rows)
inline constexpr int max_layers = 4096;                // num_layers

struct transformer_config {
    int sample_size = 128;           // latent side the model was trained at (informational; any size up to the table)
    int patch_size = 2;
    int in_channels = 16;
    int out_channels = 16;
    int num_layers = 18;
    int attention_head_dim = 64;
    int num_attention_heads = 18;
    int joint_attention_dim = 4096;
    int caption_projection_dim = 1152;
    int pooled_projection_dim = 2048;
    int pos_embed_max_size = 96;     // side of the stored 2-D position table
    bool qk_norm = false;            // true for qk_norm == "rms_norm"
    // MMDiT-X (SD3.5-medium): the blocks with a second, image-only attention (diffusers' attn2), ascending.
    std::vector<int> dual_attention_layers;

    bool dual_attention(int layer) const noexcept {
        return std::binary_search(dual_attention_layers.begin(), dual_attention_layers.end(), layer);
    }

    // Products of fields. For a config validate() accepts they are exact; for any other they saturate at the
    // int range instead of overflowing, so they can be printed in validate()'s messages.
    int hidden() const noexcept { return clamped_product(num_attention_heads, attention_head_dim); }
    int patch_features() const noexcept { return clamped_product(patch_size, patch_size, out_channels); }  // proj_out width
    int patch_inputs() const noexcept { return clamped_product(patch_size, patch_size, in_channels); }    // pos_embed.proj fan-in
    int timestep_channels() const noexcept { return 256; }                                    // fixed in diffusers

    // Throws std::invalid_argument naming the field (or the product) and its value when a value is out of
    // range or inconsistent.
    void validate() const;

    // a * b (* c) in 64 bits, clamped to int after each step (|partial| <= 2^31, so no step overflows).
    static int clamped_product(int a, int b, int c = 1) noexcept {
        constexpr std::int64_t lo = std::numeric_limits<int>::min(), hi = std::numeric_limits<int>::max();
        const std::int64_t ab = std::clamp(std::int64_t{a} * b, lo, hi);
        return static_cast<int>(std::clamp(ab * c, lo, hi));
    }
};

// Parses a diffusers config.json text. Unknown keys are ignored; features this engine does not implement
// (qk_norm other than null / "rms_norm", pos_embed_max_size null) are rejected with
// std::invalid_argument naming the key and value. `source` names the file in messages.
transformer_config parse_transformer_config(std::string_view json_text, std::string_view source = "config.json");
transformer_config load_transformer_config(const std::filesystem::path& config_json);

}  // namespace sd3
