// What only FLUX has in the forward (diffusers' FluxTransformer2DModel): its block plan (double-stream blocks are
// the shared joint blocks; single-stream blocks run the same stages with one set of weights for both streams), the
// packed-token embedding with the guidance embedding, and the rotary position embedding over (axis 0, row,
// column) ids. Everything else is the shared stages' (transformer.cpp and the files it names).
#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>

#include "sd3/errors.hpp"
#include "sd3/flux_model.hpp"
#include "transformer_impl.hpp"

namespace sd3 {
using namespace detail;

namespace {
constexpr double rope_theta = 10000.0;  // FluxPosEmbed(theta=10000)
}  // namespace

transformer::impl::impl(const flux_model& model_, const engine_limits& lim, int threads) : fx(&model_), limits(lim) {
    const auto& c = fx->config;
    c.validate();
    if (c.patch_size != 1)
        throw std::invalid_argument(message("transformer: FLUX patch_size = ", c.patch_size,
                                            " is not supported (the pipeline packs 2 x 2 latent patches into tokens itself; "
                                            "released FLUX configs have 1)"));
    if (static_cast<int>(fx->double_blocks.size()) != c.num_layers || static_cast<int>(fx->single_blocks.size()) != c.num_single_layers)
        throw std::invalid_argument(message("transformer: FLUX model has ", fx->double_blocks.size(), " double-stream and ",
                                            fx->single_blocks.size(), " single-stream blocks, config says ", c.num_layers,
                                            " and ", c.num_single_layers));
    check_limits(limits, 1, 0);
    check_threads(threads);
    check_flux_model();
    D = c.hidden();
    P = c.patch_features();
    hd = c.attention_head_dim;
    heads = c.num_attention_heads;
    size_workspaces(threads, 6, c.in_channels, false, true);
    // The rotation's frequency of each pair of a head's dims, axis by axis (FluxPosEmbed, in double): 1 / theta^(2k / d_a).
    for (const int d : c.axes_dims_rope)
        for (int k = 0; k < d / 2; ++k) rope_frequencies.push_back(1.0 / std::pow(rope_theta, static_cast<double>(2 * k) / d));
    plan_flux();
    std::vector<const linear*> all{&fx->x_embedder, &fx->time_linear1, &fx->time_linear2, &fx->text_linear1,
                                   &fx->text_linear2, &fx->context_embedder, &fx->norm_out, &fx->proj_out};
    if (c.guidance_embeds) all.insert(all.end(), {&fx->guidance_linear1, &fx->guidance_linear2});
    for (const auto& w : fx->double_blocks)
        all.insert(all.end(), {&w.norm1, &w.norm1_context, &w.to_qkv, &w.add_qkv, &w.to_out, &w.to_add_out, &w.ff1, &w.ff2,
                               &w.ff_context1, &w.ff_context2});
    for (const auto& w : fx->single_blocks) all.insert(all.end(), {&w.norm, &w.to_qkv, &w.proj_mlp});
    for (const auto& l : split_proj) all.push_back(&l);
    pack_weights(std::move(all));
    team = std::make_unique<workers>(threads);
}

void transformer::impl::check_flux_model() const {
    const auto& c = fx->config;
    const int d = c.hidden(), hd_ = c.attention_head_dim, T = c.timestep_channels();
    check_linear("x_embedder", fx->x_embedder, c.in_channels, d);
    check_outer_weights(*fx);
    if (c.guidance_embeds) {
        check_linear("time_text_embed.guidance_embedder.linear_1", fx->guidance_linear1, T, d);
        check_linear("time_text_embed.guidance_embedder.linear_2", fx->guidance_linear2, d, d);
    }
    for (std::size_t l = 0; l < fx->double_blocks.size(); ++l) {
        const auto& w = fx->double_blocks[l];
        const std::string b = "transformer_blocks." + std::to_string(l) + ".";
        if (w.context_pre_only || w.dual_attention)
            throw std::invalid_argument("transformer: " + b + " of a FLUX model must be neither context_pre_only nor dual_attention");
        for (const auto& [name, lin, in, out] :
             {std::tuple{"norm1.linear", &w.norm1, d, 6 * d}, std::tuple{"norm1_context.linear", &w.norm1_context, d, 6 * d},
              std::tuple{"attn.to_qkv", &w.to_qkv, d, 3 * d}, std::tuple{"attn.add_qkv", &w.add_qkv, d, 3 * d},
              std::tuple{"attn.to_out.0", &w.to_out, d, d}, std::tuple{"attn.to_add_out", &w.to_add_out, d, d},
              std::tuple{"ff.net.0.proj", &w.ff1, d, 4 * d}, std::tuple{"ff.net.2", &w.ff2, 4 * d, d},
              std::tuple{"ff_context.net.0.proj", &w.ff_context1, d, 4 * d}, std::tuple{"ff_context.net.2", &w.ff_context2, 4 * d, d}})
            check_linear(b + name, *lin, in, out);
        for (const auto& [name, v] : {std::pair{"attn.norm_q.weight", &w.norm_q}, std::pair{"attn.norm_k.weight", &w.norm_k},
                                      std::pair{"attn.norm_added_q.weight", &w.norm_added_q},
                                      std::pair{"attn.norm_added_k.weight", &w.norm_added_k}})
            check_vector(b + name, *v, hd_);
    }
    for (std::size_t l = 0; l < fx->single_blocks.size(); ++l) {
        const auto& w = fx->single_blocks[l];
        const std::string b = "single_transformer_blocks." + std::to_string(l) + ".";
        check_linear(b + "norm.linear", w.norm, d, 3 * d);
        check_linear(b + "attn.to_qkv", w.to_qkv, d, 3 * d);
        check_linear(b + "proj_mlp", w.proj_mlp, d, 4 * d);
        check_linear(b + "proj_out", w.proj_out, 5 * d, d);
        check_vector(b + "attn.norm_q.weight", w.norm_q, hd_);
        check_vector(b + "attn.norm_k.weight", w.norm_k, hd_);
    }
}

// Double-stream blocks are joint blocks with qk-norm and context outputs in every block; single-stream blocks
// read one modulation (shift, scale, gate) for attention and MLP alike, and their proj_out is split here by input
// columns: [attention (D) | MLP (4D)] -> D becomes D -> D without bias plus 4D -> D with it.
void transformer::impl::plan_flux() {
    for (const auto& w : fx->double_blocks) plan.push_back(joint_plan(w, true, D));
    split_proj.reserve(2 * fx->single_blocks.size());  // the plan points into it: no reallocation after this
    for (const auto& w : fx->single_blocks) {
        linear attention{D, D, std::vector<float>(static_cast<std::size_t>(D) * D), std::vector<float>(D, 0.0f)};
        linear mlp{4 * D, D, std::vector<float>(static_cast<std::size_t>(4) * D * D), w.proj_out.bias};
        for (int o = 0; o < D; ++o) {
            const float* row = w.proj_out.weight.data() + static_cast<std::size_t>(o) * 5 * D;
            std::copy_n(row, D, attention.weight.data() + static_cast<std::size_t>(o) * D);
            std::copy_n(row + D, 4 * D, mlp.weight.data() + static_cast<std::size_t>(o) * 4 * D);
        }
        split_proj.push_back(std::move(attention));
        split_proj.push_back(std::move(mlp));
        block_plan p;
        p.single = true;
        p.norm[0] = &w.norm;
        p.qkv[0] = p.qkv[1] = &w.to_qkv;
        p.norm_q[0] = p.norm_q[1] = w.norm_q.data();
        p.norm_k[0] = p.norm_k[1] = w.norm_k.data();
        p.attention_out[0] = p.attention_out[1] = &split_proj[split_proj.size() - 2];
        p.ff1[0] = p.ff1[1] = &w.proj_mlp;
        p.ff2[0] = p.ff2[1] = &split_proj.back();
        p.attention[0] = p.attention[1] = p.mlp[0] = p.mlp[1] = {0, D, 2 * D};
        plan.push_back(p);
    }
}

void transformer::impl::embed_flux(const forward_inputs& in) {
    const auto& c = fx->config;
    embed_conditioning({&fx->time_linear1, &fx->time_linear2, c.guidance_embeds ? &fx->guidance_linear1 : nullptr,
                        c.guidance_embeds ? &fx->guidance_linear2 : nullptr, &fx->text_linear1, &fx->text_linear2,
                        // the pipeline hands the model t / 1000 and the model scales it back by 1000, both in float
                        [](float t) { return t / 1000.0f * 1000.0f; }},
                       in);
    linear_rows(split(), in.context.data(), c.joint_attention_dim, B * L, fx->context_embedder, x_ctx.data(), D);
    const int C = c.in_channels;
    const float* rows = in.latents.data();
    if (tokens) {  // the active tokens' rows, gathered
        parallel_for(split(), B, static_cast<double>(B) * n * C, [&](int b, int) {
            for (int r = 0; r < n; ++r)
                std::copy_n(in.latents.data() + (static_cast<std::size_t>(b) * N + token_id(stream::image, b, r)) * C, C,
                            patches.data() + (static_cast<std::size_t>(b) * n + r) * C);
        });
        rows = patches.data();
    }
    linear_rows(split(), rows, C, B * n, fx->x_embedder, x_img.data(), D);
    rotary_tables(in);
}

// Per token, the rotation angles of each pair of a head's dims (diffusers' FluxPosEmbed: per axis a,
// angle = id_a * rope_frequencies of its pairs, computed in double, cos and sin rounded to float; the axes' pairs
// concatenated in order): [cos of every pair, sin of every pair]. All image tokens get their row, since
// a subset forward's tokens are given by absolute id.
void transformer::impl::rotary_tables(const forward_inputs& in) {
    const auto& axes = fx->config.axes_dims_rope;
    const int pairs = hd / 2;
    auto fill = [&](float* table, int token, const float* ids, float row, float column) {
        const float id[3] = {ids ? ids[0] : 0.0f, ids ? ids[1] : row, ids ? ids[2] : column};
        int j = 0;
        for (int a = 0; a < 3; ++a)
            for (int k = 0; k < axes[a] / 2; ++k, ++j) {
                const double angle = static_cast<double>(id[a]) * rope_frequencies[static_cast<std::size_t>(j)];
                table[static_cast<std::size_t>(token) * hd + j] = static_cast<float>(std::cos(angle));
                table[static_cast<std::size_t>(token) * hd + pairs + j] = static_cast<float>(std::sin(angle));
            }
    };
    const float* image_ids = in.image_ids.empty() ? nullptr : in.image_ids.data();
    const float* text_ids = in.text_ids.empty() ? nullptr : in.text_ids.data();
    parallel_for(split(), N, 4.0 * N * hd, [&](int t, int) {
        fill(rope_img.data(), t, image_ids ? image_ids + static_cast<std::size_t>(t) * 3 : nullptr, static_cast<float>(t / Wg),
             static_cast<float>(t % Wg));
    });
    for (int t = 0; t < L; ++t) fill(rope_ctx.data(), t, text_ids ? text_ids + static_cast<std::size_t>(t) * 3 : nullptr, 0.0f, 0.0f);
}

// Rotates each head's query and key by the token's angles: pairs (2j, 2j+1) as complex numbers (diffusers'
// apply_rotary_emb with interleaved cos/sin).
void transformer::impl::rotate(const float* table, float* qkv_row) const {
    const int pairs = hd / 2;
    const float* cos = table;
    const float* sin = table + pairs;
    for (int part = 0; part < 2; ++part)  // q, then k
        for (int h = 0; h < heads; ++h) {
            float* v = qkv_row + static_cast<std::ptrdiff_t>(part) * D + static_cast<std::ptrdiff_t>(h) * hd;
            for (int j = 0; j < pairs; ++j) {
                const float x0 = v[2 * j], x1 = v[2 * j + 1];
                v[2 * j] = x0 * cos[j] - x1 * sin[j];
                v[2 * j + 1] = x1 * cos[j] + x0 * sin[j];
            }
        }
}

}  // namespace sd3
