#include "sd3/config.hpp"

#include <algorithm>
#include <stdexcept>
#include <utility>

#include <nlohmann/json.hpp>

#include "sd3/errors.hpp"
#include "sd3/files.hpp"
#include "sd3/json_input.hpp"
#include "config_fields.hpp"

namespace sd3 {
namespace {

using detail::bad_config;
using detail::read_config_int;

}  // namespace

void transformer_config::validate() const {
    constexpr const char* type = "transformer_config";
    for (auto [name, v] : {std::pair{"sample_size", sample_size}, std::pair{"patch_size", patch_size},
                           std::pair{"in_channels", in_channels}, std::pair{"out_channels", out_channels},
                           std::pair{"attention_head_dim", attention_head_dim}, std::pair{"num_attention_heads", num_attention_heads},
                           std::pair{"joint_attention_dim", joint_attention_dim},
                           std::pair{"caption_projection_dim", caption_projection_dim},
                           std::pair{"pooled_projection_dim", pooled_projection_dim}})
        detail::check_field(type, name, v, max_config_field);
    detail::check_field(type, "num_layers", num_layers, max_layers);
    detail::check_field(type, "pos_embed_max_size", pos_embed_max_size, max_pos_embed_size);
    // Products, in 64 bits: each field may be in range while their product overflows int.
    detail::check_product(type, "num_attention_heads * attention_head_dim (hidden width)",
                          std::int64_t{num_attention_heads} * attention_head_dim, max_hidden);
    detail::check_product(type, "patch_size^2 * in_channels (patch inputs)", std::int64_t{patch_size} * patch_size * in_channels,
                          max_patch_features);
    detail::check_product(type, "patch_size^2 * out_channels (patch features)",
                          std::int64_t{patch_size} * patch_size * out_channels, max_patch_features);
    for (std::size_t i = 0; i < dual_attention_layers.size(); ++i) {
        const int l = dual_attention_layers[i];
        if (l < 0 || l >= num_layers)
            throw std::invalid_argument(message("transformer_config.dual_attention_layers[", i, "] = ", l,
                                                " is outside [0, num_layers = ", num_layers, ")"));
        if (i > 0 && l <= dual_attention_layers[i - 1])
            throw std::invalid_argument(message("transformer_config.dual_attention_layers[", i, "] = ", l,
                                                " is not above the entry before it (", dual_attention_layers[i - 1],
                                                "): the list must be ascending without repeats"));
    }
    if (caption_projection_dim != hidden())
        throw std::invalid_argument(message("transformer_config.caption_projection_dim = ", caption_projection_dim,
                                            " must equal num_attention_heads * attention_head_dim = ", hidden(),
                                            " (the context stream shares the blocks' width)"));
}

transformer_config parse_transformer_config(std::string_view json_text, std::string_view source) {
    const nlohmann::json j = detail::parse_config_object(json_text, source, "SD3Transformer2DModel");
    transformer_config c;
    read_config_int(j, "sample_size", c.sample_size, source);
    read_config_int(j, "patch_size", c.patch_size, source);
    read_config_int(j, "in_channels", c.in_channels, source);
    c.out_channels = c.in_channels;  // diffusers: out_channels None -> in_channels
    if (auto it = j.find("out_channels"); it != j.end() && !it->is_null()) read_config_int(j, "out_channels", c.out_channels, source);
    read_config_int(j, "num_layers", c.num_layers, source);
    read_config_int(j, "attention_head_dim", c.attention_head_dim, source);
    read_config_int(j, "num_attention_heads", c.num_attention_heads, source);
    read_config_int(j, "joint_attention_dim", c.joint_attention_dim, source);
    read_config_int(j, "caption_projection_dim", c.caption_projection_dim, source);
    read_config_int(j, "pooled_projection_dim", c.pooled_projection_dim, source);

    if (auto it = j.find("pos_embed_max_size"); it != j.end()) {
        if (it->is_null())
            bad_config(source, "pos_embed_max_size = null is not supported (this engine needs the stored pos_embed table)");
        read_config_int(j, "pos_embed_max_size", c.pos_embed_max_size, source);
    }
    if (auto it = j.find("qk_norm"); it != j.end() && !it->is_null()) {
        if (!it->is_string() || *it != "rms_norm") bad_config(source, "qk_norm = ", json_excerpt(*it), " is not supported (null or \"rms_norm\")");
        c.qk_norm = true;
    }
    if (auto it = j.find("dual_attention_layers"); it != j.end() && !it->is_null()) {
        if (!it->is_array()) bad_config(source, "dual_attention_layers = ", json_excerpt(*it), " must be an array of block indices");
        for (const auto& e : *it) {
            const auto layer = detail::config_element(e, max_layers - 1);  // validate() checks it against num_layers
            if (!layer) bad_config(source, "dual_attention_layers entry ", json_excerpt(e), " is not a block index in [0, ", max_layers, ")");
            if (c.dual_attention_layers.size() >= static_cast<std::size_t>(max_layers))
                bad_config(source, "dual_attention_layers has more than ", max_layers, " entries");
            c.dual_attention_layers.push_back(*layer);
        }
        // diffusers takes the indices as a set (`i in dual_attention_layers`): any order, repeats harmless.
        std::sort(c.dual_attention_layers.begin(), c.dual_attention_layers.end());
        c.dual_attention_layers.erase(std::unique(c.dual_attention_layers.begin(), c.dual_attention_layers.end()),
                                      c.dual_attention_layers.end());
    }
    try {
        c.validate();
    } catch (const std::invalid_argument& e) {
        bad_config(source, e.what());
    }
    return c;
}

transformer_config load_transformer_config(const std::filesystem::path& config_json) {
    // read_text_file refuses a directory, FIFO or device by name, and bounds the size.
    return parse_transformer_config(read_text_file(config_json, "transformer config"), config_json.string());
}

}  // namespace sd3
