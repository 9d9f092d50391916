// The SD3 transformer's hyper-parameters, read from a diffusers `config.json` (SD3Transformer2DModel).
#pragma once

#include <filesystem>
#include <string>
#include <string_view>

namespace sd3 {

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

    int hidden() const noexcept { return num_attention_heads * attention_head_dim; }
    int patch_features() const noexcept { return patch_size * patch_size * out_channels; }  // proj_out width
    int timestep_channels() const noexcept { return 256; }                                    // fixed in diffusers

    // Throws std::invalid_argument naming the field when a value is out of range or inconsistent.
    void validate() const;
};

// Parses a diffusers config.json text. Unknown keys are ignored; features this engine does not implement
// (dual_attention_layers, qk_norm other than null / "rms_norm", pos_embed_max_size null) are rejected with
// std::invalid_argument naming the key and value. `source` names the file in messages.
transformer_config parse_transformer_config(std::string_view json_text, std::string_view source = "config.json");
transformer_config load_transformer_config(const std::filesystem::path& config_json);

}  // namespace sd3
