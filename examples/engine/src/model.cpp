#include "sd3/model.hpp"

#include <cmath>
#include <random>
#include <stdexcept>
#include <string>

#include "sd3/errors.hpp"
#include "sd3/safetensors.hpp"

namespace sd3 {
namespace {

std::string shape_text(const std::vector<std::int64_t>& s) {
    std::string t = "[";
    for (std::size_t i = 0; i < s.size(); ++i) t += (i ? ", " : "") + std::to_string(s[i]);
    return t + "]";
}

// Reads `name`, checking that its shape is `want` exactly and that every value is finite.
std::vector<float> read_tensor(const safetensors_file& f, const std::string& name, const std::vector<std::int64_t>& want) {
    auto fail = [&](const auto&... what) {
        throw std::runtime_error(message("safetensors file '", path_excerpt(f.path().string()), "'", what...));
    };
    if (!f.contains(name)) fail(": missing tensor '", name, "' (shape ", shape_text(want), ")");
    const auto& info = f.info(name);
    if (info.shape != want)
        fail(", tensor '", name, "': shape ", excerpt(shape_text(info.shape)), " does not match the config, which needs ",
             shape_text(want));
    return f.read_finite(name);
}

linear read_linear(const safetensors_file& f, const std::string& prefix, int in, int out) {
    linear l;
    l.in = in;
    l.out = out;
    l.weight = read_tensor(f, prefix + ".weight", {out, in});
    l.bias = read_tensor(f, prefix + ".bias", {out});
    return l;
}

// Stacks linears with the same input width along the output dimension (q | k | v).
linear stack(const std::vector<linear>& parts) {
    linear s;
    s.in = parts.front().in;
    for (const auto& p : parts) {
        s.out += p.out;
        s.weight.insert(s.weight.end(), p.weight.begin(), p.weight.end());
        s.bias.insert(s.bias.end(), p.bias.begin(), p.bias.end());
    }
    return s;
}

}  // namespace

model model::from_safetensors(const transformer_config& c, const safetensors_file& f) {
    c.validate();
    const int D = c.hidden(), p = c.patch_size, hd = c.attention_head_dim;
    model m;
    m.config = c;
    m.patch_embed.in = c.in_channels * p * p;
    m.patch_embed.out = D;
    m.patch_embed.weight = read_tensor(f, "pos_embed.proj.weight", {D, c.in_channels, p, p});  // (c, u, v) order
    m.patch_embed.bias = read_tensor(f, "pos_embed.proj.bias", {D});
    const std::int64_t M = c.pos_embed_max_size;
    m.pos_table = read_tensor(f, "pos_embed.pos_embed", {1, M * M, D});
    m.time_linear1 = read_linear(f, "time_text_embed.timestep_embedder.linear_1", c.timestep_channels(), D);
    m.time_linear2 = read_linear(f, "time_text_embed.timestep_embedder.linear_2", D, D);
    m.text_linear1 = read_linear(f, "time_text_embed.text_embedder.linear_1", c.pooled_projection_dim, D);
    m.text_linear2 = read_linear(f, "time_text_embed.text_embedder.linear_2", D, D);
    m.context_embedder = read_linear(f, "context_embedder", c.joint_attention_dim, c.caption_projection_dim);
    for (int i = 0; i < c.num_layers; ++i) {
        const std::string b = "transformer_blocks." + std::to_string(i) + ".";
        block_weights w;
        w.context_pre_only = i == c.num_layers - 1;
        w.dual_attention = c.dual_attention(i);
        w.norm1 = read_linear(f, b + "norm1.linear", D, (w.dual_attention ? 9 : 6) * D);
        w.norm1_context = read_linear(f, b + "norm1_context.linear", D, (w.context_pre_only ? 2 : 6) * D);
        // q | k | v projections of an attention, fused into one D -> 3D linear
        auto fused_qkv = [&](const std::string& attn, const char* q, const char* k, const char* v) {
            return stack({read_linear(f, attn + q, D, D), read_linear(f, attn + k, D, D), read_linear(f, attn + v, D, D)});
        };
        auto head_norm = [&](const std::string& name) { return read_tensor(f, b + name + ".weight", {hd}); };
        w.to_qkv = fused_qkv(b + "attn.", "to_q", "to_k", "to_v");
        w.add_qkv = fused_qkv(b + "attn.", "add_q_proj", "add_k_proj", "add_v_proj");
        w.to_out = read_linear(f, b + "attn.to_out.0", D, D);
        if (c.qk_norm) {
            w.norm_q = head_norm("attn.norm_q");
            w.norm_k = head_norm("attn.norm_k");
            w.norm_added_q = head_norm("attn.norm_added_q");
            w.norm_added_k = head_norm("attn.norm_added_k");
        }
        if (w.dual_attention) {
            w.attn2_qkv = fused_qkv(b + "attn2.", "to_q", "to_k", "to_v");
            w.attn2_out = read_linear(f, b + "attn2.to_out.0", D, D);
            if (c.qk_norm) {
                w.attn2_norm_q = head_norm("attn2.norm_q");
                w.attn2_norm_k = head_norm("attn2.norm_k");
            }
        }
        w.ff1 = read_linear(f, b + "ff.net.0.proj", D, 4 * D);
        w.ff2 = read_linear(f, b + "ff.net.2", 4 * D, D);
        if (!w.context_pre_only) {
            w.to_add_out = read_linear(f, b + "attn.to_add_out", D, D);
            w.ff_context1 = read_linear(f, b + "ff_context.net.0.proj", D, 4 * D);
            w.ff_context2 = read_linear(f, b + "ff_context.net.2", 4 * D, D);
        }
        m.blocks.push_back(std::move(w));
    }
    m.norm_out = read_linear(f, "norm_out.linear", D, 2 * D);
    m.proj_out = read_linear(f, "proj_out", D, c.patch_features());
    return m;
}

model model::load(const std::filesystem::path& folder) {
    const auto config = load_transformer_config(folder / "config.json");
    const safetensors_file file(folder / "diffusion_pytorch_model.safetensors");
    return from_safetensors(config, file);
}

model model::random(const transformer_config& c, std::uint64_t seed, float scale) {
    c.validate();
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    auto fill = [&](std::vector<float>& v, std::size_t n, float sd, float mean = 0.0f) {
        v.resize(n);
        for (auto& x : v) x = mean + sd * normal(rng);
    };
    auto make = [&](int in, int out) {
        linear l;
        l.in = in;
        l.out = out;
        const float sd = scale / std::sqrt(static_cast<float>(in));
        fill(l.weight, static_cast<std::size_t>(in) * out, sd);
        fill(l.bias, static_cast<std::size_t>(out), sd);
        return l;
    };
    const int D = c.hidden(), hd = c.attention_head_dim;
    model m;
    m.config = c;
    m.patch_embed = make(c.in_channels * c.patch_size * c.patch_size, D);
    fill(m.pos_table, static_cast<std::size_t>(c.pos_embed_max_size) * c.pos_embed_max_size * D, 0.5f);
    m.time_linear1 = make(c.timestep_channels(), D);
    m.time_linear2 = make(D, D);
    m.text_linear1 = make(c.pooled_projection_dim, D);
    m.text_linear2 = make(D, D);
    m.context_embedder = make(c.joint_attention_dim, D);
    for (int i = 0; i < c.num_layers; ++i) {
        block_weights w;
        w.context_pre_only = i == c.num_layers - 1;
        w.dual_attention = c.dual_attention(i);
        w.norm1 = make(D, (w.dual_attention ? 9 : 6) * D);
        w.norm1_context = make(D, (w.context_pre_only ? 2 : 6) * D);
        w.to_qkv = make(D, 3 * D);
        w.add_qkv = make(D, 3 * D);
        w.to_out = make(D, D);
        if (c.qk_norm) {
            fill(w.norm_q, hd, 0.2f, 1.0f);
            fill(w.norm_k, hd, 0.2f, 1.0f);
            fill(w.norm_added_q, hd, 0.2f, 1.0f);
            fill(w.norm_added_k, hd, 0.2f, 1.0f);
        }
        if (w.dual_attention) {
            w.attn2_qkv = make(D, 3 * D);
            w.attn2_out = make(D, D);
            if (c.qk_norm) {
                fill(w.attn2_norm_q, hd, 0.2f, 1.0f);
                fill(w.attn2_norm_k, hd, 0.2f, 1.0f);
            }
        }
        w.ff1 = make(D, 4 * D);
        w.ff2 = make(4 * D, D);
        if (!w.context_pre_only) {
            w.to_add_out = make(D, D);
            w.ff_context1 = make(D, 4 * D);
            w.ff_context2 = make(4 * D, D);
        }
        m.blocks.push_back(std::move(w));
    }
    m.norm_out = make(D, 2 * D);
    m.proj_out = make(D, c.patch_features());
    return m;
}

std::size_t model::parameter_count() const {
    auto n = [](const linear& l) { return l.weight.size() + l.bias.size(); };
    std::size_t total = n(patch_embed) + pos_table.size() + n(time_linear1) + n(time_linear2) + n(text_linear1) +
                        n(text_linear2) + n(context_embedder) + n(norm_out) + n(proj_out);
    for (const auto& b : blocks)
        total += n(b.norm1) + n(b.norm1_context) + n(b.to_qkv) + n(b.add_qkv) + n(b.to_out) + n(b.to_add_out) +
                 b.norm_q.size() + b.norm_k.size() + b.norm_added_q.size() + b.norm_added_k.size() + n(b.ff1) + n(b.ff2) +
                 n(b.ff_context1) + n(b.ff_context2) + n(b.attn2_qkv) + n(b.attn2_out) + b.attn2_norm_q.size() +
                 b.attn2_norm_k.size();
    return total;
}

}  // namespace sd3
