#include "sd3/flux_model.hpp"

#include <stdexcept>
#include <string>
#include <utility>

#include "config_fields.hpp"
#include "sd3/errors.hpp"
#include "sd3/files.hpp"
#include "sd3/resources.hpp"
#include "sd3/safetensors.hpp"
#include "weights.hpp"

namespace sd3 {

void flux_config::validate() const {
    constexpr const char* type = "flux_config";
    for (auto [name, v] : {std::pair{"patch_size", patch_size}, std::pair{"in_channels", in_channels},
                           std::pair{"attention_head_dim", attention_head_dim}, std::pair{"num_attention_heads", num_attention_heads},
                           std::pair{"joint_attention_dim", joint_attention_dim},
                           std::pair{"pooled_projection_dim", pooled_projection_dim}})
        detail::check_field(type, name, v, max_config_field);
    detail::check_field(type, "num_layers", num_layers, max_layers);
    detail::check_field(type, "num_single_layers", num_single_layers, max_layers);
    detail::check_product(type, "num_attention_heads * attention_head_dim (hidden width)",
                          std::int64_t{num_attention_heads} * attention_head_dim, max_hidden);
    detail::check_product(type, "patch_size^2 * in_channels (patch features)", std::int64_t{patch_size} * patch_size * in_channels,
                          max_patch_features);
    std::int64_t rope = 0;
    for (std::size_t i = 0; i < axes_dims_rope.size(); ++i) {
        const int d = axes_dims_rope[i];
        if (d < 0 || d % 2 != 0 || d > attention_head_dim)
            throw std::invalid_argument(message("flux_config.axes_dims_rope[", i, "] = ", d,
                                                " must be even and in [0, attention_head_dim = ", attention_head_dim, "]"));
        rope += d;
    }
    if (rope != attention_head_dim)
        throw std::invalid_argument(message("flux_config.axes_dims_rope add up to ", rope, ", not attention_head_dim = ",
                                            attention_head_dim, " (the rotation covers each head whole)"));
}

flux_config parse_flux_config(std::string_view json_text, std::string_view source) {
    using detail::bad_config;
    const nlohmann::json j = detail::parse_config_object(json_text, source, "FluxTransformer2DModel");
    flux_config c;
    for (auto [key, field] : {std::pair{"patch_size", &c.patch_size}, std::pair{"in_channels", &c.in_channels},
                              std::pair{"num_layers", &c.num_layers}, std::pair{"num_single_layers", &c.num_single_layers},
                              std::pair{"attention_head_dim", &c.attention_head_dim},
                              std::pair{"num_attention_heads", &c.num_attention_heads},
                              std::pair{"joint_attention_dim", &c.joint_attention_dim},
                              std::pair{"pooled_projection_dim", &c.pooled_projection_dim}})
        detail::read_config_int(j, key, *field, source);
    if (auto it = j.find("out_channels"); it != j.end() && !it->is_null())
        bad_config(source, "out_channels = ", json_excerpt(*it), " is not supported (diffusers' FLUX sets it to in_channels)");
    if (auto it = j.find("guidance_embeds"); it != j.end()) {
        if (!it->is_boolean()) bad_config(source, "guidance_embeds must be true or false, got ", json_excerpt(*it));
        c.guidance_embeds = it->get<bool>();
    }
    if (auto it = j.find("axes_dims_rope"); it != j.end()) {
        if (!it->is_array() || it->size() != 3) bad_config(source, "axes_dims_rope = ", json_excerpt(*it), " must be 3 integers");
        for (std::size_t i = 0; i < 3; ++i) {
            const auto d = detail::config_element((*it)[i], max_config_field);
            if (!d) bad_config(source, "axes_dims_rope = ", json_excerpt(*it), " must be 3 integers in [0, ", max_config_field, "]");
            c.axes_dims_rope[i] = *d;
        }
    }
    try {
        c.validate();
    } catch (const std::invalid_argument& e) {
        bad_config(source, e.what());
    }
    return c;
}

flux_config load_flux_config(const std::filesystem::path& config_json) {
    return parse_flux_config(read_text_file(config_json, "transformer config"), config_json.string());
}

flux_model flux_model::from_safetensors(const flux_config& c, const safetensors_file& f) {
    using detail::read_linear;
    c.validate();
    const int D = c.hidden(), hd = c.attention_head_dim, T = c.timestep_channels();
    auto head_norm = [&](const std::string& name) { return detail::read_tensor(f, name + ".weight", {hd}); };
    flux_model m;
    m.config = c;
    m.x_embedder = read_linear(f, "x_embedder", c.in_channels, D);
    m.time_linear1 = read_linear(f, "time_text_embed.timestep_embedder.linear_1", T, D);
    m.time_linear2 = read_linear(f, "time_text_embed.timestep_embedder.linear_2", D, D);
    if (c.guidance_embeds) {
        m.guidance_linear1 = read_linear(f, "time_text_embed.guidance_embedder.linear_1", T, D);
        m.guidance_linear2 = read_linear(f, "time_text_embed.guidance_embedder.linear_2", D, D);
    }
    m.text_linear1 = read_linear(f, "time_text_embed.text_embedder.linear_1", c.pooled_projection_dim, D);
    m.text_linear2 = read_linear(f, "time_text_embed.text_embedder.linear_2", D, D);
    m.context_embedder = read_linear(f, "context_embedder", c.joint_attention_dim, D);
    for (int i = 0; i < c.num_layers; ++i)
        m.double_blocks.push_back(detail::read_joint_block(f, "transformer_blocks." + std::to_string(i) + ".", D, hd, true, false, false));
    for (int i = 0; i < c.num_single_layers; ++i) {
        const std::string b = "single_transformer_blocks." + std::to_string(i) + ".";
        flux_single_block w;
        w.norm = read_linear(f, b + "norm.linear", D, 3 * D);
        w.to_qkv = detail::read_fused_qkv(f, b + "attn.", "to_q", "to_k", "to_v", D);
        w.norm_q = head_norm(b + "attn.norm_q");
        w.norm_k = head_norm(b + "attn.norm_k");
        w.proj_mlp = read_linear(f, b + "proj_mlp", D, 4 * D);
        w.proj_out = read_linear(f, b + "proj_out", 5 * D, D);
        m.single_blocks.push_back(std::move(w));
    }
    m.norm_out = read_linear(f, "norm_out.linear", D, 2 * D);
    m.proj_out = read_linear(f, "proj_out", D, c.patch_features());
    return m;
}

flux_model flux_model::load(const std::filesystem::path& folder) { return detail::load_folder<flux_model>(folder, load_flux_config); }

flux_model flux_model::random(const flux_config& c, std::uint64_t seed, float scale) {
    c.validate();
    detail::random_weights r(seed, scale);
    const int D = c.hidden(), hd = c.attention_head_dim, T = c.timestep_channels();
    flux_model m;
    m.config = c;
    m.x_embedder = r.make(c.in_channels, D);
    m.time_linear1 = r.make(T, D);
    m.time_linear2 = r.make(D, D);
    if (c.guidance_embeds) {
        m.guidance_linear1 = r.make(T, D);
        m.guidance_linear2 = r.make(D, D);
    }
    m.text_linear1 = r.make(c.pooled_projection_dim, D);
    m.text_linear2 = r.make(D, D);
    m.context_embedder = r.make(c.joint_attention_dim, D);
    for (int i = 0; i < c.num_layers; ++i) m.double_blocks.push_back(detail::random_joint_block(r, D, hd, true, false, false));
    for (int i = 0; i < c.num_single_layers; ++i) {
        flux_single_block w;
        w.norm = r.make(D, 3 * D);
        w.to_qkv = r.make(D, 3 * D);
        w.norm_q = r.norm(hd);
        w.norm_k = r.norm(hd);
        w.proj_mlp = r.make(D, 4 * D);
        w.proj_out = r.make(5 * D, D);
        m.single_blocks.push_back(std::move(w));
    }
    m.norm_out = r.make(D, 2 * D);
    m.proj_out = r.make(D, c.patch_features());
    return m;
}

std::size_t flux_model::parameter_count() const {
    auto n = [](const linear& l) { return l.weight.size() + l.bias.size(); };
    std::size_t total = n(x_embedder) + n(time_linear1) + n(time_linear2) + n(guidance_linear1) + n(guidance_linear2) +
                        n(text_linear1) + n(text_linear2) + n(context_embedder) + n(norm_out) + n(proj_out);
    for (const auto& b : double_blocks) total += detail::parameter_count(b);
    for (const auto& b : single_blocks)
        total += n(b.norm) + n(b.to_qkv) + b.norm_q.size() + b.norm_k.size() + n(b.proj_mlp) + n(b.proj_out);
    return total;
}

namespace {
template <bool Pack>
void move_packed(const char* fn, int batch, int channels, int height, int width, std::span<const float> from, std::span<float> to) {
    const std::size_t want = saturating_product(batch, channels, height, width);
    if (batch < 1 || channels < 1 || height < 2 || width < 2 || height % 2 || width % 2 || from.size() != want || to.size() != want)
        throw std::invalid_argument(message(fn, ": batch/channels/height/width = ", batch, "/", channels, "/", height, "/", width,
                                            " with ", from.size(), " -> ", to.size(), " floats; expected positive sizes, even height ",
                                            "and width, and ", want, " floats each"));
    const int rows = height / 2, cols = width / 2;
    for (int b = 0; b < batch; ++b)
        for (int c = 0; c < channels; ++c)
            for (int y = 0; y < height; ++y)
                for (int x = 0; x < width; ++x) {
                    const std::size_t pixel = ((static_cast<std::size_t>(b) * channels + c) * height + y) * width + x;
                    const std::size_t token = static_cast<std::size_t>(b) * rows * cols + static_cast<std::size_t>(y / 2) * cols + x / 2;
                    const std::size_t packed = token * channels * 4 + static_cast<std::size_t>(c) * 4 + (y % 2) * 2 + x % 2;
                    if constexpr (Pack) to[packed] = from[pixel];
                    else to[pixel] = from[packed];
                }
}
}  // namespace

void flux_pack_latents(int batch, int channels, int height, int width, std::span<const float> image, std::span<float> packed) {
    move_packed<true>("flux_pack_latents", batch, channels, height, width, image, packed);
}
void flux_unpack_latents(int batch, int channels, int height, int width, std::span<const float> packed, std::span<float> image) {
    move_packed<false>("flux_unpack_latents", batch, channels, height, width, packed, image);
}

}  // namespace sd3
