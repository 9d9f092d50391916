// Conditioning and modulation: the timestep / pooled-text embedding (SD3's patch embedding too), each block's
// AdaLN chunks, and the gated residual x += gate * module output that every module site (hooked or computed) ends in.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

#include "sd3/errors.hpp"
#include "sd3/flux_model.hpp"
#include "sd3/gemm.hpp"
#include "sd3/model.hpp"
#include "sd3/resources.hpp"
#include "sd3/transformer.hpp"
#include "sd3/workers.hpp"
#include "transformer_impl.hpp"

namespace sd3 {
using namespace detail;

// Sinusoidal projection [cos, sin] (flip_sin_to_cos) of scale(values[b]), freq_i = exp(-ln(1e4) * i / 128): the
// exponent is formed in float like torch, exp evaluated correctly rounded.
void transformer::impl::timestep_projection(const float* values, float (*scale)(float), float* out) const {
    constexpr int T = 256, half = T / 2;
    for (int b = 0; b < B; ++b) {
        const float t = scale(values[b]);
        for (int i = 0; i < half; ++i) {
            const float e = (static_cast<float>(-std::log(10000.0)) * static_cast<float>(i)) / static_cast<float>(half);
            const float freq = static_cast<float>(std::exp(static_cast<double>(e)));
            const float arg = t * freq;
            out[static_cast<std::size_t>(b) * T + i] = std::cos(arg);
            out[static_cast<std::size_t>(b) * T + half + i] = std::sin(arg);
        }
    }
}

// temb = timestep MLP (+ guidance MLP: FLUX with guidance_embeds, guidance x 1000 as diffusers scales it) + pooled
// MLP, in diffusers' order, then SiLU(temb), which every AdaLN linear reads.
void transformer::impl::embed_conditioning(const conditioning_weights& w, const forward_inputs& in) {
    auto mlp = [&](const float* x, int width, const linear& l1, const linear& l2, float* out) {
        linear_rows(serial(), x, width, B, l1, small_hidden.data(), D);
        silu_inplace(small_hidden.data(), B * D);
        linear_rows(serial(), small_hidden.data(), D, B, l2, out, D);
    };
    timestep_projection(in.timesteps.data(), w.timestep_scale, tproj.data());
    mlp(tproj.data(), 256, *w.time1, *w.time2, temb.data());
    if (w.guidance1) {
        timestep_projection(in.guidance.data(), [](float g) { return g * 1000.0f; }, tproj.data());  // diffusers: guidance * 1000
        mlp(tproj.data(), 256, *w.guidance1, *w.guidance2, silu_temb.data());
        vec(temb.data(), B * D) += const_vec(silu_temb.data(), B * D);
    }
    mlp(in.pooled.data(), w.text1->in, *w.text1, *w.text2, silu_temb.data());
    vec(temb.data(), B * D) += const_vec(silu_temb.data(), B * D);
    std::copy_n(temb.data(), B * D, silu_temb.data());
    silu_inplace(silu_temb.data(), B * D);
}

void transformer::impl::embed(const forward_inputs& in) {
    const auto& c = m->config;
    embed_conditioning({&m->time_linear1, &m->time_linear2, nullptr, nullptr, &m->text_linear1, &m->text_linear2,
                        [](float t) { return t; }},
                       in);
    linear_rows(split(), in.context.data(), c.joint_attention_dim, B * L, m->context_embedder, x_ctx.data(), D);

    // Patch embedding: im2col of the active tokens ((c, u, v) order, as the conv weight), GEMM, + cropped table.
    const int p = c.patch_size, C = c.in_channels, K = C * p * p, M = c.pos_embed_max_size;
    const int top = (M - Hg) / 2, left = (M - Wg) / 2;
    parallel_for(split(), B, static_cast<double>(B) * n * K, [&](int b, int) {
        for (int r = 0; r < n; ++r) {
            const int t = token_id(stream::image, b, r), i = t / Wg, j = t % Wg;
            float* dst = patches.data() + (static_cast<std::size_t>(b) * n + r) * K;
            for (int ch = 0; ch < C; ++ch)
                for (int u = 0; u < p; ++u)
                    for (int v = 0; v < p; ++v)
                        *dst++ = in.latents[((static_cast<std::size_t>(b) * C + ch) * in.height + i * p + u) * in.width + j * p + v];
        }
    });
    linear_rows(split(), patches.data(), K, B * n, m->patch_embed, x_img.data(), D);
    parallel_for(split(), B, static_cast<double>(B) * n * D, [&](int b, int) {
        for (int r = 0; r < n; ++r) {
            const int t = token_id(stream::image, b, r), i = t / Wg, j = t % Wg;
            vec(x_img.data() + (static_cast<std::size_t>(b) * n + r) * D, D) +=
                const_vec(m->pos_table.data() + (static_cast<std::size_t>(top + i) * M + left + j) * D, D);
        }
    });
}

// The block's AdaLN chunks per stream. A single-stream block has one modulation, which both streams read.
void transformer::impl::modulation(const block_plan& p) {
    mod_stride[0] = p.norm[0]->out;
    linear_rows(split(), silu_temb.data(), D, B, *p.norm[0], mod_img.data(), mod_stride[0]);
    mod_of[0] = mod_img.data();
    if (p.norm[1]) {
        mod_stride[1] = p.norm[1]->out;
        linear_rows(split(), silu_temb.data(), D, B, *p.norm[1], mod_ctx.data(), mod_stride[1]);
        mod_of[1] = mod_ctx.data();
    } else {
        mod_stride[1] = mod_stride[0];
        mod_of[1] = mod_img.data();
    }
}

// Residual update x += gate * module_output for every active row of a stream. The output comes from the
// freshly computed rows (`computed`, mode compute) or from the hook's rows (reuse / subset).
void transformer::impl::apply_module(stream s, const module_hook& h, const float* computed, int gate_offset) {
    const int rows = tokens_of(s), all = all_tokens_of(s);
    float* x = x_of(s);
    const bool from_hook = h.mode != module_mode::compute;
    parallel_for(split(), B, 2.0 * B * rows * D, [&](int b, int) {
        const const_vec gate(modulation_of(s, b) + gate_offset, D);
        for (int r = 0; r < rows; ++r) {
            const std::size_t active_row = static_cast<std::size_t>(b) * rows + r;
            const std::size_t hook_row = static_cast<std::size_t>(b) * all + token_id(s, b, r);
            const float* src = from_hook ? h.rows + hook_row * D : computed + active_row * D;
            if (!from_hook && h.rows) std::copy_n(src, D, h.rows + hook_row * D);  // read-back for the caller's cache
            vec(x + active_row * D, D) += gate * const_vec(src, D);
        }
    });
}

}  // namespace sd3
