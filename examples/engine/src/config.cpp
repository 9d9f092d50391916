#include "sd3/config.hpp"

#include <fstream>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

namespace sd3 {
namespace {

[[noreturn]] void bad(std::string_view source, const std::string& what) {
    throw std::invalid_argument(std::string(source) + ": " + what);
}

void read_int(const nlohmann::json& j, const char* key, int& out, std::string_view source) {
    const auto it = j.find(key);
    if (it == j.end()) return;  // diffusers' default applies
    if (!it->is_number_integer()) bad(source, std::string(key) + " must be an integer, got " + it->dump());
    const auto v = it->get<long long>();
    if (v < 1 || v > (1 << 24)) bad(source, std::string(key) + " = " + std::to_string(v) + " is out of range [1, 2^24]");
    out = static_cast<int>(v);
}

}  // namespace

void transformer_config::validate() const {
    auto positive = [](const char* name, int v) {
        if (v < 1) throw std::invalid_argument(std::string("transformer_config.") + name + " = " + std::to_string(v) + " must be >= 1");
    };
    positive("sample_size", sample_size);
    positive("patch_size", patch_size);
    positive("in_channels", in_channels);
    positive("out_channels", out_channels);
    positive("num_layers", num_layers);
    positive("attention_head_dim", attention_head_dim);
    positive("num_attention_heads", num_attention_heads);
    positive("joint_attention_dim", joint_attention_dim);
    positive("caption_projection_dim", caption_projection_dim);
    positive("pooled_projection_dim", pooled_projection_dim);
    positive("pos_embed_max_size", pos_embed_max_size);
    if (caption_projection_dim != hidden())
        throw std::invalid_argument("transformer_config.caption_projection_dim = " + std::to_string(caption_projection_dim) +
                                    " must equal num_attention_heads * attention_head_dim = " + std::to_string(hidden()) +
                                    " (the context stream shares the blocks' width)");
}

transformer_config parse_transformer_config(std::string_view json_text, std::string_view source) {
    nlohmann::json j;
    try {
        j = nlohmann::json::parse(json_text);
    } catch (const nlohmann::json::exception& e) {
        bad(source, std::string("not valid JSON: ") + e.what());
    }
    if (!j.is_object()) bad(source, "top level is not a JSON object");
    if (auto it = j.find("_class_name"); it != j.end() && it->is_string() && *it != "SD3Transformer2DModel")
        bad(source, "_class_name = " + it->dump() + ", expected \"SD3Transformer2DModel\"");

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
        if (!it->is_string() || *it != "rms_norm") bad(source, "qk_norm = " + it->dump() + " is not supported (null or \"rms_norm\")");
        c.qk_norm = true;
    }
    if (auto it = j.find("dual_attention_layers"); it != j.end() && !it->is_null()) {
        if (!it->is_array()) bad(source, "dual_attention_layers = " + it->dump() + " must be an array");
        if (!it->empty())
            bad(source, "dual_attention_layers = " + it->dump() + " is not supported (SD3.5 dual attention; only SD3 blocks)");
    }
    try {
        c.validate();
    } catch (const std::invalid_argument& e) {
        bad(source, e.what());
    }
    return c;
}

transformer_config load_transformer_config(const std::filesystem::path& config_json) {
    std::ifstream f(config_json);
    if (!f) throw std::runtime_error("cannot open transformer config '" + config_json.string() + "'");
    std::stringstream ss;
    ss << f.rdbuf();
    return parse_transformer_config(ss.str(), config_json.string());
}

}  // namespace sd3
