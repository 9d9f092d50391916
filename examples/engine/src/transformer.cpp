// The MMDiT forward. One implementation per stage (embedding, modulation, norm+modulate, linear, qk-norm,
// joint attention, gated residual, feed-forward, final layer), run over a per-model block plan (transformer_impl.hpp):
// SD3's joint blocks, MMDiT-X's second attention, and FLUX's double- and single-stream blocks share them; what only
// FLUX has (its embedding, rotary positions) is in flux_forward.cpp. The plain forward is the hooked forward with
// default options. Linear layers run on sd3::gemm (weights packed once, in the constructor; row tiles are the
// parallel work units), attention on the same micro-kernel with an online softmax over key blocks; Eigen does
// the element-wise work. All scratch is sized in the constructor, so a forward does not allocate.
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

kv_cache::kv_cache(int layers, int hidden, std::vector<int> dual, int max_batch, int max_image_tokens)
    : layers_(layers), max_batch_(max_batch), max_tokens_(max_image_tokens), hidden_(hidden), dual_(std::move(dual)) {
    if (max_batch < 1) throw std::invalid_argument(message("kv_cache: max_batch = ", max_batch, " must be >= 1"));
    if (max_image_tokens < 1)
        throw std::invalid_argument(message("kv_cache: max_image_tokens = ", max_image_tokens, " must be >= 1"));
    slot_of_.assign(static_cast<std::size_t>(layers_), -1);
    for (std::size_t i = 0; i < dual_.size(); ++i) slot_of_[static_cast<std::size_t>(dual_[i])] = layers_ + static_cast<int>(i);
    const std::size_t slots = static_cast<std::size_t>(layers_) + dual_.size();
    const std::size_t n = saturating_product(slots, max_batch_, max_tokens_, hidden_);
    require_memory(message("kv_cache: keys and values for ", layers_, " layers (", dual_.size(),
                           " with a second attention), max_batch ", max_batch, " and ", max_image_tokens, " image tokens"),
                   saturating_product(n, 2, sizeof(float)));
    k_.assign(n, 0.0f);
    v_.assign(n, 0.0f);
}

kv_cache::kv_cache(const transformer_config& config, int max_batch, int max_image_tokens)
    : kv_cache((config.validate(), config.num_layers), config.hidden(), config.dual_attention_layers, max_batch,
               max_image_tokens) {}

kv_cache::kv_cache(const flux_config& config, int max_batch, int max_image_tokens)
    : kv_cache((config.validate(), config.num_layers + config.num_single_layers), config.hidden(), {}, max_batch,
               max_image_tokens) {}

kv_cache::kv_cache(const transformer& net, int max_batch, int max_image_tokens)
    : kv_cache(net.blocks(), net.hidden(),
               net.arch() == architecture::sd3 ? net.config().dual_attention_layers : std::vector<int>{}, max_batch,
               max_image_tokens) {}

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
                                default_side == 0 ? std::string() : " " + std::to_string(patch)));
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

namespace detail {
void check_linear(const std::string& name, const linear& l, int in, int out) {
    if (l.in != in || l.out != out || l.weight.size() != static_cast<std::size_t>(in) * out ||
        l.bias.size() != static_cast<std::size_t>(out))
        throw std::invalid_argument(message("transformer: model weight '", name, "' is ", l.out, " x ", l.in, " (",
                                            l.weight.size(), " weights, ", l.bias.size(), " biases), config needs ", out,
                                            " x ", in));
}
void check_vector(const std::string& name, const std::vector<float>& v, std::size_t n) {
    if (v.size() != n)
        throw std::invalid_argument(message("transformer: model tensor '", name, "' has ", v.size(), " values, config needs ", n));
}
}  // namespace detail

// Every weight's size against the config, so a hand-built model cannot make a GEMM read out of bounds (every engine
// calls it: this one and the GPU engine).
void model::validate() const {
    const auto& c = config;
    c.validate();
    if (static_cast<int>(blocks.size()) != c.num_layers)
        throw std::invalid_argument(message("transformer: model has ", blocks.size(), " blocks but config.num_layers = ", c.num_layers));
    const int d = c.hidden(), hd_ = c.attention_head_dim;
    check_linear("pos_embed.proj", patch_embed, c.in_channels * c.patch_size * c.patch_size, d);
    check_vector("pos_embed.pos_embed", pos_table, static_cast<std::size_t>(c.pos_embed_max_size) * c.pos_embed_max_size * d);
    check_outer_weights(*this);
    for (int l = 0; l < c.num_layers; ++l) {
        const auto& w = blocks[l];
        const std::string b = "transformer_blocks." + std::to_string(l) + ".";
        if (w.context_pre_only != (l == c.num_layers - 1))
            throw std::invalid_argument("transformer: " + b + "context_pre_only must be set on the last block only");
        if (w.dual_attention != c.dual_attention(l))
            throw std::invalid_argument("transformer: " + b + "dual_attention must be set exactly on the config's "
                                        "dual_attention_layers");
        check_linear(b + "norm1.linear", w.norm1, d, (w.dual_attention ? 9 : 6) * d);
        if (w.dual_attention) {
            check_linear(b + "attn2.to_qkv", w.attn2_qkv, d, 3 * d);
            check_linear(b + "attn2.to_out.0", w.attn2_out, d, d);
            if (c.qk_norm) {
                check_vector(b + "attn2.norm_q.weight", w.attn2_norm_q, hd_);
                check_vector(b + "attn2.norm_k.weight", w.attn2_norm_k, hd_);
            }
        }
        check_linear(b + "norm1_context.linear", w.norm1_context, d, (w.context_pre_only ? 2 : 6) * d);
        check_linear(b + "attn.to_qkv", w.to_qkv, d, 3 * d);
        check_linear(b + "attn.add_qkv", w.add_qkv, d, 3 * d);
        check_linear(b + "attn.to_out.0", w.to_out, d, d);
        check_linear(b + "ff.net.0.proj", w.ff1, d, 4 * d);
        check_linear(b + "ff.net.2", w.ff2, 4 * d, d);
        if (!w.context_pre_only) {
            check_linear(b + "attn.to_add_out", w.to_add_out, d, d);
            check_linear(b + "ff_context.net.0.proj", w.ff_context1, d, 4 * d);
            check_linear(b + "ff_context.net.2", w.ff_context2, 4 * d, d);
        }
        if (c.qk_norm) {
            check_vector(b + "attn.norm_q.weight", w.norm_q, hd_);
            check_vector(b + "attn.norm_k.weight", w.norm_k, hd_);
            check_vector(b + "attn.norm_added_q.weight", w.norm_added_q, hd_);
            check_vector(b + "attn.norm_added_k.weight", w.norm_added_k, hd_);
        }
    }
}

void transformer::impl::check_threads(int t) {
    if (t < 1 || t > max_threads)
        throw std::invalid_argument(message("transformer: threads = ", t, " is out of range [1, ", max_threads, "]"));
}

std::array<std::size_t, 4> transformer::impl::kv_layout(int image_tokens, int context_tokens) const {
    const std::size_t cols = gemm::register_tile().cols, hdp = values_in_place() ? 0 : padded_head(hd);
    auto r = [](std::size_t f) { return round_up(f, 16); };
    return {r(round_up(as_size(image_tokens), cols) * hd), r(round_up(as_size(context_tokens), cols) * hd),
            r(as_size(image_tokens) * hdp), r(as_size(context_tokens) * hdp)};
}
std::size_t transformer::impl::kv_slot_for(int image_tokens, int context_tokens) const {
    std::size_t total = 0;
    for (const std::size_t f : kv_layout(image_tokens, context_tokens)) total = saturating_add(total, f);
    return total;
}
transformer::impl::packed_kv transformer::impl::kv_of(int b, int h) {
    const auto sizes = kv_layout(N, L);
    float* at = kv_packed.data() + static_cast<std::size_t>(b * heads + h) * kv_slot_for(N, L);
    packed_kv p{};
    float** fields[] = {&p.k_img, &p.k_ctx, &p.v_img, &p.v_ctx};
    for (int i = 0; i < 4; ++i) {
        *fields[i] = at;
        at += sizes[i];
    }
    return p;
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

namespace {
[[noreturn]] void bad_arg(const std::string& what) { throw std::invalid_argument("transformer::forward: " + what); }

void check_size(const char* name, std::size_t got, std::size_t want) {
    if (got != want)
        bad_arg(std::string(name) + " holds " + std::to_string(got) + " floats, expected " + std::to_string(want));
}

// Checks [batch * count] ascending ids in [0, limit); returns count.
template <class Name>
int check_token_list(Name name_of, const char* suffix, std::span<const std::int32_t> ids, int batch, int limit) {
    auto name = [&] { return std::string(name_of()) + suffix; };
    if (ids.empty() || ids.size() % static_cast<std::size_t>(batch) != 0)
        bad_arg(name() + " has " + std::to_string(ids.size()) + " entries, not a positive multiple of batch " +
                std::to_string(batch));
    const int count = static_cast<int>(ids.size() / batch);
    for (int b = 0; b < batch; ++b)
        for (int i = 0; i < count; ++i) {
            const std::int32_t t = ids[static_cast<std::size_t>(b) * count + i];
            if (t < 0 || t >= limit)
                bad_arg(name() + "[" + std::to_string(b * count + i) + "] = " + std::to_string(t) +
                        " is outside [0, " + std::to_string(limit) + ")");
            if (i > 0 && t <= ids[static_cast<std::size_t>(b) * count + i - 1])
                bad_arg(name() + " of sample " + std::to_string(b) + " is not strictly ascending at position " +
                        std::to_string(i) + " (" + std::to_string(ids[static_cast<std::size_t>(b) * count + i - 1]) +
                        ", " + std::to_string(t) + ")");
        }
    return count;
}
}  // namespace

void transformer::impl::validate(const forward_inputs& in, std::span<float> velocity, const forward_options& o) const {
    const int patch = m ? m->config.patch_size : 1;
    if (in.batch < 1 || in.batch > limits.max_batch)
        bad_arg("batch = " + std::to_string(in.batch) + " outside [1, max_batch = " + std::to_string(limits.max_batch) + "]");
    if (in.height < 1 || in.width < 1 || in.height % patch || in.width % patch)
        bad_arg("height x width = " + std::to_string(in.height) + " x " + std::to_string(in.width) +
                " must be positive multiples of patch_size " + std::to_string(patch));
    if (in.height > limits.max_height || in.width > limits.max_width)
        bad_arg("height x width = " + std::to_string(in.height) + " x " + std::to_string(in.width) + " exceeds the limits " +
                std::to_string(limits.max_height) + " x " + std::to_string(limits.max_width));
    const int hg = in.height / patch, wg = in.width / patch;
    if (m && (hg > m->config.pos_embed_max_size || wg > m->config.pos_embed_max_size))
        bad_arg("patch grid " + std::to_string(hg) + " x " + std::to_string(wg) + " exceeds pos_embed_max_size " +
                std::to_string(m->config.pos_embed_max_size));
    if (in.context_tokens < 1 || in.context_tokens > limits.max_context_tokens)
        bad_arg("context_tokens = " + std::to_string(in.context_tokens) + " outside [1, max_context_tokens = " +
                std::to_string(limits.max_context_tokens) + "]");
    const std::size_t B = in.batch;
    const int joint_dim = m ? m->config.joint_attention_dim : fx->config.joint_attention_dim;
    const int pooled_dim = m ? m->config.pooled_projection_dim : fx->config.pooled_projection_dim;
    const int tokens_all = hg * wg;
    check_size("latents", in.latents.size(), B * tokens_all * token_inputs);
    check_size("timesteps", in.timesteps.size(), B);
    check_size("context", in.context.size(), B * in.context_tokens * joint_dim);
    check_size("pooled", in.pooled.size(), B * pooled_dim);
    if (fx && fx->config.guidance_embeds) check_size("guidance", in.guidance.size(), B);
    else if (!in.guidance.empty())
        bad_arg("guidance holds " + std::to_string(in.guidance.size()) +
                " floats, but the model has no guidance embedding (guidance_embeds is false: guide by CFG)");
    if (m && (!in.image_ids.empty() || !in.text_ids.empty()))
        bad_arg("image_ids/text_ids are set, but an SD3 model has no rotary positions (FLUX only)");
    if (!in.image_ids.empty()) check_size("image_ids", in.image_ids.size(), static_cast<std::size_t>(tokens_all) * 3);
    if (!in.text_ids.empty()) check_size("text_ids", in.text_ids.size(), static_cast<std::size_t>(in.context_tokens) * 3);
    for (const auto& [name, ids] : {std::pair{"image_ids", in.image_ids}, std::pair{"text_ids", in.text_ids}})
        for (std::size_t i = 0; i < ids.size(); ++i)
            if (!std::isfinite(ids[i]))
                bad_arg(std::string(name) + "[" + std::to_string(i) + "] = " + std::to_string(ids[i]) + " is not finite");

    int active = tokens_all;
    if (!o.image_tokens.empty()) {
        active = check_token_list([] { return "image_tokens"; }, "", o.image_tokens, in.batch, tokens_all);
        if (!o.kv) bad_arg("a token-subset forward (image_tokens set) needs a kv_cache (options.kv is null)");
        check_size("velocity (token rows)", velocity.size(), B * active * P);
    } else {
        check_size("velocity", velocity.size(), B * tokens_all * P);
    }
    if (o.kv) {
        if (o.kv->layers() != blocks() || o.kv->hidden() != D)
            bad_arg("kv_cache has " + std::to_string(o.kv->layers()) + " layers x hidden " + std::to_string(o.kv->hidden()) +
                    ", model needs " + std::to_string(blocks()) + " x " + std::to_string(D));
        const std::vector<int> none;
        const std::vector<int>& dual = m ? m->config.dual_attention_layers : none;
        if (o.kv->dual_attention_layers() != dual)
            bad_arg("kv_cache was made for " + std::to_string(o.kv->dual_attention_layers().size()) +
                    " dual-attention layers, the model has " + std::to_string(dual.size()) +
                    " (or other ones): make it from this model's config");
        if (o.kv->max_batch() < in.batch || o.kv->max_image_tokens() < tokens_all)
            bad_arg("kv_cache holds batch " + std::to_string(o.kv->max_batch()) + " x " + std::to_string(o.kv->max_image_tokens()) +
                    " tokens, call needs " + std::to_string(in.batch) + " x " + std::to_string(tokens_all));
    }
    if (!o.attention_probe.empty()) check_size("attention_probe", o.attention_probe.size(), B * tokens_all);
    if (!o.blocks.empty()) {
        if (o.blocks.size() != static_cast<std::size_t>(blocks()))
            bad_arg("blocks has " + std::to_string(o.blocks.size()) + " entries, expected 0 or one per block (" +
                    std::to_string(blocks()) + ")");
        for (int l = 0; l < blocks(); ++l) {
            for (int s = 0; s < 2; ++s) {
                validate_hook(o.blocks[l].attention[s], l, static_cast<stream>(s), false, in, o.image_tokens);
                validate_hook(o.blocks[l].mlp[s], l, static_cast<stream>(s), true, in, o.image_tokens);
            }
            validate_attention2_hook(o.blocks[l].attention2, l);
        }
    }
}

void transformer::impl::validate_attention2_hook(const module_hook& h, int layer) const {
    auto site = [&] { return "blocks[" + std::to_string(layer) + "].attention2"; };
    const int mode = static_cast<int>(h.mode);
    if (!plan[static_cast<std::size_t>(layer)].dual_attention()) {
        if (h.mode != module_mode::compute || h.rows || !h.tokens.empty())
            bad_arg(site() + ": block " + std::to_string(layer) +
                    " has no image-only attention (not an MMDiT-X dual-attention layer); leave this hook {compute, nullptr}");
        return;
    }
    if (mode < 0 || mode > 1) bad_arg(site() + ".mode = " + std::to_string(mode) + " is not compute (0) or reuse (1)");
    if (h.mode == module_mode::reuse && !h.rows) bad_arg(site() + ": mode reuse needs rows (got nullptr)");
    if (!h.tokens.empty()) bad_arg(site() + ".tokens is set but only MLP hooks take a token subset");
}

void transformer::impl::validate_hook(const module_hook& h, int layer, stream s, bool is_mlp, const forward_inputs& in,
                                      std::span<const std::int32_t> active) const {
    // Messages are built only on failure: validation runs on every call and must not allocate.
    auto site = [&] {
        return "blocks[" + std::to_string(layer) + "]." + (is_mlp ? "mlp" : "attention") + "[" +
               (s == stream::image ? "image" : "context") + "]";
    };
    const int mode = static_cast<int>(h.mode);
    if (mode < 0 || mode > 2) bad_arg(site() + ".mode = " + std::to_string(mode) + " is not a module_mode");
    if (s == stream::context && !plan[static_cast<std::size_t>(layer)].context_outputs) {
        if (h.mode != module_mode::compute || h.rows || !h.tokens.empty())
            bad_arg(site() + ": the last block (context_pre_only) has no context outputs; leave this hook {compute, nullptr}");
        return;
    }
    if (h.mode != module_mode::compute && !h.rows) bad_arg(site() + ": mode reuse/subset needs rows (got nullptr)");
    if (h.mode != module_mode::subset) {
        if (!h.tokens.empty()) bad_arg(site() + ".tokens is set but mode is not subset");
        return;
    }
    if (!is_mlp) bad_arg(site() + ".mode = subset: only the MLP takes a token subset (use options.image_tokens for attention)");
    const int patch = m ? m->config.patch_size : 1;
    const int limit = s == stream::image ? (in.height / patch) * (in.width / patch) : in.context_tokens;
    const int count = check_token_list(site, ".tokens", h.tokens, in.batch, limit);
    if (s == stream::image && !active.empty()) {
        const int n_active = static_cast<int>(active.size() / in.batch);
        for (int b = 0; b < in.batch; ++b) {
            int j = 0;
            for (int i = 0; i < count; ++i) {
                const std::int32_t t = h.tokens[static_cast<std::size_t>(b) * count + i];
                while (j < n_active && active[static_cast<std::size_t>(b) * n_active + j] < t) ++j;
                if (j == n_active || active[static_cast<std::size_t>(b) * n_active + j] != t)
                    bad_arg(site() + ".tokens: token " + std::to_string(t) + " of sample " + std::to_string(b) +
                            " is not among options.image_tokens (only active tokens can run the MLP)");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------

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

// The attention of both streams up to its output projection: out_img / out_ctx hold each computed stream's module
// output (before the gate); the caller applies them. Skipped when neither stream's output is computed (then the
// block's keys and values are not refreshed either).
void transformer::impl::attention_stage(int layer, const block_plan& p, const block_hooks& h) {
    const bool image_out = h.attention[0].mode == module_mode::compute;
    const bool context_out = p.context_outputs && h.attention[1].mode == module_mode::compute;
    const bool probe = !opts->attention_probe.empty();
    if (!image_out && !context_out) return;
    parallel_for(split(), B * n + B * L, norm_work * (B * n + B * L) * D, [&](int r, int) {
        const stream s = r < B * n ? stream::image : stream::context;
        const int row = s == stream::image ? r : r - B * n, per = tokens_of(s);
        const float* mod = modulation_of(s, row / per);
        const chunk_offsets& at = p.attention[static_cast<int>(s)];
        float* nrm = s == stream::image ? nrm_img.data() : nrm_ctx.data();
        norm_modulate(x_of(s) + static_cast<std::size_t>(row) * D, nrm + static_cast<std::size_t>(row) * D, D, mod + at.shift,
                      mod + at.scale);
    });
    linear_rows(split(), nrm_img.data(), D, B * n, *p.qkv[0], qkv_img.data(), 3 * D);
    linear_rows(split(), nrm_ctx.data(), D, B * L, *p.qkv[1], qkv_ctx.data(), 3 * D);
    const bool rope = fx != nullptr;  // FLUX: rotary q and k
    if (p.norm_q[0] || rope) {
        parallel_for(split(), B * n + B * L, norm_work * (B * n + B * L) * 2 * D, [&](int r, int) {
            const bool img = r < B * n;
            const int s = img ? 0 : 1, row = img ? r : r - B * n;
            float* qkv = (img ? qkv_img.data() : qkv_ctx.data()) + static_cast<std::size_t>(row) * 3 * D;
            if (p.norm_q[s]) qk_norm(qkv, p.norm_q[s], p.norm_k[s]);
            if (rope) {
                const int token = img ? token_id(stream::image, row / n, row % n) : row % L;
                rotate((img ? rope_img.data() : rope_ctx.data()) + static_cast<std::size_t>(token) * hd, qkv);
            }
        });
    }
    store_kv(layer, attention_kind::joint);
    attend(layer, attention_kind::joint, image_out, context_out || (probe && opts->probe_context_queries));
    if (image_out) linear_rows(split(), att_img.data(), D, B * n, *p.attention_out[0], out_img.data(), D);
    if (context_out) linear_rows(split(), att_ctx.data(), D, B * L, *p.attention_out[1], out_ctx.data(), D);
}

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

// MMDiT-X's second attention (diffusers' attn2): self-attention over the image tokens alone, with its own
// projections and qk-norm, added with its own gate. Its keys and values have their own kv_cache slot, so a
// token-subset forward reads the cached tokens' rows as it does for the joint attention. Not in the probe: the
// probe is the attention image tokens receive in the joint attention, the one every SD3 block has.
void transformer::impl::image_attention_stage(int layer, const block_weights& w, const module_hook& h) {
    if (h.mode == module_mode::compute) {
        linear_rows(split(), nrm2_img.data(), D, B * n, w.attn2_qkv, qkv_img.data(), 3 * D);
        if (m->config.qk_norm) {
            parallel_for(split(), B * n, norm_work * B * n * 2 * D, [&](int r, int) {
                qk_norm(qkv_img.data() + static_cast<std::size_t>(r) * 3 * D, w.attn2_norm_q.data(), w.attn2_norm_k.data());
            });
        }
        store_kv(layer, attention_kind::image_only);
        attend(layer, attention_kind::image_only, true, false);
        linear_rows(split(), att_img.data(), D, B * n, w.attn2_out, out_img.data(), D);
    }
    apply_module(stream::image, h, out_img.data(), 8 * D);
}

// The computed image tokens' keys and values into the cache (when there is one), for later subset forwards.
void transformer::impl::store_kv(int layer, attention_kind kind) {
    if (!opts->kv) return;
    parallel_for(split(), B, 2.0 * B * n * D, [&](int b, int) {
        float* keys = opts->kv->keys(layer, b, kind);
        float* values = opts->kv->values(layer, b, kind);
        for (int r = 0; r < n; ++r) {
            const float* row = qkv_img.data() + (static_cast<std::size_t>(b) * n + r) * 3 * D;
            const std::size_t t = static_cast<std::size_t>(token_id(stream::image, b, r)) * D;
            std::copy_n(row + D, D, keys + t);
            std::copy_n(row + 2 * D, D, values + t);
        }
    });
}

// softmax(Q K^T / sqrt(hd)) V over the keys [image tokens (all N); context tokens], per head; queries are the
// active image rows and/or the context rows. A task is one sample's chunk of queries; per head it walks the keys
// in blocks with an online softmax (running maximum and sum, the output rescaled when the maximum grows), so no
// buffer grows with the token count. With the probe it makes a second pass over the image keys: each query's
// probabilities are exp(score * scale - lse) from its log-sum-exp, summed into the task's column sums.
// attention_kind::image_only (MMDiT-X's attn2): the image tokens' keys alone, image queries, no probe.
void transformer::impl::attend(int layer, attention_kind kind, bool image_queries, bool context_queries) {
    const bool joint = kind == attention_kind::joint;
    const bool probe = joint && !opts->attention_probe.empty();
    const int Lk = joint ? L : 0;  // context keys
    const int qc = query_chunk();
    const int img_chunks = image_queries ? ceil_div(n, qc) : 0;
    const int ctx_chunks = context_queries ? ceil_div(L, qc) : 0;
    const int per_sample = img_chunks + ctx_chunks;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const gemm::tile_shape tile = gemm::register_tile();
    const std::ptrdiff_t panel = static_cast<std::ptrdiff_t>(gemm::packed_rows_floats(tile.rows));
    // Where sample b's keys and values are: image rows in the cache (partial forwards) or in the projection rows
    // (full forward without cache, n == N); context rows in the projection rows.
    struct kv_rows {
        const float *k_img, *v_img, *k_ctx, *v_ctx;
        int ld_img, ld_ctx;
    };
    auto rows_of = [&](int b) {
        kv_rows r{};
        if (opts->kv) {
            r.k_img = opts->kv->keys(layer, b, kind);
            r.v_img = opts->kv->values(layer, b, kind);
            r.ld_img = D;
        } else {
            r.k_img = qkv_img.data() + static_cast<std::size_t>(b) * n * 3 * D + D;
            r.v_img = r.k_img + D;
            r.ld_img = 3 * D;
        }
        r.k_ctx = qkv_ctx.data() + static_cast<std::size_t>(b) * L * 3 * D + D;
        r.v_ctx = r.k_ctx + D;
        r.ld_ctx = 3 * D;
        return r;
    };
    const bool in_place = values_in_place();
    const auto hdp = static_cast<std::ptrdiff_t>(padded_head(hd));
    // Every sample's and head's keys (and values, unless read in place) packed once, for all the query chunks.
    parallel_for(split(), B * heads, 2.0 * B * (N + Lk) * D, [&](int task, int) {
        const int b = task / heads, h = task % heads;
        const packed_kv kv = kv_of(b, h);
        const kv_rows src = rows_of(b);
        gemm::pack_transposed(src.k_img + h * hd, src.ld_img, N, hd, kv.k_img);
        if (joint) gemm::pack_transposed(src.k_ctx + h * hd, src.ld_ctx, L, hd, kv.k_ctx);
        if (in_place) return;
        for (int j0 = 0; j0 < N; j0 += key_block)
            gemm::pack_columns(src.v_img + static_cast<std::ptrdiff_t>(j0) * src.ld_img + h * hd, src.ld_img,
                               std::min(key_block, N - j0), hd, kv.v_img + static_cast<std::ptrdiff_t>(j0) * hdp);
        for (int j0 = 0; j0 < Lk; j0 += key_block)
            gemm::pack_columns(src.v_ctx + static_cast<std::ptrdiff_t>(j0) * src.ld_ctx + h * hd, src.ld_ctx,
                               std::min(key_block, Lk - j0), hd, kv.v_ctx + static_cast<std::ptrdiff_t>(j0) * hdp);
    });
    const double attention_work = 2.0 * B * ((image_queries ? n : 0) + (context_queries ? L : 0)) * static_cast<double>(N + Lk) * D;
    parallel_for(split(), B * per_sample, attention_work, [&](int task, int worker) {
        const int b = task / per_sample, chunk = task % per_sample;
        const bool img = chunk < img_chunks;
        const int q0 = (img ? chunk : chunk - img_chunks) * qc;
        const int nq = std::min(qc, (img ? n : L) - q0);
        const int q_panels = ceil_div(nq, tile.rows);  // a short last chunk computes only its own panels
        const float* q = img ? qkv_img.data() + (static_cast<std::size_t>(b) * n + q0) * 3 * D
                             : qkv_ctx.data() + (static_cast<std::size_t>(b) * L + q0) * 3 * D;
        float* o = img ? att_img.data() + (static_cast<std::size_t>(b) * n + q0) * D
                       : att_ctx.data() + (static_cast<std::size_t>(b) * L + q0) * D;
        attention_scratch w(scratch_of(worker).data(), hd);
        float* part = probe && (img || opts->probe_context_queries) ? probe_parts.data() + static_cast<std::size_t>(task) * N
                                                                    : nullptr;
        if (part) std::fill_n(part, N, 0.0f);
        // S[0:qc, 0:nk) = Q K^T for the key block at j0 of packed keys (nk keys, the rest of S's columns unused).
        auto scores = [&](const float* keys, int j0, int nk) {
            for (int kp = 0; kp * tile.cols < nk; ++kp)
                for (int qp = 0; qp < q_panels; ++qp)
                    gemm::micro_kernel(hd, w.q + qp * panel, keys + static_cast<std::ptrdiff_t>(j0 + kp * tile.cols) * hd, tile.cols,
                                       w.s + qp * panel + kp * tile.cols, key_block, gemm::start::zero);
        };
        const kv_rows src = rows_of(b);
        for (int h = 0; h < heads; ++h) {
            const packed_kv kv = kv_of(b, h);
            gemm::pack_rows(q + h * hd, 3 * D, nq, hd, w.q);
            std::fill_n(w.o, static_cast<std::size_t>(qc) * w.out_stride, 0.0f);
            std::fill_n(w.max, qc, -std::numeric_limits<float>::infinity());
            std::fill_n(w.sum, qc, 0.0f);
            for (const auto& [keys, rows, ld, packed_values, count] :
                 {std::tuple{kv.k_img, src.v_img, src.ld_img, kv.v_img, N}, std::tuple{kv.k_ctx, src.v_ctx, src.ld_ctx, kv.v_ctx, Lk}}) {
                for (int j0 = 0; j0 < count; j0 += key_block) {
                    const int nk = std::min(key_block, count - j0);
                    scores(keys, j0, nk);
                    for (int r = 0; r < nq; ++r) {
                        vec row(w.s + static_cast<std::ptrdiff_t>(r) * key_block, nk);
                        const float mx = std::max(w.max[r], row.maxCoeff());
                        const float rescale = std::exp((w.max[r] - mx) * scale);  // 0 on the first block
                        row = ((row - mx) * scale).exp();
                        w.sum[r] = w.sum[r] * rescale + row.sum();
                        w.max[r] = mx;
                        vec(w.o + static_cast<std::ptrdiff_t>(r) * w.out_stride, hd) *= rescale;
                    }
                    for (int vp = 0; vp * tile.cols < hd; ++vp) {
                        const float* v = in_place ? rows + static_cast<std::ptrdiff_t>(j0) * ld + h * hd + vp * tile.cols
                                                  : packed_values + static_cast<std::ptrdiff_t>(j0) * hdp + vp * nk * tile.cols;
                        const std::ptrdiff_t ldv = in_place ? ld : tile.cols;
                        for (int qp = 0; qp < q_panels; ++qp)
                            gemm::micro_kernel(nk, w.s + qp * panel, v, ldv,
                                               w.o + static_cast<std::ptrdiff_t>(qp) * tile.rows * w.out_stride + vp * tile.cols,
                                               w.out_stride, gemm::start::c);
                    }
                }
            }
            for (int r = 0; r < nq; ++r) {
                vec(o + static_cast<std::ptrdiff_t>(r) * D + h * hd, hd) =
                    const_vec(w.o + static_cast<std::ptrdiff_t>(r) * w.out_stride, hd) * (1.0f / w.sum[r]);
                w.lse[r] = w.max[r] * scale + std::log(w.sum[r]);
            }
            if (!part) continue;
            for (int j0 = 0; j0 < N; j0 += key_block) {
                const int nk = std::min(key_block, N - j0);
                scores(kv.k_img, j0, nk);
                vec sums(part + j0, nk);
                for (int r = 0; r < nq; ++r)
                    sums += (const_vec(w.s + static_cast<std::ptrdiff_t>(r) * key_block, nk) * scale - w.lse[r]).exp();
            }
        }
    });
    if (probe) {  // fixed-order reduction: results do not depend on the thread count
        const int col_chunks = ceil_div(N, 256);
        parallel_for(split(), B * col_chunks, static_cast<double>(B) * N * per_sample, [&](int t, int) {
            const int b = t / col_chunks, c0 = (t % col_chunks) * 256, nc = std::min(256, N - c0);
            vec dst(opts->attention_probe.data() + static_cast<std::size_t>(b) * N + c0, nc);
            const int counted = opts->probe_context_queries ? per_sample : img_chunks;
            for (int chunk = 0; chunk < counted; ++chunk)
                dst += const_vec(probe_parts.data() + static_cast<std::size_t>(b * per_sample + chunk) * N + c0, nc) *
                       (1.0f / static_cast<float>(heads));
        });
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

// The MLP of a stream up to its output (before the gate), into `out` [active rows, D]: every active row, or (subset)
// the hook's tokens, whose rows also go to the hook's buffer, which then feeds every row; nothing in reuse mode.
void transformer::impl::mlp_compute(stream s, const module_hook& h, const block_plan& p, float* out) {
    const int si = static_cast<int>(s);
    if (h.mode != module_mode::reuse) {
        const int rows = tokens_of(s), all = all_tokens_of(s);
        // Rows to compute, as active-row positions per sample: all rows, or the hook's subset.
        int count = rows;
        const std::int32_t* pos = nullptr;
        if (h.mode == module_mode::subset) {
            count = static_cast<int>(h.tokens.size() / B);
            for (int b = 0; b < B; ++b) {
                int j = 0;
                for (int i = 0; i < count; ++i) {
                    const std::int32_t t = h.tokens[static_cast<std::size_t>(b) * count + i];
                    while (token_id(s, b, j) < t) ++j;  // validated: t is an active token
                    positions[static_cast<std::size_t>(b) * count + i] = j;
                }
            }
            pos = positions.data();
        }
        const float* x = x_of(s);
        float* nrm = s == stream::image ? nrm_img.data() : nrm_ctx.data();
        parallel_for(split(), B * count, norm_work * B * count * D, [&](int r, int) {
            const int b = r / count, src_row = pos ? pos[r] : r % count;
            const float* md = modulation_of(s, b);
            norm_modulate(x + (static_cast<std::size_t>(b) * rows + src_row) * D, nrm + static_cast<std::size_t>(r) * D, D,
                          md + p.mlp[si].shift, md + p.mlp[si].scale);
        });
        linear_rows(split(), nrm, D, B * count, *p.ff1[si], hidden.data(), F, gelu_tanh_epilogue{});
        linear_rows(split(), hidden.data(), F, B * count, *p.ff2[si], out, D);
        if (h.mode == module_mode::subset) {  // computed rows go to the caller's buffer, which then feeds every row
            parallel_for(split(), B, static_cast<double>(B) * count * D, [&](int b, int) {
                for (int i = 0; i < count; ++i) {
                    const std::size_t r = static_cast<std::size_t>(b) * count + i;
                    std::copy_n(out + r * D, D, h.rows + (static_cast<std::size_t>(b) * all + h.tokens[r]) * D);
                }
            });
        }
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
    const bool rows_out = tokens != nullptr || fx;  // FLUX returns the token sequence; SD3 the image
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
    n = tokens ? static_cast<int>(o.image_tokens.size() / B) : N;
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
