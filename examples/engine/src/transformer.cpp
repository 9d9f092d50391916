// The MMDiT forward: construction (workspaces sized once, weights packed once, the per-model block plan of
// transformer_impl.hpp), the blocks as sequences of stages, the final layer, run(), and the public transformer
// API. The stages live one per file: modulation.cpp (embedding, AdaLN chunks, gated residual), attention.cpp
// (joint and image-only attention, online softmax over key blocks), probe.cpp (the attention probe), kv_cache.cpp
// (the K/V cache and packed keys/values), mlp.cpp (feed-forward), validate.cpp (weights, inputs, hooks);
// FLUX's own embedding and rotary positions are in flux_forward.cpp. SD3's joint blocks, MMDiT-X's second
// attention and FLUX's double- and single-stream blocks share them. The plain forward is the hooked forward with
// default options. Linear layers run on sd3::gemm (row tiles are the parallel work units), attention on the same
// micro-kernel; Eigen does the element-wise work. All scratch is sized in the constructor, so a forward does not
// allocate.
#include "sd3/transformer.hpp"

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
#include "sd3/workers.hpp"
#include "transformer_impl.hpp"

namespace sd3 {
using namespace detail;

// ---------------------------------------------------------------------------------------------------------------

namespace {
[[noreturn]] void bad_limit_value(const std::string& what) { throw std::invalid_argument("engine_limits." + what); }
}  // namespace

// The limits every architecture checks; `default_side` replaces a 0 height or width (0: none, then required).
void transformer::impl::check_limits(engine_limits& limits, int patch, int default_side) {
    if (limits.max_height == 0) limits.max_height = default_side;
    if (limits.max_width == 0) limits.max_width = default_side;
    if (limits.max_batch < 1) bad_limit_value(message("max_batch = ", limits.max_batch, " must be >= 1"));
    if (limits.max_context_tokens < 1)
        bad_limit_value(message("max_context_tokens = ", limits.max_context_tokens, " must be >= 1"));
    if (limits.max_height < patch || limits.max_width < patch)
        bad_limit_value(message("max_height/max_width = ", limits.max_height, "/", limits.max_width, " must be >= ",
                                default_side == 0 ? "1 (a FLUX engine needs its token grid)" : "patch_size",
                                default_side == 0 ? std::string() : message(" ", patch)));
}

transformer::impl::impl(const model& model_, const engine_limits& lim, int threads) : m(&model_), limits(lim) {
    const auto& c = m->config;
    c.validate();
    if (static_cast<int>(m->blocks.size()) != c.num_layers)
        throw std::invalid_argument(message("transformer: model has ", m->blocks.size(), " blocks but config.num_layers = ",
                                            c.num_layers));
    check_limits(limits, c.patch_size, c.sample_size);
    check_threads(threads);
    m->validate();
    D = c.hidden();
    P = c.patch_features();
    hd = c.attention_head_dim;
    heads = c.num_attention_heads;
    const bool dual = !c.dual_attention_layers.empty();
    size_workspaces(threads, dual ? 9 : 6, c.patch_inputs(), dual, false);
    plan_sd3();
    std::vector<const linear*> all{&m->patch_embed, &m->time_linear1, &m->time_linear2, &m->text_linear1,
                                   &m->text_linear2, &m->context_embedder, &m->norm_out, &m->proj_out};
    for (const auto& w : m->blocks)
        for (const linear* l : {&w.norm1, &w.norm1_context, &w.to_qkv, &w.add_qkv, &w.to_out, &w.ff1, &w.ff2,
                                &w.to_add_out, &w.ff_context1, &w.ff_context2, &w.attn2_qkv, &w.attn2_out})
            if (!l->weight.empty()) all.push_back(l);
    pack_weights(std::move(all));
    team = std::make_unique<workers>(threads);
}

// Sizes every workspace for the limits (set before), `threads` workers, modulation rows of `modulation_width` x D
// floats per sample and token input rows of `token_input_floats`. Their total is checked against the machine's
// memory before anything is allocated, so an absurd limit is refused with the amount it would need.
void transformer::impl::size_workspaces(int threads, int modulation_width, int token_input_floats, bool dual, bool rope) {
    F = 4 * D;
    token_inputs = token_input_floats;
    if (hd > key_block)  // the attention kernel packs a head's query rows in one slab of the GEMM's depth
        throw std::invalid_argument(message("transformer: attention_head_dim = ", hd, " exceeds the attention kernel's ",
                                            key_block));
    const int patch = m ? m->config.patch_size : 1;
    // Counts the engine keeps in int, formed in 64 bits first: each limit may be in range while a product is not.
    const std::int64_t tokens64 = std::int64_t{limits.max_height / patch} * (limits.max_width / patch);
    const std::int64_t tasks64 = std::int64_t{limits.max_batch} *
                                 ((tokens64 + query_chunk() - 1) / query_chunk() + ceil_div(limits.max_context_tokens, query_chunk()));
    if (tokens64 > std::numeric_limits<int>::max() || tasks64 > std::numeric_limits<int>::max())
        bad_limit_value(message("max_batch/max_height/max_width = ", limits.max_batch, "/", limits.max_height, "/",
                                limits.max_width, " give ", tokens64, " image tokens per sample and ", tasks64,
                                " attention tasks, more than the engine indexes"));
    max_tokens = static_cast<int>(tokens64);
    token_seen.assign(static_cast<std::size_t>(max_tokens), 0);
    max_ctx = limits.max_context_tokens;
    max_tasks = static_cast<int>(tasks64);
    const std::size_t Bm = limits.max_batch, Nm = max_tokens, Lm = max_ctx;
    const std::size_t rows = std::max(Nm, Lm);
    const std::size_t per_sample = saturating_product(Bm, D), image = saturating_product(Bm, Nm, D),
                      context = saturating_product(Bm, Lm, D);
    const std::size_t floats[] = {
        saturating_product(Bm, 256),                               // tproj (timestep_channels)
        saturating_mul(per_sample, 3 + modulation_width + 6 + 2),  // temb, silu_temb, small_hidden, mod_img, mod_ctx, mod_final
        saturating_mul(image, 4 + 3 + (dual ? 1 : 0)),             // x, nrm, att, out, qkv (image stream), nrm2
        saturating_mul(context, 4 + 3),                            // the same for the context stream
        saturating_product(Bm, rows, F),                           // hidden
        saturating_product(Bm, Nm, token_input_floats),            // patches
        saturating_product(Bm, Nm, P),                             // out_rows
        saturating_product(max_tasks, Nm),                         // probe_parts
        saturating_product(Bm, heads, kv_slot_for(max_tokens, max_ctx)),  // kv_packed
        saturating_product(Bm, rows),                              // positions (int32, same size as a float)
        rope ? saturating_product(Nm + Lm, hd) : 0,                // rope_img, rope_ctx
        saturating_mul(scratch_slot_for(hd), static_cast<std::size_t>(threads)),  // scratch
    };
    std::size_t total = 0;
    for (const std::size_t f : floats) total = saturating_add(total, f);
    require_memory(message("transformer: workspaces for max_batch ", limits.max_batch, ", max_height ", limits.max_height,
                           ", max_width ", limits.max_width, ", max_context_tokens ", limits.max_context_tokens, " and ",
                           threads, " threads"),
                   saturating_mul(total, sizeof(float)));

    tproj.resize(Bm * 256);
    temb.resize(Bm * D);
    silu_temb.resize(Bm * D);
    small_hidden.resize(Bm * D);
    mod_img.resize(Bm * modulation_width * D);
    mod_ctx.resize(Bm * 6 * D);
    mod_final.resize(Bm * 2 * D);
    x_img.resize(Bm * Nm * D);
    nrm_img.resize(Bm * Nm * D);
    qkv_img.resize(Bm * Nm * 3 * D);
    att_img.resize(Bm * Nm * D);
    out_img.resize(Bm * Nm * D);
    if (dual) nrm2_img.resize(Bm * Nm * D);
    x_ctx.resize(Bm * Lm * D);
    nrm_ctx.resize(Bm * Lm * D);
    qkv_ctx.resize(Bm * Lm * 3 * D);
    att_ctx.resize(Bm * Lm * D);
    out_ctx.resize(Bm * Lm * D);
    hidden.resize(Bm * rows * F);
    patches.resize(Bm * Nm * token_input_floats);
    out_rows.resize(Bm * Nm * P);
    probe_parts.resize(static_cast<std::size_t>(max_tasks) * Nm);
    kv_packed.resize(Bm * heads * kv_slot_for(max_tokens, max_ctx));
    positions.resize(Bm * rows);
    if (rope) {
        rope_img.resize(Nm * hd);
        rope_ctx.resize(Lm * hd);
    }
    size_scratch(threads);
}

// A joint block (SD3's, and FLUX's double-stream ones): joint attention over both streams, then each stream's
// MLP; SD3's last block's context stream only feeds keys and values (its norm is AdaLayerNormContinuous: scale,
// shift).
block_plan transformer::impl::joint_plan(const block_weights& w, bool qk_norm, int D) {
    block_plan p;
    p.joint = &w;
    p.context_outputs = !w.context_pre_only;
    p.norm[0] = &w.norm1;
    p.norm[1] = &w.norm1_context;
    p.qkv[0] = &w.to_qkv;
    p.qkv[1] = &w.add_qkv;
    if (qk_norm) {
        p.norm_q[0] = w.norm_q.data();
        p.norm_k[0] = w.norm_k.data();
        p.norm_q[1] = w.norm_added_q.data();
        p.norm_k[1] = w.norm_added_k.data();
    }
    p.attention_out[0] = &w.to_out;
    p.ff1[0] = &w.ff1;
    p.ff2[0] = &w.ff2;
    p.attention[0] = {0, D, 2 * D};
    p.mlp[0] = {3 * D, 4 * D, 5 * D};
    if (w.context_pre_only) {
        p.attention[1] = {D, 0, -1};
    } else {
        p.attention_out[1] = &w.to_add_out;
        p.ff1[1] = &w.ff_context1;
        p.ff2[1] = &w.ff_context2;
        p.attention[1] = p.attention[0];
        p.mlp[1] = p.mlp[0];
    }
    return p;
}

void transformer::impl::plan_sd3() {
    for (const auto& w : m->blocks) plan.push_back(joint_plan(w, m->config.qk_norm, D));
}

void transformer::impl::check_threads(int t) {
    if (t < 1 || t > max_threads)
        throw std::invalid_argument(message("transformer: threads = ", t, " is out of range [1, ", max_threads, "]"));
}

std::size_t transformer::impl::scratch_slot_for(int head_dim) {
    return round_up(std::max(attention_scratch::floats(head_dim), gemm::workspace_floats()), 16);
}

// Sizes the per-worker scratch slots for `t` workers; on failure nothing changes.
void transformer::impl::size_scratch(int t) {
    const std::size_t slot = scratch_slot_for(hd);
    require_memory(message("transformer: scratch for ", t, " threads"), saturating_product(t, slot, sizeof(float)));
    buffer fresh(static_cast<std::size_t>(t) * slot, 0.0f);
    scratch.swap(fresh);
    scratch_slot = slot;
}

// Packs every linear layer's weight (checked before) for the GEMM: a second copy of the weights, made once so
// that no product repacks them.
void transformer::impl::pack_weights(std::vector<const linear*> all) {
    std::size_t floats = 0;
    for (const linear* l : all) floats = saturating_add(floats, l->weight.size());
    require_memory(message("transformer: packed weights (", floats, " floats)"), saturating_mul(floats, sizeof(float)));
    for (const linear* l : all) packed.try_emplace(l, l->weight, l->out, l->in);
}

// ---------------------------------------------------------------------------------------------------------------

void transformer::impl::joint_block(int layer, const block_plan& p, const block_hooks& h) {
    // MMDiT-X: the image-only attention reads LayerNorm(x) modulated by its own shift and scale, from x as it is
    // before the joint attention's residual (SD35AdaLayerNormZeroX), so its input is made first.
    if (p.dual_attention() && h.attention2.mode == module_mode::compute) {
        parallel_for(split(), B * n, norm_work * B * n * D, [&](int r, int) {
            const float* mod = modulation_of(stream::image, r / n);
            norm_modulate(x_img.data() + static_cast<std::size_t>(r) * D, nrm2_img.data() + static_cast<std::size_t>(r) * D,
                          D, mod + 6 * D, mod + 7 * D);
        });
    }
    attention_stage(layer, p, h);
    apply_module(stream::image, h.attention[0], out_img.data(), p.attention[0].gate);
    if (p.context_outputs) apply_module(stream::context, h.attention[1], out_ctx.data(), p.attention[1].gate);
    if (p.dual_attention()) image_attention_stage(layer, *p.joint, h.attention2);
    for (const stream s : {stream::image, stream::context}) {
        const int i = static_cast<int>(s);
        if (s == stream::context && !p.context_outputs) break;
        float* out = s == stream::image ? out_img.data() : out_ctx.data();
        mlp_compute(s, h.mlp[i], p, out);
        apply_module(s, h.mlp[i], out, p.mlp[i].gate);
    }
}

// FLUX's single-stream block: x + gate * proj_out([attention(n), GELU(proj_mlp(n))]) with n = the modulated norm of
// the block's input, for the context and image tokens alike. The attention and the MLP both read the input, so both
// are computed before either is added; proj_out is applied as its two column blocks (plan_flux), the module sites.
void transformer::impl::single_block(int layer, const block_plan& p, const block_hooks& h) {
    attention_stage(layer, p, h);  // out_img, out_ctx
    // att_img / att_ctx are free once the attention's output projection has read them: the MLP outputs go there.
    mlp_compute(stream::image, h.mlp[0], p, att_img.data());
    mlp_compute(stream::context, h.mlp[1], p, att_ctx.data());
    for (const stream s : {stream::image, stream::context}) {
        const int i = static_cast<int>(s);
        apply_module(s, h.attention[i], s == stream::image ? out_img.data() : out_ctx.data(), p.attention[i].gate);
        apply_module(s, h.mlp[i], s == stream::image ? att_img.data() : att_ctx.data(), p.mlp[i].gate);
    }
}

void transformer::impl::final_layer(std::span<float> velocity) {
    // norm_out: AdaLayerNormContinuous, chunks (scale, shift)
    const linear& norm_out = m ? m->norm_out : fx->norm_out;
    const linear& proj_out = m ? m->proj_out : fx->proj_out;
    linear_rows(split(), silu_temb.data(), D, B, norm_out, mod_final.data(), 2 * D);
    parallel_for(split(), B * n, norm_work * B * n * D, [&](int r, int) {
        const float* md = mod_final.data() + static_cast<std::size_t>(r / n) * 2 * D;
        norm_modulate(x_img.data() + static_cast<std::size_t>(r) * D, nrm_img.data() + static_cast<std::size_t>(r) * D, D,
                      md + D, md);
    });
    const bool rows_out = subset || fx;  // FLUX returns the token sequence; SD3 the image
    float* dst = rows_out ? velocity.data() : out_rows.data();
    linear_rows(split(), nrm_img.data(), D, B * n, proj_out, dst, P);
    if (!rows_out) {  // unpatchify: row (i, j) features (u, v, ch) -> image [ch, i*p+u, j*p+v]
        const auto& c = m->config;
        const int p = c.patch_size, C = c.out_channels, Hp = Hg * p, Wp = Wg * p;
        parallel_for(split(), B, static_cast<double>(B) * N * P, [&](int b, int) {
            for (int t = 0; t < N; ++t) {
                const int i = t / Wg, j = t % Wg;
                const float* row = out_rows.data() + (static_cast<std::size_t>(b) * N + t) * P;
                for (int u = 0; u < p; ++u)
                    for (int v = 0; v < p; ++v)
                        for (int ch = 0; ch < C; ++ch)
                            velocity[((static_cast<std::size_t>(b) * C + ch) * Hp + i * p + u) * Wp + j * p + v] =
                                row[(u * p + v) * C + ch];
            }
        });
    }
}

// Hands the hidden states before block `next` (blocks(): before the final layer) to the caller's callback;
// returns the block to run next, checked against its range.
int transformer::impl::boundary(int next) {
    const int layers = blocks();
    const block_boundary b{next, std::span<float>(x_img.data(), static_cast<std::size_t>(B) * n * D),
                           std::span<float>(x_ctx.data(), static_cast<std::size_t>(B) * L * D),
                           next < layers ? std::span<const float>(mod_of[0], static_cast<std::size_t>(B) * mod_stride[0])
                                         : std::span<const float>()};
    const int to = opts->between_blocks(b);
    const int last = next < layers ? layers : next;  // before the final layer only blocks() is allowed
    if (to < next || to > last)
        throw std::logic_error(message("transformer::forward: between_blocks returned ", to, " at next_layer ", next,
                                       ", expected a block in [", next, ", ", last, "]"));
    return to;
}

void transformer::impl::run(const forward_inputs& in, std::span<float> velocity, const forward_options& o) {
    validate(in, velocity, o);
    const int patch = m ? m->config.patch_size : 1;
    opts = &o;
    B = in.batch;
    Hg = in.height / patch;
    Wg = in.width / patch;
    N = Hg * Wg;
    L = in.context_tokens;
    tokens = o.image_tokens.empty() ? nullptr : o.image_tokens.data();
    subset = tokens != nullptr || o.select == image_selection::none;
    n = o.select == image_selection::none ? 0 : tokens ? static_cast<int>(o.image_tokens.size() / B) : N;
    if (!o.attention_probe.empty()) std::fill(o.attention_probe.begin(), o.attention_probe.end(), 0.0f);

    if (fx) embed_flux(in);
    else embed(in);
    const block_hooks defaults{};
    for (int l = 0; l < blocks();) {
        const block_plan& p = plan[static_cast<std::size_t>(l)];
        const block_hooks& h = o.blocks.empty() ? defaults : o.blocks[l];
        modulation(p);
        if (o.between_blocks) {
            const int next = boundary(l);
            if (next != l) {
                l = next;
                continue;
            }
        }
        if (p.single) single_block(l, p, h);
        else joint_block(l, p, h);
        ++l;
    }
    if (o.between_blocks) boundary(blocks());
    final_layer(velocity);
    opts = nullptr;
}

// ---------------------------------------------------------------------------------------------------------------

transformer::transformer(const model& m, const engine_limits& limits, int threads)
    : impl_(std::make_unique<impl>(m, limits, threads)) {}
transformer::transformer(const flux_model& m, const engine_limits& limits, int threads)
    : impl_(std::make_unique<impl>(m, limits, threads)) {}
transformer::~transformer() = default;
transformer::transformer(transformer&&) noexcept = default;
transformer& transformer::operator=(transformer&&) noexcept = default;

architecture transformer::arch() const noexcept { return impl_->fx ? architecture::flux : architecture::sd3; }
const transformer_config& transformer::config() const {
    if (!impl_->m) throw std::logic_error("transformer::config: this engine runs a FLUX model (use flux())");
    return impl_->m->config;
}
const flux_config& transformer::flux() const {
    if (!impl_->fx) throw std::logic_error("transformer::flux: this engine runs an SD3 model (use config())");
    return impl_->fx->config;
}
int transformer::blocks() const noexcept { return impl_->blocks(); }
block_sites transformer::sites(int layer) const {
    if (layer < 0 || layer >= impl_->blocks())
        throw std::out_of_range(message("transformer::sites: layer = ", layer, " outside [0, ", impl_->blocks(), ")"));
    const block_plan& p = impl_->plan[static_cast<std::size_t>(layer)];
    return {p.context_outputs, p.dual_attention(), p.single};
}
int transformer::hidden() const noexcept { return impl_->D; }
int transformer::patch_features() const noexcept { return impl_->P; }
int transformer::image_tokens(int height, int width) const noexcept {
    const int patch = impl_->m ? impl_->m->config.patch_size : 1;
    return (height / patch) * (width / patch);
}
namespace {
// A FLUX velocity already is its token rows: a checked copy.
void copy_rows(const char* fn, int batch, int height, int width, int features, std::span<const float> from, std::span<float> to) {
    const std::size_t want = saturating_product(batch, height, width, features);
    if (batch < 1 || height < 1 || width < 1 || from.size() != want || to.size() != want)
        throw std::invalid_argument(message("transformer::", fn, ": batch/height/width = ", batch, "/", height, "/", width, " and ",
                                            from.size(), " -> ", to.size(), " floats; expected positive sizes and ", want,
                                            " floats each"));
    std::copy(from.begin(), from.end(), to.begin());
}
}  // namespace

void transformer::velocity_to_rows(int batch, int height, int width, std::span<const float> velocity, std::span<float> rows) const {
    if (impl_->m) return image_to_patches(impl_->m->config, batch, height, width, impl_->m->config.out_channels, {}, velocity, rows);
    copy_rows("velocity_to_rows", batch, height, width, impl_->P, velocity, rows);
}
void transformer::rows_to_velocity(int batch, int height, int width, std::span<const float> rows, std::span<float> velocity) const {
    if (impl_->m) return patches_to_image(impl_->m->config, batch, height, width, impl_->m->config.out_channels, {}, rows, velocity);
    copy_rows("rows_to_velocity", batch, height, width, impl_->P, rows, velocity);
}
const engine_limits& transformer::limits() const noexcept { return impl_->limits; }
int transformer::threads() const noexcept { return impl_->team->size(); }
void transformer::set_threads(int threads) {
    impl::check_threads(threads);
    if (threads == impl_->team->size()) return;
    auto team = std::make_unique<workers>(threads);  // may throw: nothing has changed yet
    impl_->size_scratch(threads);
    impl_->team = std::move(team);
}
workers& transformer::team() noexcept { return *impl_->team; }
void transformer::set_min_chunk_work(double multiply_adds) {
    if (!(multiply_adds >= 0) || !std::isfinite(multiply_adds))
        throw std::invalid_argument(message("transformer: min_chunk_work = ", multiply_adds, " must be finite and >= 0"));
    impl_->min_chunk_work = multiply_adds;
}

void transformer::forward(const forward_inputs& in, std::span<float> velocity) { impl_->run(in, velocity, {}); }
void transformer::forward(const forward_inputs& in, std::span<float> velocity, const forward_options& options) {
    impl_->run(in, velocity, options);
}

// ---------------------------------------------------------------------------------------------------------------

namespace {
void check_patch_args(const char* fn, const transformer_config& c, int batch, int height, int width, int channels,
                      std::span<const std::int32_t> tokens, std::size_t rows_size, std::size_t image_size, int& n) {
    const std::string f = fn;
    if (batch < 1 || height < 1 || width < 1 || channels < 1 || height % c.patch_size || width % c.patch_size)
        throw std::invalid_argument(f + ": batch/height/width/channels = " + std::to_string(batch) + "/" + std::to_string(height) +
                                    "/" + std::to_string(width) + "/" + std::to_string(channels) +
                                    " must be positive, height and width multiples of patch_size " + std::to_string(c.patch_size));
    const int all = (height / c.patch_size) * (width / c.patch_size);
    n = all;
    if (!tokens.empty()) {
        if (tokens.size() % static_cast<std::size_t>(batch))
            throw std::invalid_argument(f + ": tokens has " + std::to_string(tokens.size()) + " entries, not a multiple of batch " +
                                        std::to_string(batch));
        n = static_cast<int>(tokens.size() / batch);
        for (auto t : tokens)
            if (t < 0 || t >= all)
                throw std::invalid_argument(f + ": token id " + std::to_string(t) + " outside [0, " + std::to_string(all) + ")");
    }
    const std::size_t want_rows = static_cast<std::size_t>(batch) * n * c.patch_size * c.patch_size * channels;
    const std::size_t want_image = static_cast<std::size_t>(batch) * channels * height * width;
    if (rows_size != want_rows || image_size != want_image)
        throw std::invalid_argument(f + ": rows/image hold " + std::to_string(rows_size) + "/" + std::to_string(image_size) +
                                    " floats, expected " + std::to_string(want_rows) + "/" + std::to_string(want_image));
}

template <bool ToImage, class Rows, class Image>
void move_patches(const transformer_config& c, int batch, int height, int width, int channels,
                  std::span<const std::int32_t> tokens, int n, Rows rows, Image image) {
    const int p = c.patch_size, wg = width / p, feat = p * p * channels;
    for (int b = 0; b < batch; ++b)
        for (int r = 0; r < n; ++r) {
            const int t = tokens.empty() ? r : tokens[static_cast<std::size_t>(b) * n + r], i = t / wg, j = t % wg;
            for (int u = 0; u < p; ++u)
                for (int v = 0; v < p; ++v)
                    for (int ch = 0; ch < channels; ++ch) {
                        const std::size_t ri = (static_cast<std::size_t>(b) * n + r) * feat + (u * p + v) * channels + ch;
                        const std::size_t ii = ((static_cast<std::size_t>(b) * channels + ch) * height + i * p + u) * width + j * p + v;
                        if constexpr (ToImage) image[ii] = rows[ri];
                        else rows[ri] = image[ii];
                    }
        }
}
}  // namespace

void patches_to_image(const transformer_config& c, int batch, int height, int width, int channels,
                      std::span<const std::int32_t> tokens, std::span<const float> rows, std::span<float> image) {
    int n = 0;
    check_patch_args("patches_to_image", c, batch, height, width, channels, tokens, rows.size(), image.size(), n);
    move_patches<true>(c, batch, height, width, channels, tokens, n, rows, image);
}

void image_to_patches(const transformer_config& c, int batch, int height, int width, int channels,
                      std::span<const std::int32_t> tokens, std::span<const float> image, std::span<float> rows) {
    int n = 0;
    check_patch_args("image_to_patches", c, batch, height, width, channels, tokens, rows.size(), image.size(), n);
    move_patches<false>(c, batch, height, width, channels, tokens, n, rows, image);
}

}  // namespace sd3
