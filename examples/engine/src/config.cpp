#include "sd3/config.hpp"

#include <algorithm>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "sd3/errors.hpp"
#include "sd3/files.hpp"
#include "sd3/json_input.hpp"

namespace sd3 {
namespace {

template <class... Parts>
[[noreturn]] void bad(std::string_view source, const Parts&... what) {
    throw std::invalid_argument(message(path_excerpt(source), ": ", what...));
}

void read_int(const nlohmann::json& j, const char* key, int& out, std::string_view source) {
    const auto it = j.find(key);
    if (it == j.end()) return;  // diffusers' default applies
    if (!it->is_number_integer()) bad(source, key, " must be an integer, got ", json_excerpt(*it));
    // Unsigned values above INT64_MAX read as such (not wrapped negative) so the message shows the real value.
    if (it->is_number_unsigned() && it->get<std::uint64_t>() > static_cast<std::uint64_t>(max_config_field))
        bad(source, key, " = ", it->get<std::uint64_t>(), " is out of range [1, ", max_config_field, "]");
    const auto v = it->get<std::int64_t>();
    if (v < 1 || v > max_config_field) bad(source, key, " = ", v, " is out of range [1, ", max_config_field, "]");
    out = static_cast<int>(v);
}

}  // namespace

void transformer_config::validate() const {
    auto in_range = [](const char* name, int v, int most) {
        if (v < 1 || v > most)
            throw std::invalid_argument(message("transformer_config.", name, " = ", v, " is out of range [1, ", most, "]"));
    };
    in_range("sample_size", sample_size, max_config_field);
    in_range("patch_size", patch_size, max_config_field);
    in_range("in_channels", in_channels, max_config_field);
    in_range("out_channels", out_channels, max_config_field);
    in_range("num_layers", num_layers, max_layers);
    in_range("attention_head_dim", attention_head_dim, max_config_field);
    in_range("num_attention_heads", num_attention_heads, max_config_field);
    in_range("joint_attention_dim", joint_attention_dim, max_config_field);
    in_range("caption_projection_dim", caption_projection_dim, max_config_field);
    in_range("pooled_projection_dim", pooled_projection_dim, max_config_field);
    in_range("pos_embed_max_size", pos_embed_max_size, max_pos_embed_size);
    // Products, in 64 bits: each field may be in range while their product overflows int.
    auto product_in_range = [](const char* what, std::int64_t product, int most) {
        if (product > most)
            throw std::invalid_argument(message("transformer_config: ", what, " = ", product, " exceeds the limit ", most));
    };
    product_in_range("num_attention_heads * attention_head_dim (hidden width)",
                     std::int64_t{num_attention_heads} * attention_head_dim, max_hidden);
    product_in_range("patch_size^2 * in_channels (patch inputs)", std::int64_t{patch_size} * patch_size * in_channels,
                     max_patch_features);
    product_in_range("patch_size^2 * out_channels (patch features)", std::int64_t{patch_size} * patch_size * out_channels,
                     max_patch_features);
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
    nlohmann::json j;
    try {
        j = parse_json(json_text);
    } catch (const std::runtime_error& e) {
        bad(source, e.what());
    }
    if (!j.is_object()) bad(source, "top level is not a JSON object");
    if (auto it = j.find("_class_name"); it != j.end() && it->is_string() && *it != "SD3Transformer2DModel")
        bad(source, "_class_name = ", json_excerpt(*it), ", expected \"SD3Transformer2DModel\"");

    transformer_config c;
    read_int(j, "sample_size", c.sample_size, source);
    read_int(j, "patch_size", c.patch_size, source);
    read_int(j, "in_channels", c.in_channels, source);
    c.out_channels = c.in_channels;  // diffusers: out_channels None -> in_channels
    if (auto it = j.find("out_channels"); it != j.end() && !it->is_null()) read_int(j, "out_channels", c.out_channels, source);
    read_int(j, "num_layers", c.num_layers, source);
    read_int(j, "attention_head_dim", c.attention_head_dim, source);
    read_int(j, "num_attention_heads", c.num_attention_heads, source);
    read_int(j, "joint_attention_dim", c.joint_attention_dim, source);
    read_int(j, "caption_projection_dim", c.caption_projection_dim, source);
    read_int(j, "pooled_projection_dim", c.pooled_projection_dim, source);

    if (auto it = j.find("pos_embed_max_size"); it != j.end()) {
        if (it->is_null())
            bad(source, "pos_embed_max_size = null is not supported (this engine needs the stored pos_embed table)");
        read_int(j, "pos_embed_max_size", c.pos_embed_max_size, source);
    }
    if (auto it = j.find("qk_norm"); it != j.end() && !it->is_null()) {
        if (!it->is_string() || *it != "rms_norm") bad(source, "qk_norm = ", json_excerpt(*it), " is not supported (null or \"rms_norm\")");
        c.qk_norm = true;
    }
    if (auto it = j.find("dual_attention_layers"); it != j.end() && !it->is_null()) {
        if (!it->is_array()) bad(source, "dual_attention_layers = ", json_excerpt(*it), " must be an array of block indices");
        for (const auto& e : *it) {
            // Bounded before the conversion, so any JSON number reads without overflow; validate() checks the range.
            if (!e.is_number_integer() || (e.is_number_unsigned() ? e.get<std::uint64_t>() > max_layers
                                                                  : (e.get<std::int64_t>() < 0 || e.get<std::int64_t>() > max_layers)))
                bad(source, "dual_attention_layers entry ", json_excerpt(e), " is not a block index in [0, ", max_layers, ")");
            if (c.dual_attention_layers.size() >= static_cast<std::size_t>(max_layers))
                bad(source, "dual_attention_layers has more than ", max_layers, " entries");
            c.dual_attention_layers.push_back(static_cast<int>(e.get<std::int64_t>()));
        }
        // diffusers takes the indices as a set (`i in dual_attention_layers`): any order, repeats harmless.
        std::sort(c.dual_attention_layers.begin(), c.dual_attention_layers.end());
        c.dual_attention_layers.erase(std::unique(c.dual_attention_layers.begin(), c.dual_attention_layers.end()),
                                      c.dual_attention_layers.end());
    }
    try {
        c.validate();
    } catch (const std::invalid_argument& e) {
        bad(source, e.what());
    }
    return c;
}

transformer_config load_transformer_config(const std::filesystem::path& config_json) {
    // read_text_file refuses a directory, FIFO or device by name, and bounds the size.
    return parse_transformer_config(read_text_file(config_json, "transformer config"), config_json.string());
}

}  // namespace sd3
