// The K/V cache: sd3::kv_cache (every layer's image-token keys and values, kept across forwards so a token-subset
// forward attends to all tokens), the per-head packing of keys and values the attention's products read, and
// store_kv, which refreshes the cache with the tokens a forward computed (and, sequence-parallel, calls the
// caller's K/V exchange).
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

namespace {
// The hidden width of one Ulysses rank's cache: its heads / head_ranks heads (refused by name when they do not split).
int hidden_share(const transformer& net, int head_ranks) {
    const int heads = net.arch() == architecture::sd3 ? net.config().num_attention_heads : net.flux().num_attention_heads;
    if (head_ranks < 1 || heads % head_ranks != 0)
        throw std::invalid_argument(message("kv_cache: head_ranks = ", head_ranks, " does not split heads = ", heads,
                                            " (head_ranks >= 1 and heads % head_ranks == 0)"));
    return net.hidden() / head_ranks;
}
}  // namespace

kv_cache::kv_cache(const transformer& net, int max_batch, int max_image_tokens, int head_ranks)
    : kv_cache(net.blocks(), hidden_share(net, head_ranks),
               net.arch() == architecture::sd3 ? net.config().dual_attention_layers : std::vector<int>{}, max_batch,
               max_image_tokens) {}

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
    if (opts->kv_exchange) opts->kv_exchange(layer, kind, *opts->kv);  // sequence parallel: the other ranks' rows
}

}  // namespace sd3
