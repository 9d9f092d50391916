#include "sd3/model.hpp"

#include <cmath>
#include <random>
#include <stdexcept>
#include <string>

#include "sd3/errors.hpp"
#include "sd3/safetensors.hpp"
#include "weights.hpp"

namespace sd3 {

using detail::read_linear;
using detail::read_tensor;

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
    for (int i = 0; i < c.num_layers; ++i)
        m.blocks.push_back(detail::read_joint_block(f, "transformer_blocks." + std::to_string(i) + ".", D, hd, c.qk_norm,
                                                    i == c.num_layers - 1, c.dual_attention(i)));
    m.norm_out = read_linear(f, "norm_out.linear", D, 2 * D);
    m.proj_out = read_linear(f, "proj_out", D, c.patch_features());
    return m;
}

model model::load(const std::filesystem::path& folder) { return detail::load_folder<model>(folder, load_transformer_config); }

model model::random(const transformer_config& c, std::uint64_t seed, float scale) {
    c.validate();
    detail::random_weights r(seed, scale);
    const int D = c.hidden(), hd = c.attention_head_dim;
    model m;
    m.config = c;
    m.patch_embed = r.make(c.in_channels * c.patch_size * c.patch_size, D);
    r.fill(m.pos_table, static_cast<std::size_t>(c.pos_embed_max_size) * c.pos_embed_max_size * D, 0.5f);
    m.time_linear1 = r.make(c.timestep_channels(), D);
    m.time_linear2 = r.make(D, D);
    m.text_linear1 = r.make(c.pooled_projection_dim, D);
    m.text_linear2 = r.make(D, D);
    m.context_embedder = r.make(c.joint_attention_dim, D);
    for (int i = 0; i < c.num_layers; ++i)
        m.blocks.push_back(detail::random_joint_block(r, D, hd, c.qk_norm, i == c.num_layers - 1, c.dual_attention(i)));
    m.norm_out = r.make(D, 2 * D);
    m.proj_out = r.make(D, c.patch_features());
    return m;
}

std::size_t model::parameter_count() const {
    auto n = [](const linear& l) { return l.weight.size() + l.bias.size(); };
    std::size_t total = n(patch_embed) + pos_table.size() + n(time_linear1) + n(time_linear2) + n(text_linear1) +
                        n(text_linear2) + n(context_embedder) + n(norm_out) + n(proj_out);
    for (const auto& b : blocks) total += detail::parameter_count(b);
    return total;
}

namespace detail {

block_weights read_joint_block(const safetensors_file& f, const std::string& b, int D, int hd, bool qk_norm, bool context_pre_only,
                               bool dual_attention) {
    auto head_norm = [&](const std::string& name) { return read_tensor(f, b + name + ".weight", {hd}); };
    block_weights w;
    w.context_pre_only = context_pre_only;
    w.dual_attention = dual_attention;
    w.norm1 = read_linear(f, b + "norm1.linear", D, (dual_attention ? 9 : 6) * D);
    w.norm1_context = read_linear(f, b + "norm1_context.linear", D, (context_pre_only ? 2 : 6) * D);
    w.to_qkv = read_fused_qkv(f, b + "attn.", "to_q", "to_k", "to_v", D);
    w.add_qkv = read_fused_qkv(f, b + "attn.", "add_q_proj", "add_k_proj", "add_v_proj", D);
    w.to_out = read_linear(f, b + "attn.to_out.0", D, D);
    if (qk_norm) {
        w.norm_q = head_norm("attn.norm_q");
        w.norm_k = head_norm("attn.norm_k");
        w.norm_added_q = head_norm("attn.norm_added_q");
        w.norm_added_k = head_norm("attn.norm_added_k");
    }
    if (dual_attention) {
        w.attn2_qkv = read_fused_qkv(f, b + "attn2.", "to_q", "to_k", "to_v", D);
        w.attn2_out = read_linear(f, b + "attn2.to_out.0", D, D);
        if (qk_norm) {
            w.attn2_norm_q = head_norm("attn2.norm_q");
            w.attn2_norm_k = head_norm("attn2.norm_k");
        }
    }
    w.ff1 = read_linear(f, b + "ff.net.0.proj", D, 4 * D);
    w.ff2 = read_linear(f, b + "ff.net.2", 4 * D, D);
    if (!context_pre_only) {
        w.to_add_out = read_linear(f, b + "attn.to_add_out", D, D);
        w.ff_context1 = read_linear(f, b + "ff_context.net.0.proj", D, 4 * D);
        w.ff_context2 = read_linear(f, b + "ff_context.net.2", 4 * D, D);
    }
    return w;
}

block_weights random_joint_block(random_weights& r, int D, int hd, bool qk_norm, bool context_pre_only, bool dual_attention) {
    block_weights w;
    w.context_pre_only = context_pre_only;
    w.dual_attention = dual_attention;
    w.norm1 = r.make(D, (dual_attention ? 9 : 6) * D);
    w.norm1_context = r.make(D, (context_pre_only ? 2 : 6) * D);
    w.to_qkv = r.make(D, 3 * D);
    w.add_qkv = r.make(D, 3 * D);
    w.to_out = r.make(D, D);
    if (qk_norm) {
        w.norm_q = r.norm(hd);
        w.norm_k = r.norm(hd);
        w.norm_added_q = r.norm(hd);
        w.norm_added_k = r.norm(hd);
    }
    if (dual_attention) {
        w.attn2_qkv = r.make(D, 3 * D);
        w.attn2_out = r.make(D, D);
        if (qk_norm) {
            w.attn2_norm_q = r.norm(hd);
            w.attn2_norm_k = r.norm(hd);
        }
    }
    w.ff1 = r.make(D, 4 * D);
    w.ff2 = r.make(4 * D, D);
    if (!context_pre_only) {
        w.to_add_out = r.make(D, D);
        w.ff_context1 = r.make(D, 4 * D);
        w.ff_context2 = r.make(4 * D, D);
    }
    return w;
}

std::size_t parameter_count(const block_weights& b) {
    auto n = [](const linear& l) { return l.weight.size() + l.bias.size(); };
    return n(b.norm1) + n(b.norm1_context) + n(b.to_qkv) + n(b.add_qkv) + n(b.to_out) + n(b.to_add_out) + b.norm_q.size() +
           b.norm_k.size() + b.norm_added_q.size() + b.norm_added_k.size() + n(b.ff1) + n(b.ff2) + n(b.ff_context1) +
           n(b.ff_context2) + n(b.attn2_qkv) + n(b.attn2_out) + b.attn2_norm_q.size() + b.attn2_norm_k.size();
}

}  // namespace detail
}  // namespace sd3
