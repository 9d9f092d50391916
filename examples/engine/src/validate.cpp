// Validation: every weight's size against the config (model::validate, shared with the GPU engine) and a
// forward's inputs, options and hooks, all checked before any state changes.
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


namespace {
[[noreturn]] void bad_arg(const std::string& what) { throw std::invalid_argument("transformer::forward: " + what); }

void check_size(const char* name, std::size_t got, std::size_t want) {
    if (got != want)
        bad_arg(std::string(name) + " holds " + std::to_string(got) + " floats, expected " + std::to_string(want));
}

// Checks [batch * count] ascending ids in [0, limit); returns count.
// allow_empty: zero ids per sample are fine (a Ulysses rank's share of a token subset).
template <class Name>
int check_token_list(Name name_of, const char* suffix, std::span<const std::int32_t> ids, int batch, int limit,
                     bool allow_empty = false) {
    auto name = [&] { return std::string(name_of()) + suffix; };
    if (allow_empty && ids.empty()) return 0;
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

    const int select = static_cast<int>(o.select);
    if (select < 0 || select > 1) bad_arg("select = " + std::to_string(select) + " is not an image_selection (listed 0, none 1)");
    const bool none = o.select == image_selection::none;
    if (none && !o.image_tokens.empty())
        bad_arg("select = image_selection::none (no image token) but image_tokens holds " + std::to_string(o.image_tokens.size()) +
                " ids");
    if (none && (!o.ulysses || o.ulysses.rank_tokens.empty()))
        bad_arg("select = image_selection::none: a forward of zero image tokens runs only under ulysses with rank_tokens "
                "(a rank whose share of the others' token subset is empty)");
    int active = tokens_all;
    if (none) {
        active = 0;
        check_size("velocity (token rows)", velocity.size(), 0);
    } else if (!o.image_tokens.empty()) {
        active = check_token_list([] { return "image_tokens"; }, "", o.image_tokens, in.batch, tokens_all);
        if (!o.kv && !o.ulysses) bad_arg("a token-subset forward (image_tokens set) needs a kv_cache (options.kv is null)");
        check_size("velocity (token rows)", velocity.size(), B * active * P);
    } else {
        check_size("velocity", velocity.size(), B * tokens_all * P);
    }
    if (o.ulysses) {
        const head_exchange& u = o.ulysses;
        const std::string P = std::to_string(u.ranks);
        if (u.ranks < 1) bad_arg("ulysses.ranks = " + P + " must be >= 1");
        if (u.rank < 0 || u.rank >= u.ranks)
            bad_arg("ulysses.rank = " + std::to_string(u.rank) + " is outside [0, ranks = " + P + ")");
        if (heads % u.ranks != 0)
            bad_arg("ulysses: heads = " + std::to_string(heads) + " do not split over ranks = " + P +
                    " (heads % ranks must be 0)");
        if (o.kv_exchange)
            bad_arg("ulysses: kv_exchange must be unset (the head exchange brings every computed token's keys and values)");
        if (u.rank_tokens.empty()) {
            if (tokens_all % u.ranks != 0)
                bad_arg("ulysses: image tokens = " + std::to_string(tokens_all) + " do not split over ranks = " + P +
                        " (tokens % ranks must be 0 for equal shards; pick a size that does, or pass rank_tokens)");
            const int per = tokens_all / u.ranks, begin = u.rank * per;
            bool shard = active == per;
            for (int b = 0; shard && b < in.batch; ++b)
                for (int i = 0; shard && i < per; ++i)
                    shard = (o.image_tokens.empty() ? i : o.image_tokens[static_cast<std::size_t>(b) * per + i]) == begin + i;
            if (!shard)
                bad_arg("ulysses: image_tokens must be this rank's shard [" + std::to_string(begin) + ", " +
                        std::to_string(begin + per) + ") of every sample (" + std::to_string(active) +
                        " tokens given); a token subset under ulysses needs ulysses.rank_tokens (every rank's list)");
        } else {
            validate_rank_tokens(in, o, tokens_all);
        }
    }
    if (o.kv_exchange && !o.kv) bad_arg("kv_exchange needs a kv_cache (options.kv is null)");
    if (o.kv) {
        const int hidden = o.ulysses ? D / o.ulysses.ranks : D;  // Ulysses: the rank's heads
        if (o.kv->layers() != blocks() || o.kv->hidden() != hidden)
            bad_arg("kv_cache has " + std::to_string(o.kv->layers()) + " layers x hidden " + std::to_string(o.kv->hidden()) +
                    ", model needs " + std::to_string(blocks()) + " x " + std::to_string(hidden) +
                    (o.ulysses ? " (ulysses: the rank's heads, kv_cache(net, batch, tokens, ranks = " + std::to_string(o.ulysses.ranks) + "))"
                               : std::string()));
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

// ulysses.rank_tokens: one list per rank, each ascending ids per sample (possibly none), disjoint across ranks, this
// rank's the call's image_tokens; without a kv_cache every token in rank order (the keys are the exchanged rows).
void transformer::impl::validate_rank_tokens(const forward_inputs& in, const forward_options& o, int tokens_all) const {
    const head_exchange& u = o.ulysses;
    if (!u.all_to_all_v) bad_arg("ulysses.rank_tokens needs ulysses.all_to_all_v (an all-to-all with per-rank counts)");
    if (u.rank_tokens.size() != static_cast<std::size_t>(u.ranks))
        bad_arg("ulysses.rank_tokens has " + std::to_string(u.rank_tokens.size()) + " lists, expected one per rank (ranks = " +
                std::to_string(u.ranks) + ")");
    for (int r = 0; r < u.ranks; ++r) {
        const auto name = [r] { return "ulysses.rank_tokens[" + std::to_string(r) + "]"; };
        check_token_list(name, "", u.rank_tokens[static_cast<std::size_t>(r)], in.batch, tokens_all, true);
    }
    const auto& mine = u.rank_tokens[static_cast<std::size_t>(u.rank)];
    if (o.select == image_selection::none) {
        if (!mine.empty())
            bad_arg("select = image_selection::none, but ulysses.rank_tokens[" + std::to_string(u.rank) + "] (this rank's) holds " +
                    std::to_string(mine.size()) + " ids");
    } else if (o.image_tokens.empty()) {
        bad_arg("ulysses.rank_tokens is set: image_tokens must be this rank's list (or select = image_selection::none when it is "
                "empty), got every token");
    } else if (!std::equal(mine.begin(), mine.end(), o.image_tokens.begin(), o.image_tokens.end())) {
        bad_arg("image_tokens (" + std::to_string(o.image_tokens.size()) + " ids) differ from ulysses.rank_tokens[" +
                std::to_string(u.rank) + "] (" + std::to_string(mine.size()) + "), this rank's list");
    }
    // disjoint, and (without a cache) every token in rank order
    for (int b = 0; b < in.batch; ++b) {
        std::fill_n(token_seen.begin(), tokens_all, std::uint8_t{0});
        int next = 0;
        bool in_order = true;
        for (int r = 0; r < u.ranks; ++r) {
            const auto& list = u.rank_tokens[static_cast<std::size_t>(r)];
            const std::size_t m = list.size() / static_cast<std::size_t>(in.batch);
            for (std::size_t i = 0; i < m; ++i) {
                const std::int32_t t = list[static_cast<std::size_t>(b) * m + i];
                if (token_seen[static_cast<std::size_t>(t)])
                    bad_arg("ulysses.rank_tokens: token " + std::to_string(t) + " of sample " + std::to_string(b) +
                            " is in two ranks' lists (rank " + std::to_string(r) + " and an earlier one)");
                token_seen[static_cast<std::size_t>(t)] = 1;
                in_order = in_order && t == next++;
            }
        }
        if (!o.kv && !(in_order && next == tokens_all))
            bad_arg("ulysses.rank_tokens: a token subset (" + std::to_string(next) + " of " + std::to_string(tokens_all) +
                    " tokens of sample " + std::to_string(b) + ", or not in rank order) reads the other tokens' keys and values "
                    "from a kv_cache of the rank's heads (options.kv is null)");
    }
    if (!o.blocks.empty() && o.select == image_selection::none)
        for (int l = 0; l < blocks(); ++l)
            if (o.blocks[static_cast<std::size_t>(l)].mlp[0].mode == module_mode::subset)
                bad_arg("blocks[" + std::to_string(l) + "].mlp[image]: mode subset with select = image_selection::none (no image token)");
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

}  // namespace sd3
